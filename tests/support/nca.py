"""network-config-analyzer (`nca`) as an oracle for NetworkPolicy isolation.

nca computes, offline, which connections a set of NetworkPolicies allows
between the pods and namespaces it is given, and between pods and IP
addresses. `connectivity()` writes everything as YAML to a directory, runs
`nca --connectivity ... -o txt_no_fw_rules` (one line per source and
destination: `src => dst : connections`) and parses the answer.

nca needs PyYAML 6.0.2 and the product pins 6.0.3, so it runs from its own
venv (see requirements-nca.txt); `NCA=/path/to/nca` overrides where.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devtools.mockstack import ROOT
from tests.support.tools import executable

NCA_VENV = ROOT / "build" / "tools" / "nca-venv"
INSTALL = (
    f"python3.11 -m venv {NCA_VENV.relative_to(ROOT)} && "
    f"{NCA_VENV.relative_to(ROOT)}/bin/pip install -r tests/support/requirements-nca.txt"
)

Manifest = dict[str, Any]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PortRange = tuple[int, int]


def nca_command() -> Path:
    override = os.environ.get("NCA")
    return executable("nca", INSTALL, *([Path(override)] if override else []), NCA_VENV / "bin" / "nca")


@dataclass(frozen=True)
class Cube:
    """Some protocols on some destination ports; None means all of them."""

    protocols: frozenset[str] | None
    ports: tuple[PortRange, ...] | None

    def allows(self, protocol: str, port: int) -> bool:
        protocol_ok = self.protocols is None or protocol in self.protocols
        port_ok = self.ports is None or any(lo <= port <= hi for lo, hi in self.ports)
        return protocol_ok and port_ok


@dataclass(frozen=True)
class Connections:
    """What nca says one source may open to one destination."""

    everything: bool = False
    cubes: tuple[Cube, ...] = ()

    def __bool__(self) -> bool:
        return self.everything or bool(self.cubes)

    def allows(self, protocol: str, port: int) -> bool:
        return self.everything or any(c.allows(protocol, port) for c in self.cubes)

    def ports(self) -> dict[str, set[int]]:
        """Protocol -> the ports allowed on it (only for a set with no "all" part)."""
        if self.everything:
            raise ValueError("all connections: no finite port list")
        result: dict[str, set[int]] = {}
        for cube in self.cubes:
            if cube.protocols is None or cube.ports is None:
                raise ValueError(f"unbounded connection set {cube}")
            for protocol in cube.protocols:
                result.setdefault(protocol, set()).update(p for lo, hi in cube.ports for p in range(lo, hi + 1))
        return result

    def __str__(self) -> str:
        return "All connections" if self.everything else str(self.cubes or "No connections")

    @staticmethod
    def parse(text: str) -> Connections:
        text = text.strip()
        if text == "All connections":
            return Connections(everything=True)
        if text == "No connections":
            return Connections()
        bodies = re.findall(r"\{([^{}]*)\}", text)
        if not bodies or re.sub(r"\{[^{}]*\}", "", text).strip(", "):
            raise ValueError(f"unexpected nca connection set {text!r}")
        return Connections(cubes=tuple(_parse_cube(body) for body in bodies))


def _parse_cube(body: str) -> Cube:
    # e.g. "protocols:TCP, UDP,dst_ports:53" or "protocols:TCP,dst_ports:1080,3128" or "dst_ports:1-52"
    fields = dict(re.findall(r"(\w+):([^:]*?)(?=,\w+:|$)", body))
    unknown = set(fields) - {"protocols", "dst_ports"}
    if unknown:
        raise ValueError(f"nca cube {body!r} restricts {sorted(unknown)}: not understood here")
    protocols: frozenset[str] | None = None
    if "protocols" in fields:
        if fields["protocols"].startswith("all but"):
            raise ValueError(f"nca cube {body!r}: complemented protocol sets are not understood here")
        protocols = frozenset(p.strip() for p in fields["protocols"].split(","))
    ports: tuple[PortRange, ...] | None = None
    if "dst_ports" in fields:
        ranges = []
        for part in fields["dst_ports"].split(","):
            lo, _, hi = part.strip().partition("-")
            ranges.append((int(lo), int(hi or lo)))
        ports = tuple(ranges)
    return Cube(protocols, ports)


@dataclass(frozen=True)
class AddressRange:
    first: IPAddress
    last: IPAddress

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return address.version == self.first.version and int(self.first) <= int(address) <= int(self.last)

    def overlaps(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        if network.version != self.first.version:
            return False
        return int(self.first) <= int(network[-1]) and int(network[0]) <= int(self.last)

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @staticmethod
    def parse(text: str) -> AddressRange:
        if "/" in text:
            net = ipaddress.ip_network(text)
            return AddressRange(net[0], net[-1])
        first, _, last = text.partition("-")
        return AddressRange(ipaddress.ip_address(first), ipaddress.ip_address(last or first))


Endpoint = str | AddressRange  # "namespace/pod" or an address range


def _parse_endpoint(text: str) -> Endpoint:
    text = text.strip()
    pod = re.fullmatch(r"([^/\s]+)/([^\[\s]+)\[Pod\]", text)
    if pod:
        return f"{pod[1]}/{pod[2]}"
    return AddressRange.parse(text)


@dataclass
class ConnectivityMap:
    """nca's answer: every (source, destination) pair with some allowed connection."""

    edges: list[tuple[Endpoint, Endpoint, Connections]] = field(default_factory=list)
    raw: str = ""

    def between(self, src: str, dst: str) -> Connections:
        """Connections from pod `src` to pod `dst` ("namespace/name")."""
        found = [c for s, d, c in self.edges if s == src and d == dst]
        return _union(found)

    def to_address(self, src: str, address: str) -> Connections:
        ip = ipaddress.ip_address(address)
        return _union([c for s, d, c in self.edges if s == src and isinstance(d, AddressRange) and ip in d])

    def from_address(self, address: str, dst: str) -> Connections:
        ip = ipaddress.ip_address(address)
        return _union([c for s, d, c in self.edges if d == dst and isinstance(s, AddressRange) and ip in s])

    def pod_destinations(self, src: str) -> dict[str, Connections]:
        return {d: c for s, d, c in self.edges if s == src and isinstance(d, str)}

    def pod_sources(self, dst: str) -> dict[str, Connections]:
        return {s: c for s, d, c in self.edges if d == dst and isinstance(s, str)}

    def address_destinations(self, src: str) -> list[tuple[AddressRange, Connections]]:
        return [(d, c) for s, d, c in self.edges if s == src and isinstance(d, AddressRange)]

    def address_sources(self, dst: str) -> list[tuple[AddressRange, Connections]]:
        return [(s, c) for s, d, c in self.edges if d == dst and isinstance(s, AddressRange)]

    @staticmethod
    def parse(text: str) -> ConnectivityMap:
        result = ConnectivityMap(raw=text)
        for line in text.splitlines():
            if " => " not in line:
                continue
            src, _, rest = line.partition(" => ")
            dst, sep, conns = rest.partition(" : ")
            if not sep:
                raise ValueError(f"unexpected nca output line {line!r}")
            result.edges.append((_parse_endpoint(src), _parse_endpoint(dst), Connections.parse(conns)))
        if not result.edges:
            raise ValueError(f"nca reported no connections at all:\n{text}")
        return result


