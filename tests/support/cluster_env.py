"""A real single-node Kubernetes cluster in the data-path topology (issue 9).

    sudo .venv/bin/python -m tests.support.cluster_env up     # make cluster-up
    sudo .venv/bin/python -m tests.support.cluster_env down   # make cluster-down
    sudo .venv/bin/python -m tests.support.cluster_env status

The node is one more namespace (``node``, 192.168.5.15, as a Lima VM's
address) of tests/datapath/topology.py's Topology, next to its "internet",
"lan", "control" and "exit" namespaces; the topology's router plays the host
(the node's gateway). Everything of the node runs in that network namespace
and in ONE private mount namespace held by a small holder process, so that
kubelet, containerd and runc see the same mounts, and the tmpfs laid over
/run, /var/lib and /var/log there catches what they write at fixed paths
(shim sockets, CNI state and netns files, kubelet's root, pod logs); it all
disappears with the holder. The parts, as k3s runs them:

- etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
  kube-proxy (iptables mode) from k8s.io/kubernetes v1.35
  (scripts/build-engine-bins.sh);
- containerd, runc and the CNI bridge + host-local plugins from Debian, pod
  range 10.42.0.0/16 (the node's 10.42.0.0/24), services 10.43.0.0/16;
- kube-router's NetworkPolicy controller from k3s's fork, CoreDNS as
  kube-dns at 10.43.0.10, images imported from OCI archives
  (scripts/build-cluster-bins.sh).

The API server is reachable from the host at https://127.0.0.1:16443 through
a forwarder (as Rancher Desktop forwards the VM's port): the kubeconfig is
build/cluster/kubeconfig, context ``tailscale-egress-e2e``. State (pids,
saved sysctls) is in build/cluster/state.json, so that ``down`` in another
process stops exactly what ``up`` started.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import requests
import urllib3
import yaml

from tests.datapath.stack_tailnet import EXIT_TAG, LAPTOP_LINK, RELAY_TAG, apply_guard, stack_policy_for_headscale
from tests.datapath.topology import (
    BIN_NAMES,
    CONTROL_IP,
    ECHO_NAME,
    EXIT_PUBLIC_IP,
    LINKS,
    LOGIN_SERVER,
    ROUTER,
    Topology,
    TopologyError,
    cache_bin_dir,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "cluster"
CONTEXT = "tailscale-egress-e2e"
RUN_ID = "cluster"  # namespaces tsecluster-<role>: never reaped by a data-path run
NODE_ROLE = "node"
NODE_SUBNET = "192.168.5.0/24"
NODE_IP = "192.168.5.15"
NODE_GATEWAY = "192.168.5.1"  # the topology's router: the node's host
NODE_NAME = "tse-node"
CLUSTER_CIDR = "10.42.0.0/16"
NODE_POD_CIDR = "10.42.0.0/24"
SERVICE_CIDR = "10.43.0.0/16"
API_SERVICE_IP = "10.43.0.1"
DNS_IP = "10.43.0.10"
API_PORT = 6443  # in the node
HOST_API = ("127.0.0.1", 16443)  # the forwarder on the host
CGROUP_ROOT = "tse-cluster"  # kubelet's cgroupRoot, in every v1 hierarchy
INTERNET_IP = LINKS["internet"][1]
LAN_IP = LINKS["lan"][1]
LAPTOP_ROLE = "laptop"  # a member's device on the tailnet (--tailnet)
LAPTOP_SERVICE_PORT = 8022  # an HTTP server at its tailnet address
# --hosted: Headscale's address as the hosted control plane's, in Tailscale's
# published range (builders/networks.py), and the apt servers' namespace.
HOSTED_CONTROL_IP = "192.200.0.10"
APT_ROLE = "pkgs"
EXIT_NODE_IMAGE = "debian-12"  # the program's default (config.py)

K8S_BINS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy")
CLUSTER_BINS = ("kube-router", "coredns", "probe", "pause")
IMAGES = ("pause", "tailscale", "probe", "coredns")
IMAGES_LAYOUT = 2  # scripts/build-cluster-bins.sh's IMAGES_LAYOUT
COREDNS_IMAGE = "local/coredns:1.15.0"
PROBE_IMAGE = "local/probe:1"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.1"
# Kernel settings the kubelet changes when protectKernelDefaults is off
# (global, not per network namespace): saved at up, restored at down.
KERNEL_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
TOOLS = ("ip", "iptables", "ipset", "conntrack", "nsenter", "unshare", "openssl", "containerd", "ctr", "runc")


class ClusterError(RuntimeError):
    pass


# The cluster is one per machine (fixed network namespaces, ports and mount
# points): whatever starts, uses or stops it for a bounded time (a test run,
# the bench, demo up/down) holds this lock, so a second one waits instead of
# tearing the cluster down under the first.
MACHINE_LOCK = (Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")) / "tailscale-egress-cluster.lock"


LOCK_HELD_ENV = "TS_EGRESS_CLUSTER_LOCK_HELD"  # set while held: the holder's child processes have it too


@contextlib.contextmanager
def machine_lock(wait: float = 3600.0) -> Iterator[None]:
    if os.environ.get(LOCK_HELD_ENV) == "1":  # a parent holds it for us (e.g. the test that runs `make demo`)
        yield
        return
    with MACHINE_LOCK.open("a") as f:
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"another run held {MACHINE_LOCK} for {wait:.0f} s (`fuser {MACHINE_LOCK}` names it)"
                    ) from None
                if not told:
                    print(f"waiting for another run's cluster to finish ({MACHINE_LOCK})", file=sys.stderr, flush=True)
                    told = True
                time.sleep(2)
        os.environ[LOCK_HELD_ENV] = "1"
        try:
            yield
        finally:
            del os.environ[LOCK_HELD_ENV]
            fcntl.flock(f, fcntl.LOCK_UN)


def missing_prerequisites() -> list[str]:
    """Reasons the cluster cannot run here (empty: it can)."""
    out: list[str] = []
    if sys.platform != "linux":
        out.append("needs Linux")
    elif os.geteuid() != 0:
        out.append("needs root (network namespaces, cgroups, containerd)")
    for tool in TOOLS:
        if shutil.which(tool) is None:
            out.append(f"`{tool}` not found (bash scripts/install-test-tools.sh --cluster)")
    if not Path("/usr/lib/cni/bridge").exists():
        out.append("/usr/lib/cni/bridge missing (apt-get install containernetworking-plugins)")
    if not Path("/sys/fs/cgroup/memory").is_dir():
        out.append("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory (this harness drives cgroup v1)")
    return out


def missing_artifacts(bin_dir: Path) -> list[str]:
    # The topology's programs too (BIN_NAMES): a cache from before one of them (wanlink) is filled in.
    wanted = (*K8S_BINS, *CLUSTER_BINS, *BIN_NAMES)
    out = [f"{bin_dir / b}" for b in wanted if not os.access(bin_dir / b, os.X_OK)]
    images = bin_dir.parent / "images"
    out += [f"{images / (i + '.tar')}" for i in IMAGES if not (images / f"{i}.tar").exists()]
    # Images of an older layout (e.g. a relay image without iptables) are rebuilt.
    listing = images / "IMAGES"
    if f"IMAGES_LAYOUT={IMAGES_LAYOUT}" not in (listing.read_text().splitlines() if listing.exists() else []):
        out.append(f"{listing} (not IMAGES_LAYOUT={IMAGES_LAYOUT}: scripts/build-cluster-bins.sh images)")
    return out


def build_all(timeout: float = 5400) -> None:
    """The idempotent build scripts (minutes from a cold cache, then seconds)."""
    steps = [
        ["bash", str(REPO / "scripts" / "build-datapath-bins.sh")],
        ["bash", str(REPO / "scripts" / "build-engine-bins.sh"), "kubernetes"],
        ["bash", str(REPO / "scripts" / "build-cluster-bins.sh")],
    ]
    env = {**os.environ, "KUBE_EXTRA": "kubelet kube-proxy"}
    for cmd in steps:
        print(f"+ {' '.join(cmd)}", flush=True)
        p = subprocess.run(cmd, env=env, timeout=timeout, check=False)
        if p.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed (rc={p.returncode})")


# ---------------------------------------------------------------- small helpers
def _run(args: Sequence[str], check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(args)} -> rc={p.returncode}\n{p.stdout}{p.stderr}")
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _kill_tree_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop_pid(pid: int, timeout: float = 10) -> None:
    if not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _b64(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


# ---------------------------------------------------------------- PKI (openssl)
@dataclass
class Pki:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _run(
            [
                "openssl",
                "req",
                "-x509",
                *ec,
                "-days",
                "30",
                "-subj",
                "/CN=tse-cluster-ca",
                "-keyout",
                str(self.dir / "ca.key"),
                "-out",
                str(self.ca),
            ]
        )
        # Service account token signing key.
        _run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(self.key("sa"))])
        _run(["openssl", "ec", "-in", str(self.key("sa")), "-pubout", "-out", str(self.dir / "sa.pub")])
        api_sans = [
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
            "DNS:localhost",
            "IP:127.0.0.1",
            f"IP:{NODE_IP}",
            f"IP:{API_SERVICE_IP}",
        ]
        certs: list[tuple[str, str, list[str], str]] = [
            ("apiserver", "/CN=kube-apiserver", api_sans, "serverAuth"),
            ("kubelet-serving", f"/CN={NODE_NAME}", [f"DNS:{NODE_NAME}", f"IP:{NODE_IP}"], "serverAuth"),
            ("admin", "/O=system:masters/CN=tse-admin", [], "clientAuth"),
            ("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", [], "clientAuth"),
            ("kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}", [], "clientAuth"),
            ("kube-proxy", "/CN=system:kube-proxy", [], "clientAuth"),
            ("controller-manager", "/CN=system:kube-controller-manager", [], "clientAuth"),
            ("scheduler", "/CN=system:kube-scheduler", [], "clientAuth"),
            # k3s gives its embedded controllers one identity with broad rights;
            # here that is system:masters.
            ("kube-router", "/O=system:masters/CN=tse-kube-router", [], "clientAuth"),
        ]
        for name, subj, sans, usage in certs:
            ext = self.dir / f"{name}.ext"
            lines = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}", "keyUsage=digitalSignature"]
            if sans:
                lines.append("subjectAltName=" + ",".join(sans))
            ext.write_text("\n".join(lines) + "\n")
            csr = self.dir / f"{name}.csr"
            _run(["openssl", "req", *ec, "-subj", subj, "-keyout", str(self.key(name)), "-out", str(csr)])
            _run(
                [
                    "openssl",
                    "x509",
                    "-req",
                    "-in",
                    str(csr),
                    "-CA",
                    str(self.ca),
                    "-CAkey",
                    str(self.dir / "ca.key"),
                    "-CAcreateserial",
                    "-days",
                    "30",
                    "-extfile",
                    str(ext),
                    "-out",
                    str(self.crt(name)),
                ]
            )
            csr.unlink()
            ext.unlink()

    def kubeconfig(self, path: Path, user: str, server: str, context: str = "default") -> Path:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": server, "certificate-authority-data": _b64(self.ca)}}],
            "users": [
                {
                    "name": context,
                    "user": {"client-certificate-data": _b64(self.crt(user)), "client-key-data": _b64(self.key(user))},
                }
            ],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
        }
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path.chmod(0o600)
        return path


# ---------------------------------------------------------------- API client
class Api:
    """Just enough of the Kubernetes API for the harness and the tests:
    server-side apply, get, list, delete, pod logs."""

    RESOURCES: ClassVar[dict[tuple[str, str], tuple[str, str, bool]]] = {
        # (apiVersion, kind) -> (prefix, plural, namespaced)
        ("v1", "Namespace"): ("/api/v1", "namespaces", False),
        ("v1", "Pod"): ("/api/v1", "pods", True),
        ("v1", "Service"): ("/api/v1", "services", True),
        ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
        ("v1", "Secret"): ("/api/v1", "secrets", True),
        ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
        ("v1", "Node"): ("/api/v1", "nodes", False),
        ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments", True),
        ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies", True),
        ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): (
            "/apis/rbac.authorization.k8s.io/v1",
            "clusterrolebindings",
            False,
        ),
    }

    def __init__(self, server: str, ca: Path, cert: Path, key: Path) -> None:
        self.server = server
        self.s = requests.Session()
        # Not the environment's CA bundle or proxies (requests prefers them to
        # the session's own settings).
        self.s.trust_env = False
        self.s.verify = str(ca)
        self.s.cert = (str(cert), str(key))

    @classmethod
    def from_kubeconfig(cls, path: Path, workdir: Path) -> Api:
        cfg = yaml.safe_load(path.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        user = cfg["users"][0]["user"]
        workdir.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, data in (
            ("ca.crt", cluster["certificate-authority-data"]),
            ("client.crt", user["client-certificate-data"]),
            ("client.key", user["client-key-data"]),
        ):
            f = workdir / name
            f.write_bytes(base64.b64decode(data))
            f.chmod(0o600)
            files[name] = f
        return cls(cluster["server"], files["ca.crt"], files["client.crt"], files["client.key"])

    def path(self, api_version: str, kind: str, name: str = "", namespace: str | None = None) -> str:
        try:
            prefix, plural, namespaced = self.RESOURCES[(api_version, kind)]
        except KeyError:
            raise ClusterError(f"Api: add {api_version} {kind} to Api.RESOURCES") from None
        p = prefix
        if namespaced and namespace:
            p += f"/namespaces/{namespace}"
        p += f"/{plural}"
        return p + (f"/{name}" if name else "")

    def request(self, method: str, path: str, ok: Sequence[int] = (200, 201), **kw: Any) -> Any:
        r = self.s.request(method, self.server + path, timeout=kw.pop("timeout", 30), **kw)
        if r.status_code not in ok:
            raise ClusterError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:2000]}")
        ctype = r.headers.get("content-type", "")
        return r.json() if ctype.startswith("application/json") else r.text

    def apply(self, obj: Mapping[str, Any]) -> Any:
        md = obj["metadata"]
        path = self.path(obj["apiVersion"], obj["kind"], md["name"], md.get("namespace"))
        return self.request(
            "PATCH",
            path,
            params={"fieldManager": "tse-cluster", "force": "true"},
            data=json.dumps(obj),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> Any | None:
        r = self.s.get(self.server + self.path(api_version, kind, name, namespace), timeout=30)
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise ClusterError(f"GET {kind} {namespace}/{name} -> HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def list(self, api_version: str, kind: str, namespace: str | None = None, **params: str) -> list[Any]:
        out = self.request("GET", self.path(api_version, kind, namespace=namespace), params=params)
        return list(out.get("items") or [])

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None, grace: int = 0) -> None:
        self.request(
            "DELETE",
            self.path(api_version, kind, name, namespace),
            ok=(200, 202, 404),
            params={"gracePeriodSeconds": str(grace)},
        )

    def pod_log(self, namespace: str, name: str) -> str:
        return str(self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}/log"))

    def healthy(self) -> bool:
        try:
            return self.s.get(self.server + "/readyz", timeout=5).status_code == 200
        except requests.RequestException:
            return False


# ---------------------------------------------------------------- host port forwarder
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def forward(listen: tuple[str, int], netns_pid: int, target: tuple[str, int]) -> None:
    """Accept on the host and connect inside the node's network namespace
    (a socket stays in the namespace it was created in)."""
    host_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    node_ns = os.open(f"/proc/{netns_pid}/ns/net", os.O_RDONLY)
    srv = socket.create_server(listen, reuse_port=False)

    def pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    print(f"forwarding {listen[0]}:{listen[1]} -> node {target[0]}:{target[1]}", flush=True)
    while True:
        client, _ = srv.accept()
        _setns(node_ns)
        try:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            _setns(host_ns)
        try:
            upstream.settimeout(5)
            upstream.connect(target)
            upstream.settimeout(None)
        except OSError:
            client.close()
            upstream.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


# ---------------------------------------------------------------- the cluster
@dataclass
class State:
    """What ``up`` started, for ``down`` (possibly another process)."""

    pids: dict[str, int] = field(default_factory=dict)
    holder: int = 0
    namespaces: list[str] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    created_cgroups: list[str] = field(default_factory=list)
    # With --tailnet: login_server, exit_tailnet_ip, exit_public_ip, exit_tag, relay_tag,
    # laptop_tailnet_ip, ca, headscale_config, headscale_policy.
    tailnet: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def load(path: Path) -> State:
        if not path.exists():
            return State()
        d = json.loads(path.read_text())
        return State(**d)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2))


class Cluster:
    def __init__(self, build: Path = BUILD, bin_dir: Path | None = None) -> None:
        self.build = build
        self.bin = bin_dir or cache_bin_dir()
        self.images = self.bin.parent / "images"
        self.state_file = build / "state.json"
        self.state = State.load(self.state_file)
        self.pki = Pki(build / "pki")
        self.logs = build / "logs"
        self.kubeconfig = build / "kubeconfig"
        self.host_dns_log = build / "host-dns-queries.jsonl"
        self.topo: Topology | None = None
        self.hosted = False
        self.api: Api | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------ processes
    def ns(self, role: str) -> str:
        return f"tse{RUN_ID}-{role}"

    def node_cmd(self, args: Sequence[str]) -> list[str]:
        """Run in the node's network AND mount namespace (the holder's)."""
        return ["nsenter", f"--target={self.state.holder}", "--mount", "--net", "--", *args]

    def node_run(
        self, args: Sequence[str], check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.node_cmd(args), check=check, timeout=timeout)

    def spawn(self, name: str, args: Sequence[str], in_node: bool = True, env: Mapping[str, str] | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        cmd = self.node_cmd(args) if in_node else list(args)
        with log.open("ab") as f:
            f.write(f"\n==== {time.strftime('%H:%M:%S')} start {' '.join(cmd)}\n".encode())
            f.flush()
            p = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        self.state.pids[name] = p.pid
        self.state.save(self.state_file)
        return p.pid

    def tail(self, name: str, n: int = 40) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait(self, what: str, pred: Callable[[], object], timeout: float, proc: str | None = None) -> Any:
        def check() -> object:
            if proc and not _alive(self.state.pids[proc]):
                raise ClusterError(f"{proc} exited:\n{self.tail(proc)}")
            return pred()

        try:
            return wait_for(what, check, timeout, interval=0.5)
        except TimeoutError as e:
            extra = f"\n--- {proc} log ---\n{self.tail(proc)}" if proc else ""
            raise ClusterError(f"{e}{extra}") from None

    def _phase(self, name: str, start: float) -> None:
        self.timings[name] = round(time.monotonic() - start, 1)

    # ------------------------------------------------------------ up
    def is_up(self) -> bool:
        return bool(self.state.holder) and _alive(self.state.holder) and self.kubeconfig.exists()

    def up(self, tailnet: bool = False, hosted: bool = False) -> None:
        """`tailnet`: Headscale, a netns exit node and a member's laptop (the
        cluster-only stack's). `hosted`: the default stack's world instead:
        Headscale as Tailscale's hosted control plane, and the emulated
        Hetzner and Tailscale APIs (tests/support/clouds.py), whose servers
        are exit-node VMs booted on this topology."""
        if tailnet and hosted:
            raise ClusterError("a cluster is up with --tailnet or with --hosted, not both")
        self.hosted = hosted
        missing = missing_prerequisites() + [f"missing {m}" for m in missing_artifacts(self.bin)]
        if missing:
            raise ClusterError("cannot start the cluster:\n  " + "\n  ".join(missing))
        if self.is_up():
            print(f"cluster already up (state {self.state_file}); `make cluster-down` first to restart it")
            return
        if self.state.pids or self.state.namespaces:
            print("left-overs of an earlier cluster: cleaning up first", flush=True)
            self.down()
        t0 = time.monotonic()
        if self.build.exists():
            shutil.rmtree(self.build)
        self.build.mkdir(parents=True)
        self.state = State()
        try:
            self._up_topology()
            self._up_control_plane()
            self._up_node()
            self._up_addons()
            if tailnet:
                self._up_tailnet()
            if hosted:
                self._up_hosted()
        except BaseException:
            if os.environ.get("TSE_CLUSTER_KEEP_ON_FAILURE"):
                print("cluster-up failed: left running for a look (make cluster-down removes it)", file=sys.stderr)
                raise
            print("cluster-up failed: tearing down what was started", file=sys.stderr)
            with contextlib.suppress(Exception):
                self.down(keep_logs=True)
            raise
        self._phase("total", t0)
        self.state.save(self.state_file)

    def _up_topology(self) -> None:
        t = time.monotonic()
        Topology.reap_stale()
        topo = Topology(self.build / "topology", self.bin, run_id=RUN_ID)
        self.topo = topo
        # Recorded before create(): a half-created topology is still removed by down().
        hosted_roles = (APT_ROLE,) if self.hosted else ()
        self.state.namespaces = [topo.ns(r) for r in (ROUTER, *LINKS, NODE_ROLE, *hosted_roles)]
        self.state.save(self.state_file)
        topo.create()
        topo.add_leaf(NODE_ROLE, NODE_SUBNET, NODE_IP)
        records = [f"{ECHO_NAME}={INTERNET_IP}"]
        if self.hosted:
            # Only here: the boot images' and the VMs' modules are not the plain cluster's.
            from tests.support.exit_vm import CONTROL_NAME, PKGS_LINK, load_boot_image, trust_boot_ca

            # Before any server starts: every certificate from the CA the exit
            # node's image trusts, the apt servers' link.
            load_boot_image(EXIT_NODE_IMAGE)  # its keys: the CA
            trust_boot_ca(topo)
            topo.add_leaf(APT_ROLE, *PKGS_LINK)
            # Headscale answers as controlplane.tailscale.com at an address in
            # Tailscale's published range (what the relay's policy allows by
            # default): the router forwards that address to Headscale's.
            records.append(f"{CONTROL_NAME}={HOSTED_CONTROL_IP}")
            for proto, port in (("tcp", "443"), ("tcp", "80"), ("udp", "3478")):
                dnat = f"-t nat -A PREROUTING -d {HOSTED_CONTROL_IP} -p {proto} --dport {port} -j DNAT"
                topo.run(ROUTER, ["iptables", *dnat.split(), "--to-destination", CONTROL_IP])
        for role in ("internet", "lan"):
            p = topo.start_echo(role)
            self.state.pids[f"echo-{role}"] = p.pid
        # The host's resolver, which CoreDNS forwards to (the node's resolv.conf).
        dns = topo.spawn(
            ROUTER,
            "host-dns",
            [
                sys.executable,
                "-m",
                "tests.support.host_dns",
                f"--addr={NODE_GATEWAY}",
                *(f"--record={r}" for r in records),
                f"--log={self.host_dns_log}",
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.state.pids["host-dns"] = dns.pid
        wait_for("host resolver", lambda: "ready" in dns.log.read_text() or not dns.alive(), 15)
        if not dns.alive():
            raise ClusterError(f"host resolver exited:\n{dns.tail()}")
        # The node reaches the LAN, as a laptop's VM does (the router rejects
        # everything towards it but the relay's link otherwise).
        topo.run(ROUTER, ["iptables", "-I", "FORWARD", "1", "-i", f"v-{NODE_ROLE}", "-o", "v-lan", "-j", "ACCEPT"])
        # The holder: one mount namespace for every process of the node, with
        # private tmpfs over the paths kubelet, containerd and CNI write to
        # whatever their configuration.
        script = " && ".join(
            [
                "mount -t tmpfs -o mode=755,size=256m tse-run /run",
                # A sysfs of the node's network namespace (its /sys/class/net),
                # with the host's cgroup hierarchies moved onto it.
                "mkdir /run/tse-cgroup",
                "mount --rbind /sys/fs/cgroup /run/tse-cgroup",
                "mount -t sysfs tse-sysfs /sys",
                "mount --move /run/tse-cgroup /sys/fs/cgroup",
                "rmdir /run/tse-cgroup",
                "mount -t tmpfs -o mode=755,size=1g tse-varlib /var/lib",
                "mount -t tmpfs -o mode=755,size=256m tse-varlog /var/log",
                "mkdir -p /run/netns /var/lib/cni /var/log/pods /var/log/containers",
                "echo ready",
                "exec sleep infinity",
            ]
        )
        self.logs.mkdir(parents=True, exist_ok=True)
        holder = subprocess.Popen(
            [
                # nsenter, not `ip netns exec`: that one replaces /sys, cgroups included.
                "nsenter",
                f"--net=/run/netns/{self.ns(NODE_ROLE)}",
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdout=(self.logs / "holder.log").open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state.pids["holder"] = holder.pid
        self.state.save(self.state_file)
        wait_for(
            "node holder", lambda: "ready" in (self.logs / "holder.log").read_text() or holder.poll() is not None, 10
        )
        if holder.poll() is not None:
            raise ClusterError(f"node holder exited: {(self.logs / 'holder.log').read_text()}")
        # nsenter and unshare fork nothing (they exec): the holder's pid is the
        # process whose namespaces everything else enters.
        self.state.holder = holder.pid
        for kv in (
            "net.ipv4.ip_forward=1",
            "net.bridge.bridge-nf-call-iptables=1",
            "net.bridge.bridge-nf-call-ip6tables=1",
        ):
            self.node_run(["sysctl", "-qw", kv])
        (self.build / "resolv.conf").write_text(f"nameserver {NODE_GATEWAY}\noptions timeout:1 attempts:2\n")
        self._phase("topology", t)

    def _kubeconfigs(self) -> None:
        local = f"https://127.0.0.1:{API_PORT}"
        for user in ("admin", "kubelet", "kube-proxy", "controller-manager", "scheduler", "kube-router"):
            self.pki.kubeconfig(self.build / f"{user}.kubeconfig", user, local)
        self.pki.kubeconfig(self.kubeconfig, "admin", f"https://{HOST_API[0]}:{HOST_API[1]}", CONTEXT)

    def _up_control_plane(self) -> None:
        t = time.monotonic()
        self.pki.create()
        self._kubeconfigs()
        b, p = self.bin, self.pki
        self.spawn(
            "etcd",
            [
                str(b / "etcd"),
                f"--data-dir={self.build / 'etcd'}",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=default=http://127.0.0.1:2380",
                "--listen-metrics-urls=http://127.0.0.1:2381",
                "--log-level=warn",
            ],
        )
        self.spawn(
            "kube-apiserver",
            [
                str(b / "kube-apiserver"),
                "--etcd-servers=http://127.0.0.1:2379",
                f"--advertise-address={NODE_IP}",
                "--bind-address=0.0.0.0",
                f"--secure-port={API_PORT}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-node-port-range=30000-32767",
                f"--tls-cert-file={p.crt('apiserver')}",
                f"--tls-private-key-file={p.key('apiserver')}",
                f"--client-ca-file={p.ca}",
                f"--service-account-key-file={p.dir / 'sa.pub'}",
                f"--service-account-signing-key-file={p.key('sa')}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                f"--kubelet-client-certificate={p.crt('apiserver-kubelet-client')}",
                f"--kubelet-client-key={p.key('apiserver-kubelet-client')}",
                f"--kubelet-certificate-authority={p.ca}",
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                "--anonymous-auth=false",
                "--enable-priority-and-fairness=false",
            ],
        )
        # The API server listens in the node; the host reaches it through the
        # forwarder, started first so that readiness is checked through it.
        self.spawn(
            "forwarder",
            [
                sys.executable,
                "-m",
                "tests.support.cluster_env",
                "forward",
                "--netns-pid",
                str(self.state.holder),
            ],
            in_node=False,
            env={"PYTHONPATH": str(REPO)},
        )
        self.api = Api.from_kubeconfig(self.kubeconfig, self.build / "client")
        self.wait("kube-apiserver /readyz", self.api.healthy, 90, proc="kube-apiserver")
        self.spawn(
            "kube-controller-manager",
            [
                str(b / "kube-controller-manager"),
                f"--kubeconfig={self.build / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={self.build / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={self.build / 'controller-manager.kubeconfig'}",
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
                "--allocate-node-cidrs=true",
                f"--cluster-cidr={CLUSTER_CIDR}",
                "--node-cidr-mask-size=24",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--root-ca-file={p.ca}",
                f"--service-account-private-key-file={p.key('sa')}",
                f"--cluster-signing-cert-file={p.ca}",
                f"--cluster-signing-key-file={p.dir / 'ca.key'}",
                "--use-service-account-credentials=true",
            ],
        )
        self.spawn(
            "kube-scheduler",
            [
                str(b / "kube-scheduler"),
                f"--kubeconfig={self.build / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={self.build / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={self.build / 'scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
            ],
        )
        self._phase("control-plane", t)

    def _containerd_config(self) -> Path:
        c = self.build / "containerd"
        (self.build / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        cfg = f"""version = 2
