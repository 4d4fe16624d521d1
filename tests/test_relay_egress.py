"""Where the relay itself may go. Pinned by default, the Hetzner exit node
with Tailscale's hosted control plane included: the exit node's WireGuard
port and the control plane's published ranges, nothing else. The public
internet only on the explicit opt-in, with a warning at `up`."""

from __future__ import annotations

from typing import Any

import pulumi
import pytest

from builders.network_policies import relay_egress
from builders.networks import TAILSCALE_CONTROL_PLANE_CIDRS
from devtools.mockstack import evaluate
from tests.stacks import dev_config, kube_objects, with_config

# The exit node's public IPs, as Hetzner reports them (the fakes').
EXIT_NODE: list[tuple[str, str, int | None]] = [("2001:db8:1::1/128", "UDP", 41641), ("203.0.113.10/32", "UDP", 41641)]


def relay_egress_rules(config: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    evaluation = evaluate(config, "egress", **kwargs)
    assert evaluation.error is None, evaluation.error
    (policy,) = [p for p in kube_objects(evaluation, "NetworkPolicy") if p["metadata"]["name"] == "relay-egress"]
    assert policy["spec"]["policyTypes"] == ["Egress"]
    rules: list[dict[str, Any]] = policy["spec"]["egress"]
    return rules


def ip_rules(rules: list[dict[str, Any]]) -> list[tuple[str, str, int | None]]:
    return sorted(
        (peer["ipBlock"]["cidr"], port["protocol"] if "ports" in rule else "any", port.get("port"))
        for rule in rules
        for peer in rule["to"]
        if "ipBlock" in peer
        for port in rule.get("ports", [{}])
    )


def control_plane(*cidrs: str) -> list[tuple[str, str, int | None]]:
    return [(c, p, n) for c in cidrs for p, n in (("TCP", 80), ("TCP", 443), ("UDP", 3478))]


def test_the_default_stack_is_pinned_to_the_exit_node_and_tailscales_published_control_plane() -> None:
    rules = ip_rules(relay_egress_rules(dev_config()))
    assert rules == sorted(control_plane("192.200.0.0/24", "2606:b740:49::/48") + EXIT_NODE)
    assert not [r for r in rules if r[0] in ("0.0.0.0/0", "::/0")]


def test_tailscales_control_plane_ranges_are_the_published_ones_without_the_logging_ranges() -> None:
    # KB 1082 (tailscale.com/kb/1082/firewall-ports); logs are off in the relay.
    assert TAILSCALE_CONTROL_PLANE_CIDRS == ("192.200.0.0/24", "2606:b740:49::/48")


def test_control_plane_cidrs_replace_the_published_ranges() -> None:
    config = with_config(dev_config(), "tailnet", controlPlaneCidrs=["192.0.2.0/28"])
    assert ip_rules(relay_egress_rules(config)) == sorted(control_plane("192.0.2.0/28") + EXIT_NODE)


def test_the_public_internet_is_an_explicit_opt_in_and_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda msg, *a, **kw: warnings.append(msg))
    rules = relay_egress_rules(with_config(dev_config(), "tailnet", relayEgress="public"))
    assert ip_rules(rules) == [("0.0.0.0/0", "any", None), ("::/0", "any", None)]
    public = next(r for r in rules if any("ipBlock" in p for p in r["to"]))
    excepted = {c for peer in public["to"] for c in peer["ipBlock"]["except"]}
    for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "127.0.0.0/8"):
        assert private in excepted
    for private in ("fc00::/7", "fe80::/10"):
        assert private in excepted
    (warning,) = [w for w in warnings if "relayEgress" in w]
    assert "tailnet.relayEgress is public" in warning and "dials proxy requests directly" in warning
    assert "Set tailnet.relayEgress to pinned" in warning


def test_the_pinned_default_warns_about_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda msg, *a, **kw: warnings.append(msg))
    relay_egress_rules(dev_config())
    assert [w for w in warnings if "relayEgress" in w or "public address" in w] == []


def test_a_private_login_server_is_reachable_at_its_address_and_port_alone() -> None:
    config = with_config(dev_config(), "exitNode", existingTailnetIp="100.64.0.1", existingPublicIps=["198.51.100.7"])
    config = with_config(config, "tailnet", loginServer="http://192.168.1.50:8080")
    config["tailscale-egress:relayAuthKey"] = "tskey-auth-MOCK"
    rules = ip_rules(relay_egress_rules(config, secret_keys=("tailscale-egress:relayAuthKey",)))
    # Self-hosted: not Tailscale's ranges, the login server and the exit node only.
    assert rules == [
        ("192.168.1.50/32", "TCP", 8080),
        ("192.168.1.50/32", "UDP", 3478),
        ("198.51.100.7/32", "UDP", 41641),
    ]


def test_a_private_login_server_stays_reachable_with_the_public_opt_in() -> None:
    config = with_config(dev_config(), "exitNode", existingTailnetIp="100.64.0.1")
    config = with_config(config, "tailnet", loginServer="http://192.168.1.50:8080", relayEgress="public")
    config["tailscale-egress:relayAuthKey"] = "tskey-auth-MOCK"
    rules = ip_rules(relay_egress_rules(config, secret_keys=("tailscale-egress:relayAuthKey",)))
    assert ("192.168.1.50/32", "TCP", 8080) in rules and ("0.0.0.0/0", "any", None) in rules
    assert not [r for r in rules if r[0].startswith("192.168.") and r[0] != "192.168.1.50/32"]


@pytest.mark.parametrize(
    ("ips", "login", "cidrs", "missing"),
    [
        ([], None, [], "the exit node's public IPs"),
        (["203.0.113.10"], None, [], "the control plane's addresses"),  # a login server named by host name
    ],
)
def test_the_builder_never_falls_back_to_the_public_internet(
    ips: list[str], login: tuple[str, int] | None, cidrs: list[str], missing: str
) -> None:
    with pytest.raises(ValueError, match=missing):
        relay_egress(ips, login, cidrs, hosted_control_plane=False)
