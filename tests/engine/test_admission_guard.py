"""The admission guard on a real API server (`make cluster-api`): as a user
who is admin of a protected namespace but did not deploy the stack, every
way to weaken the namespace's isolation is refused by the stack's own
policy, with its message; ordinary work still passes; the identity that
deployed the stack can still change and delete everything, and the cluster's
own controllers can still delete what the stack deleted.

The objects applied are the stack's own render (the mock engine's), for a
cluster-only stack with its own names, so that a run leaves nothing behind and
never meets another stack's guard.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from builders.admission import policy_names
from builders.names import StackNames
from builders.proxy_env import PROXY_CONFIGMAP
from builders.relay import RELAY_NAME
from components.admission_guard import OWN_POLICY_NAME, check_existing_policies, deployer_username
from components.egress_relay import AUTH_SECRET_NAME
from config import ClusterConfig
from devtools.mockstack import PROJECT, Evaluation, evaluate
from preflight import OFFLINE_ENV, PreflightError
from tests.stacks import RELAY_AUTH_KEY, cluster_only_config, kube_objects, with_config
from tests.support.apiserver import Cluster
from tests.test_admission_guard import (
    CLUSTER_SERVICES,
    EXPOSED_SERVICES,
    INGRESS_SOURCE,
    OPENING,
    OPENING_INGRESS,
    ORDINARY,
    ORDINARY_INGRESS,
    network_policy,
    service,
)

pytestmark = pytest.mark.engine

Manifest = dict[str, Any]
# The suite's API server (the `cluster` fixture, as `make cluster-api` starts
# it), or one already running whose kubeconfig TS_EGRESS_KUBECONFIG names
# (same context names).
ADMIN, ALICE = Cluster.context("admin"), Cluster.context("alice")
_SESSION: dict[str, Path] = {}
CACHE_BIN = Path(os.environ.get("TS_EGRESS_CACHE", Path.home() / ".cache" / "tailscale-egress")) / "bin"

RBAC = "rbac.authorization.k8s.io"
PSA = "pod-security.kubernetes.io"
EGRESS_REFUSED = "may allow egress only to the relay"
OBJECT_REFUSED = "belongs to tailscale-egress stack"
LABELS_REFUSED = "must stay restricted"
INGRESS_REFUSED = "may allow ingress only from pods of this namespace"


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def _kubectl_path() -> str:
    found = shutil.which("kubectl", path=f"{CACHE_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        _unavailable("kubectl is not installed: make engine-bins, or install kubectl 1.28 or later")
    assert found is not None
    return found


def _preflight_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The program's preflight as `pulumi preview` runs it: online, with the suite's kubectl first on PATH."""
    monkeypatch.setenv(OFFLINE_ENV, "0")
    monkeypatch.setenv("PATH", f"{Path(_kubectl_path()).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def kubectl(context: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_kubectl_path(), "--kubeconfig", str(_SESSION["kubeconfig"]), "--context", context, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], policy: str, message: str) -> None:
    """Refused by the stack's own policy `policy`, with its message (not by RBAC)."""
    assert result.returncode != 0, f"admitted: {result.stdout}"
    assert f"ValidatingAdmissionPolicy '{policy}' with binding '{policy}' denied request" in result.stderr, (
        result.stderr
    )
    assert message in result.stderr, result.stderr


def as_yaml(*objects: Manifest) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


@dataclass(frozen=True)
class Stack:
    prefix: str
    deployer: str
    protected: str  # the protected namespace, created by the stack
    relay: str  # the relay's namespace
    objects: list[Manifest]  # what was applied

    @property
    def egress_policy(self) -> str:
        return policy_names(self.prefix)[0]

    @property
    def services_policy(self) -> str:
        return policy_names(self.prefix)[6]

    @property
    def objects_policy(self) -> str:
        return policy_names(self.prefix)[1]

    @property
    def labels_policy(self) -> str:
        return policy_names(self.prefix)[3]

    def policy_for(self, kind: str) -> str:
        """The policy that guards the stack's objects of `kind` (kinds with data, or with a spec)."""
        return policy_names(self.prefix)[2 if kind in ("configmap", "secret") else 1]


def _guard_is_in_force(stack: Stack) -> bool:
    probe = network_policy("probe", stack.protected, egress=[{}])
    result = kubectl(ALICE, "create", "--dry-run=server", "-f", "-", stdin=as_yaml(probe))
    return result.returncode != 0 and stack.egress_policy in result.stderr


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    external = os.environ.get("TS_EGRESS_KUBECONFIG")
    if external:
        _SESSION["kubeconfig"] = Path(external)
    else:
        _SESSION["kubeconfig"] = request.getfixturevalue("cluster").kubeconfig
    if kubectl(ADMIN, "get", "--raw", "/readyz").returncode != 0:
        _unavailable(f"the API server of {_SESSION['kubeconfig']} (context {ADMIN}) does not answer")
    run = secrets.token_hex(3)
    name = f"guard-{run}"
    protected, relay = f"guard-app-{run}", f"guard-relay-{run}"
    deployer = json.loads(ok(kubectl(ADMIN, "auth", "whoami", "-o", "json")))["status"]["userInfo"]["username"]
    config = with_config(
        cluster_only_config(relay), "cluster", protectedNamespaces=[{"name": protected, "create": True}]
    )
    config = with_config(config, "cluster", deployer=deployer, ingressFrom=[INGRESS_SOURCE])
    evaluation = evaluate(config, name, secret_keys=(RELAY_AUTH_KEY,))
    assert evaluation.error is None, evaluation.error
    ours = {protected, relay}
    objects = [
        o
        for o in kube_objects(evaluation)
        if o["metadata"].get("namespace") in ours
        or (o["kind"] == "Namespace" and o["metadata"]["name"] in ours)
        or o["kind"].startswith("ValidatingAdmissionPolicy")
    ]
    s = Stack(StackNames.for_stack(PROJECT, name).prefix, deployer, protected, relay, objects)
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    rest = [o for o in objects if o["kind"] != "Namespace"]
    try:
        ok(
            kubectl(
                ADMIN, "apply", "--server-side", "--field-manager=engine-test", "-f", "-", stdin=as_yaml(*namespaces)
            )
        )
        ok(kubectl(ADMIN, "apply", "--server-side", "--field-manager=engine-test", "-f", "-", stdin=as_yaml(*rest)))
        # alice: admin of both namespaces (ClusterRole admin via RoleBinding), and
        # allowed to label namespaces, so that only the guard can stop her.
        rbac = [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "alice-admin", "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
            }
            for ns in (protected, relay)
        ] + [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": f"{name}-namespace-labeller"},
                "rules": [
                    {
                        "apiGroups": [""],
                        # The subresources too: their updates save labels as well (issue 19, point 6).
                        "resources": ["namespaces", "namespaces/status", "namespaces/finalize"],
                        "verbs": ["get", "list", "patch", "update"],
                    }
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": f"{name}-namespace-labeller"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": f"{name}-namespace-labeller",
                },
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
            },
        ]
        ok(kubectl(ADMIN, "apply", "-f", "-", stdin=as_yaml(*rbac)))
        deadline = time.monotonic() + 30
        while not _guard_is_in_force(s):
            assert time.monotonic() < deadline, "the guard did not come into force within 30 s"
            time.sleep(0.5)
        yield s
    finally:
        # Also after a failed setup: nothing of the run stays in the cluster.
        kubectl(ADMIN, "delete", "namespace", protected, relay, "--ignore-not-found", "--wait=false")
        for o in objects:
            if o["kind"].startswith("ValidatingAdmissionPolicy"):
                kubectl(ADMIN, "delete", o["kind"], o["metadata"]["name"], "--ignore-not-found")
        kubectl(ADMIN, "delete", "clusterrolebinding,clusterrole", f"{name}-namespace-labeller", "--ignore-not-found")


