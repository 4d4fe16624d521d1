"""The proxy settings workloads load with `envFrom` (a ConfigMap per
protected namespace). Nothing in them is secret."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from builders.kube import Manifest, metadata
from builders.relay import HTTP_PROXY_PORT, SOCKS5_PORT

PROXY_CONFIGMAP: Final = "tailscale-egress-proxy"


def proxy_urls(relay_host: str) -> dict[str, str]:
    return {
        "http": f"http://{relay_host}:{HTTP_PROXY_PORT}",
        # socks5h: the relay resolves names, so no lookup leaks from the pod.
        "socks5": f"socks5h://{relay_host}:{SOCKS5_PORT}",
    }


def proxy_environment(relay_host: str, pod_cidr: str, service_cidr: str, cluster_domain: str) -> dict[str, str]:
    """HTTP(S)_PROXY, ALL_PROXY and NO_PROXY in both cases (tools read either).

    NO_PROXY keeps in-cluster traffic direct: it stays subject to the
    namespace's NetworkPolicy (same namespace and DNS only).
    """
    urls = proxy_urls(relay_host)
    no_proxy = ",".join(
        [
            "localhost",
            "127.0.0.1",
            "::1",
            pod_cidr,
            service_cidr,
            f".{cluster_domain}",
            ".svc",
            "kubernetes.default",
        ]
    )
    values = {
        "http_proxy": urls["http"],
        "https_proxy": urls["http"],
        "all_proxy": urls["socks5"],
        "no_proxy": no_proxy,
    }
    return {**{k.upper(): v for k, v in values.items()}, **values}


def proxy_configmap(namespace: str, env: Mapping[str, str]) -> Manifest:
    """The ConfigMap a workload names in `envFrom` (see the `usage` output)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(PROXY_CONFIGMAP, namespace),
        "data": dict(env),
    }
