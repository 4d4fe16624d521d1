"""What a workload in a protected namespace is given to reach the internet:
proxy settings for envFrom, outputs that say how to use them."""

from __future__ import annotations

from tests.stacks import dev, kube_objects, pinned


def proxy_settings(namespace: str) -> dict[str, str]:
    (configmap,) = [c for c in kube_objects(pinned(), "ConfigMap") if c["metadata"]["namespace"] == namespace]
    assert configmap["metadata"]["name"] == "tailscale-egress-proxy"
    data: dict[str, str] = configmap["data"]
    return data


def test_every_protected_namespace_gets_the_proxy_settings() -> None:
    for namespace in ("default", "team-a", "team-b"):
        settings = proxy_settings(namespace)
        relay = "relay.tailscale-egress.svc.cluster.local"
        for var in ("HTTP_PROXY", "HTTPS_PROXY"):
            assert settings[var] == settings[var.lower()] == f"http://{relay}:3128"
        # socks5h: names are resolved by the relay, not by the pod.
        assert settings["ALL_PROXY"] == settings["all_proxy"] == f"socks5h://{relay}:1080"


def test_cluster_traffic_bypasses_the_proxy() -> None:
    no_proxy = proxy_settings("default")["NO_PROXY"].split(",")
    assert proxy_settings("default")["no_proxy"] == proxy_settings("default")["NO_PROXY"]
    for entry in ("10.42.0.0/16", "10.43.0.0/16", ".cluster.local", ".svc", "localhost", "127.0.0.1"):
        assert entry in no_proxy


def test_the_relay_service_serves_both_proxy_ports() -> None:
    (service,) = kube_objects(dev(), "Service")
    assert service["metadata"] == {**service["metadata"], "name": "relay", "namespace": "tailscale-egress"}
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("socks5", 1080), ("http-proxy", 3128)}
    (deployment,) = kube_objects(dev(), "Deployment")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_outputs_tell_a_developer_where_the_proxies_are_and_how_to_use_them() -> None:
    outputs = dev().outputs
    assert outputs["relayHttpProxy"] == "http://relay.tailscale-egress.svc.cluster.local:3128"
    assert outputs["relaySocksProxy"] == "socks5h://relay.tailscale-egress.svc.cluster.local:1080"
    assert outputs["protectedNamespaces"] == ["default"]
    assert "configMapRef: {name: tailscale-egress-proxy}" in outputs["usage"]
    assert outputs["exitNodePublicIps"] and outputs["exitNodeHostname"]


def test_the_relay_egress_mode_is_reported() -> None:
    assert dev().outputs["relayEgress"].startswith("pinned")
    assert pinned().outputs["relayEgress"].startswith("pinned")
