"""Turns a manifest (plain data from `builders`) into its Pulumi resource."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from builders.kube import Manifest

_RESOURCES: dict[str, Callable[..., pulumi.CustomResource]] = {
    "Namespace": k8s.core.v1.Namespace,
    "NetworkPolicy": k8s.networking.v1.NetworkPolicy,
    "Deployment": k8s.apps.v1.Deployment,
    "Service": k8s.core.v1.Service,
    "ConfigMap": k8s.core.v1.ConfigMap,
    "ValidatingAdmissionPolicy": k8s.admissionregistration.v1.ValidatingAdmissionPolicy,
    "ValidatingAdmissionPolicyBinding": k8s.admissionregistration.v1.ValidatingAdmissionPolicyBinding,
}


def _field(manifest: Manifest | pulumi.Output[Manifest], name: str) -> Any:
    if isinstance(manifest, dict):
        return manifest.get(name)
    return manifest.apply(lambda m: m.get(name))


def apply_manifest(
    name: str, manifest: Manifest | pulumi.Output[Manifest], opts: pulumi.ResourceOptions, kind: str | None = None
) -> pulumi.CustomResource:
    """The resource for `manifest`. A manifest that waits for a value (an
    Output, such as one holding the exit node's address) needs `kind` given."""
    kind = kind or (manifest["kind"] if isinstance(manifest, dict) else None)
    if kind not in _RESOURCES:
        raise ValueError(f"{name}: no resource for kind {kind!r}")
    names = ("metadata",) if kind == "Namespace" else ("metadata", "data" if kind == "ConfigMap" else "spec")
    fields: dict[str, Any] = {f: _field(manifest, f) for f in names}
    return _RESOURCES[kind](name, opts=opts, **fields)