class TestThePolicies:
    def test_each_type_checks_cleanly_against_every_kind_it_matches(self, stack: Stack) -> None:
        # The API server checks each expression against the schema of each kind the policy matches;
        # a warning there would read as an error to whoever inspects the guard.
        for name in policy_names(stack.prefix):
            deadline = time.monotonic() + 30
            while True:
                policy = json.loads(ok(kubectl(ADMIN, "get", "validatingadmissionpolicy", name, "-o", "json")))
                status = policy.get("status") or {}
                if status.get("observedGeneration") == policy["metadata"]["generation"] and "typeChecking" in status:
                    break
                assert time.monotonic() < deadline, f"{name} was not type-checked within 30 s"
                time.sleep(0.5)
            assert status["typeChecking"].get("expressionWarnings", []) == [], name


class TestExtraNetworkPolicies:
    @pytest.mark.parametrize("case", sorted(OPENING))
    def test_a_policy_that_opens_egress_is_refused(self, stack: Stack, case: str) -> None:
        policy = network_policy(case, stack.protected, **OPENING[case](stack))
        refused(kubectl(ALICE, "create", "-f", "-", stdin=as_yaml(policy)), stack.egress_policy, EGRESS_REFUSED)

    @pytest.mark.parametrize("case", sorted(ORDINARY))
    def test_an_ordinary_policy_is_admitted(self, stack: Stack, case: str) -> None:
        policy = network_policy(case, stack.protected, **ORDINARY[case](stack))
        ok(kubectl(ALICE, "create", "-f", "-", stdin=as_yaml(policy)))
        ok(kubectl(ALICE, "delete", "networkpolicy", case, "-n", stack.protected))

    def test_opening_an_admitted_policy_later_is_refused(self, stack: Stack) -> None:
        policy = network_policy("later", stack.protected, **ORDINARY["egress-to-own-pods"](stack))
        ok(kubectl(ALICE, "create", "-f", "-", stdin=as_yaml(policy)))
        patch = json.dumps({"spec": {"egress": [{}]}})
        refused(
            kubectl(ALICE, "patch", "networkpolicy", "later", "-n", stack.protected, "--type=merge", "-p", patch),
            stack.egress_policy,
            EGRESS_REFUSED,
        )

    def test_the_deployer_cannot_add_an_open_policy_either(self, stack: Stack) -> None:
        # A Helm chart installed with the deployer's own credentials is the common case.
        policy = network_policy("chart", stack.protected, egress=[{}])
        refused(kubectl(ADMIN, "create", "-f", "-", stdin=as_yaml(policy)), stack.egress_policy, EGRESS_REFUSED)

    def test_the_message_names_the_policy_and_the_way_out(self, stack: Stack) -> None:
        policy = network_policy("helm-chart-default", stack.protected, egress=[{}])
        result = kubectl(ALICE, "create", "-f", "-", stdin=as_yaml(policy))
        assert f"NetworkPolicy {stack.protected}/helm-chart-default:" in result.stderr
        assert f"envFrom: configMapRef {PROXY_CONFIGMAP}" in result.stderr


