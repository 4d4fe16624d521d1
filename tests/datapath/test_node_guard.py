"""Issue 8, point 5: the paths below NetworkPolicy, closed by the node guard.

The router namespace is the node. It filters the workload as kube-router
does (topology.apply_kube_router: the rendered policies of the workload's
namespace, and before them kube-router's unconditional ICMP accepts; the
node's own NodePorts exempt). The workload pings as an unprivileged pod
does on containerd 2: uid 65534, no capabilities, an ICMP datagram socket
allowed by net.ipv4.ping_group_range. The guard is the exact script of the
rendered DaemonSet, run in the node namespace by the image's shell
(busybox sh) with only NET_ADMIN and NET_RAW, as the pod runs it.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from builders.node_guard import chain_names
from tests.support.tools import missing

from .topology import (
    ECHO_NAME,
    EXIT_PUBLIC_IP,
    IMAGE_PATH,
    INTERNET_IP,
    LAN_IP,
    LINKS,
    RELAY_IP,
    ROUTER,
    WORKLOAD_IP,
    Proc,
    Topology,
    load_manifests,
    start_full,
    wait_for,
)

pytestmark = pytest.mark.datapath

# The node's own address outside the cluster's ranges (its LAN side: the host, as the pod sees it).
NODE_IP = str(next(ipaddress.ip_network(LINKS["lan"][0]).hosts()))
NODE_PORT = 30080
OTHER_NODE_PORT = 8080  # not a NodePort: the pod's policy applies, with or without the guard
PAYLOAD = "exfiltrated-by-icmp"
# A Python the pod's uid (65534) can run (the venv's may live under /root).
POD_PYTHON = Path("/usr/bin/python3")

# An unprivileged ping: SOCK_DGRAM ICMP (what containerd 2 allows every pod), the payload echoed back.
PINGER = """
import socket, struct, sys
dst, payload = sys.argv[1], sys.argv[2].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.settimeout(1.0)
for seq in range(1, 4):
    s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, seq) + payload, (dst, 0))
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        continue
    if data[0] == 0 and data[8:] == payload:
        print(peer[0]); sys.exit(0)
sys.exit(1)
"""
UDP_PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
for _ in range(3):
    s.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(64)[0].decode()); sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
"""
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(64)
    s.sendto(b"node-port-udp", peer)
"""


def as_pod(t: Topology, args: list[str], timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """Run in the workload netns as a restricted pod's process: uid 65534, no capabilities."""
    priv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    priv += ["--bounding-set=-all", "--no-new-privs"]
    return t.run("workload", [*priv, *args], check=False, timeout=timeout)


def ping(t: Topology, dst: str) -> bool:
    return as_pod(t, [str(POD_PYTHON), "-c", PINGER, dst, PAYLOAD]).returncode == 0


def node_port_tcp(t: Topology, port: int = NODE_PORT) -> bool:
    return t.curl(f"http://{NODE_IP}:{port}/", timeout=3).returncode == 0


def node_port_udp(t: Topology) -> bool:
    p = as_pod(t, [str(POD_PYTHON), "-c", UDP_PROBE, NODE_IP, str(NODE_PORT)])
    return p.returncode == 0 and p.stdout.strip() == "node-port-udp"


def via_relay(t: Topology) -> bool:
    p = t.curl(f"https://{ECHO_NAME}/ip", proxy=t.http_proxy(), timeout=10)
    return p.returncode == 0 and p.stdout.strip() == EXIT_PUBLIC_IP


