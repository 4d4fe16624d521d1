"""The whole promise on a real cluster (issue 9): `pulumi up` of the
cluster-only stack through the real engine into the real single-node cluster
(kubelet, containerd, kube-router enforcing the NetworkPolicies, CoreDNS),
with the topology's headscale as control server and its tailscaled as the
BYO exit node. The relay runs as a pod from the rendered manifest, unchanged.

One deployment for the module; the tests run in the order of the file (the
fail-closed and destroy tests change the deployment, so they come last).
Every "unreachable" target is first shown reachable from a pod of a
namespace the stack does not protect, so a refusal is the policy's doing,
never a server that is not there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pulumi import automation as auto

from builders.proxy_env import PROXY_CONFIGMAP
from builders.relay import HEALTH_PORT, HTTP_PROXY_PORT
from tests.datapath.topology import ECHO_NAME, EXIT_PUBLIC_IP, LAN_IP, ROUTER
from tests.stacks import RELAY_AUTH_KEY, cluster_only_config_on, with_config
from tests.support.apiserver import bin_dir
from tests.support.cluster_env import (
    API_SERVICE_IP,
    BUILD,
    CONTEXT,
    DNS_IP,
    INTERNET_IP,
    NODE_GATEWAY,
    NODE_IP,
    PROBE_IMAGE,
    Api,
    Cluster,
    ClusterError,
)
from tests.support.engine import Engine, missing_engine_binaries

pytestmark = pytest.mark.cluster

STACK = "e2e"
RELAY_NS = "tailscale-egress"
PROTECTED = "e2e-app"  # exists before the stack, labelled in place
PROTECTED_LABELS = {"team": "e2e"}
OPEN = "e2e-open"  # not protected: the control pod, the server pod
RELAY_TAG = "tag:egress-relay"
UDP_PORT = 5599  # the UDP echo servers this module starts in the topology
SERVER_PORT = 8080  # the server pod's TCP port (busybox httpd), and its NodePort
NODE_PORT = 30080
METADATA_IP = "169.254.169.254"
TOPOLOGY = BUILD / "topology"
RESTRICTED_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
}
UDP_ECHO = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "while True:\n"
    "    d,a=s.recvfrom(2048)\n"
    "    s.sendto(d,a)\n"
)


# ---------------------------------------------------------------- tailnet (headscale, exit node)
@dataclass
class Tailnet:
    cluster: Cluster

    @property
    def info(self) -> dict[str, str]:
        return self.cluster.state.tailnet

    def hs(self, *args: str) -> Any:
        # Through `ip netns exec`: Topology(...) would copy binaries headscale is running.
        p = subprocess.run(
            ["ip", "netns", "exec", self.cluster.ns("control"), str(TOPOLOGY / "bin" / "headscale"), "-c",
             self.info["headscale_config"], *args, "-o", "json"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if p.returncode != 0:
            raise ClusterError(f"headscale {' '.join(args)} -> rc={p.returncode}: {p.stdout}{p.stderr}")
        out = p.stdout.strip()
        return json.loads(out) if out else None

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.hs("nodes", "list") or [])

    def relay_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if RELAY_TAG in (n.get("tags") or n.get("forced_tags") or [])]

    def exit_node(self) -> dict[str, Any] | None:
        return next((n for n in self.nodes() if n.get("name") == "exit"), None)

    def relay_key(self) -> str:
        user = next(u for u in self.hs("users", "list") if u["name"] == "tse")
        out = self.hs(
            "preauthkeys", "create", "--user", str(user["id"]), "--expiration", "4h",
            "--reusable", "--ephemeral", "--tags", RELAY_TAG,
        )  # fmt: skip
        return str(out["key"])

    def exit_key(self) -> str:
        user = next(u for u in self.hs("users", "list") if u["name"] == "tse")
        return str(self.hs("preauthkeys", "create", "--user", str(user["id"]), "--expiration", "1h")["key"])

    def approve_exit(self, approve: bool) -> None:
        node = self.exit_node()
        assert node is not None, "the exit node is not in headscale"
        routes = "0.0.0.0/0,::/0" if approve else ""
        self.hs("nodes", "approve-routes", "--identifier", str(node["id"]), "--routes", routes)

    def exit_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TS_NO_LOGS_NO_SUPPORT": "true",
            "SSL_CERT_FILE": str(TOPOLOGY / "ssl/certs/ca-certificates.crt"),
        }

    def stop_exit(self) -> None:
        pid = self.cluster.state.pids.get("exit-tailscaled", 0)
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                with_reap(pid)
                time.sleep(0.2)

    def start_exit(self) -> None:
        d = TOPOLOGY / "exit"
        self.cluster.spawn(
            "exit-tailscaled",
            ["ip", "netns", "exec", self.cluster.ns("exit"), str(TOPOLOGY / "bin" / "tailscaled"),
             f"--statedir={d}", f"--socket={d / 'tailscaled.sock'}", "--tun=tailscale0", "--port=41641",
             "--no-logs-no-support"],
            in_node=False, env=self.exit_env(),
        )  # fmt: skip

    def exit_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.cluster.ns("exit"), str(TOPOLOGY / "bin" / "tailscale"),
             f"--socket={TOPOLOGY / 'exit' / 'tailscaled.sock'}", *args],
            capture_output=True, text=True, timeout=60, check=False, env=self.exit_env(),
        )  # fmt: skip


def with_reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def wait(what: str, pred: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


# ---------------------------------------------------------------- pods
def kubectl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir() / "kubectl"), "--kubeconfig", str(BUILD / "kubeconfig"), "--context", CONTEXT, *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def pod(
    name: str, ns: str, command: str, env_from_proxy: bool = False, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": PROBE_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", "-c", command],
        "securityContext": RESTRICTED_CONTAINER,
    }
    volumes: list[dict[str, Any]] = []
    if env_from_proxy:
        container["envFrom"] = [{"configMapRef": {"name": PROXY_CONFIGMAP}}]
        # The topology's CA, which signed the "internet" echo server's certificate.
        container["volumeMounts"] = [{"name": "ca", "mountPath": "/ca", "readOnly": True}]
        volumes = [{"name": "ca", "configMap": {"name": "e2e-ca"}}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
            "securityContext": RESTRICTED_POD_SECURITY,
            "containers": [container],
            "volumes": volumes,
        },
    }


def running_pod(api: Api, obj: dict[str, Any], timeout: float = 90) -> dict[str, Any]:
    api.apply(obj)
    md = obj["metadata"]

    def ready() -> dict[str, Any] | None:
        p = api.get("v1", "Pod", md["name"], md["namespace"]) or {}
        conds = {c["type"]: c["status"] for c in (p.get("status") or {}).get("conditions") or []}
        return p if conds.get("Ready") == "True" else None

    p: dict[str, Any] = wait(f"pod {md['namespace']}/{md['name']} Ready", ready, timeout, 0.5)
    return p


@dataclass
class Probe:
    """`probe <args>` run in a long-lived pod with kubectl exec: one JSON result."""

    ns: str
    name: str

    def __call__(self, *args: str, timeout: str = "4s") -> dict[str, Any]:
        script = "exec /usr/local/bin/probe " + " ".join(args) + f" -timeout {timeout}"
        p = kubectl("exec", "-n", self.ns, self.name, "--", "/bin/sh", "-c", script, timeout=60)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        assert lines, f"probe {args} printed nothing (rc={p.returncode}): {p.stdout}{p.stderr}"
        result: dict[str, Any] = json.loads(lines[-1])
        return result


# ---------------------------------------------------------------- the deployment
@dataclass
class Deployment:
    api: Api
    cluster: Cluster
    tailnet: Tailnet
    engine: Engine
    stack: auto.Stack
    config: dict[str, Any]
    workload: Probe
    control: Probe
    server_ip: str
    relay_service_ip: str
    before: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    destroyed: bool = False

    def relay_pods(self) -> list[dict[str, Any]]:
        return [p for p in self.api.list("v1", "Pod", RELAY_NS) if not p["metadata"].get("deletionTimestamp")]

    def relay_ready(self) -> bool:
        pods = self.relay_pods()
        return bool(pods) and all(
            {c["type"]: c["status"] for c in p["status"].get("conditions") or []}.get("Ready") == "True" for p in pods
        )

    def relay_pod_ip(self) -> str:
        pods = self.relay_pods()
        assert pods, "no relay pod"
        return str(pods[0]["status"]["podIP"])


def up(stack: auto.Stack) -> auto.UpResult:
    output: list[str] = []
    try:
        return stack.up(on_output=output.append, color="never")
    except auto.CommandError as err:
        raise AssertionError("".join(output[-80:]) + f"\n{err}") from None


def stack_config(cluster: Cluster, relay_key: str) -> dict[str, Any]:
    t = cluster.state.tailnet
    config = cluster_only_config_on(str(cluster.kubeconfig), CONTEXT, RELAY_NS, [PROTECTED], deployer="tse-admin")
    config = with_config(
        config, "exitNode", existingTailnetIp=t["exit_tailnet_ip"], existingPublicIps=[t["exit_public_ip"]]
    )
    config = with_config(config, "tailnet", loginServer=t["login_server"])
    config[RELAY_AUTH_KEY] = relay_key
    return config


def namespace_labels(api: Api, name: str) -> dict[str, str]:
    ns = api.get("v1", "Namespace", name)
    assert ns is not None
    return dict(ns["metadata"].get("labels") or {})


def inventory(api: Api, namespaces: list[str]) -> set[tuple[str, str, str]]:
    kinds = [("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "Service"), ("apps/v1", "Deployment"),
             ("networking.k8s.io/v1", "NetworkPolicy")]  # fmt: skip
    out = {(k, ns, o["metadata"]["name"]) for ns in namespaces for v, k in kinds for o in api.list(v, k, ns)}
    out |= {("Namespace", "", n["metadata"]["name"]) for n in api.list("v1", "Namespace")}
    for plural in ("validatingadmissionpolicies", "validatingadmissionpolicybindings"):
        items = api.request("GET", f"/apis/admissionregistration.k8s.io/v1/{plural}").get("items") or []
        out |= {(plural, "", o["metadata"]["name"]) for o in items}
    out |= {("daemonsets", o["metadata"]["namespace"], o["metadata"]["name"])
            for o in api.request("GET", "/apis/apps/v1/daemonsets").get("items") or []}  # fmt: skip
    return out


def start_udp_echo(cluster: Cluster, role: str, addr: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", cluster.ns(role), sys.executable, "-c", UDP_ECHO, addr, str(UDP_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def e2e(cluster: Cluster) -> Iterator[Deployment]:
    t0 = time.monotonic()
    missing = missing_engine_binaries()
    if missing:
        msg = f"not built: {', '.join(missing)}; run `make engine-bins`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    if not cluster.state.tailnet:
        pytest.fail("the cluster runs without headscale and the exit node: `make cluster-down && make cluster-up`")
    # The program's preflight runs kubectl: the one built with the engine.
    os.environ["PATH"] = f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
    api = cluster._api()
    tailnet = Tailnet(cluster)
    echoes = [
        start_udp_echo(cluster, "internet", INTERNET_IP),
        start_udp_echo(cluster, "lan", LAN_IP),
        start_udp_echo(cluster, ROUTER, NODE_GATEWAY),
        start_udp_echo(cluster, "node", NODE_IP),
    ]
    for name, labels in ((PROTECTED, PROTECTED_LABELS), (OPEN, {})):
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    # A server in the unprotected namespace: a pod of another namespace, and a NodePort.
    server = running_pod(api, pod("server", OPEN, f"exec httpd -f -p {SERVER_PORT} -h /tmp"))
    api.apply({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": OPEN},
        "spec": {"type": "NodePort", "selector": {"app": "server"},
                 "ports": [{"port": SERVER_PORT, "targetPort": SERVER_PORT, "nodePort": NODE_PORT}]},
    })  # fmt: skip
    before = {"objects": inventory(api, [PROTECTED, OPEN, "default"]),
              "labels": {n: namespace_labels(api, n) for n in (PROTECTED, OPEN, "default")}}  # fmt: skip
    state = BUILD / "e2e-pulumi"
    shutil.rmtree(state, ignore_errors=True)
    engine = Engine(state).setup()
    config = stack_config(cluster, tailnet.relay_key())
    stack = engine.stack(STACK, config, secret_keys=(RELAY_AUTH_KEY,))
    t_up = time.monotonic()
    up(stack)
    timings = {"setup": round(t_up - t0, 1), "pulumi up": round(time.monotonic() - t_up, 1)}
    svc = api.get("v1", "Service", "relay", RELAY_NS) or {}
    ca = Path(cluster.state.tailnet["ca"]).read_text()
    api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "e2e-ca", "namespace": PROTECTED},
               "data": {"ca.crt": ca}})  # fmt: skip
    control = running_pod(api, pod("control", OPEN, "exec sleep 3600"))
    workload = running_pod(api, pod("workload", PROTECTED, "exec sleep 3600", env_from_proxy=True))
    del control, workload
    time.sleep(3)  # kube-router learns a pod's address once it runs
    d = Deployment(
        api=api, cluster=cluster, tailnet=tailnet, engine=engine, stack=stack, config=config,
        workload=Probe(PROTECTED, "workload"), control=Probe(OPEN, "control"),
        server_ip=str(server["status"]["podIP"]), relay_service_ip=str(svc.get("spec", {}).get("clusterIP", "")),
        before=before, timings=timings,
    )  # fmt: skip
    try:
        yield d
    finally:
        if not d.destroyed:
            with_output: list[str] = []
            try:
                stack.destroy(on_output=with_output.append, color="never")
            except auto.CommandError as err:
                print("".join(with_output[-40:]) + f"\n{err}", file=sys.stderr)
        engine.remove_stack(STACK)
        for name in (PROTECTED, OPEN):
            api.delete("v1", "Namespace", name)
        for p in echoes:
            p.terminate()
        for p in echoes:
            p.wait(5)
        print(f"\ne2e timings (s): {d.timings}", file=sys.stderr)


# ---------------------------------------------------------------- 1. the way out
def test_relay_pod_is_ready_with_its_exit_node_online(e2e: Deployment) -> None:
    t = time.monotonic()
    wait("the relay pod Ready", e2e.relay_ready, 120)
    e2e.timings["relay ready after up"] = round(time.monotonic() - t, 1)
    exit_node = e2e.tailnet.exit_node()
    assert exit_node is not None and exit_node.get("online"), exit_node
    relays = e2e.tailnet.relay_nodes()
    assert len(relays) == 1 and relays[0].get("online"), relays


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("HTTP_PROXY", f"http://{INTERNET_IP}/ip"),
        ("HTTPS_PROXY", f"https://{ECHO_NAME}/ip"),
        ("ALL_PROXY", f"http://{ECHO_NAME}/ip"),
    ],
)
def test_workload_reaches_the_internet_through_the_proxy_from_the_exit_node(
    e2e: Deployment, variable: str, url: str
) -> None:
    wait("the relay pod Ready", e2e.relay_ready, 120)
    # HTTP_PROXY for http://, HTTPS_PROXY (CONNECT) for https://, ALL_PROXY: socks5h.
    r = e2e.workload("http", url, f'-proxy "${variable}"', "-cacert /ca/ca.crt", timeout="15s")
    assert r["ok"], r
    assert r["body"].strip() == EXIT_PUBLIC_IP, r
    assert str(r.get("proxy", "")).startswith("socks5h://" if variable == "ALL_PROXY" else "http://"), r


# ---------------------------------------------------------------- 2. nothing else, directly
DIRECT_TCP = {
    "internet 80": f"{INTERNET_IP}:80",
    "internet 443": f"{INTERNET_IP}:443",
    "LAN 80": f"{LAN_IP}:80",
    "host 53": f"{NODE_GATEWAY}:53",
    "node kubelet": f"{NODE_IP}:10250",
    "node api server": f"{NODE_IP}:6443",
    "node NodePort": f"{NODE_IP}:{NODE_PORT}",
    "api Service": f"{API_SERVICE_IP}:443",
}
DIRECT_UDP = {
    "internet": f"{INTERNET_IP}:{UDP_PORT}",
    "LAN": f"{LAN_IP}:{UDP_PORT}",
    "host": f"{NODE_GATEWAY}:{UDP_PORT}",
    "node": f"{NODE_IP}:{UDP_PORT}",
    "host DNS": f"{NODE_GATEWAY}:53",
}


@pytest.mark.parametrize("target", list(DIRECT_TCP.values()), ids=list(DIRECT_TCP))
def test_workload_cannot_open_tcp_directly(e2e: Deployment, target: str) -> None:
    assert e2e.control("tcp", target)["ok"], f"control pod could not reach {target}: the check would prove nothing"
    r = e2e.workload("tcp", target)
    assert not r["ok"], f"the protected workload reached {target} directly: {r}"


def test_workload_cannot_reach_metadata_or_pods_of_other_namespaces(e2e: Deployment) -> None:
    target = f"{e2e.server_ip}:{SERVER_PORT}"
    assert e2e.control("tcp", target)["ok"]
    assert not e2e.workload("tcp", target)["ok"]
    # Nothing answers 169.254.169.254 here: a refusal or a timeout, never a connection.
    assert not e2e.workload("tcp", f"{METADATA_IP}:80")["ok"]


def test_workload_cannot_use_the_relays_other_ports(e2e: Deployment) -> None:
    ip = e2e.relay_pod_ip()
    assert e2e.workload("tcp", f"{ip}:{HTTP_PROXY_PORT}")["ok"]
    r = e2e.workload("tcp", f"{ip}:{HEALTH_PORT}")
    assert not r["ok"], f"the workload reached the relay's health port: {r}"


@pytest.mark.parametrize("target", list(DIRECT_UDP.values()), ids=list(DIRECT_UDP))
def test_workload_cannot_send_udp_directly(e2e: Deployment, target: str) -> None:
    if target.endswith(":53"):
        assert e2e.control("dns", ECHO_NAME + ".", f"-server {target}")["ok"]
        r = e2e.workload("dns", ECHO_NAME + ".", f"-server {target}")
    else:
        assert e2e.control("udp", target)["ok"], f"no UDP echo from {target} even without a policy"
        r = e2e.workload("udp", target)
    assert not r["ok"], f"the protected workload got a UDP reply from {target}: {r}"


def test_workload_cluster_dns_works(e2e: Deployment) -> None:
    r = e2e.workload("dns", "kubernetes.default.svc.cluster.local")
    assert r["ok"] and r["addrs"] == [API_SERVICE_IP], r
    r = e2e.workload("dns", "kube-dns.kube-system.svc.cluster.local", f"-server {DNS_IP}:53")
    assert r["ok"] and r["addrs"] == [DNS_IP], r


@pytest.mark.parametrize("target", [INTERNET_IP, LAN_IP, NODE_GATEWAY])
def test_workload_cannot_ping_out_of_the_cluster(e2e: Deployment, target: str) -> None:
    """kube-router accepts pod ICMP before any NetworkPolicy; the node guard closes it."""
    r = e2e.workload("ping", target)
    assert not r["ok"], f"the protected workload pinged {target}: {r}"