class TestIngressPolicies:
    """Issue 19, point 8: ingress to a protected namespace from its own pods
    and cluster.ingressFrom only; the same cases as the preflight's mirror."""

    @pytest.mark.parametrize("case", sorted(OPENING_INGRESS))
    def test_a_policy_that_opens_ingress_is_refused(self, stack: Stack, case: str) -> None:
        policy = network_policy(case, stack.protected, **OPENING_INGRESS[case](stack))
        refused(kubectl(ALICE, "create", "-f", "-", stdin=as_yaml(policy)), stack.egress_policy, INGRESS_REFUSED)

    @pytest.mark.parametrize("case", sorted(ORDINARY_INGRESS))
    def test_ingress_from_the_namespace_and_cluster_ingress_from_is_admitted(self, stack: Stack, case: str) -> None:
        policy = network_policy(case, stack.protected, **ORDINARY_INGRESS[case](stack))
        ok(kubectl(ALICE, "create", "-f", "-", stdin=as_yaml(policy)))
        ok(kubectl(ALICE, "delete", "networkpolicy", case, "-n", stack.protected))

    def test_the_deployer_cannot_open_ingress_either(self, stack: Stack) -> None:
        policy = network_policy("chart", stack.protected, ingress=[{}])
        refused(kubectl(ADMIN, "create", "-f", "-", stdin=as_yaml(policy)), stack.egress_policy, INGRESS_REFUSED)