root = "{c / "root"}"
state = "{c / "state"}"
oom_score = 0

[grpc]
  address = "{c / "containerd.sock"}"

[ttrpc]
  address = "{c / "containerd.sock.ttrpc"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{c / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  disable_apparmor = true

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{self.build / "cni" / "net.d"}"
"""
        c.mkdir(parents=True, exist_ok=True)
        path = c / "config.toml"
        path.write_text(cfg)
        return path

    def _cni_config(self) -> None:
        conf = {
            "cniVersion": "1.0.0",
            "name": "tse-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    # As flannel does for k3s: pod traffic leaving the node
                    # carries the node's address.
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": NODE_POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": "/var/lib/cni/networks",
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (self.build / "cni" / "net.d" / "10-tse.conflist").write_text(json.dumps(conf, indent=2))

    def _cgroups(self) -> None:
        """kubelet's cgroupRoot in every v1 hierarchy (it must exist)."""
        for h in sorted(Path("/sys/fs/cgroup").iterdir()):
            if h.name == "unified" or not h.is_dir() or h.is_symlink():
                continue
            d = h / CGROUP_ROOT
            if not d.exists():
                d.mkdir()
                self.state.created_cgroups.append(str(d))
            if h.name.startswith("cpuset"):
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (d / f).write_text((h / f).read_text())
        self.state.save(self.state_file)

    def _kubelet_config(self) -> Path:
        p = self.pki
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(p.ca)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "failCgroupV1": False,
            "failSwapOn": False,
            # No CAP_SYS_RESOURCE here: the kubelet cannot lower its score.
            "oomScoreAdj": 0,
            "enforceNodeAllocatable": [],
            "resolvConf": str(self.build / "resolv.conf"),
            "clusterDNS": [DNS_IP],
            "clusterDomain": "cluster.local",
            "containerRuntimeEndpoint": f"unix://{self.build / 'containerd' / 'containerd.sock'}",
            "tlsCertFile": str(p.crt("kubelet-serving")),
            "tlsPrivateKeyFile": str(p.key("kubelet-serving")),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "serializeImagePulls": False,
            # Images are imported, never pulled: never collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "podLogsDirectory": "/var/log/pods",
            "localStorageCapacityIsolation": False,
            "protectKernelDefaults": False,
        }
        path = self.build / "kubelet-config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def _up_node(self) -> None:
        t = time.monotonic()
        sock = self.build / "containerd" / "containerd.sock"
        self.spawn("containerd", ["containerd", "--config", str(self._containerd_config())])
        self._cni_config()
        self.wait("containerd socket", sock.exists, 30, proc="containerd")
        ctr = ["ctr", "--address", str(sock), "-n", "k8s.io"]
        for name in IMAGES:
            self.node_run([*ctr, "images", "import", str(self.images / f"{name}.tar")], timeout=120)
        self._phase("containerd+images", t)
        t = time.monotonic()
        for key in KERNEL_SYSCTLS:
            self.state.sysctls[key] = Path("/proc/sys", *key.split(".")).read_text().strip()
        self._cgroups()
        (self.build / "kubelet").mkdir(exist_ok=True)
        self.spawn(
            "kubelet",
            [
                str(self.bin / "kubelet"),
                f"--config={self._kubelet_config()}",
                f"--kubeconfig={self.build / 'kubelet.kubeconfig'}",
                f"--root-dir={self.build / 'kubelet'}",
                f"--node-ip={NODE_IP}",
                f"--hostname-override={NODE_NAME}",
                "--v=1",
            ],
        )
        api = self._api()
        self.wait("node Ready", lambda: self.node_ready(), 120, proc="kubelet")
        self._phase("kubelet-ready", t)
        t = time.monotonic()
        kp = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self.build / "kube-proxy.kubeconfig")},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": CLUSTER_CIDR,
            "bindAddress": NODE_IP,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # 0: leave the (global) conntrack limits and timeouts alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        kp_path = self.build / "kube-proxy-config.yaml"
        kp_path.write_text(yaml.safe_dump(kp, sort_keys=False))
        self.spawn("kube-proxy", [str(self.bin / "kube-proxy"), f"--config={kp_path}"])
        self.spawn(
            "kube-router",
            [
                str(self.bin / "kube-router"),
                f"--kubeconfig={self.build / 'kube-router.kubeconfig'}",
                f"--hostname-override={NODE_NAME}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                "--health-port=0",
                "--v=1",
            ],
        )
        self.wait(
            "kube-router's chains",
            lambda: "KUBE-ROUTER-FORWARD" in self.node_run(["iptables", "-S"], check=False).stdout,
            60,
            proc="kube-router",
        )
        self.wait(
            "kube-proxy's chains",
            lambda: "KUBE-SERVICES" in self.node_run(["iptables", "-t", "nat", "-S"], check=False).stdout,
            60,
            proc="kube-proxy",
        )
        del api
        self._phase("kube-proxy+kube-router", t)

    def _api(self) -> Api:
        if self.api is None:
            self.api = Api.from_kubeconfig(self.kubeconfig, self.build / "client")
        return self.api

    def host_dns_queries(self) -> list[dict[str, Any]]:
        """Every query the host's resolver received (name, peer, rcode)."""
        if not self.host_dns_log.exists():
            return []
        return [json.loads(x) for x in self.host_dns_log.read_text().splitlines() if x.strip()]

    def node_ready(self) -> bool:
        node = self._api().get("v1", "Node", NODE_NAME)
        if not node:
            return False
        conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions") or []}
        return conds.get("Ready") == "True"

    def _up_addons(self) -> None:
        t = time.monotonic()
        api = self._api()
        for obj in coredns_objects():
            api.apply(obj)

        def dns_ready() -> bool:
            dep = api.get("apps/v1", "Deployment", "coredns", "kube-system") or {}
            return int((dep.get("status") or {}).get("readyReplicas") or 0) >= 1

        self.wait("CoreDNS ready", dns_ready, 120)
        self._phase("coredns", t)

    def _up_tailnet(self) -> None:
        """The topology's headscale (with the stack's tailnet policy), its exit
        node (tagged, behind the cloud-init guard), a member's laptop serving
        HTTP at its tailnet address, and the relay image re-imported with the
        topology's CA in its bundle (headscale's certificate is signed by it;
        the rendered pod is used unchanged)."""
        t = time.monotonic()
        topo = self.topo
        if topo is None:
            raise ClusterError("the topology is not up")
        # As the data path does it (tests/datapath/test_tailnet_reach.py): the
        # tailnet policy the stack writes, in Headscale's terms, and the exit
        # node's cloud-init guard. Without them, the relay reaches the exit
        # node's own services and every other device of the tailnet.
        topo.hs_policy_path = topo.workdir / "policy.hujson"
        # No autoApprovers: the BYO exit node of a cluster-only stack is approved
        # explicitly (start_exit), and the fail-closed test unapproves it.
        topo.hs_policy_path.write_text(json.dumps(stack_policy_for_headscale(auto_approve=False), indent=2))
        self.state.pids["headscale"] = topo.start_control().pid
        # Tagged, as the stack's exit node key is: the policy's `via` names the tag.
        topo.exit_authkey = topo.tagged_preauth_key([EXIT_TAG], ephemeral=True, reusable=False)
        apply_guard(topo)
        exit_ip = topo.start_exit(approve=True)
        self.state.pids["exit-tailscaled"] = topo.procs["exit-tailscaled"].pid
        # Another tailnet device (a member's laptop) with a service at its
        # tailnet address: the relay must not reach it.
        self.state.namespaces.append(topo.ns(LAPTOP_ROLE))
        self.state.save(self.state_file)
        laptop_ip = topo.start_tailnet_node(LAPTOP_ROLE, *LAPTOP_LINK, authkey=topo.preauth_key(ephemeral=True))
        self.state.pids["laptop-tailscaled"] = topo.procs[f"{LAPTOP_ROLE}-tailscaled"].pid
        wait_for(
            f"{laptop_ip} on the laptop's tailscale0",
            lambda: laptop_ip in topo.run(LAPTOP_ROLE, ["ip", "addr", "show", "tailscale0"]).stdout,
            20,
        )
        self.state.pids["laptop-service"] = topo.start_listener(
            LAPTOP_ROLE, "laptop", laptop_ip, LAPTOP_SERVICE_PORT
        ).pid
        self.state.tailnet = {
            "login_server": LOGIN_SERVER,
            "exit_tailnet_ip": exit_ip,
            "exit_public_ip": EXIT_PUBLIC_IP,
            "exit_tag": EXIT_TAG,
            "relay_tag": RELAY_TAG,
            "laptop_tailnet_ip": laptop_ip,
            "ca": str(topo.ca_cert),
            "headscale_config": str(topo.hs_config),
            "headscale_policy": str(topo.hs_policy_path),
        }
        self.state.save(self.state_file)
        self._import_relay_image(topo)
        self._phase("tailnet+relay-image", t)

    def _import_relay_image(self, topo: Topology) -> None:
        """The relay image re-imported with the topology's CA in its bundle
        (Headscale's certificate is signed by it; the rendered pod is used unchanged)."""
        work = self.build / "relay-image"
        oci = work / "oci"
        oci.mkdir(parents=True)
        _run(["tar", "-xf", str(self.images / "tailscale.tar"), "-C", str(oci)])
        bundle = work / "ca-certificates.crt"
        system = Path("/etc/ssl/certs/ca-certificates.crt")
        bundle.write_text((system.read_text() if system.exists() else "") + topo.ca_cert.read_text())
        bundle.chmod(0o644)
        _run(["umoci", "insert", "--image", f"{oci}:img", str(bundle), "/etc/ssl/certs/ca-certificates.crt"])
        index = json.loads((oci / "index.json").read_text())
        name = f"ghcr.io/tailscale/tailscale:{self.tailscale_tag()}"
        for m in index["manifests"]:
            m.setdefault("annotations", {})["io.containerd.image.name"] = name
        (oci / "index.json").write_text(json.dumps(index))
        _run(["tar", "-C", str(oci), "-cf", str(work / "tailscale.tar"), "."])
        sock = self.build / "containerd" / "containerd.sock"
        self.node_run(["ctr", "--address", str(sock), "-n", "k8s.io", "images", "import", str(work / "tailscale.tar")])

    def _up_hosted(self) -> None:
        """Headscale as the hosted control plane (its policy in its database,
        written through the emulated Tailscale API), the relay image, and the
        emulated clouds' process: its endpoints in clouds.json."""
        from tests.support.clouds import CLOUDS_FILE
        from tests.support.exit_vm import CONTROL_NAME

        t = time.monotonic()
        topo = self.topo
        if topo is None:
            raise ClusterError("the topology is not up")
        topo.hs_policy_in_database = True
        self.state.pids["headscale"] = topo.start_control().pid
        self.state.tailnet = {
            "hosted": "true",
            "control_plane": f"https://{CONTROL_NAME} at {HOSTED_CONTROL_IP} (Headscale, {CONTROL_IP})",
            "ca": str(topo.ca_cert),
            "headscale_config": str(topo.hs_config),
        }
        self.state.save(self.state_file)
        self._import_relay_image(topo)
        self.spawn(
            "clouds",
            [sys.executable, "-m", "tests.support.clouds", f"--build={self.build}", f"--run-id={RUN_ID}"],
            in_node=False,
            env={"PYTHONPATH": str(REPO)},
        )
        self.wait("the emulated clouds", (self.build / CLOUDS_FILE).exists, 60, proc="clouds")
        self.state.tailnet["clouds"] = str(self.build / CLOUDS_FILE)
        self.state.save(self.state_file)
        self._phase("hosted+relay-image", t)

    def tailscale_tag(self) -> str:
        for line in (self.images / "IMAGES").read_text().splitlines():
            if line.startswith("TAILSCALE_IMAGE="):
                return line.rsplit(":", 1)[1]
        raise ClusterError(f"no TAILSCALE_IMAGE in {self.images / 'IMAGES'}")

    # ------------------------------------------------------------ down
    def down(self, keep_logs: bool = True) -> None:
        st = self.state
        # 1. No new pods: stop the controllers, then let the kubelet stop every
        #    pod (CNI DEL, sandboxes) while it still can.
        for name in ("kube-controller-manager", "kube-scheduler"):
            if name in st.pids:
                _stop_pid(st.pids[name])
        if st.pids.get("kubelet") and _alive(st.pids["kubelet"]) and self.kubeconfig.exists():
            with contextlib.suppress(Exception):
                api = self._api()
                for pod in api.list("v1", "Pod"):
                    md = pod["metadata"]
                    api.delete("v1", "Pod", md["name"], md["namespace"], grace=0)
                with contextlib.suppress(TimeoutError):
                    wait_for("pods stopped", lambda: not self._running_tasks(), 30, interval=1)
        # 2. Everything else we started, newest first.
        for name in reversed(list(st.pids)):
            _stop_pid(st.pids[name], timeout=5)
        # 3. What is left in the pods' cgroups and the node's namespaces.
        self._kill_cgroup_tree()
        for ns in st.namespaces:
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            _kill_tree_pids([int(x) for x in pids if x.isdigit()])
        if st.holder:
            _stop_pid(st.holder, timeout=2)
        self._remove_cgroups()
        for key, value in st.sysctls.items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", *key.split(".")).write_text(value)
        for ns in st.namespaces:
            _run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        # 4. Files: everything under build/cluster but the logs.
        if self.build.exists():
            for child in self.build.iterdir():
                if keep_logs and child.name == "logs":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        self.state = State()

    def _running_tasks(self) -> bool:
        sock = self.build / "containerd" / "containerd.sock"
        p = self.node_run(["ctr", "--address", str(sock), "-n", "k8s.io", "tasks", "ls", "-q"], check=False, timeout=10)
        return bool(p.stdout.strip()) and p.returncode == 0

    def _cgroup_dirs(self) -> Iterator[Path]:
        for h in Path("/sys/fs/cgroup").iterdir():
            d = h / CGROUP_ROOT
            if d.is_dir():
                yield d

    def _kill_cgroup_tree(self) -> None:
        for _ in range(5):
            pids = set()
            for d in self._cgroup_dirs():
                for f in d.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError):
                        pids |= {int(x) for x in f.read_text().split()}
            if not pids:
                return
            _kill_tree_pids(sorted(pids))
            time.sleep(0.5)

    def _remove_cgroups(self) -> None:
        for d in self._cgroup_dirs():
            # Deepest first: a cgroup can only be removed once it is empty.
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()

    # ------------------------------------------------------------ report
    def describe(self) -> str:
        st = self.state
        lines = [
            f"kubeconfig: {self.kubeconfig} (context {CONTEXT}); API server https://{HOST_API[0]}:{HOST_API[1]} "
            f"(forwarded to {NODE_IP}:{API_PORT} in the node)",
            f"node {NODE_NAME} in netns {self.ns(NODE_ROLE)} at {NODE_IP} (gateway {NODE_GATEWAY}: the router)",
            f"pods {NODE_POD_CIDR} on cni0, services {SERVICE_CIDR}, DNS {DNS_IP} (CoreDNS, k8s-app=kube-dns)",
            f"internet {INTERNET_IP} (echo :80/:443, {self.ns('internet')}); LAN {LAN_IP} ({self.ns('lan')})",
            *(f"tailnet: {k} {v}" for k, v in st.tailnet.items()),
            f"host resolver {NODE_GATEWAY}:53 (CoreDNS forwards there): {ECHO_NAME} -> {INTERNET_IP}, else NXDOMAIN",
            f"images: {PAUSE_IMAGE}, {PROBE_IMAGE}, {COREDNS_IMAGE}, ghcr.io/tailscale/tailscale (imported)",
            "processes (all in the node's namespaces but the forwarder and the echo servers):",
        ]
        for name, pid in st.pids.items():
            lines.append(
                f"  {name:24} pid {pid:<7} {'running' if _alive(pid) else 'EXITED'}  log {self.logs / (name + '.log')}"
            )
        if self.timings:
            lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in self.timings.items()))
        return "\n".join(lines)


