"""Small helpers for the Kubernetes objects the stack builds, so that every
manifest is spelled the same way."""

from __future__ import annotations

from typing import Any, Final

Manifest = dict[str, Any]

PART_OF: Final = {"app.kubernetes.io/part-of": "tailscale-egress", "app.kubernetes.io/managed-by": "pulumi"}
RELAY_LABELS: Final = {"app.kubernetes.io/name": "tailscale-egress-relay"}
KUBE_DNS_LABELS: Final = {"k8s-app": "kube-dns"}
DNS_NAMESPACE: Final = "kube-system"
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"

# Pod Security Admission: `restricted` enforced, and reported by warn and audit.
POD_SECURITY_LABELS: Final = {
    f"pod-security.kubernetes.io/{mode}{suffix}": value
    for mode in ("enforce", "warn", "audit")
    for suffix, value in (("", "restricted"), ("-version", "latest"))
}


def metadata(name: str, namespace: str | None = None, labels: dict[str, str] | None = None) -> Manifest:
    meta: Manifest = {"name": name, "labels": {**PART_OF, **(labels or {})}}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def namespace(name: str) -> Manifest:
    """A namespace the stack owns or labels: Pod Security `restricted`."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata(name, labels=POD_SECURITY_LABELS)}