class TestServices:
    """Issue 19, point 8: no externalIPs (they take addresses over for the
    whole cluster), no NodePort or LoadBalancer in a protected namespace."""

    @pytest.mark.parametrize("case", sorted(EXPOSED_SERVICES))
    @pytest.mark.parametrize("who", ["alice", "the-deployer"])
    def test_an_exposed_service_is_refused(self, stack: Stack, case: str, who: str) -> None:
        context = ALICE if who == "alice" else ADMIN
        manifest = service(case, stack.protected, **EXPOSED_SERVICES[case])
        message = "may not set externalIPs" if case == "external-ips" else "must be of type ClusterIP, ExternalName"
        refused(kubectl(context, "create", "-f", "-", stdin=as_yaml(manifest)), stack.services_policy, message)

    @pytest.mark.parametrize("case", sorted(CLUSTER_SERVICES))
    def test_a_service_inside_the_cluster_is_admitted(self, stack: Stack, case: str) -> None:
        ok(kubectl(ALICE, "create", "-f", "-", stdin=as_yaml(service(case, stack.protected, **CLUSTER_SERVICES[case]))))
        ok(kubectl(ALICE, "delete", "service", case, "-n", stack.protected))

    def test_exposing_an_admitted_service_later_is_refused(self, stack: Stack) -> None:
        ok(kubectl(ALICE, "create", "-f", "-", stdin=as_yaml(service("later", stack.protected))))
        try:
            for patch in ({"spec": {"type": "NodePort"}}, {"spec": {"externalIPs": ["198.51.100.7"]}}):
                result = kubectl(
                    ALICE, "patch", "service", "later", "-n", stack.protected, "--type=merge", "-p", json.dumps(patch)
                )
                assert result.returncode != 0 and stack.services_policy in result.stderr, result.stderr
        finally:
            ok(kubectl(ALICE, "delete", "service", "later", "-n", stack.protected))

    def test_services_elsewhere_are_not_its_business(self, stack: Stack) -> None:
        manifest = service("exposed", stack.relay, type="NodePort")
        ok(kubectl(ADMIN, "create", "--dry-run=server", "-f", "-", stdin=as_yaml(manifest)))


class TestTheStacksObjects:
    @pytest.mark.parametrize(
        "args",
        [
            pytest.param(("delete", "networkpolicy", OWN_POLICY_NAME), id="delete-the-policy"),
            pytest.param(("label", "networkpolicy", OWN_POLICY_NAME, "x=y"), id="change-the-policy"),
            pytest.param(("delete", "configmap", PROXY_CONFIGMAP), id="delete-the-proxy-settings"),
            pytest.param(("label", "configmap", PROXY_CONFIGMAP, "x=y"), id="change-the-proxy-settings"),
        ],
    )
    def test_in_a_protected_namespace_they_are_refused_to_its_admin(self, stack: Stack, args: tuple[str, ...]) -> None:
        refused(kubectl(ALICE, *args, "-n", stack.protected), stack.policy_for(args[1]), OBJECT_REFUSED)

    def test_deleting_every_policy_at_once_spares_the_stacks(self, stack: Stack) -> None:
        # A DELETE of the collection carries no name: each object is judged by its own.
        path = f"/apis/networking.k8s.io/v1/namespaces/{stack.protected}/networkpolicies"
        result = kubectl(ALICE, "delete", "--raw", path)
        assert result.returncode != 0 and OBJECT_REFUSED in result.stderr, result.stderr
        ok(kubectl(ADMIN, "get", "networkpolicy", OWN_POLICY_NAME, "-n", stack.protected))

    def test_replacing_the_policy_with_an_open_one_is_refused(self, stack: Stack) -> None:
        patch = json.dumps({"spec": {"egress": [{}]}})
        result = kubectl(
            ALICE, "patch", "networkpolicy", OWN_POLICY_NAME, "-n", stack.protected, "--type=merge", "-p", patch
        )
        # Both policies refuse it; the API server reports the first.
        assert result.returncode != 0, result.stdout
        assert OBJECT_REFUSED in result.stderr or EGRESS_REFUSED in result.stderr, result.stderr

    @pytest.mark.parametrize(
        "args",
        [
            pytest.param(("delete", "networkpolicy", "relay-egress"), id="delete-the-relay-egress-policy"),
            pytest.param(("delete", "networkpolicy", "default-deny"), id="delete-the-default-deny"),
            pytest.param(("label", "secret", AUTH_SECRET_NAME, "x=y"), id="change-the-auth-secret"),
            pytest.param(("delete", "secret", AUTH_SECRET_NAME), id="delete-the-auth-secret"),
            pytest.param(("scale", "deployment", RELAY_NAME, "--replicas=0"), id="scale-the-relay"),
            pytest.param(("label", "deployment", RELAY_NAME, "x=y"), id="change-the-relay"),
            pytest.param(("delete", "deployment", RELAY_NAME), id="delete-the-relay"),
            pytest.param(("delete", "service", RELAY_NAME), id="delete-the-service"),
        ],
    )
    def test_in_the_relay_namespace_they_are_refused_to_its_admin(self, stack: Stack, args: tuple[str, ...]) -> None:
        refused(kubectl(ALICE, *args, "-n", stack.relay), stack.policy_for(args[1]), OBJECT_REFUSED)

    def test_no_new_policy_may_select_the_relay(self, stack: Stack) -> None:
        policy = network_policy("relay-allow-all", stack.relay, egress=[{}])
        refused(kubectl(ALICE, "create", "-f", "-", stdin=as_yaml(policy)), stack.objects_policy, OBJECT_REFUSED)

    def test_the_apps_own_configmaps_are_its_own(self, stack: Stack) -> None:
        ok(kubectl(ALICE, "create", "configmap", "app-settings", "-n", stack.protected, "--from-literal=a=b"))
        ok(kubectl(ALICE, "label", "configmap", "app-settings", "-n", stack.protected, "x=y"))
        ok(kubectl(ALICE, "delete", "configmap", "app-settings", "-n", stack.protected))