def coredns_objects() -> list[dict[str, Any]]:
    """CoreDNS as k3s deploys it (manifests/coredns.yaml), trimmed to the
    plugins built here; it forwards to the node's resolv.conf (the host)."""
    ns = "kube-system"
    labels = {"k8s-app": "kube-dns"}
    corefile = """.:53 {
    errors
    health {
        lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    forward . /etc/resolv.conf
    cache 30
    loop
}
"""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": ns}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": ns},
            "data": {"Corefile": corefile},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": ns, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "containers": [
                            {
                                "name": "coredns",
                                "image": COREDNS_IMAGE,
                                "imagePullPolicy": "IfNotPresent",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                ],
                                "resources": {
                                    "limits": {"memory": "170Mi"},
                                    "requests": {"cpu": "100m", "memory": "70Mi"},
                                },
                                "securityContext": {
                                    "runAsNonRoot": True,
                                    "runAsUser": 65532,
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"},
                                },
                                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                                "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": ns, "labels": labels},
            "spec": {
                "selector": labels,
                "clusterIP": DNS_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        },
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cluster_env", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build or reuse, start, print what runs where")
    up.add_argument("--no-build", action="store_true", help="do not run the build scripts")
    up.add_argument("--tailnet", action="store_true", help="also start headscale and the exit node")
    up.add_argument(
        "--hosted",
        action="store_true",
        help="the default stack's: headscale as the hosted control plane, the emulated Hetzner and Tailscale APIs",
    )
    sub.add_parser("down", help="stop everything `up` started and remove its state")
    sub.add_parser("status")
    fw = sub.add_parser("forward", help=argparse.SUPPRESS)
    fw.add_argument("--netns-pid", type=int, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "forward":
        forward(HOST_API, a.netns_pid, ("127.0.0.1", API_PORT))
        return 0
    urllib3.disable_warnings()
    c = Cluster()
    if a.cmd == "up":
        if not a.no_build and missing_artifacts(c.bin):
            t = time.monotonic()
            build_all()
            print(f"build: {time.monotonic() - t:.0f} s")
        c.up(tailnet=a.tailnet, hosted=a.hosted)
        print(c.describe())
    elif a.cmd == "down":
        c.down()
        print("cluster down: processes, namespaces, cgroups, mounts and build/cluster state removed (logs kept)")
    else:
        print(c.describe() if c.state.pids else "no cluster (state file absent)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ClusterError, TopologyError) as e:
        print(f"cluster_env: {e}", file=sys.stderr)
        sys.exit(1)
