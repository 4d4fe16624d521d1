"""Fast checks of the data-path harness itself (no root, no binaries)."""

from __future__ import annotations

from typing import Any

import pytest

from .topology import TopologyError, netpol_to_iptables, relay_spec_from_manifests


def _deployment(env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {
            "name": "relay",
            "namespace": "ns",
            "labels": {"app.kubernetes.io/name": "tailscale-egress-relay"},
        },
        "spec": {
            "template": {
                "metadata": {"labels": {"app": "relay"}},
                "spec": {
                    "securityContext": {"runAsUser": 65532},
                    "containers": [
                        {
                            "name": "tailscale",
                            "env": env,
                            "readinessProbe": {"exec": {"command": ["/bin/sh", "-c", "true"]}},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 9002}},
                        }
                    ],
                },
            }
        },
    }


AUTH = {"name": "TS_AUTHKEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}


def test_relay_spec_reads_env_ports_user_and_policies() -> None:
    pol = {
        "kind": "NetworkPolicy",
        "metadata": {"namespace": "ns"},
        "spec": {"podSelector": {"matchLabels": {"app": "relay"}}, "policyTypes": ["Egress"], "egress": []},
    }
    other = {**pol, "metadata": {"namespace": "elsewhere"}}
    spec = relay_spec_from_manifests(
        [
            _deployment(
                [AUTH, {"name": "TS_SOCKS5_SERVER", "value": ":1080"}, {"name": "TS_KUBE_SECRET", "value": ""}]
            ),
            pol,
            other,
        ]
    )
    assert spec.env == {"TS_SOCKS5_SERVER": ":1080", "TS_KUBE_SECRET": ""}
    assert spec.authkey_env == "TS_AUTHKEY"
    assert spec.proxy_ports == [1080]
    assert (spec.run_as_user, spec.run_as_group) == (65532, 65532)
    assert spec.network_policies == [pol]


def test_relay_spec_rejects_other_value_from() -> None:
    env = [AUTH, {"name": "TS_HOSTNAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    with pytest.raises(TopologyError, match="TS_HOSTNAME"):
        relay_spec_from_manifests([_deployment(env)])


def test_netpol_translation_ipblocks_ports_and_except() -> None:
    pol = {
        "spec": {
            "egress": [
                {"to": [{"ipBlock": {"cidr": "198.51.100.10/32"}}], "ports": [{"protocol": "TCP", "port": 443}]},
                {
                    "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                    "ports": [{"protocol": "UDP", "port": 41641, "endPort": 41645}],
                },
                {"to": [{"ipBlock": {"cidr": "2001:db8::/64"}}]},
                {"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53}]},
            ]
        }
    }
    rules = netpol_to_iptables([pol])
    v4 = [" ".join(r) for r in rules[4]]
    v6 = [" ".join(r) for r in rules[6]]
    assert "-A TSE-EGRESS -d 198.51.100.10/32 -j TSE-P1" in v4
    assert "-A TSE-P1 -p tcp --dport 443 -j ACCEPT" in v4
    assert "-A TSE-P2 -d 10.0.0.0/8 -j RETURN" in v4
    assert "-A TSE-P2 -p udp --dport 41641:41645 -j ACCEPT" in v4
    assert "-A TSE-P3 -j ACCEPT" in v6
    assert v4[-1].endswith("-j REJECT --reject-with icmp-port-unreachable")
    assert v6[-1].endswith("-j REJECT --reject-with icmp6-port-unreachable")
    # selector peers (DNS) add nothing in this topology
    assert not any("53" in r for r in v4 + v6)