class TestPodSecurityLabels:
    @pytest.mark.parametrize(
        "label",
        [
            f"{PSA}/enforce=privileged",
            f"{PSA}/enforce=baseline",
            f"{PSA}/enforce-",
            f"{PSA}/warn=baseline",
            f"{PSA}/audit-",
            f"{PSA}/enforce-version=v1.24",
            f"{PSA}/enforce-version=v1.29",
            f"{PSA}/warn-version=v1.2",
        ],
    )
    @pytest.mark.parametrize("which", ["protected", "relay"])
    def test_weakening_is_refused(self, stack: Stack, label: str, which: str) -> None:
        namespace = stack.protected if which == "protected" else stack.relay
        refused(
            kubectl(ALICE, "label", "namespace", namespace, label, "--overwrite"), stack.labels_policy, LABELS_REFUSED
        )

    @pytest.mark.parametrize("subresource", ["status", "finalize"])
    def test_weakening_through_a_subresource_is_refused(self, stack: Stack, subresource: str) -> None:
        """Issue 19, point 6: an update of `namespaces/status` or
        `namespaces/finalize` saves the labels it carries."""
        namespace = json.loads(ok(kubectl(ADMIN, "get", "namespace", stack.protected, "-o", "json")))
        namespace["metadata"]["labels"][f"{PSA}/enforce"] = "privileged"
        path = f"/api/v1/namespaces/{stack.protected}/{subresource}"
        try:
            result = kubectl(ALICE, "replace", "--raw", path, "-f", "-", stdin=json.dumps(namespace))
            assert result.returncode != 0, f"admitted: {result.stdout[:300]}"
            assert stack.labels_policy in result.stderr + result.stdout, result.stderr
            assert LABELS_REFUSED in result.stderr + result.stdout, result.stderr
        finally:
            # Where it was admitted, the label is the deployer's to give back.
            ok(kubectl(ADMIN, "label", "namespace", stack.protected, f"{PSA}/enforce=restricted", "--overwrite"))

    def test_other_labels_and_a_recent_pinned_version_pass(self, stack: Stack) -> None:
        ok(kubectl(ALICE, "label", "namespace", stack.protected, "team=a"))
        ok(
            kubectl(
                ALICE,
                "label",
                "namespace",
                stack.protected,
                f"{PSA}/audit-version=v1.35",
                "--overwrite",
            )
        )
        ok(
            kubectl(
                ADMIN,
                "label",
                "namespace",
                stack.protected,
                "team-",
                f"{PSA}/audit-version=latest",
                "--overwrite",
            )
        )


