"""NetworkPolicies: who may talk to whom.

Each policy names its `policyTypes` explicitly: a policy that leaves them out
and has egress rules also isolates ingress, which is never what we mean here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from builders.kube import (
    DNS_NAMESPACE,
    KUBE_DNS_LABELS,
    NAMESPACE_NAME_LABEL,
    RELAY_LABELS,
    Manifest,
    metadata,
)
from builders.networks import (
    CONTROL_PORTS,
    NON_PUBLIC_IPV4,
    NON_PUBLIC_IPV6,
    STUN_PORT,
    TAILSCALE_CONTROL_PLANE_CIDRS,
    WIREGUARD_PORT,
    host_cidr,
)

Protocol = Literal["TCP", "UDP"]


@dataclass(frozen=True)
class Destination:
    """An address block the relay may reach, on one protocol and port."""

    cidr: str
    protocol: Protocol
    port: int


def network_policy(
    name: str,
    namespace: str,
    pod_labels: dict[str, str] | None,
    *,
    ingress: list[Manifest] | None = None,
    egress: list[Manifest] | None = None,
) -> Manifest:
    """A policy selecting the pods with `pod_labels` (all pods when None).

    A direction passed as [] isolates that direction entirely; one passed as
    None is not governed by this policy.
    """
    types = [t for t, rules in (("Ingress", ingress), ("Egress", egress)) if rules is not None]
    spec: Manifest = {"podSelector": {"matchLabels": pod_labels} if pod_labels else {}, "policyTypes": types}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(name, namespace),
        "spec": spec,
    }


def ports(protocol: Protocol, *numbers: int) -> list[Manifest]:
    return [{"protocol": protocol, "port": n} for n in numbers]


def pods_in(namespace: str, labels: dict[str, str]) -> Manifest:
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}},
        "podSelector": {"matchLabels": labels},
    }


def dns_rule() -> Manifest:
    """Egress to the cluster's DNS pods (CoreDNS, label k8s-app=kube-dns)."""
    return {"to": [pods_in(DNS_NAMESPACE, KUBE_DNS_LABELS)], "ports": ports("UDP", 53) + ports("TCP", 53)}


def namespace_named(namespace: str) -> Manifest:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}}


def protected_namespace_policy(
    namespace: str, relay_namespace: str, relay_ports: Sequence[int], ingress_from: Sequence[str] = ()
) -> Manifest:
    """Default-deny egress and ingress for every pod of a protected namespace.

    Egress allowed: the relay's proxy ports, cluster DNS, and pods of the same
    namespace. Everything else (the internet directly, the host, the LAN,
    cloud metadata, other namespaces) is denied. Ingress allowed: pods of the
    same namespace and of `ingress_from` only, so that no other namespace
    opens a two-way channel that never touches the relay.
    """
    return network_policy(
        "tailscale-egress-only-via-relay",
        namespace,
        None,
        ingress=[{"from": [{"podSelector": {}}, *(namespace_named(ns) for ns in sorted(set(ingress_from)))]}],
        egress=[
            {"to": [pods_in(relay_namespace, RELAY_LABELS)], "ports": ports("TCP", *relay_ports)},
            dns_rule(),
            {"to": [{"podSelector": {}}]},
        ],
    )


def relay_namespace_default_deny(namespace: str) -> Manifest:
    """Anything else in the relay's namespace talks to nobody, either way."""
    return network_policy("default-deny", namespace, None, ingress=[], egress=[])


def relay_ingress_policy(namespace: str, protected_namespaces: Iterable[str], relay_ports: Sequence[int]) -> Manifest:
    """Only pods of protected namespaces reach the relay, and only its proxy ports."""
    return network_policy(
        "relay-ingress",
        namespace,
        RELAY_LABELS,
        ingress=[
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [
                                {
                                    "key": NAMESPACE_NAME_LABEL,
                                    "operator": "In",
                                    "values": sorted(protected_namespaces),
                                }
                            ]
                        }
                    }
                ],
                "ports": ports("TCP", *relay_ports),
            }
        ],
    )


