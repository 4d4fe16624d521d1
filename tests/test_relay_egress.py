"""Where the relay itself may go: pinned when every address is known, the
public internet otherwise, and a private login server at its address alone."""

from __future__ import annotations

from typing import Any

from builders.network_policies import relay_egress
from tests.stacks import dev_config, kube_objects, with_config
from tools.mockstack import evaluate


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


def test_a_hetzner_exit_node_with_tailscales_hosted_control_plane_gets_the_public_internet() -> None:
    rules = relay_egress_rules(dev_config())
    assert ip_rules(rules) == [("0.0.0.0/0", "any", None), ("::/0", "any", None)]
    public = next(r for r in rules if any("ipBlock" in p for p in r["to"]))
    excepted = {c for peer in public["to"] for c in peer["ipBlock"]["except"]}
    for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "127.0.0.0/8"):
        assert private in excepted
    for private in ("fc00::/7", "fe80::/10", "::/8"):
        assert private in excepted


def test_known_control_plane_addresses_pin_the_relay_to_them_and_the_exit_node() -> None:
    config = with_config(dev_config(), "tailnet", controlPlaneCidrs=["192.0.2.0/28"])
    assert ip_rules(relay_egress_rules(config)) == [
        ("192.0.2.0/28", "TCP", 80),
        ("192.0.2.0/28", "TCP", 443),
        ("192.0.2.0/28", "UDP", 3478),
        # The exit node's public IPs, as Hetzner reports them (the fakes').
        ("2001:db8:1::1/128", "UDP", 41641),
        ("203.0.113.10/32", "UDP", 41641),
    ]


def test_a_private_login_server_is_reachable_at_its_address_and_port_alone() -> None:
    config = with_config(dev_config(), "exitNode", existingTailnetIp="100.64.0.1")
    config = with_config(config, "tailnet", loginServer="http://192.168.1.50:8080")
    config["tailscale-egress:relayAuthKey"] = "tskey-auth-MOCK"
    rules = ip_rules(relay_egress_rules(config, secret_keys=("tailscale-egress:relayAuthKey",)))
    # Its own exit node's public IPs are unknown: the public internet, plus the login server.
    assert ("192.168.1.50/32", "TCP", 8080) in rules and ("192.168.1.50/32", "UDP", 3478) in rules
    assert ("0.0.0.0/0", "any", None) in rules
    assert not [r for r in rules if r[0].startswith("192.168.") and r[0] != "192.168.1.50/32"]


def test_a_login_server_named_by_hostname_cannot_be_pinned() -> None:
    egress = relay_egress(["203.0.113.10"], None, [])
    assert egress.public_internet and egress.destinations == ()