class TestPoliciesWrittenBeforeTheGuard:
    def test_the_preflight_finds_an_open_policy_in_a_namespace_about_to_be_protected(
        self, stack: Stack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        namespace = f"{stack.protected}-next"  # not guarded yet
        ok(kubectl(ADMIN, "create", "namespace", namespace))
        try:
            ok(kubectl(ADMIN, "create", "-f", "-", stdin=as_yaml(network_policy("chart", namespace, egress=[{}]))))
            _preflight_online(monkeypatch)
            cluster = ClusterConfig(
                context=ADMIN,
                kubeconfig=str(_SESSION["kubeconfig"]),
                protected_namespaces=[{"name": namespace}],
                relay_namespace=stack.relay,
            )
            with pytest.raises(PreflightError) as err:
                check_existing_policies(cluster)
            assert f"NetworkPolicy {namespace}/chart: egress[0] = {{}}" in str(err.value)
        finally:
            kubectl(ADMIN, "delete", "namespace", namespace, "--wait=false")

    def test_the_program_refuses_it_before_anything_is_created(
        self, stack: Stack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The whole program's preflight, as `pulumi preview` runs it (it reads
        namespaces and policies in one kubectl call): the open policy is named
        and no Kubernetes resource is registered."""
        namespace = f"{stack.protected}-open"
        ok(kubectl(ADMIN, "create", "namespace", namespace))
        try:
            ok(kubectl(ADMIN, "create", "-f", "-", stdin=as_yaml(network_policy("chart", namespace, egress=[{}]))))
            result = _program_preflight(stack, ADMIN, namespace, monkeypatch)
            assert isinstance(result.error, PreflightError), result.error
            assert f"NetworkPolicy {namespace}/chart: egress[0] = {{}}" in str(result.error)
            assert [r.type for r in result.resources if r.type.startswith("kubernetes:")] == []
        finally:
            kubectl(ADMIN, "delete", "namespace", namespace, "--wait=false")

    def test_a_deployer_who_may_not_list_every_policy_is_told_which_call_failed(
        self, stack: Stack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """alice may list namespaces but not the NetworkPolicies of every
        namespace: the program names the guard's call, its refusal and the fix."""
        result = _program_preflight(stack, ALICE, stack.protected, monkeypatch)
        message = str(result.error)
        assert isinstance(result.error, PreflightError), result.error
        assert "tailscale-egress:cluster.admissionGuard is on, and `kubectl get networkpolicies" in message
        assert "forbidden" in message and "pulumi config set --path cluster.deployer" in message
        assert [r.type for r in result.resources if r.type.startswith("kubernetes:")] == []


def _program_preflight(stack: Stack, context: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Evaluation:
    """__main__.py under the mock engine with its preflight online against the
    suite's API server, protecting the existing `namespace`."""
    _preflight_online(monkeypatch)
    config = with_config(
        cluster_only_config(stack.relay),
        "cluster",
        context=context,
        kubeconfig=str(_SESSION["kubeconfig"]),
        protectedNamespaces=[namespace],
        deployer=stack.deployer,
    )
    return evaluate(config, "guard-preflight", secret_keys=(RELAY_AUTH_KEY,), offline=False)


class TestTheDeployer:
    def test_is_the_user_the_api_server_names_for_the_kubeconfig(
        self, stack: Stack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _preflight_online(monkeypatch)
        assert deployer_username(ClusterConfig(context=ADMIN, kubeconfig=str(_SESSION["kubeconfig"]))) == stack.deployer
        assert deployer_username(ClusterConfig(context=ALICE, kubeconfig=str(_SESSION["kubeconfig"]))) == "alice"

    def test_changes_the_stacks_objects_and_labels(self, stack: Stack) -> None:
        ok(kubectl(ADMIN, "label", "networkpolicy", OWN_POLICY_NAME, "-n", stack.protected, "x=y"))
        ok(kubectl(ADMIN, "label", "networkpolicy", OWN_POLICY_NAME, "-n", stack.protected, "x-"))
        ok(kubectl(ADMIN, "label", "namespace", stack.protected, f"{PSA}/warn=baseline", "--overwrite"))
        ok(
            kubectl(
                ADMIN,
                "label",
                "namespace",
                stack.protected,
                f"{PSA}/warn=restricted",
                "--overwrite",
            )
        )
        ok(kubectl(ADMIN, "label", "secret", AUTH_SECRET_NAME, "-n", stack.relay, "x=y"))

    def test_deletes_the_stacks_objects_as_destroy_does(self, stack: Stack) -> None:
        ok(kubectl(ADMIN, "delete", "configmap", PROXY_CONFIGMAP, "-n", stack.protected))
        # Deleted in the foreground, as Pulumi deletes: the garbage collector
        # then takes its finalizer off under the guard.
        ok(
            kubectl(
                ADMIN, "delete", "deployment", RELAY_NAME, "-n", stack.relay, "--cascade=foreground", "--timeout=90s"
            )
        )
        assert kubectl(ADMIN, "get", "deployment", RELAY_NAME, "-n", stack.relay).returncode != 0
        ok(kubectl(ADMIN, "delete", "networkpolicy", "relay-egress", "-n", stack.relay))

    def test_deletes_a_protected_namespace_with_the_stacks_objects_still_in_it(self, stack: Stack) -> None:
        # The namespace controller empties it: the guard must let it.
        assert kubectl(ADMIN, "get", "networkpolicy", OWN_POLICY_NAME, "-n", stack.protected).returncode == 0
        ok(kubectl(ADMIN, "delete", "namespace", stack.protected, stack.relay, "--timeout=120s"))
