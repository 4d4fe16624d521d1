"""A real Kubernetes control plane on loopback for the engine tests (issue 7).

Starts, idempotently, the binaries `make engine-bins` builds: etcd, kube-apiserver
(Pod Security admission and ValidatingAdmissionPolicy on, as they are by default;
authorization Node,RBAC), kube-controller-manager (namespace deletion, garbage
collection, service-account tokens, Deployments...), kube-scheduler and kwok with
one fake node that pods are scheduled onto and made Running/Ready, so that a
Deployment becomes Available without any container runtime.

Writes `build/engine/kubeconfig` with the contexts `tailscale-egress-test` (user
`admin`, in `system:masters`: the deployer), `tailscale-egress-test-alice` and
`tailscale-egress-test-bob` (ordinary users with no rights: tests bind roles to
them). Everything it writes is under `build/engine/` (logs in `logs/`, pid files
in `run/`); nothing else on the machine is touched.

    python -m tests.support.apiserver start     # `make cluster-api`
    python -m tests.support.apiserver stop      # `make cluster-api-down`
    python -m tests.support.apiserver status

Tests: `require_binaries()`, then `with running(state_dir, ports=Ports.free()) as
cluster:` (their own directory and ports, so that a cluster someone started with
`make cluster-api` is left alone); `cluster.kubeconfig`, `cluster.context("alice")`,
`cluster.request(...)`. The CLI's ports are fixed loopback ports below the
ephemeral range, overridable by env (`TS_EGRESS_APISERVER_PORT` and friends,
see `PORT_ENV`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = REPO / "build" / "engine"
CONTEXT = "tailscale-egress-test"
SERVICE_CIDR = "10.43.0.0/16"
# kwok hands out pod IPs from here: the pod CIDR of k3s, which the stack assumes.
POD_CIDR = "10.42.0.0/24"
# The fake node's address (TEST-NET-2: it is nobody's).
FAKE_NODE_IP = "198.51.100.10"
FAKE_NODE = "kwok-node-0"
FAKE_NODE_LABEL = ("type", "kwok")
# The identities in the kubeconfig and their groups. `admin` deploys.
USERS: dict[str, tuple[str, ...]] = {"admin": ("system:masters",), "alice": (), "bob": ()}
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
START_TIMEOUT = 180.0  # seconds; the machine running the tests may be busy


class ClusterError(RuntimeError):
    """The control plane could not be started; the message names the log to read."""


class MissingBinaryError(ClusterError):
    """A binary `make engine-bins` builds is not there."""


def cache_dir() -> Path:
    return Path(os.environ.get("TS_EGRESS_CACHE") or Path.home() / ".cache" / "tailscale-egress")


def bin_dir() -> Path:
    return cache_dir() / "bin"


def missing_binaries() -> list[str]:
    """The names of the control-plane binaries that are not built yet."""
    missing = [name for name in BINARIES if not os.access(bin_dir() / name, os.X_OK)]
    if not (bin_dir() / "kwok-stages").is_dir():
        missing.append("kwok-stages")
    return missing


def require_binaries() -> None:
    """For tests: skip naming `make engine-bins` when a binary is missing (fail under CI=true)."""
    from tests.support.tools import missing  # pytest only where tests run

    absent = missing_binaries()
    if absent:
        missing(f"the engine binaries {', '.join(absent)} (in {bin_dir()})", "make engine-bins")


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ClusterError(f"{name}={raw!r} is not a TCP port: set it to a number from 1 to 65535, or unset it")
    return int(raw)


# Each port: its environment variable and default (below Linux's ephemeral range,
# away from the well-known Kubernetes ports another cluster may use).
PORT_ENV: dict[str, tuple[str, int]] = {
    "etcd": ("TS_EGRESS_ETCD_PORT", 22379),
    "etcd_peer": ("TS_EGRESS_ETCD_PEER_PORT", 22380),
    "apiserver": ("TS_EGRESS_APISERVER_PORT", 26443),
    "controller_manager": ("TS_EGRESS_CONTROLLER_MANAGER_PORT", 20257),
    "scheduler": ("TS_EGRESS_SCHEDULER_PORT", 20259),
}


@dataclass(frozen=True)
class Ports:
    """Loopback ports, each overridable by the environment variable named in `PORT_ENV`."""

    etcd: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    @classmethod
    def from_env(cls) -> Ports:
        values = {field: _env_port(env, default) for field, (env, default) in PORT_ENV.items()}
        return cls(**values)

    @classmethod
    def free(cls) -> Ports:
        """Ports the kernel says are free now: for a test session beside another cluster."""
        return cls(**dict(zip(PORT_ENV, free_ports(len(PORT_ENV)), strict=True)))


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports the kernel says are free now (all held
    open while they are chosen, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind(("127.0.0.1", 0))
            ports.append(int(probe.getsockname()[1]))
    return ports


def _known_ports(state_dir: Path) -> Ports:
    """The ports of the cluster running from `state_dir`, else those of the environment."""
    try:
        saved = Ports(**json.loads((state_dir / "ports.json").read_text()))
    except (OSError, ValueError, TypeError):
        return Ports.from_env()
    cluster = Cluster(state_dir=state_dir, ports=saved)
    return saved if any(_running_pid(cluster, name) for name in BINARIES) else Ports.from_env()


@dataclass(frozen=True)
class Cluster:
    """Where the running control plane is, and how to talk to it."""

    state_dir: Path
    ports: Ports

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def run(self) -> Path:
        return self.state_dir / "run"

    @staticmethod
    def context(user: str = "admin") -> str:
        """The kubeconfig context of `user` (`admin`, `alice` or `bob`)."""
        return CONTEXT if user == "admin" else f"{CONTEXT}-{user}"

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, user: str = "admin"
    ) -> tuple[int, dict[str, Any]]:
        """One API call as `user`; returns the HTTP status and the decoded JSON body."""
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / f"{user}.crt"), str(self.pki / f"{user}.key"))
        connection = http.client.HTTPSConnection("127.0.0.1", self.ports.apiserver, context=context, timeout=30)
        try:
            payload = None if body is None else json.dumps(body)
            headers = {"Accept": "application/json", "Content-Type": "application/json"}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            decoded = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            decoded = {"raw": raw.decode(errors="replace")}
        return response.status, decoded if isinstance(decoded, dict) else {"items": decoded}


# --- PKI (openssl CLI: no Python crypto dependency) -------------------------


def _openssl(*args: str, cwd: Path) -> None:
    command = ["openssl", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"command failed (in {cwd}): {' '.join(command)}\n{result.stderr.strip()}")


def _issue(pki: Path, name: str, subject: str, extensions: Sequence[str]) -> None:
    """A P-256 key and a certificate for it signed by the test CA (10 years)."""
    if (pki / f"{name}.crt").exists() and (pki / f"{name}.key").exists():
        return
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    with tempfile.NamedTemporaryFile("w", dir=pki, suffix=".ext", delete=False) as ext:
        ext.write("\n".join(extensions) + "\n")
    try:
        serial = "0x" + secrets.token_hex(16)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", serial,
            "-days", "3650", "-extfile", ext.name, "-out", f"{name}.crt", cwd=pki,
        )  # fmt: skip
    finally:
        os.unlink(ext.name)
        (pki / f"{name}.csr").unlink(missing_ok=True)
    (pki / f"{name}.key").chmod(0o600)


def _client_subject(user: str, groups: Sequence[str]) -> str:
    return "".join(f"/O={group}" for group in groups) + f"/CN={user}"


CLIENT_EXTENSIONS = ("keyUsage=critical,digitalSignature", "extendedKeyUsage=clientAuth")
# The control plane's own identities (RBAC has roles for the first two built in;
# kwok updates the status of every pod on its node: an administrator).
COMPONENT_USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kube-controller-manager": ("system:kube-controller-manager", ()),
    "kube-scheduler": ("system:kube-scheduler", ()),
    "kwok": ("kwok-controller", ("system:masters",)),
}


def ensure_pki(pki: Path) -> None:
    """CA, API server serving cert, service-account key pair and client certs (kept once made)."""
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    if not (pki / "ca.crt").exists():
        _openssl(
            "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650", "-subj", "/CN=tailscale-egress-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=pki,
        )  # fmt: skip
        (pki / "ca.key").chmod(0o600)
    names = ("kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")
    san = ",".join(["DNS:localhost", *(f"DNS:{n}" for n in names), "IP:127.0.0.1", "IP:10.43.0.1"])
    _issue(
        pki, "apiserver", "/CN=kube-apiserver",
        ("keyUsage=critical,digitalSignature", "extendedKeyUsage=serverAuth", f"subjectAltName={san}"),
    )  # fmt: skip
    if not (pki / "sa.key").exists():
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key", cwd=pki)
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        (pki / "sa.key").chmod(0o600)
    for user, groups in USERS.items():
        _issue(pki, user, _client_subject(user, groups), CLIENT_EXTENSIONS)
    for name, (user, groups) in COMPONENT_USERS.items():
        _issue(pki, name, _client_subject(user, groups), CLIENT_EXTENSIONS)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _write_kubeconfig(cluster: Cluster, path: Path, users: dict[str, str]) -> None:
    """A self-contained kubeconfig (certificates inline), one context per user; the first is current."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CONTEXT,
                "cluster": {"server": cluster.server, "certificate-authority-data": _b64(cluster.pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": f"{CONTEXT}-{user}",
                "user": {
                    "client-certificate-data": _b64(cluster.pki / f"{cert}.crt"),
                    "client-key-data": _b64(cluster.pki / f"{cert}.key"),
                },
            }
            for user, cert in users.items()
        ],
        "contexts": [
            {"name": context, "context": {"cluster": CONTEXT, "user": f"{CONTEXT}-{user}"}}
            for context, user in ((Cluster.context(user), user) for user in users)
        ],
        "current-context": Cluster.context(next(iter(users))),
    }
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    path.with_suffix(".tmp").replace(path)


