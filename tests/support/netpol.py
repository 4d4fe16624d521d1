"""A plain reading of Kubernetes NetworkPolicy semantics, as a cross-check of
nca (not a replacement): a connection from pod A to pod B (or an address) is
allowed when A's egress and B's ingress both allow it. A pod selected by no
policy of a direction is not isolated in that direction. Named ports are
resolved against the destination pod's container ports."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

Manifest = dict[str, Any]


def _matches_labels(selector: Manifest | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


class Model:
    def __init__(self, policies: Sequence[Manifest], pods: Sequence[Manifest], namespaces: Sequence[Manifest]) -> None:
        self.policies = list(policies)
        self.pods = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in pods}
        self.ns_labels = {n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in namespaces}

    def _selecting(self, pod: str, direction: str) -> list[Manifest]:
        manifest = self.pods[pod]
        return [
            p
            for p in self.policies
            if p["metadata"]["namespace"] == manifest["metadata"]["namespace"]
            and direction in p["spec"].get("policyTypes", [])
            and _matches_labels(p["spec"].get("podSelector"), manifest["metadata"].get("labels") or {})
        ]

    def _peer_matches(self, peer: Manifest, policy_ns: str, other: str | None, address: str | None) -> bool:
        if "ipBlock" in peer:
            if address is None:
                return False  # pods are matched by selectors here, as nca does
            ip = ipaddress.ip_address(address)
            block = peer["ipBlock"]
            cidr = ipaddress.ip_network(block["cidr"])
            if ip.version != cidr.version or ip not in cidr:
                return False
            return not any(
                ip.version == ipaddress.ip_network(e).version and ip in ipaddress.ip_network(e)
                for e in block.get("except") or []
            )
        if other is None:
            return False
        pod = self.pods[other]
        ns = pod["metadata"]["namespace"]
        if "namespaceSelector" in peer:
            if not _matches_labels(peer["namespaceSelector"], self.ns_labels.get(ns, {})):
                return False
        elif ns != policy_ns:
            return False
        return _matches_labels(peer.get("podSelector"), pod["metadata"].get("labels") or {})

    def _port_matches(self, rule: Manifest, protocol: str, port: int, dst: str | None) -> bool:
        if not rule.get("ports"):
            return True
        for entry in rule["ports"]:
            if entry.get("protocol", "TCP") != protocol:
                continue
            number = entry.get("port")
            if number is None:
                return True
            if isinstance(number, str):
                number = self._named_port(dst, number, protocol)
            if number is not None and number <= port <= entry.get("endPort", number):
                return True
        return False

    def _named_port(self, dst: str | None, name: str, protocol: str) -> int | None:
        if dst is None:
            return None
        for container in self.pods[dst]["spec"].get("containers", []):
            for p in container.get("ports", []):
                if p.get("name") == name and p.get("protocol", "TCP") == protocol:
                    return int(p["containerPort"])
        return None

    def _direction_allows(
        self,
        pod: str,
        direction: str,
        other: str | None,
        address: str | None,
        protocol: str,
        port: int,
        dst: str | None,
    ) -> bool:
        policies = self._selecting(pod, direction)
        if not policies:
            return True
        key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        for policy in policies:
            ns = policy["metadata"]["namespace"]
            for rule in policy["spec"].get(key) or []:
                peers = rule.get(peers_key)
                peer_ok = not peers or any(self._peer_matches(p, ns, other, address) for p in peers)
                if peer_ok and self._port_matches(rule, protocol, port, dst):
                    return True
        return False

    def allows(self, src: str, dst: str, protocol: str, port: int) -> bool:
        return self._direction_allows(src, "Egress", dst, None, protocol, port, dst) and self._direction_allows(
            dst, "Ingress", src, None, protocol, port, dst
        )

    def allows_to_address(self, src: str, address: str, protocol: str, port: int) -> bool:
        return self._direction_allows(src, "Egress", None, address, protocol, port, None)
