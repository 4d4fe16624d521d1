"""EgressRelay: the only way out of the protected namespaces.

Its own namespace (Pod Security `restricted`), the auth key Secret, the
relay's NetworkPolicies (created before the relay itself), the Deployment and
the Service for the proxy ports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from builders.kube import metadata, namespace
from builders.network_policies import (
    RelayEgress,
    relay_egress_policy,
    relay_ingress_policy,
    relay_namespace_default_deny,
)
from builders.proxy_env import proxy_urls
from builders.relay import (
    AUTH_SECRET_KEY,
    PROXY_PORTS,
    RelaySettings,
    relay_deployment,
    relay_host,
    relay_service,
)
from components.kube import apply_manifest
from config import ClusterConfig

AUTH_SECRET_NAME = "relay-auth"


@dataclass(frozen=True)
class EgressRelayArgs:
    cluster: ClusterConfig
    hostname: str
    auth_key: pulumi.Output[str]
    exit_node_ip: pulumi.Output[str]
    egress: pulumi.Output[RelayEgress]
    protected_namespaces: Sequence[str]
    login_server: str | None
    # Started only after these (the protected namespaces' policies): a
    # component's depends_on does not reach its children, so it is passed here.
    start_after: Sequence[pulumi.Resource] = ()


class EgressRelay(pulumi.ComponentResource):
    http_proxy: pulumi.Output[str]
    socks_proxy: pulumi.Output[str]

    def __init__(self, name: str, args: EgressRelayArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tailscale-egress:relay:EgressRelay", name, None, opts)
        ns = args.cluster.relay_namespace
        child = pulumi.ResourceOptions(parent=self)
        ns_resource = apply_manifest(f"{name}-namespace", namespace(ns), child)
        in_ns = pulumi.ResourceOptions(parent=self, depends_on=[ns_resource])

        policies = [
            apply_manifest(f"{name}-default-deny", relay_namespace_default_deny(ns), in_ns),
            apply_manifest(f"{name}-ingress", relay_ingress_policy(ns, args.protected_namespaces, PROXY_PORTS), in_ns),
            apply_manifest(
                f"{name}-egress",
                args.egress.apply(lambda egress: relay_egress_policy(ns, egress)),
                in_ns,
                kind="NetworkPolicy",
            ),
        ]
        secret = k8s.core.v1.Secret(
            f"{name}-auth",
            metadata=k8s.meta.v1.ObjectMetaArgs(**metadata(AUTH_SECRET_NAME, ns)),
            type="Opaque",
            string_data={AUTH_SECRET_KEY: args.auth_key},
            opts=in_ns,
        )
        deployment = args.exit_node_ip.apply(
            lambda ip: relay_deployment(
                RelaySettings(
                    namespace=ns,
                    image=args.cluster.relay_image,
                    replicas=args.cluster.relay_replicas,
                    hostname=args.hostname,
                    exit_node_ip=ip,
                    auth_secret_name=AUTH_SECRET_NAME,
                    login_server=args.login_server,
                )
            )
        )
        # The relay starts only once its own policies are in force.
        apply_manifest(
            f"{name}-deployment",
            deployment,
            pulumi.ResourceOptions(parent=self, depends_on=[*policies, secret, *args.start_after]),
            kind="Deployment",
        )
        apply_manifest(f"{name}-service", relay_service(ns), in_ns)

        urls = proxy_urls(relay_host(ns, args.cluster.cluster_domain))
        self.http_proxy = pulumi.Output.from_input(urls["http"])
        self.socks_proxy = pulumi.Output.from_input(urls["socks5"])
        self.register_outputs({"http_proxy": self.http_proxy, "socks_proxy": self.socks_proxy})
