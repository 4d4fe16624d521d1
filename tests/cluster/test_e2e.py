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
import functools
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
from builders.relay import HEALTH_PORT, HTTP_PROXY_PORT, SOCKS5_PORT
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
from tools.verify import VerifyConfig, default_targets, exit_code, format_table, run_verify

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
EXIT_SERVICE_PORT = 8081  # a server on the exit node itself (tailnet bypass check)
METADATA_IP = "169.254.169.254"
# The node guard needs iptables in the relay image (ghcr.io/tailscale/tailscale
# ships iptables-legacy and iptables-nft); the image assembled here
# (scripts/build-cluster-bins.sh) has had containerboot, tailscaled, tailscale
# and busybox only: the guard then finds no backend and never sets its rules.
# So the guard is on exactly when the relay image the cluster imported has them.
RELAY_IMAGE = "ghcr.io/tailscale/tailscale:v1.102.5"
GUARD_COMMANDS = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save")
NODE_GUARD_MISSING = (
    f"node guard off: the relay image the cluster imported ({RELAY_IMAGE}) has no iptables-legacy/-nft "
    "(its pod logs 'no iptables backend holds rules yet'), so pod ICMP out of the cluster stays open"
)
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
# A UDP echo and a TCP listener on the same port, in one of the topology's namespaces.
ECHO = (
    "import socket,sys,threading\n"
    "a=(sys.argv[1],int(sys.argv[2]))\n"
    "t=socket.socket();t.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);t.bind(a);t.listen(64)\n"
    "def acc():\n"
    "    while True:\n"
    "        c,_=t.accept();c.close()\n"
    "threading.Thread(target=acc,daemon=True).start()\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.bind(a)\n"
    "while True:\n"
    "    d,p=s.recvfrom(2048)\n"
    "    s.sendto(d,p)\n"
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
    node_guard: bool = False

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


def stack_config(cluster: Cluster, relay_key: str, node_guard: bool) -> dict[str, Any]:
    t = cluster.state.tailnet
    config = cluster_only_config_on(str(cluster.kubeconfig), CONTEXT, RELAY_NS, [PROTECTED], deployer="tse-admin")
    config = with_config(
        config, "exitNode", existingTailnetIp=t["exit_tailnet_ip"], existingPublicIps=[t["exit_public_ip"]]
    )
    config = with_config(config, "tailnet", loginServer=t["login_server"])
    config = with_config(config, "cluster", nodeGuard=node_guard)
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


def start_echo(cluster: Cluster, role: str, addr: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", cluster.ns(role), sys.executable, "-c", ECHO, addr, str(UDP_PORT)],
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
    with contextlib.ExitStack() as cleanup:
        for role, addr in (("internet", INTERNET_IP), ("lan", LAN_IP), (ROUTER, NODE_GATEWAY), ("node", NODE_IP)):
            echo = start_echo(cluster, role, addr)
            cleanup.callback(stop_process, echo)
        for name, labels in ((PROTECTED, PROTECTED_LABELS), (OPEN, {})):
            # A namespace of an earlier run may still be terminating.
            wait(f"namespace {name} gone", functools.partial(not_terminating, api, name), 120)
            api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
            cleanup.callback(api.delete, "v1", "Namespace", name)
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
        node_guard = relay_image_has_iptables(api)
        config = stack_config(cluster, tailnet.relay_key(), node_guard)
        stack = engine.stack(STACK, config, secret_keys=(RELAY_AUTH_KEY,))
        cleanup.callback(engine.remove_stack, STACK)
        t_up = time.monotonic()
        holder: list[Deployment] = []
        cleanup.callback(lambda: None if holder and holder[0].destroyed else destroy_quietly(stack))
        up(stack)
        timings = {"setup": round(t_up - t0, 1), "pulumi up": round(time.monotonic() - t_up, 1)}
        svc = api.get("v1", "Service", "relay", RELAY_NS) or {}
        ca = Path(cluster.state.tailnet["ca"]).read_text()
        api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "e2e-ca", "namespace": PROTECTED},
                   "data": {"ca.crt": ca}})  # fmt: skip
        running_pod(api, pod("control", OPEN, "exec sleep 3600"))
        running_pod(api, pod("workload", PROTECTED, "exec sleep 3600", env_from_proxy=True))
        time.sleep(3)  # kube-router learns a pod's address once it runs
        d = Deployment(
            api=api, cluster=cluster, tailnet=tailnet, engine=engine, stack=stack, config=config,
            workload=Probe(PROTECTED, "workload"), control=Probe(OPEN, "control"),
            server_ip=str(server["status"]["podIP"]), relay_service_ip=str(svc.get("spec", {}).get("clusterIP", "")),
            before=before, timings=timings, node_guard=node_guard,
        )  # fmt: skip
        holder.append(d)
        cleanup.callback(write_timings, d.timings, t0)
        yield d


