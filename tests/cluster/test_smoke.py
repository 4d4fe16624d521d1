"""The cluster itself works as a k3s node would: Ready, restricted pods of the
probe image run, kube-router enforces a NetworkPolicy for real, and CoreDNS
answers for service names."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.datapath.topology import ECHO_NAME
from tests.support.cluster_env import (
    API_SERVICE_IP,
    DNS_IP,
    INTERNET_IP,
    NODE_IP,
    NODE_NAME,
    PROBE_IMAGE,
    Api,
    Cluster,
)

pytestmark = pytest.mark.cluster

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Api:
    return cluster._api()


def namespace(api: Api, prefix: str) -> Iterator[str]:
    name = f"{prefix}-{secrets.token_hex(3)}"
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": RESTRICTED}})
    try:
        yield name
    finally:
        api.delete("v1", "Namespace", name)


@pytest.fixture
def open_ns(api: Api) -> Iterator[str]:
    yield from namespace(api, "smoke-open")


@pytest.fixture
def deny_ns(api: Api) -> Iterator[str]:
    ns_iter = namespace(api, "smoke-deny")
    ns = next(ns_iter)
    api.apply(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny-egress", "namespace": ns},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]},
        }
    )
    yield ns
    next(ns_iter, None)


def run_probe(api: Api, ns: str, *args: str, timeout: float = 90) -> dict[str, Any]:
    """One short-lived, Pod-Security-restricted pod of the probe image running
    `probe <args>`; returns the probe's JSON result (and its exit code)."""
    name = f"probe-{secrets.token_hex(3)}"
    # A moment first: kube-router builds the pod's firewall chain from the
    # pod's IP, which it learns only once the pod runs (as in k3s).
    script = "sleep 3; exec /usr/local/bin/probe " + " ".join(args)
    api.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "probe"}},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 65532,
                    "runAsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "probe",
                        "image": PROBE_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["/bin/sh", "-c", script],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True,
                        },
                    }
                ],
            },
        }
    )
    deadline = time.monotonic() + timeout
    pod: dict[str, Any] = {}
    while time.monotonic() < deadline:
        pod = api.get("v1", "Pod", name, ns) or {}
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"probe pod {ns}/{name} did not finish in {timeout:.0f}s: {json.dumps(pod.get('status'))}")
    log = api.pod_log(ns, name)
    api.delete("v1", "Pod", name, ns)
    lines = [ln for ln in log.splitlines() if ln.startswith("{")]
    assert lines, f"probe printed no result: {log!r}"
    result: dict[str, Any] = json.loads(lines[-1])
    result["phase"] = pod["status"]["phase"]
    result["pod_ip"] = pod["status"].get("podIP")
    return result


def test_node_is_ready_at_its_topology_address(api: Api) -> None:
    node = api.get("v1", "Node", NODE_NAME)
    assert node is not None
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == NODE_IP
    assert node["spec"].get("podCIDR") == "10.42.0.0/24"


def test_restricted_probe_pod_reaches_the_internet_without_a_policy(api: Api, open_ns: str) -> None:
    r = run_probe(api, open_ns, "tcp", f"{INTERNET_IP}:80")
    assert r["ok"], r
    assert r["phase"] == "Succeeded"
    # The pod has an address of the node's pod range.
    assert str(r["pod_ip"]).startswith("10.42.0."), r


def test_default_deny_egress_policy_blocks_the_internet(api: Api, deny_ns: str) -> None:
    r = run_probe(api, deny_ns, "tcp", f"{INTERNET_IP}:80", "-timeout", "4s")
    assert not r["ok"], f"kube-router let a pod under default-deny egress reach the internet: {r}"
    assert r["phase"] == "Failed"


def test_cluster_dns_resolves_service_names(api: Api, open_ns: str) -> None:
    r = run_probe(api, open_ns, "dns", "kubernetes.default.svc.cluster.local")
    assert r["ok"], r
    assert r["addrs"] == [API_SERVICE_IP]
    # Through the pod's own resolv.conf (ClusterFirst: the kube-dns Service).
    r = run_probe(api, open_ns, "dns", "kube-dns.kube-system", "-timeout", "4s")
    assert r["ok"], r
    assert r["addrs"] == [DNS_IP]


def test_cluster_dns_forwards_other_names_to_the_hosts_resolver(cluster: Cluster, api: Api, open_ns: str) -> None:
    """As on k3s: CoreDNS answers what is not a cluster name from the node's
    resolv.conf, a resolver on the host, and the query leaves from the node."""
    r = run_probe(api, open_ns, "dns", f"{ECHO_NAME}.", "-timeout", "4s")
    assert r["ok"], r
    assert r["addrs"] == [INTERNET_IP]
    asked = [q for q in cluster.host_dns_queries() if q["name"] == ECHO_NAME]
    assert asked, f"the host's resolver never saw {ECHO_NAME}: {cluster.host_dns_queries()}"
    assert {q["peer"] for q in asked} == {NODE_IP}