def guard_script(t: Topology) -> str:
    (ds,) = [o for o in load_manifests(t.workdir / "render" / "manifests") if o.get("kind") == "DaemonSet"]
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["/bin/sh", "-c"], command
    caps = container["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    return str(command[2])


def start_guard(t: Topology, script: str, name: str) -> Proc:
    """The DaemonSet's container on the node: root with NET_ADMIN and NET_RAW only.
    Its own `name` per start: a log of its own."""
    priv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_admin,+net_raw", "--no-new-privs"]
    return t.spawn(
        ROUTER,
        name,
        [*priv, "busybox", "sh", "-c", script, "node-guard"],
        env={"PATH": IMAGE_PATH},
    )


def mangle(t: Topology) -> str:
    return t.run(ROUTER, ["iptables-nft-save", "-t", "mangle"]).stdout


@pytest.fixture(scope="module")
def node(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """Relay ready, the workload filtered by kube-router on the node, a
    listener on the node's address on a NodePort (TCP, UDP) and on 8080."""
    if not POD_PYTHON.exists() or shutil.which("busybox") is None:
        missing("/usr/bin/python3 and busybox", "sudo apt-get install python3 busybox-static")
    t = start_full(tmp_path_factory.mktemp("guard"), bin_dir, policy=True)
    try:
        t.wait_relay_ready()
        t.apply_kube_router(load_manifests(t.workdir / "render" / "manifests"))
        # containerd 2 (enable_unprivileged_icmp): every pod may open ICMP datagram sockets.
        t.run("workload", ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
        for port in (NODE_PORT, OTHER_NODE_PORT):
            server = [sys.executable, "-m", "http.server", str(port), "--bind", NODE_IP]
            t.spawn(ROUTER, f"node-listener-{port}", server)
        t.spawn(ROUTER, "node-listener-udp", [sys.executable, "-c", UDP_ECHO, NODE_IP, str(NODE_PORT)])
        url = f"http://{NODE_IP}:{NODE_PORT}/"
        wait_for("node listener", lambda: t.curl(url, role=ROUTER, timeout=2).returncode == 0, 15)
        yield t
    finally:
        t.close()


TARGETS = {"internet": INTERNET_IP, "lan": LAN_IP, "host": NODE_IP}


def reachable(t: Topology) -> dict[str, bool]:
    seen = {name: ping(t, ip) for name, ip in TARGETS.items()}
    seen["nodeport-tcp"] = node_port_tcp(t)
    seen["nodeport-udp"] = node_port_udp(t)
    return seen


def test_without_the_guard_icmp_and_node_ports_get_past_the_policy(node: Topology) -> None:
    # The policy itself holds: TCP straight out, or to the node on another port, is rejected.
    assert node.curl(f"http://{INTERNET_IP}/ip", timeout=3).returncode != 0
    assert not node_port_tcp(node, OTHER_NODE_PORT)
    # kube-router's accepts: an unprivileged pod pings (payload and all) the
    # internet, the LAN and the host, and reaches the node's NodePorts.
    assert reachable(node) == dict.fromkeys([*TARGETS, "nodeport-tcp", "nodeport-udp"], True)
    assert via_relay(node)


def test_with_the_guard_they_are_closed_and_the_relay_still_works(node: Topology) -> None:
    guard = start_guard(node, guard_script(node), "node-guard")
    try:
        wait_for("guard rules", lambda: "node-guard: rules installed" in guard.log.read_text() or not guard.alive(), 20)
        assert guard.alive(), guard.tail()
        assert "node-guard: rules installed (nft)" in guard.tail()  # the backend the node's kube-router uses
        assert reachable(node) == dict.fromkeys([*TARGETS, "nodeport-tcp", "nodeport-udp"], False)
        assert via_relay(node), "the relay path broke under the guard"
        assert ping(node, RELAY_IP), "ICMP inside the cluster's ranges is not the guard's business"
    finally:
        rc = guard.stop()
    # Pod deleted (stack destroyed, or nodeGuard turned off): its rules go with it.
    assert rc == 0, guard.tail()
    assert "TSE-GUARD" not in mangle(node)
    assert ping(node, INTERNET_IP)


def test_the_guard_puts_its_rules_back_and_first(node: Topology) -> None:
    guard = start_guard(node, guard_script(node), "node-guard-again")
    try:
        wait_for("guard rules", lambda: "node-guard: rules installed" in guard.log.read_text() or not guard.alive(), 20)
        chains = [line.split()[0][1:] for line in mangle(node).splitlines() if line.startswith(":TSE-GUARD-")]
        main, _, forward = chain_names(min(chains, key=len))
        assert {main, forward} <= set(chains), chains
        # Someone flushes the guard's chains and puts an ACCEPT in front of its jumps
        # (PREROUTING: the pod ranges; FORWARD: routed ICMP).
        for chain in chains:
            node.run(ROUTER, ["iptables", "-t", "mangle", "-F", chain])
        for hook in ("PREROUTING", "FORWARD"):
            node.run(ROUTER, ["iptables", "-t", "mangle", "-I", hook, "1", "-j", "ACCEPT"])
        assert ping(node, INTERNET_IP)
        wait_for("guard back in place", lambda: not ping(node, INTERNET_IP), 20, interval=1)
        for hook, chain in (("PREROUTING", main), ("FORWARD", forward)):
            first = node.run(ROUTER, ["iptables", "-t", "mangle", "-S", hook]).stdout.splitlines()[1]
            assert first.endswith(f"-j {chain}"), (hook, first)
    finally:
        guard.stop()
        for hook in ("PREROUTING", "FORWARD"):
            node.run(ROUTER, ["iptables", "-t", "mangle", "-D", hook, "-j", "ACCEPT"], check=False)


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_the_guard_detects_the_backend_kube_router_uses(node: Topology, backend: str, tmp_path: Path) -> None:
    """Real iptables binaries, a scratch node namespace whose only rules are
    kube-router's chains in one backend."""
    ns = f"{node.prefix}detect-{backend}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:

        def in_ns(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["ip", "netns", "exec", ns, *args], capture_output=True, text=True, check=False, timeout=30
            )

        in_ns(f"iptables-{backend}", "-N", "KUBE-ROUTER-INPUT").check_returncode()
        in_ns(f"iptables-{backend}", "-I", "INPUT", "1", "-j", "KUBE-ROUTER-INPUT").check_returncode()
        p = in_ns("env", f"PATH={IMAGE_PATH}", "busybox", "sh", "-c", guard_script(node), "node-guard", "detect")
        assert (p.returncode, p.stdout.strip()) == (0, backend), p.stderr
        p = in_ns("env", f"PATH={IMAGE_PATH}", "busybox", "sh", "-c", guard_script(node), "node-guard", "apply")
        assert p.returncode == 0, p.stderr
        assert "TSE-GUARD-" in in_ns(f"iptables-{backend}-save", "-t", "mangle").stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_a_drop_in_the_other_backend_still_drops(node: Topology) -> None:
    """Why the backend matters less than one might fear where a kernel has
    both: legacy and nft each hook PREROUTING, and a DROP in either ends the
    packet, whatever the other accepted. (It matters where a kernel lacks
    one: the guard then exits non-zero and its pod restarts, visibly.)"""
    rule = ["-t", "mangle", "-I", "PREROUTING", "1", "-s", WORKLOAD_IP, "-p", "icmp", "-j", "DROP"]
    assert ping(node, INTERNET_IP)
    node.run(ROUTER, ["iptables-legacy", *rule])
    try:
        assert not ping(node, INTERNET_IP)
    finally:
        node.run(ROUTER, ["iptables-legacy", *[a if a != "-I" else "-D" for a in rule if a != "1"]])
    assert ping(node, INTERNET_IP)
