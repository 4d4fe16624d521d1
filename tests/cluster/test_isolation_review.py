"""Issue 19, the second isolation review, on the real cluster: the
cluster-only stack deployed as tests/cluster/test_e2e.py deploys it (real
engine, kubelet, containerd, the CNI bridge `cni0`, kube-router, CoreDNS,
headscale and a tailscaled exit node), then each way around the isolation
that the review found, tried from a pod as a user's workload would.

Every "unreachable" target is first shown answering: from the node itself
(its own network namespace) where the node guard closes the path for every
pod, from a pod of a namespace the stack does not protect where a policy
closes it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pulumi import automation as auto

from builders.relay import HEALTH_PORT, HTTP_PROXY_PORT, RELAY_CONTAINER
from tests.cluster.test_e2e import node_guard_state, node_probe
from tests.datapath.topology import EXIT_PUBLIC_IP, ROUTER
from tests.stacks import RELAY_AUTH_KEY, with_config
from tests.support.cluster_env import API_PORT, INTERNET_IP, Cluster, ClusterError
from tests.support.deployment import (
    OPEN,
    PROTECTED,
    RELAY_NS,
    SERVER_PORT,
    DeployError,
    Deployment,
    deploy,
    kubectl,
    kubectl_command,
    namespace_labels,
    pod,
    running_pod,
    wait,
)

pytestmark = pytest.mark.cluster

STACK = "isolation"  # its own stack (and state): test_e2e.py's is destroyed by then
KUBELET_PORT = 10250
PSA = "pod-security.kubernetes.io"
# Inside the cluster's ranges, used by nothing: the pod range outside the
# node's own /24, and the service range. The "host" (the topology's router,
# the node's gateway) answers at both, as a corporate VPN on 10/8 would.
UNUSED_POD_IP = "10.42.250.250"
UNUSED_SERVICE_IP = "10.43.250.250"


@pytest.fixture(scope="module")
def review(cluster: Cluster) -> Iterator[Deployment]:
    with contextlib.ExitStack() as cleanup:
        try:
            d = deploy(cluster, cleanup, stack_name=STACK)
        except DeployError as e:
            if os.environ.get("CI", "").lower() == "true" or "not built" not in str(e):
                pytest.fail(str(e), pytrace=False)
            pytest.skip(str(e))
        if not d.node_guard:
            pytest.fail("the relay image has no iptables: the node guard cannot run (see test_e2e.py)", pytrace=False)
        wait("the node guard's rules", lambda: guard_installed(d), 90, 1)
        yield d


def guard_installed(d: Deployment) -> bool:
    ns = f"{RELAY_NS}-node-guard"
    return any(
        "rules installed" in kubectl("logs", "-n", ns, p["metadata"]["name"]).stdout
        for p in d.api.list("v1", "Pod", ns)
    )


def pod_link_local(namespace: str, name: str, container: str | None = None) -> str:
    """The pod's fe80:: address on its eth0 (the CNI bridge's link), read inside it."""
    where = ["-c", container] if container else []
    p = kubectl("exec", "-n", namespace, name, *where, "--", "cat", "/proc/net/if_inet6")
    for line in p.stdout.splitlines():
        address, _, _, scope, _, interface = line.split()
        if interface == "eth0" and scope == "20":  # 0x20: link scope
            return str(ipaddress.IPv6Address(int(address, 16)))
    raise AssertionError(f"{namespace}/{name} has no IPv6 link-local address: the checks would prove nothing\n{p}")


def node_link_local(d: Deployment, interface: str = "cni0") -> str:
    p = subprocess.run(
        ["ip", "netns", "exec", d.cluster.ns("node"), "ip", "-6", "-o", "addr", "show", "dev", interface, "scope",
         "link"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    for word in p.stdout.split():
        if word.startswith("fe80:"):
            return word.split("/")[0]
    raise AssertionError(f"the node's {interface} has no link-local address: {p.stdout}{p.stderr}")


def relay_pod(d: Deployment) -> str:
    wait("the relay pod Ready", d.relay_ready, 120)
    return str(d.relay_pods()[0]["metadata"]["name"])


def in_pod(address: str, port: int, zone: str = "eth0") -> str:
    """host:port for a probe in a pod (quoted: the shell would read [..] as a pattern)."""
    return shlex.quote(f"[{address}%{zone}]:{port}")


# ---------------------------------------------------------------- point 1: IPv6 link-local
def test_a_protected_pod_cannot_reach_another_namespaces_pod_at_its_link_local_address(review: Deployment) -> None:
    server = pod_link_local(OPEN, "server")
    assert node_probe(review, "tcp", f"[{server}%cni0]:{SERVER_PORT}")["ok"], "the server does not answer on IPv6"
    # Over IPv4 the policy holds (test_e2e.py); over fe80:: nothing looked.
    assert not review.workload("tcp", f"{review.server_ip}:{SERVER_PORT}")["ok"]
    r = review.workload("tcp", in_pod(server, SERVER_PORT))
    assert not r["ok"], (
        f"the protected workload reached {OPEN}/server at [{server}%eth0]: {r}\n{node_guard_state(review)}"
    )


@pytest.mark.parametrize("port", [KUBELET_PORT, API_PORT], ids=["kubelet", "api-server"])
def test_a_protected_pod_cannot_reach_the_nodes_services_at_the_bridges_link_local_address(
    review: Deployment, port: int
) -> None:
    node = node_link_local(review)
    assert node_probe(review, "tcp", f"[{node}%cni0]:{port}")["ok"], f"nothing answers at [{node}]:{port}"
    r = review.workload("tcp", in_pod(node, port))
    assert not r["ok"], f"the protected workload reached the node at [{node}%eth0]:{port}: {r}"


def test_a_namespace_the_relay_refuses_cannot_use_it_at_its_link_local_address(review: Deployment) -> None:
    """`relay-ingress` admits only the protected namespaces, by their pods'
    cluster addresses; the relay listens on its pod address alone (issue 19,
    point 2), so its link-local address serves nothing, even to the node."""
    relay = pod_link_local(RELAY_NS, relay_pod(review), RELAY_CONTAINER)
    url = f"http://{INTERNET_IP}/ip"
    via_node = node_probe(review, "http", url, "-proxy", f"http://{review.relay_pod_ip()}:{HTTP_PROXY_PORT}")
    assert via_node["ok"] and via_node["body"].strip() == EXIT_PUBLIC_IP, f"the relay's proxy: {via_node}"
    for port in (HTTP_PROXY_PORT, HEALTH_PORT):
        assert not node_probe(review, "tcp", f"[{relay}%cni0]:{port}")["ok"], f"the relay listens at [{relay}]:{port}"
    r = review.control("http", url, "-proxy", shlex.quote(f"http://[{relay}%25eth0]:{HTTP_PROXY_PORT}"), timeout="8s")
    assert not r["ok"], f"{OPEN}/control, refused by relay-ingress, used the relay at [{relay}%eth0]: {r}"
    r = review.control("tcp", in_pod(relay, HEALTH_PORT))
    assert not r["ok"], f"{OPEN}/control reached the relay's health port at [{relay}%eth0]: {r}"


def test_the_ipv4_paths_are_unchanged(review: Deployment) -> None:
    wait("the relay pod Ready", review.relay_ready, 120)
    r = review.workload("http", f"http://{INTERNET_IP}/ip", '-proxy "$HTTP_PROXY"', timeout="15s")
    assert r["ok"] and r["body"].strip() == EXIT_PUBLIC_IP, r
    assert review.control("tcp", f"{review.server_ip}:{SERVER_PORT}")["ok"]
    assert review.workload("tcp", f"{review.relay_pod_ip()}:{HTTP_PROXY_PORT}")["ok"]
    assert not review.workload("tcp", f"{INTERNET_IP}:80")["ok"]


# ---------------------------------------------------------------- point 4: ICMP to unused cluster addresses
@pytest.fixture
def host_answers_inside_the_cluster_ranges(review: Deployment) -> Iterator[None]:
    router = review.cluster.ns(ROUTER)
    for ip in (UNUSED_POD_IP, UNUSED_SERVICE_IP):
        subprocess.run(["ip", "netns", "exec", router, "ip", "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
    try:
        yield
    finally:
        for ip in (UNUSED_POD_IP, UNUSED_SERVICE_IP):
            subprocess.run(["ip", "netns", "exec", router, "ip", "addr", "del", f"{ip}/32", "dev", "lo"], check=False)


@pytest.mark.usefixtures("host_answers_inside_the_cluster_ranges")
@pytest.mark.parametrize("target", [UNUSED_POD_IP, UNUSED_SERVICE_IP], ids=["pod-range", "service-range"])
def test_icmp_to_an_unused_cluster_address_does_not_leave_the_node(review: Deployment, target: str) -> None:
    node_ping = subprocess.run(
        ["ip", "netns", "exec", review.cluster.ns("node"), "busybox", "ping", "-c1", "-W2", target],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert node_ping.returncode == 0, f"the host does not answer {target}: the check would prove nothing"
    r = review.workload("ping", target)
    assert not r["ok"], f"the protected workload's ICMP to {target} left the node and came back: {r}"
    # ICMP inside the node's own pod range is still the cluster's business.
    assert review.control("ping", review.server_ip)["ok"]


# ---------------------------------------------------------------- point 7: DNS is the stack's own selector
def test_egress_to_any_kube_system_pod_on_port_53_is_refused(review: Deployment) -> None:
    wide = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "kube-system-port-53", "namespace": PROTECTED},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                }
            ],
        },
    }
    try:
        with pytest.raises(ClusterError, match=r"HTTP (403|422).*egress-only-via-relay"):
            review.api.apply(wide)
    finally:
        review.api.delete("networking.k8s.io/v1", "NetworkPolicy", "kube-system-port-53", PROTECTED)


# ---------------------------------------------------------------- point 6: labels through the subresources
@pytest.mark.parametrize("subresource", ["status", "finalize"])
def test_pod_security_labels_cannot_be_changed_through_a_namespace_subresource(
    review: Deployment, subresource: str
) -> None:
    other = ("--as=mallory", "--as-group=system:masters")
    namespace = review.api.get("v1", "Namespace", PROTECTED)
    assert namespace is not None
    namespace["metadata"]["labels"][f"{PSA}/enforce"] = "privileged"
    path = f"/api/v1/namespaces/{PROTECTED}/{subresource}"
    try:
        p = subprocess.run(
            kubectl_command(*other, "replace", "--raw", path, "-f", "-"),
            input=json.dumps(namespace), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert p.returncode != 0, f"mallory set {PSA}/enforce=privileged through {path}: {p.stdout[:300]}"
        assert "pod-security-labels" in p.stdout + p.stderr, p.stdout + p.stderr
        assert namespace_labels(review.api, PROTECTED).get(f"{PSA}/enforce") == "restricted"
    finally:
        # Where it was admitted, the deployer gives the label back.
        kubectl("label", "namespace", PROTECTED, f"{PSA}/enforce=restricted", "--overwrite")


# ---------------------------------------------------------------- points 10 and 11: the preflight
def preview(d: Deployment, config: dict[str, Any]) -> tuple[str, auto.CommandError | None]:
    d.engine.write_config(STACK, config, secret_keys=(RELAY_AUTH_KEY,))
    output: list[str] = []
    try:
        d.stack.preview(on_output=output.append, color="never")
    except auto.CommandError as err:
        return "".join(output), err
    finally:
        d.engine.write_config(STACK, d.config, secret_keys=(RELAY_AUTH_KEY,))
    return "".join(output), None


def test_the_preflight_refuses_pod_and_service_ranges_that_are_not_the_clusters(review: Deployment) -> None:
    wrong = with_config(review.config, "cluster", podCidr="10.99.0.0/16", serviceCidr="10.96.0.0/12")
    t = time.monotonic()
    output, err = preview(review, wrong)
    assert err is not None, f"previewed with podCidr 10.99.0.0/16 and serviceCidr 10.96.0.0/12:\n{output[-3000:]}"
    text = output + str(err)
    assert "tailscale-egress:cluster.podCidr = '10.99.0.0/16': the cluster's pods are not in it" in text, text[-3000:]
    assert "node tse-node has 10.42.0.0/24" in text
    assert "pulumi config set --path cluster.podCidr" in text
    assert "tailscale-egress:cluster.serviceCidr = '10.96.0.0/12'" in text
    assert "ServiceCIDR kubernetes has 10.43.0.0/16" in text
    review.timings["refused preview"] = round(time.monotonic() - t, 1)


def test_the_preflight_warns_when_the_deployer_is_kubectls_everyday_identity(
    review: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's kubeconfig as kubectl's default: its user, tse-admin, is the stack's deployer."""
    monkeypatch.setenv("KUBECONFIG", str(review.cluster.kubeconfig))
    output, err = preview(review, review.config)
    assert err is None, f"{err}\n{output[-3000:]}"
    assert "the stack deploys as 'tse-admin', the identity kubectl uses by default" in output, output[-3000:]