def finished_phase(api: Api, name: str, ns: str) -> str | None:
    phase = ((api.get("v1", "Pod", name, ns) or {}).get("status") or {}).get("phase")
    return str(phase) if phase in ("Succeeded", "Failed") else None


def relay_image_has_iptables(api: Api) -> bool:
    """Whether the relay image the cluster has (imported, never pulled) holds
    the iptables backends the node guard runs, asked from a pod of it."""
    check = pod("relay-image-check", OPEN, " && ".join(f"command -v {c}" for c in GUARD_COMMANDS))
    check["spec"]["restartPolicy"] = "Never"
    check["spec"]["containers"][0]["image"] = RELAY_IMAGE
    api.apply(check)
    try:
        phase = wait("the relay image check", lambda: finished_phase(api, "relay-image-check", OPEN), 60, 0.5)
    finally:
        api.delete("v1", "Pod", "relay-image-check", OPEN)
    return bool(phase == "Succeeded")


def write_timings(timings: dict[str, float], t0: float) -> None:
    """build/cluster/e2e-timings.json: what each phase took, for the note."""
    timings["module total"] = round(time.monotonic() - t0, 1)
    (BUILD / "e2e-timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\ne2e timings (s): {timings}", file=sys.stderr)


def not_terminating(api: Api, name: str) -> bool:
    ns = api.get("v1", "Namespace", name)
    return not (ns and ns["metadata"].get("deletionTimestamp"))


def destroy_quietly(stack: auto.Stack) -> None:
    output: list[str] = []
    try:
        stack.destroy(on_output=output.append, color="never")
    except auto.CommandError as err:
        print("".join(output[-40:]) + f"\n{err}", file=sys.stderr)


