"""The Kubernetes objects each stack applies: valid for every supported
Kubernetes minor, admitted by Pod Security `restricted`, and a relay that is
pinned, bounded, probed and cut off from the Kubernetes API."""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest

from builders.node_guard import guard_namespace
from devtools.mockstack import Evaluation
from tests.stacks import dev, kube_objects, pinned, pinned_config
from tests.support.kube import (
    applied_objects,
    applied_objects_of,
    containers,
    identity,
    kubernetes_resources,
    pod_templates,
)
from tests.support.pod_security import violations

Manifest = dict[str, Any]
STACKS: dict[str, Callable[[], Evaluation]] = {"dev": dev, "pinned": pinned}
MINORS = tuple(f"1.{m}" for m in range(31, 37))


@pytest.fixture(params=sorted(STACKS))
def evaluation(request: pytest.FixtureRequest) -> Evaluation:
    return STACKS[request.param]()


def relay(evaluation: Evaluation) -> Manifest:
    (deployment,) = [
        d for d in applied_objects(evaluation) if d["kind"] == "Deployment" and d["metadata"]["name"] == "relay"
    ]
    return deployment


class TestSchemas:
    def test_every_kubernetes_resource_is_checked(self, evaluation: Evaluation) -> None:
        # A resource these tests cannot read would escape every check below.
        unchecked = [f"{r.type} {r.name}" for r in kubernetes_resources(evaluation) if applied_objects_of(r) is None]
        assert unchecked == []

    def test_checks_see_the_objects_the_render_writes(self, evaluation: Evaluation) -> None:
        assert sorted(map(identity, applied_objects(evaluation))) == sorted(map(identity, kube_objects(evaluation)))

    @pytest.mark.parametrize("minor", MINORS)
    def test_every_object_validates_strictly(self, minor: str, evaluation: Evaluation) -> None:
        errors = []
        for obj in applied_objects(evaluation):
            name = f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
            try:
                used = kubernetes_validate.validate(obj, minor, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{name}: {e.message}")
            else:
                assert used == minor, f"{name} validated against {used}, not {minor}"
        assert errors == []


def _ip_blocks(obj: Manifest) -> list[Manifest]:
    spec = obj.get("spec", {})
    rules = [*spec.get("ingress", []), *spec.get("egress", [])]
    return [p["ipBlock"] for r in rules for p in (r.get("to", []) + r.get("from", [])) if "ipBlock" in p]


class TestIpBlocksAsTheApiServerReadsThem:
    """The API server parses CIDRs as Go does: an IPv4-mapped block
    (::ffff:0:0/96) is IPv4 to it, so it is never "a strict subset" of an
    IPv6 cidr and `pulumi up` fails. Schema validation cannot see this."""

    def test_every_except_is_a_strict_subset_of_its_cidr(self, evaluation: Evaluation) -> None:
        bad = []
        for obj in kube_objects(evaluation, "NetworkPolicy"):
            for block in _ip_blocks(obj):
                cidr = ipaddress.ip_network(block["cidr"])
                for i, text in enumerate(block.get("except", [])):
                    exc = ipaddress.ip_network(text)
                    mapped = exc.version == 6 and exc.network_address.ipv4_mapped is not None
                    strict = exc.version == cidr.version and exc.subnet_of(cidr) and exc.prefixlen > cidr.prefixlen  # type: ignore[arg-type]
                    if mapped or not strict:
                        bad.append(f"{obj['metadata']['name']}: except[{i}] {text} in {block['cidr']}")
        assert bad == []

    def test_no_cidr_is_ipv4_mapped(self, evaluation: Evaluation) -> None:
        mapped = [
            block["cidr"]
            for obj in kube_objects(evaluation, "NetworkPolicy")
            for block in _ip_blocks(obj)
            if (net := ipaddress.ip_network(block["cidr"])).version == 6 and net.network_address.ipv4_mapped
        ]
        assert mapped == []


# The one exception to `restricted`: the node guard, alone in its own namespace.
NODE_GUARD_NAMESPACE = guard_namespace("tailscale-egress")


class TestPodSecurity:
    def test_every_pod_template_but_the_node_guard_passes_restricted(self, evaluation: Evaluation) -> None:
        templates = [
            (name, template)
            for name, template in pod_templates(applied_objects(evaluation))
            if name != f"DaemonSet {NODE_GUARD_NAMESPACE}/node-guard"
        ]
        assert templates, "the stack makes no pods at all"
        found = {name: v for name, template in templates if (v := violations(template))}
        assert found == {}

    def test_every_namespace_the_stack_creates_or_labels_enforces_restricted(self, evaluation: Evaluation) -> None:
        labels = {
            n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in kube_objects(evaluation, "Namespace")
        }
        enforced = {n: ls.get("pod-security.kubernetes.io/enforce") for n, ls in labels.items()}
        assert enforced == {**dict.fromkeys(labels, "restricted"), NODE_GUARD_NAMESPACE: "privileged"}

    def test_protected_and_relay_namespaces_are_all_labelled(self) -> None:
        labelled = {n["metadata"]["name"] for n in kube_objects(pinned(), "Namespace")}
        config = pinned_config()["tailscale-egress:cluster"]
        protected = {n if isinstance(n, str) else n["name"] for n in config["protectedNamespaces"]}
        assert labelled == protected | {"tailscale-egress", NODE_GUARD_NAMESPACE}

    def test_pods_run_only_in_namespaces_that_enforce_restricted(self, evaluation: Evaluation) -> None:
        labelled = {n["metadata"]["name"] for n in kube_objects(evaluation, "Namespace")} - {NODE_GUARD_NAMESPACE}
        workloads = [o for o in applied_objects(evaluation) if o["kind"] in ("Deployment", "Pod", "DaemonSet")]
        namespaces = [o["metadata"]["namespace"] for o in workloads if o["metadata"]["name"] != "node-guard"]
        assert set(namespaces) <= labelled

    def test_the_privileged_namespace_holds_the_node_guard_and_nothing_else(self, evaluation: Evaluation) -> None:
        inside = [
            identity(o) for o in applied_objects(evaluation) if o["metadata"].get("namespace") == NODE_GUARD_NAMESPACE
        ]
        assert inside == [("DaemonSet", NODE_GUARD_NAMESPACE, "node-guard")]

    @pytest.mark.parametrize(
        "break_it",
        [
            pytest.param(lambda s: s.update(hostNetwork=True), id="hostNetwork"),
            pytest.param(lambda s: s["containers"][0]["securityContext"].update(privileged=True), id="privileged"),
            pytest.param(
                lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
                id="allowPrivilegeEscalation-true",
            ),
            pytest.param(
                lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
                id="allowPrivilegeEscalation-unset",
            ),
            pytest.param(
                lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
                id="add-NET_ADMIN",
            ),
            pytest.param(
                lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
                id="drop-not-ALL",
            ),
            pytest.param(lambda s: s["containers"][0]["securityContext"].update(runAsUser=0), id="runAsUser-0"),
            pytest.param(
                lambda s: s["containers"][0]["securityContext"].update(runAsNonRoot=False), id="runAsNonRoot-false"
            ),
            pytest.param(
                lambda s: s["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
                id="seccomp-Unconfined",
            ),
            pytest.param(
                lambda s: s["containers"][0]["securityContext"].update(procMount="Unmasked"), id="procMount-Unmasked"
            ),
            pytest.param(lambda s: s["containers"][0]["ports"][0].update(hostPort=1080), id="hostPort"),
            pytest.param(lambda s: s["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), id="hostPath"),
            pytest.param(
                lambda s: s["securityContext"].update(sysctls=[{"name": "net.ipv4.ip_forward", "value": "1"}]),
                id="unsafe-sysctl",
            ),
            pytest.param(lambda s: s["securityContext"].update(seLinuxOptions={"type": "spc_t"}), id="seLinux-spc_t"),
            pytest.param(lambda s: s["securityContext"].update(windowsOptions={"hostProcess": True}), id="hostProcess"),
            pytest.param(lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "h", "path": "/"}}), id="nfs"),
            pytest.param(
                lambda s: s["containers"][0]["securityContext"].update(appArmorProfile={"type": "Unconfined"}),
                id="appArmor-Unconfined",
            ),
        ],
    )
    def test_checker_rejects_a_relay_made_unsafe(self, break_it: Callable[[Manifest], None]) -> None:
        # The checks above are only as good as the checker: each of these must trip it.
        template = copy.deepcopy(relay(dev())["spec"]["template"])
        assert violations(template) == []
        break_it(template["spec"])
        assert violations(template) != []


IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


class TestImages:
    def test_every_image_is_pinned(self, evaluation: Evaluation) -> None:
        unpinned = []
        for name, template in pod_templates(applied_objects(evaluation)):
            for c in containers(template["spec"]):
                match = IMAGE.match(c["image"])
                if match is None or not (match["tag"] or match["digest"]) or match["tag"] == "latest":
                    unpinned.append(f"{name}: {c['name']} {c['image']}")
        assert unpinned == []


class TestRelay:
    def test_go_runtime_memory_limit_is_the_containers_memory_request(self, evaluation: Evaluation) -> None:
        (container,) = relay(evaluation)["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        ref = env["GOMEMLIMIT"]["valueFrom"]["resourceFieldRef"]
        assert ref == {"containerName": container["name"], "resource": "requests.memory"}
        # In bytes (no divisor), as Go reads it; below the limit, which stays the hard stop.
        memory = container["resources"]
        assert memory["requests"]["memory"] == "128Mi" and memory["limits"]["memory"] == "256Mi"

    def test_has_cpu_and_memory_requests_and_limits(self, evaluation: Evaluation) -> None:
        for c in containers(relay(evaluation)["spec"]["template"]["spec"]):
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                assert set(resources.get(kind) or {}) >= {"cpu", "memory"}, f"{c['name']} {kind}"

    def test_has_liveness_readiness_and_startup_probes(self, evaluation: Evaluation) -> None:
        for c in containers(relay(evaluation)["spec"]["template"]["spec"]):
            missing = [p for p in ("livenessProbe", "readinessProbe", "startupProbe") if not c.get(p)]
            assert missing == [], c["name"]

    def test_has_a_read_only_root_filesystem(self, evaluation: Evaluation) -> None:
        for c in containers(relay(evaluation)["spec"]["template"]["spec"]):
            assert (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True, c["name"]

    def test_gets_no_service_account_token(self, evaluation: Evaluation) -> None:
        spec = relay(evaluation)["spec"]["template"]["spec"]
        assert spec.get("automountServiceAccountToken") is False
        projected = [
            v["name"]
            for v in spec.get("volumes") or []
            for source in (v.get("projected") or {}).get("sources") or []
            if "serviceAccountToken" in source
        ]
        assert projected == []

    def test_keeps_its_state_off_the_kubernetes_api(self, evaluation: Evaluation) -> None:
        # containerboot stores state in a Secret through the API unless TS_KUBE_SECRET is empty.
        for c in containers(relay(evaluation)["spec"]["template"]["spec"]):
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            assert env.get("TS_KUBE_SECRET") == "", c["name"]

    def test_is_granted_no_rbac(self, evaluation: Evaluation) -> None:
        rbac = [r.type for r in kubernetes_resources(evaluation) if "rbac.authorization.k8s.io" in r.type]
        assert rbac == []
