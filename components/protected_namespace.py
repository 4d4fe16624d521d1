"""ProtectedNamespace: a namespace whose pods reach the internet only through
the relay.

Pod Security `restricted` (enforce, warn, audit), a default-deny egress policy
with the relay's proxy ports, DNS and the namespace's own pods as the only
exceptions (and ingress from its own pods and `cluster.ingressFrom` only),
and a ConfigMap of proxy settings for `envFrom`. An existing
namespace is labelled in place (server-side apply), and on destroy loses only
the labels the stack set; a namespace the stack creates is deleted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from builders.kube import namespace
from builders.network_policies import protected_namespace_policy
from builders.proxy_env import proxy_configmap
from components.kube import apply_manifest
from config import ProtectedNamespaceConfig


@dataclass(frozen=True)
class ProtectedNamespaceArgs:
    namespace: ProtectedNamespaceConfig
    relay_namespace: str
    relay_ports: Sequence[int]
    proxy_env: Mapping[str, str]
    ingress_from: Sequence[str] = ()


class ProtectedNamespace(pulumi.ComponentResource):
    def __init__(self, name: str, args: ProtectedNamespaceArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tailscale-egress:namespace:ProtectedNamespace", name, None, opts)
        ns = args.namespace.name
        manifest = namespace(ns)
        if args.namespace.create:
            ns_resource: pulumi.CustomResource = apply_manifest(name, manifest, pulumi.ResourceOptions(parent=self))
        else:
            ns_resource = k8s.core.v1.NamespacePatch(
                name,
                metadata={"name": ns, "labels": manifest["metadata"]["labels"]},
                opts=pulumi.ResourceOptions(parent=self),
            )
        in_ns = pulumi.ResourceOptions(parent=self, depends_on=[ns_resource])
        policy = protected_namespace_policy(ns, args.relay_namespace, args.relay_ports, args.ingress_from)
        apply_manifest(f"{name}-egress", policy, in_ns)
        apply_manifest(f"{name}-proxy-settings", proxy_configmap(ns, args.proxy_env), in_ns)
        self.register_outputs({})
