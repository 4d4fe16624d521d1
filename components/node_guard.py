"""NodeGuard: node-level rules for the paths below NetworkPolicy.

Its own namespace (Pod Security `privileged`, the only one the stack makes)
and a DaemonSet of the relay's pinned image that keeps the rules of
builders/node_guard.py in place on every node, and removes them when it is
deleted (`pulumi destroy`, or `cluster.nodeGuard: false`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from builders.node_guard import (
    chain_name,
    guard_namespace,
    guard_script,
    node_guard_daemonset,
    node_guard_namespace,
)
from components.kube import apply_manifest
from config import ClusterConfig


@dataclass(frozen=True)
class NodeGuardArgs:
    cluster: ClusterConfig


class NodeGuard(pulumi.ComponentResource):
    namespace: str

    def __init__(self, name: str, args: NodeGuardArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tailscale-egress:node:NodeGuard", name, None, opts)
        cluster = args.cluster
        self.namespace = guard_namespace(cluster.relay_namespace)
        ns = apply_manifest(
            f"{name}-namespace", node_guard_namespace(self.namespace), pulumi.ResourceOptions(parent=self)
        )
        script = guard_script(
            chain_name(self.namespace),
            pod_cidrs=[cluster.pod_cidr],
            cluster_cidrs=[cluster.pod_cidr, cluster.service_cidr],
        )
        manifest = node_guard_daemonset(self.namespace, cluster.relay_image, script)
        k8s.apps.v1.DaemonSet(
            f"{name}-daemonset",
            metadata=manifest["metadata"],
            spec=manifest["spec"],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[ns]),
        )
        self.register_outputs({"namespace": self.namespace})