def stop_process(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


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
    "host": f"{NODE_GATEWAY}:{UDP_PORT}",
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
    # With the node guard, no pod reaches a NodePort: the node itself shows it answers.
    control = node_probe(e2e, "tcp", target) if target.endswith(f":{NODE_PORT}") else e2e.control("tcp", target)
    assert control["ok"], f"nothing answers at {target}: the check would prove nothing"
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
    if not e2e.node_guard:
        pytest.xfail(NODE_GUARD_MISSING)
    # The guard closes ICMP for every pod (the control pod's too): the node shows the target answers.
    node_ping = subprocess.run(
        ["ip", "netns", "exec", e2e.cluster.ns("node"), "busybox", "ping", "-c1", "-W2", target],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert node_ping.returncode == 0, f"{target} answers no ping: the check would prove nothing: {node_ping.stdout}"
    r = e2e.workload("ping", target)
    assert not r["ok"], f"the protected workload pinged {target}: {r}\n{node_guard_state(e2e)}"


def node_probe(e2e: Deployment, *args: str) -> dict[str, Any]:
    """The probe run on the node itself (its network namespace), not in a pod."""
    p = subprocess.run(
        ["ip", "netns", "exec", e2e.cluster.ns("node"), str(e2e.cluster.bin / "probe"), *args, "-timeout", "4s"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"probe on the node printed nothing: {p.stdout}{p.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def node_guard_state(e2e: Deployment) -> str:
    ns = f"{RELAY_NS}-node-guard"
    pods = e2e.api.list("v1", "Pod", ns)
    out = [f"node guard pods in {ns}: {[(p['metadata']['name'], p['status'].get('phase')) for p in pods]}"]
    for p in pods:
        out.append(kubectl("logs", "-n", ns, p["metadata"]["name"], "--tail=20").stdout)
    return "\n".join(out)


# ---------------------------------------------------------------- 3. make verify
def verify_config() -> VerifyConfig:
    return VerifyConfig(
        namespaces=(PROTECTED,),
        relay_namespace=RELAY_NS,
        expected_exit_ips=(EXIT_PUBLIC_IP,),
        kubeconfig=str(BUILD / "kubeconfig"),
        context=CONTEXT,
        image=PROBE_IMAGE,
        probe_kind="probe",
        echo_url=f"http://{INTERNET_IP}/ip",
        targets=default_targets(
            internet=[f"{INTERNET_IP}:80,443,{UDP_PORT}"],
            host=[f"{NODE_GATEWAY}:{UDP_PORT}"],
            lan=[f"{LAN_IP}:80,443,{UDP_PORT}"],
        ),
        external_dns=(NODE_GATEWAY,),
        kubectl=str(bin_dir() / "kubectl"),
    )


def test_make_verify_passes_and_fails_without_the_namespace_policy(e2e: Deployment) -> None:
    wait("the relay pod Ready", e2e.relay_ready, 120)
    t = time.monotonic()
    results = run_verify(verify_config())
    e2e.timings["verify"] = round(time.monotonic() - t, 1)
    assert exit_code(results) == 0, format_table(results)
    # Broken on purpose, as the deployer (the admission guard lets it): the
    # namespace's own egress policies deleted.
    policies = e2e.api.list("networking.k8s.io/v1", "NetworkPolicy", PROTECTED)
    assert policies, f"the stack put no NetworkPolicy in {PROTECTED}"
    for p in policies:
        e2e.api.delete("networking.k8s.io/v1", "NetworkPolicy", p["metadata"]["name"], PROTECTED)
    try:
        time.sleep(3)  # kube-router's sync
        broken = run_verify(verify_config())
        assert exit_code(broken) != 0, format_table(broken)
        failed = {r.category for r in broken if r.ok is False}
        assert "internet" in failed, format_table(broken)
    finally:
        for p in policies:
            md = p["metadata"]
            clean = {k: md[k] for k in ("name", "namespace", "labels", "annotations") if k in md}
            e2e.api.request(
                "POST",
                f"/apis/networking.k8s.io/v1/namespaces/{PROTECTED}/networkpolicies",
                json={"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": clean,
                      "spec": p["spec"]},
            )  # fmt: skip
        time.sleep(3)
    assert not e2e.workload("tcp", f"{INTERNET_IP}:80")["ok"], "the restored policy does not hold"


# ---------------------------------------------------------------- 4. who may use the relay
def test_a_pod_of_an_unprotected_namespace_cannot_use_the_relay(e2e: Deployment) -> None:
    wait("the relay pod Ready", e2e.relay_ready, 120)
    assert e2e.workload("http", f"http://{INTERNET_IP}/ip", f"-proxy http://{e2e.relay_pod_ip()}:{HTTP_PROXY_PORT}")[
        "ok"
    ]
    for proxy in (
        f"http://relay.{RELAY_NS}.svc.cluster.local:{HTTP_PROXY_PORT}",
        f"http://{e2e.relay_pod_ip()}:{HTTP_PROXY_PORT}",
        f"socks5h://{e2e.relay_pod_ip()}:{SOCKS5_PORT}",
    ):
        r = e2e.control("http", f"http://{INTERNET_IP}/ip", f"-proxy {proxy}")
        assert not r["ok"], f"a pod of {OPEN} (not protected) used the relay through {proxy}: {r}"


def test_a_non_compliant_pod_is_refused_in_a_protected_namespace(e2e: Deployment) -> None:
    bad = pod("rooty", PROTECTED, "exec sleep 60")
    bad["spec"]["securityContext"] = {"runAsUser": 0}
    bad["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    with pytest.raises(ClusterError, match=r"HTTP 403.*violates PodSecurity.*restricted:latest"):
        e2e.api.apply(bad)
    assert e2e.api.get("v1", "Pod", "rooty", PROTECTED) is None


# ---------------------------------------------------------------- the bypasses the admission guard closes
def test_an_extra_permissive_network_policy_is_refused_even_for_the_deployer(e2e: Deployment) -> None:
    wide = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-all-egress", "namespace": PROTECTED},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
        },
    }
    with pytest.raises(ClusterError, match=r"HTTP (403|422).*egress-only-via-relay"):
        e2e.api.apply(wide)
    assert e2e.api.get("networking.k8s.io/v1", "NetworkPolicy", "allow-all-egress", PROTECTED) is None
    assert not e2e.workload("tcp", f"{INTERNET_IP}:80")["ok"]


def test_someone_else_cannot_remove_the_namespace_labels_or_the_policy(e2e: Deployment) -> None:
    """Another cluster admin (not the deployer) can neither weaken Pod Security
    nor delete the namespace's egress policy."""
    other = ("--as=mallory", "--as-group=system:masters")
    p = kubectl(*other, "label", "namespace", PROTECTED, "pod-security.kubernetes.io/enforce-")
    assert p.returncode != 0 and "pod-security-labels" in p.stderr, p.stdout + p.stderr
    assert namespace_labels(e2e.api, PROTECTED).get("pod-security.kubernetes.io/enforce") == "restricted"
    policies = e2e.api.list("networking.k8s.io/v1", "NetworkPolicy", PROTECTED)
    assert policies
    name = policies[0]["metadata"]["name"]
    p = kubectl(*other, "-n", PROTECTED, "delete", "networkpolicy", name)
    assert p.returncode != 0 and "stack-objects" in p.stderr, p.stdout + p.stderr
    assert e2e.api.get("networking.k8s.io/v1", "NetworkPolicy", name, PROTECTED) is not None


@pytest.mark.xfail(
    strict=True,
    reason="open on this cluster: its headscale runs with no policy (allow-all) and the topology's exit node has "
    "no guard of the VM's cloud-init; a cluster-only stack skips the tailnet policy preflight, so the BYO exit node "
    "and the policy are the user's to close (closed with the stack's policy and the guard: "
    "tests/datapath/test_tailnet_reach.py)",
)
def test_the_exit_nodes_own_services_are_not_reachable_through_the_proxy(e2e: Deployment, tmp_path: Path) -> None:
    """Through the relay a pod reaches the internet, not the tailnet: here an
    HTTP server on the exit node, at its tailnet address."""
    wait("the relay pod Ready", e2e.relay_ready, 120)
    (tmp_path / "index.html").write_text("exit node service\n")
    tmp_path.chmod(0o755)
    server = subprocess.Popen(
        ["ip", "netns", "exec", e2e.cluster.ns("exit"), sys.executable, "-m", "http.server", "--bind", "0.0.0.0",
         "--directory", str(tmp_path), str(EXIT_SERVICE_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        exit_ip = e2e.tailnet.info["exit_tailnet_ip"]
        local = f"http://{EXIT_PUBLIC_IP}:{EXIT_SERVICE_PORT}/"
        wait("the exit node's server", lambda: e2e.control("http", local)["ok"], 20)
        for variable in ("HTTP_PROXY", "ALL_PROXY"):
            r = e2e.workload("http", f"http://{exit_ip}:{EXIT_SERVICE_PORT}/", f'-proxy "${variable}"', timeout="8s")
            assert not r["ok"], f"through {variable} the workload reached the exit node's own service: {r}"
    finally:
        stop_process(server)


# ---------------------------------------------------------------- 5. fail closed
def proxy_attempts(e2e: Deployment) -> dict[str, dict[str, Any]]:
    ip = e2e.relay_pod_ip()
    url = f"http://{INTERNET_IP}/ip"
    return {
        "Service (HTTP_PROXY)": e2e.workload("http", url, '-proxy "$HTTP_PROXY"', timeout="8s"),
        "Service (ALL_PROXY)": e2e.workload("http", url, '-proxy "$ALL_PROXY"', timeout="8s"),
        "relay pod IP (HTTP)": e2e.workload("http", url, f"-proxy http://{ip}:{HTTP_PROXY_PORT}", timeout="8s"),
        "relay pod IP (SOCKS5)": e2e.workload("http", url, f"-proxy socks5h://{ip}:{SOCKS5_PORT}", timeout="8s"),
    }


def new_relay_running(e2e: Deployment, old: set[str]) -> bool:
    return any(p["metadata"]["name"] not in old and p["status"].get("phase") == "Running" for p in e2e.relay_pods())


def recovered(e2e: Deployment) -> bool:
    if not e2e.relay_ready():
        return False
    r = e2e.workload("http", f"http://{INTERNET_IP}/ip", '-proxy "$HTTP_PROXY"', timeout="8s")
    return bool(r["ok"]) and r["body"].strip() == EXIT_PUBLIC_IP


def rejoin_exit(e2e: Deployment) -> None:
    """The exit node's tailscaled logs in again with a fresh key (its node was deleted)."""
    tn = e2e.tailnet
    p = tn.exit_cli(
        "up", f"--login-server={tn.info['login_server']}", f"--authkey={tn.exit_key()}", "--advertise-exit-node",
        "--hostname=exit", "--accept-dns=false", "--force-reauth",
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    wait("the exit node back in headscale", tn.exit_node, 30)
    tn.approve_exit(True)


@pytest.mark.parametrize("breakage", ["exit node stopped", "routes unapproved", "node deleted"])
def test_fail_closed_and_recovers_by_itself(e2e: Deployment, breakage: str) -> None:
    tn = e2e.tailnet
    wait("the relay pod Ready", e2e.relay_ready, 120)
    t = time.monotonic()
    if breakage == "exit node stopped":
        tn.stop_exit()
    elif breakage == "routes unapproved":
        tn.approve_exit(False)
    else:
        node = tn.exit_node()
        assert node is not None
        tn.hs("nodes", "delete", "--identifier", str(node["id"]), "--force")
    try:
        wait("the relay pod not Ready", lambda: not e2e.relay_ready(), 60)
        e2e.timings[f"not Ready after {breakage}"] = round(time.monotonic() - t, 1)
        leaked = {k: r for k, r in proxy_attempts(e2e).items() if r["ok"]}
        assert not leaked, f"with the {breakage}, the workload still got out: {leaked}"
        if breakage == "exit node stopped":
            # A relay that starts while its exit node is away never becomes Ready.
            old = {p["metadata"]["name"] for p in e2e.relay_pods()}
            for name in old:
                e2e.api.delete("v1", "Pod", name, RELAY_NS, grace=30)  # time to log out
            wait("a new relay pod running", lambda: new_relay_running(e2e, old), 90)
            time.sleep(10)
            assert not e2e.relay_ready(), "a relay pod started without its exit node is Ready"
    finally:
        t = time.monotonic()
        if breakage == "exit node stopped":
            tn.start_exit()
        elif breakage == "routes unapproved":
            tn.approve_exit(True)
        else:
            rejoin_exit(e2e)
    new_ip = wait("the exit node's tailnet IP", lambda: tn.exit_cli("ip", "-4").stdout.strip(), 60)
    old_ip = tn.info["exit_tailnet_ip"]
    if new_ip != old_ip:
        # Headscale gives a node that registers anew the next free address:
        # the relay, pinned to the old one, stays closed until `pulumi up`
        # with the new existingTailnetIp.
        assert breakage == "node deleted", f"the exit node came back as {new_ip}, not {old_ip}"
        time.sleep(10)
        assert not e2e.relay_ready(), f"the relay is Ready with its exit node {old_ip} gone"
        leaked = {k: r for k, r in proxy_attempts(e2e).items() if r["ok"]}
        assert not leaked, f"the workload got out with the exit node at a new address: {leaked}"
        e2e.cluster.state.tailnet["exit_tailnet_ip"] = new_ip
        e2e.cluster.state.save(e2e.cluster.state_file)
        e2e.config = with_config(e2e.config, "exitNode", existingTailnetIp=new_ip)
        e2e.engine.write_config(STACK, e2e.config, secret_keys=(RELAY_AUTH_KEY,))
        t = time.monotonic()
        up(e2e.stack)
    wait(f"the relay recovered after the {breakage}", lambda: recovered(e2e), 120, 2)
    e2e.timings[f"recovered after {breakage}"] = round(time.monotonic() - t, 1)


# ---------------------------------------------------------------- 6. destroy
def test_destroy_leaves_the_cluster_as_it_was_and_the_relay_leaves_the_tailnet(e2e: Deployment) -> None:
    e2e.api.delete("v1", "ConfigMap", "e2e-ca", PROTECTED)
    t = time.monotonic()
    destroy_quietly(e2e.stack)
    e2e.destroyed = True
    e2e.timings["pulumi destroy"] = round(time.monotonic() - t, 1)
    wait(f"namespace {RELAY_NS} gone", lambda: e2e.api.get("v1", "Namespace", RELAY_NS) is None, 120)
    after = inventory(e2e.api, [PROTECTED, OPEN, "default"])
    before = e2e.before["objects"]
    assert after == before, f"left behind: {sorted(after - before)}; removed: {sorted(before - after)}"
    labels = {n: namespace_labels(e2e.api, n) for n in (PROTECTED, OPEN, "default")}
    assert labels == e2e.before["labels"]
    wait("the relay's node gone from headscale", lambda: not e2e.tailnet.relay_nodes(), 60)
