"""The admission guard the stack deploys: which policies, bound to which
namespaces, exempting whom; and how the stack learns who deploys it.

What the policies refuse and admit is shown on a real API server in
tests/engine/test_admission_guard.py; here, what a reader of the render sees.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from builders.admission import DEPLOYER_PLACEHOLDER, cel_string, policy_names
from builders.names import StackNames
from components.admission_guard import deployer_username
from config import ClusterConfig
from preflight import OFFLINE_ENV, PreflightError
from tests.stacks import dev, dev_config, kube_objects, pinned, pinned_config, with_config
from tools.mockstack import PROJECT, Evaluation, evaluate

Manifest = dict[str, Any]
VAP = "ValidatingAdmissionPolicy"
BINDING = "ValidatingAdmissionPolicyBinding"


def guard(evaluation: Evaluation) -> dict[str, Manifest]:
    objects = kube_objects(evaluation, VAP) + kube_objects(evaluation, BINDING)
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


def prefix(stack: str) -> str:
    return StackNames.for_stack(PROJECT, stack).prefix


def evaluated(config: dict[str, Any], stack: str) -> Evaluation:
    result = evaluate(config, stack, secret_keys=("tailscale-egress:relayAuthKey",))
    assert result.error is None, result.error
    return result


def namespaces_selected(binding: Manifest) -> list[str]:
    (expression,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert (expression["key"], expression["operator"]) == ("kubernetes.io/metadata.name", "In")
    return list(expression["values"])


class TestWhatIsDeployed:
    def test_three_policies_each_bound_to_deny(self) -> None:
        found = guard(dev())
        names = policy_names(prefix("dev"))
        assert sorted(found) == sorted([f"{VAP}/{n}" for n in names] + [f"{BINDING}/{n}" for n in names])
        for name in names:
            assert found[f"{VAP}/{name}"]["spec"]["failurePolicy"] == "Fail"
            binding = found[f"{BINDING}/{name}"]["spec"]
            assert binding["policyName"] == name
            assert binding["validationActions"] == ["Deny"]

    def test_names_carry_the_stack_so_two_stacks_in_one_cluster_do_not_collide(self) -> None:
        alice, bob = (evaluated(dev_config(), s) for s in ("alice", "bob"))
        assert set(guard(alice)).isdisjoint(guard(bob))
        assert all(prefix("alice") in key for key in guard(alice))

    def test_egress_guard_binds_the_protected_namespaces_only(self) -> None:
        egress = guard(pinned())[f"{BINDING}/{policy_names(prefix('pinned'))[0]}"]
        assert namespaces_selected(egress) == ["default", "team-a", "team-b"]

    def test_stack_objects_guard_binds_the_protected_and_relay_namespaces(self) -> None:
        objects = guard(pinned())[f"{BINDING}/{policy_names(prefix('pinned'))[1]}"]
        assert namespaces_selected(objects) == ["default", "tailscale-egress", "team-a", "team-b"]

    def test_label_guard_covers_the_protected_and_relay_namespaces_by_name(self) -> None:
        labels = guard(pinned())[f"{BINDING}/{policy_names(prefix('pinned'))[2]}"]
        (rule,) = labels["spec"]["matchResources"]["resourceRules"]
        assert rule["resources"] == ["namespaces"]
        assert rule["resourceNames"] == ["default", "tailscale-egress", "team-a", "team-b"]

    def test_a_stack_that_turns_the_guard_off_deploys_none(self) -> None:
        off = evaluated(with_config(pinned_config(), "cluster", admissionGuard=False), "off")
        assert guard(off) == {}
        assert [r.type for r in off.resources if "AdmissionGuard" in r.type] == []


class TestWhoIsExempt:
    def test_the_configured_deployer_is_written_into_every_exemption(self) -> None:
        user = 'oidc:Dev "Ops"\\x'
        found = guard(evaluated(with_config(pinned_config(), "cluster", deployer=user), "who"))
        policies = [o for key, o in found.items() if key.startswith(f"{VAP}/")]
        for policy in policies:
            conditions = " ".join(c["expression"] for c in policy["spec"]["matchConditions"])
            assert f"request.userInfo.username == {cel_string(user)}" in conditions or (
                f"request.userInfo.username != {cel_string(user)}" in conditions
            ), policy["metadata"]["name"]

    def test_a_render_without_a_deployer_shows_a_placeholder_that_matches_nobody(self) -> None:
        text = str(guard(dev()))
        assert cel_string(DEPLOYER_PLACEHOLDER) in text

    def test_the_deployer_is_exempt_from_the_egress_rule_only_for_the_stacks_own_policy(self) -> None:
        # A Helm chart installed with the deployer's own credentials must still be refused.
        egress = guard(pinned())[f"{VAP}/{policy_names(prefix('pinned'))[0]}"]
        (own, *_) = egress["spec"]["matchConditions"]
        assert own["expression"] == (
            f"!(request.userInfo.username == {cel_string(DEPLOYER_PLACEHOLDER)}"
            ' && request.name == "tailscale-egress-only-via-relay")'
        )


class TestCelString:
    @pytest.mark.parametrize(
        ("text", "literal"),
        [
            ("system:admin", '"system:admin"'),
            ('a"b', '"a\\"b"'),
            ("a\\b", '"a\\\\b"'),
            ("a\nb", '"a\\x0ab"'),
            ("zoë", '"zoë"'),
        ],
    )
    def test_any_username_is_written_as_exactly_one_cel_string(self, text: str, literal: str) -> None:
        assert cel_string(text) == literal

    def test_a_lone_surrogate_is_refused(self) -> None:
        with pytest.raises(ValueError, match="surrogate"):
            cel_string("a\udc80")


KUBECTL = shutil.which("kubectl")


class TestWhoDeploys:
    """`deployer_username` asks the API server through the real kubectl."""

    def test_the_configured_deployer_is_used_without_asking(self) -> None:
        assert deployer_username(ClusterConfig(deployer="alice")) == "alice"

    def test_a_render_asks_nobody(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(OFFLINE_ENV, "1")
        assert deployer_username(ClusterConfig()) == DEPLOYER_PLACEHOLDER

    def test_without_kubectl_the_error_names_the_key_and_the_fix(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setenv(OFFLINE_ENV, "0")
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(PreflightError) as err:
            deployer_username(ClusterConfig())
        message = str(err.value)
        assert "tailscale-egress:cluster.deployer is not set, and kubectl is not on PATH" in message
        assert "pulumi config set --path cluster.deployer <username>" in message
        assert "cluster.admissionGuard false" in message

    def test_an_unreachable_api_server_is_a_clear_error(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        if KUBECTL is None:
            if os.environ.get("CI") == "true":
                pytest.fail("kubectl is not installed")
            pytest.skip(
                "kubectl is not installed: apt-get install kubectl (or see https://kubernetes.io/docs/tasks/tools/)"
            )
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
            "users: [{name: u, user: {token: t}}]\n"
            "contexts: [{name: nowhere, context: {cluster: c, user: u}}]\n"
        )
        monkeypatch.setenv(OFFLINE_ENV, "0")
        with pytest.raises(PreflightError) as err:
            deployer_username(ClusterConfig(context="nowhere", kubeconfig=str(kubeconfig)))
        message = str(err.value)
        assert f"`kubectl auth whoami --output json --context nowhere --kubeconfig {kubeconfig}` failed" in message
        assert "127.0.0.1:1" in message
        assert "pulumi config set --path cluster.deployer <username>" in message


class TestConfig:
    @pytest.mark.parametrize("bad", ["", "  alice", "alice "])
    def test_a_blank_or_padded_deployer_is_refused_naming_the_key(self, bad: str) -> None:
        result = evaluate(with_config(dev_config(), "cluster", deployer=bad), "bad")
        assert result.error is not None and result.resources == []
        assert f"tailscale-egress:cluster.deployer = {bad!r}: must be a Kubernetes username" in str(result.error)

    def test_the_example_stack_spells_out_both_keys_at_their_defaults(self) -> None:
        cluster = dev_config()["tailscale-egress:cluster"]
        assert (cluster["admissionGuard"], cluster["deployer"]) == (True, None)