@dataclass(frozen=True)
class RelayEgress:
    """Where the relay may go besides cluster DNS."""

    # Always allowed, even when private: the control server and (pinned) the exit node.
    destinations: tuple[Destination, ...]
    # Also any public address: only on the explicit opt-in `tailnet.relayEgress: public`.
    public_internet: bool

    @property
    def mode(self) -> str:
        return "public internet" if self.public_internet else "pinned to the exit node and control server"


def relay_egress(
    exit_node_public_ips: Sequence[str],
    login_server_address: tuple[str, int] | None,
    control_plane_cidrs: Sequence[str],
    *,
    hosted_control_plane: bool,
    public_internet: bool = False,
) -> RelayEgress:
    """The relay's destinations: the control server (its HTTP(S) ports, and
    STUN for the DERP server Headscale embeds) and the exit node's WireGuard
    port.

    Pinned (the default) is that and nothing more: a proxy request that
    tailscaled dials directly, as it does while its exit node is missing from
    the netmap (removed, not yet there, before the first netmap), finds no
    way out. The control plane is a login server at an IP literal,
    `control_plane_cidrs`, or, for Tailscale's hosted control plane when no
    CIDRs are given, the ranges Tailscale publishes. DERP is not reachable
    when pinned; the relay connects to the exit node's public UDP port.

    `public_internet` (`tailnet.relayEgress: public`) adds any public
    address. A login server on a private address is reachable in both
    modes, at its address and port alone. Raises ValueError when a pinned
    policy lacks the exit node's or the control plane's addresses (the
    configuration refuses that before anything is created).
    """
    control: list[Destination] = []
    if login_server_address is not None:
        ip, port = login_server_address
        control += [Destination(host_cidr(ip), "TCP", port), Destination(host_cidr(ip), "UDP", STUN_PORT)]
    cidrs = list(control_plane_cidrs)
    if not cidrs and hosted_control_plane and not public_internet:
        cidrs = list(TAILSCALE_CONTROL_PLANE_CIDRS)
    for cidr in cidrs:
        control += [Destination(cidr, "TCP", port) for port in CONTROL_PORTS]
        control.append(Destination(cidr, "UDP", STUN_PORT))
    if public_internet:
        return RelayEgress(destinations=tuple(control), public_internet=True)
    if not exit_node_public_ips or not control:
        missing = "the exit node's public IPs" if not exit_node_public_ips else "the control plane's addresses"
        raise ValueError(f"pinned relay egress needs {missing} (or tailnet.relayEgress: public)")
    exit_node = [Destination(host_cidr(ip), "UDP", WIREGUARD_PORT) for ip in exit_node_public_ips]
    return RelayEgress(destinations=tuple(control + exit_node), public_internet=False)


def relay_egress_policy(namespace: str, egress: RelayEgress) -> Manifest:
    """The relay's way out: cluster DNS, `egress.destinations`, and when
    `egress.public_internet`, any public address, never a private,
    link-local, CGNAT, loopback, multicast or metadata one."""
    reach: list[Manifest] = []
    if egress.public_internet:
        reach.append(
            {
                "to": [
                    {"ipBlock": {"cidr": "0.0.0.0/0", "except": list(NON_PUBLIC_IPV4)}},
                    {"ipBlock": {"cidr": "::/0", "except": list(NON_PUBLIC_IPV6)}},
                ]
            }
        )
    reach += [
        {"to": [{"ipBlock": {"cidr": d.cidr}}], "ports": ports(d.protocol, d.port)}
        for d in sorted(set(egress.destinations), key=lambda d: (d.cidr, d.protocol, d.port))
    ]
    return network_policy("relay-egress", namespace, RELAY_LABELS, egress=[dns_rule(), *reach])
