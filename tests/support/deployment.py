"""A stack deployed into the real single-node cluster (tests/support/cluster_env.py)
through the real engine, with the probes that check it: shared by the
end-to-end suite (tests/cluster/test_e2e.py), `make demo` (tools/demo.py)
and `make bench-cluster`.

The cluster-only stack: the topology's headscale as login server, its
tailscaled as the BYO exit node, a relay key minted by headscale, one
protected namespace that exists beforehand (labelled in place) and one that
is not protected, for the control pod and a server behind a NodePort.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pulumi import automation as auto

from builders.proxy_env import PROXY_CONFIGMAP
from tests.datapath.stack_tailnet import RELAY_TAG
from tests.datapath.topology import EXIT_PUBLIC_IP, LAN_IP, ROUTER
from tests.stacks import RELAY_AUTH_KEY, cluster_only_config_on, with_config
from tests.support.apiserver import bin_dir
from tests.support.cluster_env import (
    BUILD,
    CONTEXT,
    INTERNET_IP,
    NODE_GATEWAY,
    NODE_IP,
    PROBE_IMAGE,
    Api,
    Cluster,
    ClusterError,
)
from tests.support.engine import Engine, missing_engine_binaries
from tools.verify import VerifyConfig, default_targets

STACK = "e2e"
RELAY_NS = "tailscale-egress"
PROTECTED = "e2e-app"  # exists before the stack, labelled in place
PROTECTED_LABELS = {"team": "e2e"}
OPEN = "e2e-open"  # not protected: the control pod, the server pod

UDP_PORT = 5599  # the UDP echo servers this module starts in the topology
SERVER_PORT = 8080  # the server pod's TCP port (busybox httpd), and its NodePort
NODE_PORT = 30080
# The node guard needs iptables in the relay image (ghcr.io/tailscale/tailscale
# ships iptables-legacy and iptables-nft); the image assembled here
# (scripts/build-cluster-bins.sh) carries them from Debian's iptables, an image
# built before that had none: the guard then finds no backend and never sets
# its rules. So the guard is on exactly when the imported relay image has them.
RELAY_IMAGE = "ghcr.io/tailscale/tailscale:v1.102.5"
GUARD_COMMANDS = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save")
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
        """Tagged as the exit node first joined: the tailnet policy routes the relay only via that tag."""
        user = next(u for u in self.hs("users", "list") if u["name"] == "tse")
        tags = ["--tags", self.info["exit_tag"]] if self.info.get("exit_tag") else []
        out = self.hs("preauthkeys", "create", "--user", str(user["id"]), "--expiration", "1h", *tags)
        return str(out["key"])

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
def kubectl_command(*args: str) -> list[str]:
    """kubectl with the cluster's kubeconfig and context."""
    return [str(bin_dir() / "kubectl"), "--kubeconfig", str(BUILD / "kubeconfig"), "--context", CONTEXT, *args]


def kubectl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kubectl_command(*args), capture_output=True, text=True, timeout=timeout, check=False)


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


class DeployError(Exception):
    """What is missing for a deployment, with the command that fixes it."""


def deploy(cluster: Cluster, cleanup: contextlib.ExitStack, stack_name: str = STACK) -> Deployment:
    """`pulumi up` of the cluster-only stack through the real engine, with what
    the checks need around it: UDP/TCP echo servers on the topology's
    "internet", "LAN", host and node addresses, an unprotected namespace with
    a server pod behind a NodePort, the control and workload probe pods.

    Everything it sets up is undone by ``cleanup`` (destroy included); a
    caller that keeps the deployment running (`make demo`) pops it."""
    t0 = time.monotonic()
    missing = missing_engine_binaries()
    if missing:
        raise DeployError(f"not built: {', '.join(missing)}; run `make engine-bins`")
    if not cluster.state.tailnet:
        raise DeployError(
            "the cluster runs without headscale and the exit node: `make cluster-down && make cluster-up`"
        )
    api = cluster._api()
    if api.get("v1", "Namespace", RELAY_NS) is not None:
        raise DeployError(
            f"namespace {RELAY_NS} exists already: a stack (the demo's?) is deployed in this cluster; "
            "`make demo-down` or `make cluster-down` first"
        )
    # The program's preflight runs kubectl: the one built with the engine.
    os.environ["PATH"] = f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
    tailnet = Tailnet(cluster)
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
    state = BUILD / f"{stack_name}-pulumi"
    shutil.rmtree(state, ignore_errors=True)
    engine = Engine(state).setup()
    node_guard = relay_image_has_iptables(api)
    config = stack_config(cluster, tailnet.relay_key(), node_guard)
    stack = engine.stack(stack_name, config, secret_keys=(RELAY_AUTH_KEY,))
    cleanup.callback(engine.remove_stack, stack_name)
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
    return d


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


def not_terminating(api: Api, name: str) -> bool:
    ns = api.get("v1", "Namespace", name)
    return not (ns and ns["metadata"].get("deletionTimestamp"))


def destroy_quietly(stack: auto.Stack) -> None:
    output: list[str] = []
    try:
        stack.destroy(on_output=output.append, color="never")
    except auto.CommandError as err:
        print("".join(output[-40:]) + f"\n{err}", file=sys.stderr)


def stop_process(p: subprocess.Popen[Any]) -> None:
    p.terminate()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


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
