"""Address ranges the isolation is built on."""

from __future__ import annotations

import ipaddress
from typing import Final

# Everything that is not the public internet: the laptop, the LAN, the cluster
# itself, cloud metadata, CGNAT (including the tailnet's own 100.64/10),
# loopback, multicast and reserved space.
NON_PUBLIC_IPV4: Final[tuple[str, ...]] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
NON_PUBLIC_IPV6: Final[tuple[str, ...]] = (
    # IETF-reserved ::/8: the unspecified and loopback addresses, the IPv4-
    # compatible (::/96) and IPv4-mapped (::ffff:0:0/96) blocks and NAT64
    # (64:ff9b::/96, 64:ff9b:1::/48). One block, because the API server reads
    # an IPv4-mapped CIDR such as ::ffff:0:0/96 as IPv4 and refuses it inside
    # ::/0 ("must be a strict subset of cidr"). Nothing is lost: a socket
    # dialling ::ffff:a.b.c.d sends IPv4 packets to a.b.c.d, which the IPv4
    # exceptions cover.
    "::/8",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",  # deprecated site-local
    "ff00::/8",
)
# Tailscale's own address space: a tailnet IP is CGNAT (IPv4) or this ULA (IPv6).
TAILNET_IPV4: Final = ipaddress.ip_network("100.64.0.0/10")
TAILNET_IPV6: Final = ipaddress.ip_network("fd7a:115c:a1e0::/48")

# The exit routes an exit node advertises and the stack approves.
EXIT_ROUTES: Final[tuple[str, str]] = ("0.0.0.0/0", "::/0")

# WireGuard port tailscaled listens on (the Debian package's default), opened
# on the exit node's firewall so the relay can connect directly.
WIREGUARD_PORT: Final = 41641
# STUN, served by DERP servers (Headscale's embedded one included).
STUN_PORT: Final = 3478
# A control server's ports: its Noise protocol over HTTP (tried first), then HTTPS.
CONTROL_PORTS: Final[tuple[int, ...]] = (443, 80)

# Tailscale's hosted control plane (controlplane.tailscale.com), the ranges
# Tailscale publishes in "What firewall ports should I open to use
# Tailscale?": https://tailscale.com/kb/1082/firewall-ports
# Its logging ranges (199.165.136.0/24, 2606:b740:1::/48) are left out: the
# relay runs with TS_NO_LOGS_NO_SUPPORT and never uploads logs. DERP relays
# have no published range; the relay does without them (it reaches the exit
# node directly on its public UDP port: tests/datapath/test_fail_closed.py).
# `tailnet.controlPlaneCidrs` replaces these when Tailscale changes them.
TAILSCALE_CONTROL_PLANE_CIDRS: Final[tuple[str, ...]] = ("192.200.0.0/24", "2606:b740:49::/48")


def _networks(cidrs: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


def is_public(address: str) -> bool:
    """True when `address` (an IP or a CIDR) lies wholly in public address space."""
    net = ipaddress.ip_network(address, strict=False)
    blocked = _networks(NON_PUBLIC_IPV4 if net.version == 4 else NON_PUBLIC_IPV6)
    return not any(net.overlaps(b) for b in blocked)


def host_cidr(address: str) -> str:
    """`1.2.3.4` -> `1.2.3.4/32`, `2001:db8::1` -> `2001:db8::1/128`."""
    ip = ipaddress.ip_address(address)
    return f"{ip}/{ip.max_prefixlen}"


def is_tailnet_ip(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip in (TAILNET_IPV4 if ip.version == 4 else TAILNET_IPV6)
