"""The tailnet side: keys with the right powers, the exit node approved as
code, and the policy file left alone unless the stack is asked to manage it."""

from __future__ import annotations

import json
from typing import Any

from builders.tailnet_policy import merged_policy, policy_problems
from tests.stacks import dev, dev_config, kube_objects, with_config
from tools.mockstack import PERMISSIVE_POLICY, FakeProviders, evaluate

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


def test_relay_key_is_reusable_ephemeral_and_preauthorized() -> None:
    key = key_inputs("tailnet-relay-key")
    assert key["tags"] == ["tag:egress-relay"]
    assert (key["reusable"], key["ephemeral"], key["preauthorized"]) == (True, True, True)
    assert key["recreateIfInvalid"] == "always"


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
    existing = {**PERMISSIVE_POLICY, "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["*:22"]}]}
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


def test_managing_the_policy_works_on_an_empty_tailnet_policy() -> None:
    config = with_config(dev_config(), "tailnet", managePolicy=True)
    evaluation = evaluate(config, "managed", fakes=FakeProviders(policy={}))
    assert evaluation.error is None, evaluation.error


def test_merging_is_idempotent() -> None:
    once = merged_policy({"grants": []}, "tag:a", "tag:b")
    assert merged_policy(once, "tag:a", "tag:b") == once
