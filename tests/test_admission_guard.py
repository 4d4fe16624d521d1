"""The admission guard the stack deploys: which policies, bound to which
namespaces, exempting whom; and how the stack learns who deploys it.

What the policies refuse and admit is shown on a real API server in
tests/engine/test_admission_guard.py; here, what a reader of the render sees.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builders.admission import (
    DEPLOYER_PLACEHOLDER,
    cel_string,
    opening_egress_rules,
    opening_ingress_rules,
    policy_names,
)
from builders.names import StackNames
from components.admission_guard import (
    OWN_POLICY_NAME,
    default_username,
    deployer_username,
    opening_policies,
    shared_identity_warning,
)
from config import ClusterConfig, parse_config
from devtools.mockstack import PROJECT, Evaluation, evaluate
from preflight import OFFLINE_ENV, PreflightError
from tests.stacks import dev, dev_config, kube_objects, pinned, pinned_config, with_config

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


# NetworkPolicies a namespace admin (or a Helm chart) might add, written for
# namespaces `w.protected` and `w.relay`. The engine tests apply the same
# cases to a real API server, so the CEL rule and its Python mirror
# (opening_egress_rules) are held to one verdict.


@dataclass(frozen=True)
class Where:
    protected: str
    relay: str


def network_policy(name: str, namespace: str, **spec: Any) -> Manifest:
    policy_types = spec.pop("policyTypes", [t for t in ("Ingress", "Egress") if t.lower() in spec])
    body = {"podSelector": {}, **spec}
    if policy_types is not None:
        body["policyTypes"] = policy_types
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def ns_named(name: str) -> Manifest:
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


def dns_rule() -> Manifest:
    return {
        "to": [{"namespaceSelector": ns_named("kube-system"), "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def relay_rule(relay: str, ports: list[Manifest] | None = None) -> Manifest:
    rule: Manifest = {"to": [{"namespaceSelector": ns_named(relay)}]}
    rule["ports"] = (
        ports if ports is not None else [{"protocol": "TCP", "port": 1080}, {"protocol": "TCP", "port": 3128}]
    )
    return rule


# Extra policies a namespace admin (or a Helm chart) might add: each would
# open egress around the relay.
OPENING: dict[str, Any] = {
    "allow-all-egress": lambda s: {"egress": [{}]},
    "no-policy-types-allow-all": lambda s: {"egress": [{}], "policyTypes": None},
    "ipblock-everywhere": lambda s: {"egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]},
    "ipblock-ipv6-everywhere": lambda s: {"egress": [{"to": [{"ipBlock": {"cidr": "::/0"}}]}]},
    "dns-by-ip": lambda s: {
        "egress": [{"to": [{"ipBlock": {"cidr": "10.43.0.10/32"}}], "ports": [{"protocol": "UDP", "port": 53}]}]
    },
    "another-namespace": lambda s: {"egress": [{"to": [{"namespaceSelector": ns_named("kube-public")}]}]},
    "every-namespace-port-53": lambda s: {
        "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53}]}]
    },
    "kube-system-port-443": lambda s: {
        "egress": [{"to": [{"namespaceSelector": ns_named("kube-system")}], "ports": [{"port": 443}]}]
    },
    "kube-system-any-port": lambda s: {"egress": [{"to": [{"namespaceSelector": ns_named("kube-system")}]}]},
    # Issue 19, point 7: port 53 of any kube-system pod (k3s's service load balancers live there) is no DNS.
    "kube-system-any-pod-port-53": lambda s: {
        "egress": [{"to": [{"namespaceSelector": ns_named("kube-system")}], "ports": [{"protocol": "UDP", "port": 53}]}]
    },
    "kube-system-other-pods-port-53": lambda s: {
        "egress": [
            {
                "to": [
                    {
                        "namespaceSelector": ns_named("kube-system"),
                        "podSelector": {"matchLabels": {"svccontroller.k3s.cattle.io/svcname": "exposed"}},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 53}],
            }
        ]
    },
    "kube-dns-and-more-port-53": lambda s: {
        "egress": [
            {
                "to": [
                    {
                        "namespaceSelector": ns_named("kube-system"),
                        "podSelector": {
                            "matchExpressions": [{"key": "k8s-app", "operator": "In", "values": ["kube-dns", "svclb"]}]
                        },
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}],
            }
        ]
    },
    "relay-namespace-any-port": lambda s: {"egress": [relay_rule(s.relay, [])]},
    "relay-namespace-port-22": lambda s: {"egress": [relay_rule(s.relay, [{"port": 22}])]},
    "relay-namespace-port-range": lambda s: {
        "egress": [relay_rule(s.relay, [{"protocol": "TCP", "port": 1080, "endPort": 3128}])]
    },
    "relay-namespace-named-port": lambda s: {"egress": [relay_rule(s.relay, [{"port": "socks5"}])]},
    "relay-namespace-udp": lambda s: {"egress": [relay_rule(s.relay, [{"protocol": "UDP", "port": 1080}])]},
    "namespace-by-expression": lambda s: {
        "egress": [
            {
                "to": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [
                                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}
                            ]
                        }
                    }
                ]
            }
        ]
    },
    "own-pods-and-an-ipblock": lambda s: {
        "egress": [{"to": [{"podSelector": {}}, {"ipBlock": {"cidr": "192.168.0.0/16"}}]}]
    },
    # Inert while policyTypes says Ingress only, and refused all the same (see builders/admission.py).
    "ingress-typed-with-open-egress": lambda s: {"egress": [{}], "policyTypes": ["Ingress"]},
}

# What a namespace's own work needs: admitted.
ORDINARY: dict[str, Any] = {
    "ingress-only": lambda s: {"ingress": [{"from": [{"podSelector": {}}]}]},
    "deny-all-ingress": lambda s: {"policyTypes": ["Ingress"]},
    "deny-all-egress": lambda s: {"egress": []},
    "egress-to-own-pods": lambda s: {"egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]},
    "egress-to-own-namespace-by-name": lambda s: {"egress": [{"to": [{"namespaceSelector": ns_named(s.protected)}]}]},
    "the-stacks-own-rules-again": lambda s: {
        "egress": [relay_rule(s.relay), dns_rule(), {"to": [{"podSelector": {}}]}]
    },
    "one-relay-port": lambda s: {"egress": [relay_rule(s.relay, [{"port": 3128}])]},
}


# Ingress to a protected namespace (issue 19, point 8): a policy there admits
# only the namespace's own pods and those of cluster.ingressFrom. The engine
# tests apply the same cases to a real API server.
INGRESS_SOURCE = "ingress-controllers"

OPENING_INGRESS: dict[str, Any] = {
    "allow-all-ingress": lambda s: {"ingress": [{}]},
    "a-port-from-anywhere": lambda s: {"ingress": [{"ports": [{"protocol": "TCP", "port": 8080}]}]},
    "every-namespace": lambda s: {"ingress": [{"from": [{"namespaceSelector": {}}]}]},
    "another-namespace": lambda s: {"ingress": [{"from": [{"namespaceSelector": ns_named("kube-public")}]}]},
    "the-lan": lambda s: {"ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}]}]},
    "the-node": lambda s: {"ingress": [{"from": [{"podSelector": {}}, {"ipBlock": {"cidr": "10.42.0.1/32"}}]}]},
    "the-source-and-more-by-expression": lambda s: {
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/metadata.name",
                                    "operator": "In",
                                    "values": [INGRESS_SOURCE, "x"],
                                }
                            ]
                        }
                    }
                ]
            }
        ]
    },
    "egress-typed-with-open-ingress": lambda s: {"ingress": [{}], "policyTypes": ["Egress"]},
}

ORDINARY_INGRESS: dict[str, Any] = {
    "own-pods": lambda s: {"ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]},
    "own-namespace-by-name": lambda s: {"ingress": [{"from": [{"namespaceSelector": ns_named(s.protected)}]}]},
    "the-ingress-source": lambda s: {
        "ingress": [
            {
                "from": [{"namespaceSelector": ns_named(INGRESS_SOURCE), "podSelector": {}}],
                "ports": [{"protocol": "TCP", "port": 8080}],
            }
        ]
    },
}

# Services in a protected namespace: refused, and admitted.
EXPOSED_SERVICES: dict[str, Manifest] = {
    "external-ips": {"externalIPs": ["203.0.113.10"]},
    "node-port": {"type": "NodePort"},
    "load-balancer": {"type": "LoadBalancer"},
}
CLUSTER_SERVICES: dict[str, Manifest] = {
    "cluster-ip": {},
    "headless": {"clusterIP": "None"},
    "external-name": {"type": "ExternalName", "externalName": "example.com"},
}


def service(name: str, namespace: str, **spec: Any) -> Manifest:
    body = {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}], **spec}
    if spec.get("type") == "ExternalName":
        del body["selector"]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": body}


class TestWhatIsDeployed:
    def test_four_policies_each_bound_to_deny(self) -> None:
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

    @pytest.mark.parametrize(
        ("which", "extra"), [(1, ["tailscale-egress-node-guard"]), (2, [])], ids=["stack-objects", "stack-data"]
    )
    def test_stack_objects_guards_bind_the_protected_and_relay_namespaces(self, which: int, extra: list[str]) -> None:
        # The node guard's DaemonSet is a stack object with a spec (issue 19, point 9).
        objects = guard(pinned())[f"{BINDING}/{policy_names(prefix('pinned'))[which]}"]
        assert namespaces_selected(objects) == sorted(["default", "tailscale-egress", "team-a", "team-b", *extra])

    def test_the_node_guards_namespace_has_pods_of_its_daemonset_alone_and_no_exec(self) -> None:
        """Issue 19, point 9: the one privileged namespace is guarded too."""
        found = guard(pinned())
        pods_name, exec_name = policy_names(prefix("pinned"))[4:6]
        for name in (pods_name, exec_name):
            assert namespaces_selected(found[f"{BINDING}/{name}"]) == ["tailscale-egress-node-guard"]
        pods = found[f"{VAP}/{pods_name}"]["spec"]
        assert [r["resources"] for r in pods["matchConstraints"]["resourceRules"]] == [
            ["pods"],
            ["pods/ephemeralcontainers"],
        ]
        (check,) = pods["validations"]
        assert "system:serviceaccount:kube-system:daemon-set-controller" in check["expression"]
        assert "object.spec == oldObject.spec" in check["expression"]  # no image swapped in place
        exec_rules = found[f"{VAP}/{exec_name}"]["spec"]["matchConstraints"]["resourceRules"]
        assert exec_rules == [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CONNECT"],
                "resources": ["pods/attach", "pods/exec", "pods/portforward"],
            }
        ]
        objects = found[f"{VAP}/{policy_names(prefix('pinned'))[1]}"]["spec"]
        assert (
            "request.namespace == \"tailscale-egress-node-guard\" ? request.resource.resource == 'daemonsets'"
            in (objects["validations"][0]["expression"])
        )

    def test_label_guard_covers_the_protected_and_relay_namespaces_by_name(self) -> None:
        labels = guard(pinned())[f"{BINDING}/{policy_names(prefix('pinned'))[3]}"]
        (rule,) = labels["spec"]["matchResources"]["resourceRules"]
        # The status and finalize subresources save a namespace's labels too (issue 19, point 6).
        assert rule["resources"] == ["namespaces", "namespaces/finalize", "namespaces/status"]
        assert rule["resourceNames"] == ["default", "tailscale-egress", "team-a", "team-b"]

    def test_a_stack_that_turns_the_guard_off_deploys_none(self) -> None:
        off = evaluated(with_config(pinned_config(), "cluster", admissionGuard=False), "off")
        assert guard(off) == {}
        assert [r.type for r in off.resources if "AdmissionGuard" in r.type] == []


class TestWhoIsExempt:
    def test_the_configured_deployer_is_written_into_every_exemption(self) -> None:
        user = 'oidc:Dev "Ops"\\x'
        found = guard(evaluated(with_config(pinned_config(), "cluster", deployer=user), "who"))
        # The Services policy exempts nobody: the stack writes no Service in a protected namespace.
        services = policy_names(prefix("who"))[6]
        assert "matchConditions" not in found[f"{VAP}/{services}"]["spec"]
        policies = [o for key, o in found.items() if key.startswith(f"{VAP}/") and key != f"{VAP}/{services}"]
        assert len(policies) == 6
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
            ' && object.metadata.name == "tailscale-egress-only-via-relay")'
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


class TestTheDeployerIsNotTheEverydayIdentity:
    """Issue 19, point 11: on a single-identity laptop the deployer's
    exemption covers every kubectl and Helm command of its user."""

    def fake_kubectl(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, username: str | None) -> None:
        kubectl = tmp_path / "kubectl"
        review = json.dumps({"kind": "SelfSubjectReview", "status": {"userInfo": {"username": username}}})
        body = f"echo '{review}'" if username else "echo 'error: no configuration' >&2; exit 1"
        kubectl.write_text(f"#!/bin/sh\n{body}\n")
        kubectl.chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))

    def test_kubectls_own_identity_is_read_from_its_current_context(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.fake_kubectl(tmp_path, monkeypatch, "rancher")
        assert default_username() == "rancher"

    def test_no_everyday_identity_to_compare_is_no_warning(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.fake_kubectl(tmp_path, monkeypatch, None)
        assert default_username() is None
        assert shared_identity_warning("rancher", None) is None
        monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
        assert default_username() is None

    def test_the_same_identity_is_warned_about_with_why_and_the_remedy(self) -> None:
        warning = shared_identity_warning("rancher", "rancher")
        assert warning is not None
        assert "the stack deploys as 'rancher', the identity kubectl uses by default" in warning
        assert "a chart that sets pod-security.kubernetes.io/enforce: privileged on a protected namespace passes" in (
            warning
        )
        assert "pulumi config set --path cluster.context <that context>" in warning
        assert shared_identity_warning("deployer", "rancher") is None


class TestConfig:
    @pytest.mark.parametrize("bad", ["", "  alice", "alice "])
    def test_a_blank_or_padded_deployer_is_refused_naming_the_key(self, bad: str) -> None:
        result = evaluate(with_config(dev_config(), "cluster", deployer=bad), "bad")
        assert result.error is not None and result.resources == []
        assert f"tailscale-egress:cluster.deployer = {bad!r}: must be a Kubernetes username" in str(result.error)

    def test_the_guard_is_on_and_asks_who_deploys_by_default(self) -> None:
        cluster = parse_config({}).cluster
        assert (cluster.admission_guard, cluster.deployer) == (True, None)


class TestPoliciesThatExistBeforeTheGuard:
    """Admission judges only what is written after it: the preflight finds
    open policies already in a protected namespace with the same rule."""

    WHERE = Where(protected="team-a", relay="tailscale-egress")

    @pytest.mark.parametrize("case", sorted(OPENING))
    def test_each_opening_policy_is_found(self, case: str) -> None:
        policy = network_policy(case, "team-a", **OPENING[case](self.WHERE))
        assert opening_egress_rules(policy, "tailscale-egress", (1080, 3128)) != []

    @pytest.mark.parametrize("case", sorted(ORDINARY))
    def test_each_ordinary_policy_passes(self, case: str) -> None:
        policy = network_policy(case, "team-a", **ORDINARY[case](self.WHERE))
        assert opening_egress_rules(policy, "tailscale-egress", (1080, 3128)) == []

    @pytest.mark.parametrize("case", sorted(OPENING_INGRESS))
    def test_each_policy_opening_ingress_is_found(self, case: str) -> None:
        policy = network_policy(case, "team-a", **OPENING_INGRESS[case](self.WHERE))
        assert opening_ingress_rules(policy, (INGRESS_SOURCE,)) != []

    @pytest.mark.parametrize("case", sorted(ORDINARY_INGRESS))
    def test_each_ordinary_ingress_policy_passes(self, case: str) -> None:
        policy = network_policy(case, "team-a", **ORDINARY_INGRESS[case](self.WHERE))
        assert opening_ingress_rules(policy, (INGRESS_SOURCE,)) == []

    def test_ingress_from_the_source_is_found_once_it_leaves_cluster_ingress_from(self) -> None:
        policy = network_policy("web", "team-a", **ORDINARY_INGRESS["the-ingress-source"](self.WHERE))
        assert opening_ingress_rules(policy, ()) == [0]

    def test_the_preflight_names_an_ingress_rule_and_the_key_that_admits_its_source(self) -> None:
        cluster = ClusterConfig(protectedNamespaces=["team-a"])  # type: ignore[call-arg]
        web = network_policy("web", "team-a", ingress=[{"from": [{"namespaceSelector": ns_named("traefik")}]}])
        assert opening_policies(cluster, [web]) == [
            'NetworkPolicy team-a/web: ingress[0] = {"from": [{"namespaceSelector": {"matchLabels":'
            ' {"kubernetes.io/metadata.name": "traefik"}}}]}'
        ]
        admitted = ClusterConfig(protectedNamespaces=["team-a"], ingressFrom=["traefik"])  # type: ignore[call-arg]
        assert opening_policies(admitted, [web]) == []

    def test_the_preflight_names_the_namespace_the_policy_and_the_rule(self) -> None:
        cluster = ClusterConfig(protectedNamespaces=["team-a"])  # type: ignore[call-arg]
        chart = network_policy("chart", "team-a", egress=[{"to": [{"podSelector": {}}]}, {}])
        assert opening_policies(cluster, [chart]) == ["NetworkPolicy team-a/chart: egress[1] = {}"]

    def test_the_stacks_own_policy_and_unprotected_namespaces_are_not_its_business(self) -> None:
        cluster = ClusterConfig(protectedNamespaces=["team-a"])  # type: ignore[call-arg]
        own = network_policy(OWN_POLICY_NAME, "team-a", egress=[{}])
        elsewhere = network_policy("open", "team-b", egress=[{}])
        assert opening_policies(cluster, [own, elsewhere]) == []