def _union(found: Sequence[Connections]) -> Connections:
    if any(c.everything for c in found):
        return Connections(everything=True)
    return Connections(cubes=tuple(cube for c in found for cube in c.cubes))


def _write_all(path: Path, docs: Iterable[Manifest]) -> None:
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))


def connectivity(
    workdir: Path, policies: Sequence[Manifest], pods: Sequence[Manifest], namespaces: Sequence[Manifest]
) -> ConnectivityMap:
    """nca's connectivity map for `policies` over the given pods and namespaces."""
    nca = nca_command()
    workdir.mkdir(parents=True, exist_ok=True)
    policy_dir = workdir / "policies"
    policy_dir.mkdir(exist_ok=True)
    for i, policy in enumerate(policies):
        _write_all(
            policy_dir / f"{i:02d}-{policy['metadata']['namespace']}-{policy['metadata']['name']}.yaml", [policy]
        )
    (workdir / "pods.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "PodList", "items": list(pods)}))
    (workdir / "namespaces.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "NamespaceList", "items": list(namespaces)})
    )
    command = [
        str(nca),
        "--connectivity", str(policy_dir),
        "--pod_list", str(workdir / "pods.yaml"),
        "--ns_list", str(workdir / "namespaces.yaml"),
        "--output_format", "txt_no_fw_rules",
        "--print_ipv6",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0 or "Error" in done.stderr or "Error:" in done.stdout:
        raise RuntimeError(f"nca failed ({done.returncode}): {' '.join(command)}\n{done.stdout}\n{done.stderr}")
    return ConnectivityMap.parse(done.stdout)