# --- processes ---------------------------------------------------------------

_children: dict[int, subprocess.Popen[bytes]] = {}


def _pidfile(cluster: Cluster, name: str) -> Path:
    return cluster.run / f"{name}.pid"


def _running_pid(cluster: Cluster, name: str) -> int | None:
    """The pid of our `name` if it runs: the pid file's process, executing our binary."""
    pidfile = _pidfile(cluster, name)
    try:
        record = json.loads(pidfile.read_text())
        pid, exe = int(record["pid"]), str(record["exe"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid)
        return None
    try:
        actual = os.readlink(f"/proc/{pid}/exe")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    # A reused pid runs another program: not ours to keep or to stop.
    if actual.removesuffix(" (deleted)") != exe or state == "Z":
        return None
    return pid


# The Ports fields each component listens on.
LISTENS: dict[str, tuple[str, ...]] = {
    "etcd": ("etcd", "etcd_peer"),
    "kube-apiserver": ("apiserver",),
    "kube-controller-manager": ("controller_manager",),
    "kube-scheduler": ("scheduler",),
    "kwok": (),
}


def _check_ports_free(cluster: Cluster, name: str) -> None:
    """Refuse to start beside another program on our port: its health checks would pass for ours."""
    for field in LISTENS[name]:
        port = getattr(cluster.ports, field)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as error:
                env = PORT_ENV[field][0]
                raise ClusterError(
                    f"{name}: port 127.0.0.1:{port} is in use by another program ({error.strerror}); "
                    f"stop it, or choose another port with {env}=<port>"
                ) from error


def _spawn(cluster: Cluster, name: str, args: Sequence[str]) -> int:
    _check_ports_free(cluster, name)
    exe = os.path.realpath(bin_dir() / name)
    log = cluster.logs / f"{name}.log"
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {exe} {' '.join(args)}\n".encode())
        out.flush()
        child = subprocess.Popen(
            [exe, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=cluster.state_dir, start_new_session=True,
        )  # fmt: skip
    _children[child.pid] = child
    _pidfile(cluster, name).write_text(json.dumps({"pid": child.pid, "exe": exe}) + "\n")
    return child.pid


def _stop_process(cluster: Cluster, name: str, timeout: float = 20.0) -> bool:
    pid = _running_pid(cluster, name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running_pid(cluster, name) == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        if _running_pid(cluster, name) == pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _running_pid(cluster, name) == pid:
                time.sleep(0.05)
        child = _children.pop(pid, None)
        if child is not None:
            child.wait()
    _pidfile(cluster, name).unlink(missing_ok=True)
    return pid is not None


def _log_tail(cluster: Cluster, name: str, lines: int = 15) -> str:
    try:
        text = (cluster.logs / f"{name}.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _wait(cluster: Cluster, name: str, what: str, ready: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    """Poll `ready()` until true; fail naming the component's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException, ssl.SSLError):
            if ready():
                return
        if _running_pid(cluster, name) is None:
            raise ClusterError(
                f"{name} exited before {what}; see {cluster.logs / (name + '.log')}:\n{_log_tail(cluster, name)}"
            )
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{what}: not after {timeout:.0f} s; see {cluster.logs / (name + '.log')}:\n{_log_tail(cluster, name)}"
            )
        time.sleep(0.25)


def _https_ok(port: int, path: str) -> bool:
    """GET https://127.0.0.1:<port><path> is 200 (component self-signed serving certs: not verified)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    finally:
        connection.close()


def _etcd_healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        return response.status == 200 and json.loads(response.read()).get("health") == "true"
    finally:
        connection.close()


# --- the components ----------------------------------------------------------


def _etcd_args(cluster: Cluster) -> list[str]:
    client = f"http://127.0.0.1:{cluster.ports.etcd}"
    peer = f"http://127.0.0.1:{cluster.ports.etcd_peer}"
    # Plain HTTP on loopback: a throwaway test store, reachable only from this machine.
    return [
        "--name=default",
        f"--data-dir={cluster.state_dir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--listen-metrics-urls=",
        "--log-level=warn",
        "--quota-backend-bytes=1073741824",
    ]


def _apiserver_args(cluster: Cluster) -> list[str]:
    pki = cluster.pki
    return [
        f"--etcd-servers=http://127.0.0.1:{cluster.ports.etcd}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={cluster.ports.apiserver}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC",
        # Privileged pods are then refused by Pod Security admission alone, as on
        # k3s (which allows them): the tests must see PSA do it.
        "--allow-privileged=true",
        # The `kubernetes` Service may not point at a loopback address: no endpoints.
        "--endpoint-reconciler-type=none",
        "--kubelet-preferred-address-types=InternalIP",
        "--profiling=false",
    ]


def _component_kubeconfig(cluster: Cluster, name: str) -> Path:
    """The kubeconfig a control-plane component connects with (its own client certificate)."""
    path = cluster.pki / f"{name}.kubeconfig"
    _write_kubeconfig(cluster, path, {name: name})
    return path


def _controller_manager_args(cluster: Cluster) -> list[str]:
    kubeconfig = _component_kubeconfig(cluster, "kube-controller-manager")
    pki = cluster.pki
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={cluster.ports.controller_manager}",
        "--controllers=*",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--profiling=false",
    ]


def _scheduler_args(cluster: Cluster) -> list[str]:
    kubeconfig = _component_kubeconfig(cluster, "kube-scheduler")
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={cluster.ports.scheduler}",
        "--leader-elect=false",
        "--profiling=false",
    ]


def _kwok_args(cluster: Cluster) -> list[str]:
    kubeconfig = _component_kubeconfig(cluster, "kwok")
    stages = sorted((bin_dir() / "kwok-stages").glob("*.yaml"))
    label, value = FAKE_NODE_LABEL
    return [
        f"--config={','.join(str(stage) for stage in stages)}",
        f"--kubeconfig={kubeconfig}",
        f"--manage-nodes-with-label-selector={label}={value}",
        f"--cidr={POD_CIDR}",
        f"--node-ip={FAKE_NODE_IP}",
        "--node-lease-duration-seconds=40",
    ]


def _fake_node() -> dict[str, Any]:
    label, value = FAKE_NODE_LABEL
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": FAKE_NODE,
            "labels": {
                label: value,
                "kubernetes.io/hostname": FAKE_NODE,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        # No taint: every pod may land here, as on a one-node k3s.
        "spec": {},
    }


def _node_ready(cluster: Cluster) -> bool:
    status, node = cluster.request("GET", f"/api/v1/nodes/{FAKE_NODE}")
    conditions = node.get("status", {}).get("conditions", []) if status == 200 else []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _ensure_fake_node(cluster: Cluster) -> None:
    status, _ = cluster.request("GET", f"/api/v1/nodes/{FAKE_NODE}")
    if status == 404:
        status, body = cluster.request("POST", "/api/v1/nodes", _fake_node())
        if status not in (201, 409):
            raise ClusterError(f"creating node {FAKE_NODE}: HTTP {status}: {body.get('message', body)}")


def _exists(cluster: Cluster, path: str) -> bool:
    return cluster.request("GET", path)[0] == 200


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One start or stop at a time per state directory (two test sessions may share it)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def status(state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, int | None]:
    """Which of our components run (name: pid, or None)."""
    cluster = Cluster(state_dir=state_dir.resolve(), ports=Ports.from_env())
    return {name: _running_pid(cluster, name) for name in BINARIES}


def start(state_dir: Path = DEFAULT_STATE_DIR, fresh: bool = False, ports: Ports | None = None) -> Cluster:
    """Start what is not running yet and wait until the cluster is usable.

    Usable: /readyz is ok, the `default` namespace and its `default` service
    account exist, and kwok's node is Ready. `fresh` stops a running cluster and
    wipes its data first. `ports`: default those of the cluster already running
    from `state_dir`, else the environment's (`PORT_ENV`); a test session that
    must not meet `make cluster-api` passes its own state_dir and `Ports.free()`.
    """
    missing = missing_binaries()
    if missing:
        raise MissingBinaryError(
            f"not built: {', '.join(missing)} (looked in {bin_dir()}); build them with `make engine-bins`"
        )
    if shutil.which("openssl") is None:
        raise MissingBinaryError("`openssl` is not installed; install it with: apt-get install openssl")
    if fresh:
        stop(state_dir, keep_data=False)
    state_dir = state_dir.resolve()
    with _locked(state_dir):
        cluster = Cluster(state_dir=state_dir, ports=ports or _known_ports(state_dir))
        (state_dir / "ports.json").write_text(json.dumps(asdict(cluster.ports)) + "\n")
        return _start(cluster)


def _start(cluster: Cluster) -> Cluster:
    for directory in (cluster.state_dir, cluster.logs, cluster.run):
        directory.mkdir(parents=True, exist_ok=True)
    ensure_pki(cluster.pki)
    _write_kubeconfig(cluster, cluster.kubeconfig, {user: user for user in USERS})

    if _running_pid(cluster, "etcd") is None:
        _spawn(cluster, "etcd", _etcd_args(cluster))
    _wait(cluster, "etcd", "etcd healthy", lambda: _etcd_healthy(cluster.ports.etcd))

    if _running_pid(cluster, "kube-apiserver") is None:
        _spawn(cluster, "kube-apiserver", _apiserver_args(cluster))
    _wait(cluster, "kube-apiserver", "kube-apiserver /readyz ok", lambda: cluster.request("GET", "/readyz")[0] == 200)

    starters = {
        "kube-controller-manager": _controller_manager_args,
        "kube-scheduler": _scheduler_args,
        "kwok": _kwok_args,
    }
    for name, args in starters.items():
        if _running_pid(cluster, name) is None:
            _spawn(cluster, name, args(cluster))
    _wait(
        cluster, "kube-controller-manager", "kube-controller-manager /healthz ok",
        lambda: _https_ok(cluster.ports.controller_manager, "/healthz"),
    )  # fmt: skip
    _wait(
        cluster, "kube-scheduler", "kube-scheduler /healthz ok", lambda: _https_ok(cluster.ports.scheduler, "/healthz")
    )
    _wait(cluster, "kube-apiserver", "namespace default", lambda: _exists(cluster, "/api/v1/namespaces/default"))
    _wait(
        cluster, "kube-controller-manager", "service account default/default",
        lambda: _exists(cluster, "/api/v1/namespaces/default/serviceaccounts/default"),
    )  # fmt: skip
    _ensure_fake_node(cluster)
    _wait(cluster, "kwok", f"node {FAKE_NODE} Ready (kwok)", lambda: _node_ready(cluster))
    return cluster


STOP_ORDER = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")


def stop(state_dir: Path = DEFAULT_STATE_DIR, keep_data: bool = False) -> list[str]:
    """Stop every component we started (by pid file); wipe etcd's data unless `keep_data`.

    Certificates, the kubeconfig and the logs stay (the next start reuses the
    certificates; the logs are for reading after a failure).
    """
    cluster = Cluster(state_dir=state_dir.resolve(), ports=_known_ports(state_dir.resolve()))
    with _locked(cluster.state_dir):
        stopped = [name for name in STOP_ORDER if _stop_process(cluster, name)]
        if not keep_data:
            shutil.rmtree(cluster.state_dir / "etcd", ignore_errors=True)
    return stopped


def describe(cluster: Cluster) -> str:
    lines = [
        f"control plane on loopback (state, pid files and logs under {cluster.state_dir}):",
        f"  etcd                     http://127.0.0.1:{cluster.ports.etcd}  (data {cluster.state_dir / 'etcd'})",
        f"  kube-apiserver           {cluster.server}",
        f"  kube-controller-manager  https://127.0.0.1:{cluster.ports.controller_manager}/healthz",
        f"  kube-scheduler           https://127.0.0.1:{cluster.ports.scheduler}/healthz",
        f"  kwok                     node {FAKE_NODE} (pods get IPs from {POD_CIDR})",
        f"  binaries                 {bin_dir()}",
        f"  logs                     {cluster.logs}/<component>.log",
        f"kubeconfig {cluster.kubeconfig}: contexts {', '.join(Cluster.context(u) for u in USERS)}",
        f"  kubectl --kubeconfig {cluster.kubeconfig} --context {CONTEXT} get ns",
        "stop it (and wipe its data) with: make cluster-api-down",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def running(state_dir: Path = DEFAULT_STATE_DIR, fresh: bool = True, ports: Ports | None = None) -> Iterator[Cluster]:
    """A cluster for the length of a `with` block (for a pytest session fixture)."""
    cluster = start(state_dir, fresh=fresh, ports=ports)
    try:
        yield cluster
    finally:
        stop(state_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.apiserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="default: %(default)s")
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="start (idempotent) and wait until usable")
    start_parser.add_argument("--fresh", action="store_true", help="stop and wipe a running cluster first")
    stop_parser = commands.add_parser("stop", help="stop everything started here and wipe the data")
    stop_parser.add_argument("--keep-data", action="store_true", help="keep etcd's data for the next start")
    commands.add_parser("status", help="which components run")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            began = time.monotonic()
            cluster = start(args.state_dir, fresh=args.fresh)
            print(describe(cluster))
            print(f"ready in {time.monotonic() - began:.1f} s")
        elif args.command == "stop":
            stopped = stop(args.state_dir, keep_data=args.keep_data)
            print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
        else:
            for name, pid in status(args.state_dir).items():
                print(f"{name:24} {'pid ' + str(pid) if pid else 'not running'}")
    except ClusterError as error:
        print(f"cluster-api: ERROR: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