# ---------------------------------------------------------------- point 9: the node guard's own namespace
# Last: before the fix, these change the guard itself.
GUARD_NS = f"{RELAY_NS}-node-guard"
MALLORY = ("--as=mallory", "--as-group=system:masters")  # another cluster admin, not the deployer


def test_nobody_but_the_deployer_changes_the_node_guards_daemonset(review: Deployment) -> None:
    p = kubectl(*MALLORY, "-n", GUARD_NS, "set", "image", "daemonset/node-guard", "guard=local/probe:1")
    assert p.returncode != 0, f"mallory changed the node guard's image: {p.stdout}"
    assert "stack-objects" in p.stderr, p.stderr
    p = kubectl(*MALLORY, "-n", GUARD_NS, "delete", "daemonset", "node-guard", "--wait=false")
    assert p.returncode != 0, f"mallory deleted the node guard: {p.stdout}"


def test_no_other_pod_runs_in_the_node_guards_privileged_namespace(review: Deployment) -> None:
    rogue = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "rogue", "namespace": GUARD_NS},
        "spec": {
            "hostNetwork": True,
            "containers": [
                {"name": "main", "image": "local/probe:1", "command": ["sleep", "60"],
                 "securityContext": {"privileged": True}}
            ],
        },
    }  # fmt: skip
    try:
        p = subprocess.run(
            kubectl_command(*MALLORY, "create", "-f", "-"),
            input=json.dumps(rogue), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert p.returncode != 0, f"mallory ran a privileged host-network pod in {GUARD_NS}: {p.stdout}"
        assert "node-guard-pods" in p.stderr, p.stderr
    finally:
        review.api.delete("v1", "Pod", "rogue", GUARD_NS)


def test_nobody_but_the_deployer_execs_into_the_node_guard(review: Deployment) -> None:
    (guard,) = [p["metadata"]["name"] for p in review.api.list("v1", "Pod", GUARD_NS)]
    p = kubectl(*MALLORY, "-n", GUARD_NS, "exec", guard, "--", "iptables-legacy-save")
    assert p.returncode != 0, f"mallory ran a command in the node guard (host network, NET_ADMIN): {p.stdout[:300]}"
    assert "node-guard-exec" in p.stderr, p.stderr


# ---------------------------------------------------------------- point 8: ingress and Services
@pytest.fixture(scope="module")
def protected_server(review: Deployment) -> Iterator[str]:
    """A server in the protected namespace, as a developer's app would run."""
    server = running_pod(review.api, pod("inner", PROTECTED, f"exec httpd -f -p {SERVER_PORT} -h /tmp"))
    yield str(server["status"]["podIP"])
    kubectl("delete", "pod", "-n", PROTECTED, "inner", "--wait=false")


def test_another_namespaces_pod_cannot_open_a_connection_to_a_protected_pod(
    review: Deployment, protected_server: str
) -> None:
    target = f"{protected_server}:{SERVER_PORT}"
    assert review.workload("tcp", target)["ok"], "the protected server does not answer its own namespace"
    r = review.control("tcp", target)
    assert not r["ok"], f"{OPEN}/control opened a connection to {PROTECTED}/inner, a channel past the relay: {r}"


@pytest.mark.parametrize(
    "spec",
    [{"type": "NodePort"}, {"type": "LoadBalancer"}, {"externalIPs": [EXIT_PUBLIC_IP]}],
    ids=["node-port", "load-balancer", "external-ips"],
)
def test_a_protected_namespace_cannot_expose_its_pods_or_take_an_address_over(
    review: Deployment, spec: dict[str, Any]
) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "exposed", "namespace": PROTECTED},
        "spec": {"selector": {"app": "inner"}, "ports": [{"port": SERVER_PORT}], **spec},
    }
    p = subprocess.run(
        kubectl_command("create", "-f", "-"), input=json.dumps(service), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    if p.returncode == 0:
        kubectl("delete", "service", "-n", PROTECTED, "exposed", "--wait=false")
    assert p.returncode != 0 and "ValidatingAdmissionPolicy" in p.stderr, f"admitted: {spec}\n{p.stdout}{p.stderr}"
