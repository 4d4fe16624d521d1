"""The tailnet side: keys with the right powers, the exit node approved as
code, and the policy file left alone unless the stack is asked to manage it."""

from __future__ import annotations

import json
import time
from typing import Any

from builders.tailnet_policy import merged_policy, policy_problems
from components.tailnet_access import relay_key_generation
from devtools.mockstack import PERMISSIVE_POLICY, FakeProviders, evaluate
from tests.stacks import dev, dev_config, kube_objects, with_config

KEY = "tailscale:index/tailnetKey:TailnetKey"


def key_inputs(name: str) -> dict[str, Any]:
    inputs: dict[str, Any] = dev().one(KEY, name).plain()
    return inputs


def test_exit_node_key_is_single_use_ephemeral_preauthorized_and_short_lived() -> None:
    key = key_inputs("tailnet-exit-node-key")
    assert key["tags"] == ["tag:egress-exit"]
    assert (key["reusable"], key["ephemeral"], key["preauthorized"]) == (False, True, True)
    assert isinstance(key["expiry"], int) and 300 <= key["expiry"] <= 86400
    # A spent single-use key must not be re-minted: that would replace the VM.
    assert key["recreateIfInvalid"] == "never"


def test_relay_key_is_reusable_ephemeral_preauthorized_and_lives_a_week() -> None:
    key = key_inputs("tailnet-relay-key")
    assert key["tags"] == ["tag:egress-relay"]
    assert (key["reusable"], key["ephemeral"], key["preauthorized"]) == (True, True, True)
    assert key["expiry"] == 7 * 24 * 3600
    assert key["recreateIfInvalid"] == "always"


def test_relay_key_lifetime_is_configurable() -> None:
    evaluation = evaluate(with_config(dev_config(), "tailnet", relayKeyExpiryHours=24), "short")
    assert evaluation.error is None, evaluation.error
    assert evaluation.one(KEY, "tailnet-relay-key").plain()["expiry"] == 24 * 3600


def test_relay_key_is_renewed_once_half_its_lifetime_has_passed() -> None:
    week = 7 * 24 * 3600
    start = 1_800_000_000 - 1_800_000_000 % (week // 2)
    assert relay_key_generation(start, week) == relay_key_generation(start + week // 2 - 1, week)
    assert relay_key_generation(start + week // 2, week) == relay_key_generation(start, week) + 1
    # The generation is in the key's description, which replaces the key when it changes.
    key = key_inputs("tailnet-relay-key")
    assert key["description"].endswith(f" relay g{relay_key_generation(time.time(), week)}")
    assert len(key["description"]) <= 50


def test_long_stack_names_keep_the_key_generation_whole() -> None:
    evaluation = evaluate(dev_config(), "a-developer-stack-with-a-very-long-name-indeed")
    assert evaluation.error is None, evaluation.error
    description = evaluation.one(KEY, "tailnet-relay-key").plain()["description"]
    assert len(description) <= 50
    assert description.endswith(f" relay g{relay_key_generation(time.time(), 7 * 24 * 3600)}")


def test_the_exit_routes_are_approved_through_the_api() -> None:
    (routes,) = dev().of_type("tailscale:index/deviceSubnetRoutes:DeviceSubnetRoutes")
    inputs = routes.plain()
    assert sorted(inputs["routes"]) == ["0.0.0.0/0", "::/0"]
    assert inputs["deviceId"].startswith("n") and inputs["deviceId"].endswith("CNTRL")


def test_the_relay_uses_the_approved_exit_node_by_its_tailnet_ip() -> None:
    (deployment,) = kube_objects(dev(), "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    args = env["TS_EXTRA_ARGS"].split()
    assert f"--exit-node={dev().outputs['exitNodeTailnetIp']}" in args
    assert "--exit-node-allow-lan-access=false" in args
    assert dev().outputs["exitNodeTailnetIp"].startswith("100.")


def test_the_policy_file_is_not_touched_by_default() -> None:
    assert not dev().of_type("tailscale:index/acl:Acl")


def test_managing_the_policy_adds_our_entries_and_keeps_the_rest() -> None:
    existing = {**PERMISSIVE_POLICY, "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:server:22"]}]}
    config = with_config(dev_config(), "tailnet", managePolicy=True)
    evaluation = evaluate(config, "managed", fakes=FakeProviders(policy=existing))
    assert evaluation.error is None, evaluation.error
    (acl,) = evaluation.of_type("tailscale:index/acl:Acl")
    policy = json.loads(acl.plain()["acl"])
    assert policy["acls"] == existing["acls"]
    assert policy["autoApprovers"] == {"exitNode": ["tag:egress-exit"]}
    assert policy_problems(policy, "tag:egress-exit", "tag:egress-relay") == []
    # Keys are minted only once the policy that owns their tags is in place.
    for key in evaluation.of_type(KEY):
        assert acl.urn in key.dependencies


def test_managing_the_policy_works_on_a_deny_all_tailnet_policy() -> None:
    # An empty policy file ({}) is allow-all, and refused (tests/test_tailnet_policy.py);
    # empty rule lists allow nothing.
    config = with_config(dev_config(), "tailnet", managePolicy=True)
    evaluation = evaluate(config, "managed", fakes=FakeProviders(policy={"acls": [], "grants": []}))
    assert evaluation.error is None, evaluation.error


def test_merging_is_idempotent() -> None:
    once = merged_policy({"grants": []}, "tag:a", "tag:b")
    assert merged_policy(once, "tag:a", "tag:b") == once
