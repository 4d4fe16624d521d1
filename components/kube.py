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
}


def apply_manifest(
    name: str, manifest: Manifest | pulumi.Output[Manifest], opts: pulumi.ResourceOptions, kind: str | None = None
) -> pulumi.CustomResource:
    """The resource for `manifest`. A manifest that waits for a value (an
    Output, such as one holding the exit node's address) needs `kind` given."""
    kind = kind or (manifest["kind"] if isinstance(manifest, dict) else None)
    if kind not in _RESOURCES:
        raise ValueError(f"{name}: no resource for kind {kind!r}")
    m: pulumi.Output[Manifest] = pulumi.Output.from_input(manifest)
    fields: dict[str, Any] = {
        field: m.apply(lambda d, f=field: d.get(f)) for field in ("metadata", "spec", "data")
    }
    if kind == "Namespace":
        del fields["spec"], fields["data"]
    elif kind == "ConfigMap":
        del fields["spec"]
    else:
        del fields["data"]
    return _RESOURCES[kind](name, opts=opts, **fields)
