"""A realistic cluster for a stack's NetworkPolicies to act on.

Every namespace of the stack (protected ones with two workload pods each; the
relay's namespace with the relay pod, labelled as its Deployment's template,
and one unrelated pod), plus kube-system (CoreDNS and metrics-server, as k3s
runs them) and a team namespace the stack does not protect. Namespaces carry
`kubernetes.io/metadata.name` as the API server sets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from builders.node_guard import guard_namespace
from devtools.mockstack import Evaluation
from tests.stacks import kube_objects

Manifest = dict[str, Any]

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
UNPROTECTED_NAMESPACE = "team-unprotected"
DNS_NAMESPACE = "kube-system"
WORKLOAD_NAMES = ("web", "worker")


def pod(namespace: str, name: str, labels: dict[str, str], spec: Manifest | None = None) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": spec or {"containers": [{"name": "app", "image": f"registry.example/{name}:1.0"}]},
    }


def namespace(name: str, labels: dict[str, str] | None = None) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {**(labels or {}), NAMESPACE_NAME_LABEL: name}},
    }


@dataclass
class Cluster:
    relay_namespace: str
    protected: list[str]
    relay_pod: str  # "namespace/name"
    bystander_pod: str  # another pod of the relay's namespace
    dns_pods: list[str]
    other_system_pods: list[str]
    unprotected_pods: list[str]
    workloads: dict[str, list[str]] = field(default_factory=dict)  # protected namespace -> its pods
    pods: list[Manifest] = field(default_factory=list)
    namespaces: list[Manifest] = field(default_factory=list)

    def all_workloads(self) -> list[str]:
        return [p for pods in self.workloads.values() for p in pods]


def cluster_for(evaluation: Evaluation) -> Cluster:
    """The cluster a user of this stack has once it is applied."""
    (relay,) = [d for d in kube_objects(evaluation, "Deployment") if d["metadata"]["name"] == "relay"]
    relay_ns = relay["metadata"]["namespace"]
    template = relay["spec"]["template"]
    stack_namespaces = {
        n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in kube_objects(evaluation, "Namespace")
    }
    # The node guard's pods run in the node's network (hostNetwork): no NetworkPolicy sees them.
    protected = sorted(n for n in stack_namespaces if n not in (relay_ns, guard_namespace(relay_ns)))

    def ref(manifest: Manifest) -> str:
        return f"{manifest['metadata']['namespace']}/{manifest['metadata']['name']}"

    relay_pod = pod(relay_ns, "relay-7d9f8c6b5-x2x4q", template["metadata"]["labels"], template["spec"])
    bystander = pod(relay_ns, "debug-shell", {"app": "debug-shell"})
    dns = [pod(DNS_NAMESPACE, f"coredns-5d78c9869d-{s}", {"k8s-app": "kube-dns"}) for s in ("abcde", "fghij")]
    system = [pod(DNS_NAMESPACE, "metrics-server-6f4c6675d5-klmno", {"k8s-app": "metrics-server"})]
    unprotected = [pod(UNPROTECTED_NAMESPACE, "app-0", {"app": "team-app"})]
    workloads = {ns: [pod(ns, f"{w}-0", {"app": w}) for w in WORKLOAD_NAMES] for ns in protected}

    pods = [relay_pod, bystander, *dns, *system, *unprotected, *(p for ps in workloads.values() for p in ps)]
    namespaces = [namespace(n, labels) for n, labels in stack_namespaces.items()]
    namespaces += [namespace(DNS_NAMESPACE), namespace(UNPROTECTED_NAMESPACE)]
    return Cluster(
        relay_namespace=relay_ns,
        protected=protected,
        relay_pod=ref(relay_pod),
        bystander_pod=ref(bystander),
        dns_pods=[ref(p) for p in dns],
        other_system_pods=[ref(p) for p in system],
        unprotected_pods=[ref(p) for p in unprotected],
        workloads={ns: [ref(p) for p in ps] for ns, ps in workloads.items()},
        pods=pods,
        namespaces=namespaces,
    )
