"""Network-namespace topology running the REAL data-path programs.

Used by the pytest suite in this directory and by devtools/bench_datapath.py.

Namespaces (names prefixed per run: ``tse<pid>x<rand>-<role>``) hang off one
router namespace ``rt`` with one veth link each; nothing has a route to
anything outside the topology::

    internet  192.0.2.80      HTTP/HTTPS echo server ("echo.example.test")
    exit      203.0.113.10    tailscaled --advertise-exit-node, NAT to internet
    control   198.51.100.10   headscale (https :443, embedded DERP + STUN :3478)
    lan       192.168.77.10   listener counting every connection ("the laptop")
    relay     10.42.1.10      containerboot (userspace) exactly as rendered
    workload  10.42.2.20      may reach only the relay's proxy ports

Every process started here is tracked and stopped by ``Topology.close``; the
namespaces and their /etc/netns/<ns> files are removed there as well.
Namespaces left behind by a run whose process is gone are removed on the next
``Topology.create``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

from .wan_link import LinkShape, WanLink

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = REPO / "scripts" / "build-datapath-bins.sh"
BIN_NAMES = ("tailscaled", "tailscale", "containerboot", "headscale", "wanlink")
NS_TAG = "tse"

ROUTER = "rt"
# role -> (link subnet, leaf address); the router is .1 on every link.
LINKS: dict[str, tuple[str, str]] = {
    "internet": ("192.0.2.0/24", "192.0.2.80"),
    "exit": ("203.0.113.0/24", "203.0.113.10"),
    "control": ("198.51.100.0/24", "198.51.100.10"),
    "lan": ("192.168.77.0/24", "192.168.77.10"),
    "relay": ("10.42.1.0/24", "10.42.1.10"),
    "workload": ("10.42.2.0/24", "10.42.2.20"),
}
INTERNET_IP = LINKS["internet"][1]
EXIT_PUBLIC_IP = LINKS["exit"][1]
CONTROL_IP = LINKS["control"][1]
LAN_IP = LINKS["lan"][1]
RELAY_IP = LINKS["relay"][1]
WORKLOAD_IP = LINKS["workload"][1]
ECHO_NAME = "echo.example.test"
LOGIN_SERVER = f"https://{CONTROL_IP}"
HS_USER = "tse"
RELAY_LABEL = "tailscale-egress-relay"
RELAY_CONTAINER = "tailscale"
# What the image has at /usr/local/bin (tailscale, tailscaled, containerboot).
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_RELAY_UID = 65534
AUTHKEY_ENV = ("TS_AUTHKEY", "TS_AUTH_KEY")


class TopologyError(RuntimeError):
    pass


def cache_bin_dir() -> Path:
    base = os.environ.get("TS_EGRESS_CACHE") or str(Path.home() / ".cache" / "tailscale-egress")
    return Path(base) / "bin"


def missing_prerequisites() -> list[str]:
    """Reasons the data-path topology cannot run here (empty: it can)."""
    out: list[str] = []
    if sys.platform != "linux":
        out.append("needs Linux network namespaces")
    if os.geteuid() != 0:
        out.append("needs root (ip netns, veth, iptables)")
    for tool in ("ip", "iptables", "ip6tables", "nsenter", "setpriv", "curl", "openssl", "go"):
        if shutil.which(tool) is None:
            out.append(f"`{tool}` not found on PATH")
    if not Path("/dev/net/tun").exists():
        out.append("/dev/net/tun missing (exit node runs tailscaled in kernel TUN mode)")
    return out


def build_bins(timeout: float = 3000) -> Path:
    """Run the (idempotent) build script; return the directory of the binaries."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise TopologyError(f"{BUILD_SCRIPT} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    d = cache_bin_dir()
    for name in BIN_NAMES:
        if not os.access(d / name, os.X_OK):
            raise TopologyError(f"{d / name} missing after {BUILD_SCRIPT}")
    return d


def wait_for(what: str, pred: Callable[[], object], timeout: float, interval: float = 0.25) -> Any:
    """Poll ``pred`` until truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last_exc = e
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def descendants(self) -> list[int]:
        """PIDs of all live descendants (tailscaled puts itself in its own group)."""
        out: list[int] = []
        todo = [self.popen.pid]
        while todo:
            pid = todo.pop()
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError, ValueError):
                    kids = [int(k) for k in (task / "children").read_text().split()]
                    out += kids
                    todo += kids
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Like a container runtime: ``sig`` to the main process, wait, then
        SIGKILL everything that is left of its process tree."""
        tree = self.descendants()
        if self.alive():
            self.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        for pid in [self.popen.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def kill_all(self) -> None:
        """SIGKILL the whole process tree at once (a crashed/OOM-killed container)."""
        for pid in [self.popen.pid, *self.descendants()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class RelaySpec:
    """What the rendered relay Deployment says, reduced to what we run."""

    env: dict[str, str]
    authkey_env: str
    readiness: list[str]
    liveness_path: str
    liveness_port: int
    run_as_user: int
    run_as_group: int
    read_only_root: bool
    proxy_ports: list[int]
    network_policies: list[dict[str, Any]] = field(default_factory=list)
    # TS_AUTHKEY=file:<path>: the key is a file of a Secret volume (path, mode, group), not in the environment.
    authkey_file: str | None = None
    authkey_mode: int = 0o644
    fs_group: int | None = None


def _secret_file_mode(pod_spec: Mapping[str, Any], container: Mapping[str, Any], path: str) -> int:
    """The mode of `path`, a file of a Secret volume mounted in the container (the kubelet's defaultMode
    or the item's mode, 0644 when unset)."""
    for mount in container.get("volumeMounts") or []:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            raise TopologyError(f"{path} is on volume {mount['name']!r}, which is not a Secret")
        item = [i for i in secret.get("items") or [] if i["path"] == path.removeprefix(prefix)]
        if secret.get("items") and not item:
            raise TopologyError(f"the Secret volume {mount['name']!r} has no item at {path}")
        return int(item[0].get("mode", secret.get("defaultMode", 0o644)) if item else secret.get("defaultMode", 0o644))
    raise TopologyError(f"TS_AUTHKEY names {path}, which no volume of the relay container holds")


def _find_relay(objs: list[dict[str, Any]]) -> dict[str, Any]:
    deps = [
        o
        for o in objs
        if o.get("kind") == "Deployment"
        and (o.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/name") == RELAY_LABEL
    ]
    if len(deps) != 1:
        raise TopologyError(f"expected one relay Deployment labelled {RELAY_LABEL}, got {len(deps)}")
    return deps[0]


def _expand(value: str, env: Mapping[str, str]) -> str:
    """`$(NAME)` replaced by a variable defined earlier in the list, `$$` by `$`,
    as the kubelet expands a container's env values."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def _port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def _selector_matches(sel: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in sel.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def load_manifests(manifest_dir: Path) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for p in sorted(manifest_dir.glob("*.y*ml")):
        for doc in yaml.safe_load_all(p.read_text()):
            if isinstance(doc, dict):
                objs.append(doc)
    if not objs:
        raise TopologyError(f"no manifests in {manifest_dir}")
    return objs


_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _resource_field(container: Mapping[str, Any], ref: Mapping[str, Any]) -> int:
    """A memory resourceFieldRef resolved as the kubelet does (bytes, divisor 1)."""
    kind, _, resource = str(ref["resource"]).partition(".")
    quantity = str((container.get("resources") or {}).get(kind, {}).get(resource, ""))
    match = _QUANTITY.match(quantity)
    if resource != "memory" or "divisor" in ref or match is None:
        raise TopologyError(f"unsupported resourceFieldRef {dict(ref)} (quantity {quantity!r})")
    return int(match.group(1)) * _UNITS[match.group(2)]


def relay_spec_from_manifests(objs: list[dict[str, Any]]) -> RelaySpec:
    dep = _find_relay(objs)
    ns = dep.get("metadata", {}).get("namespace", "default")
    pod = dep["spec"]["template"]
    pod_labels: dict[str, str] = pod.get("metadata", {}).get("labels") or {}
    containers = [c for c in pod["spec"]["containers"] if c.get("name") == RELAY_CONTAINER]
    if len(containers) != 1:
        raise TopologyError(f"relay Deployment has no container named {RELAY_CONTAINER!r}")
    c = containers[0]
    env: dict[str, str] = {}
    authkey_env = ""
    for item in c.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = _expand(str(item["value"]), env)
        elif "valueFrom" in item:
            if name in AUTHKEY_ENV and "secretKeyRef" in item["valueFrom"]:
                # The key in the environment: the harness puts it there itself.
                authkey_env = name
            elif "resourceFieldRef" in item["valueFrom"]:
                env[name] = str(_resource_field(c, item["valueFrom"]["resourceFieldRef"]))
            elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
                env[name] = RELAY_IP  # the downward API: the pod's own address
            else:
                raise TopologyError(f"unsupported valueFrom for env {name}: {item['valueFrom']}")
        else:
            env[name] = ""
    if c.get("envFrom"):
        raise TopologyError("envFrom on the relay container is not supported by this harness")
    authkey_file, authkey_mode = None, 0o644
    for name in AUTHKEY_ENV:
        if env.get(name, "").startswith("file:"):
            authkey_env, authkey_file = name, env[name].removeprefix("file:")
            authkey_mode = _secret_file_mode(pod["spec"], c, authkey_file)
    if not authkey_env:
        raise TopologyError("relay container has no TS_AUTHKEY, from a secretKeyRef or as file:<Secret volume>")
    ready = c.get("readinessProbe", {}).get("exec", {}).get("command")
    if not ready:
        raise TopologyError("relay readinessProbe is not an exec command")
    live = c.get("livenessProbe", {}).get("httpGet")
    if not live:
        raise TopologyError("relay livenessProbe is not httpGet")
    live_port = live["port"]
    if isinstance(live_port, str):
        named = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        live_port = named[live_port]
    sc_pod = pod["spec"].get("securityContext") or {}
    sc = c.get("securityContext") or {}
    uid = int(sc.get("runAsUser", sc_pod.get("runAsUser", DEFAULT_RELAY_UID)))
    gid = int(sc.get("runAsGroup", sc_pod.get("runAsGroup", uid)))
    ports = sorted({_port_of(env[k]) for k in ("TS_SOCKS5_SERVER", "TS_OUTBOUND_HTTP_PROXY_LISTEN") if env.get(k)})
    pols = [
        o
        for o in objs
        if o.get("kind") == "NetworkPolicy"
        and o.get("metadata", {}).get("namespace", "default") == ns
        and _selector_matches(o["spec"].get("podSelector") or {}, pod_labels)
        and "Egress" in (o["spec"].get("policyTypes") or [])
    ]
    return RelaySpec(
        authkey_file=authkey_file,
        authkey_mode=authkey_mode,
        fs_group=int(sc_pod["fsGroup"]) if "fsGroup" in sc_pod else None,
        env=env,
        authkey_env=authkey_env,
        readiness=[str(x) for x in ready],
        liveness_path=str(live.get("path", "/")),
        liveness_port=int(live_port),
        run_as_user=uid,
        run_as_group=gid,
        read_only_root=bool(sc.get("readOnlyRootFilesystem", False)),
        proxy_ports=ports,
        network_policies=pols,
    )


def netpol_to_iptables(policies: Sequence[Mapping[str, Any]]) -> dict[int, list[list[str]]]:
    """Translate egress NetworkPolicies into OUTPUT rules, per IP family.

    A stand-in for kube-router: loopback, ESTABLISHED/RELATED and ICMP are
    accepted (kube-router does the same), then each ipBlock peer (cidr minus
    except) with its ports is accepted, everything else is REJECTed.
    Pod/namespace selector peers are ignored (only DNS uses them; there is no
    DNS server in this topology). Returns {4: [...], 6: [...]} argument lists
    for iptables/ip6tables (without the binary name).
    """
    rules: dict[int, list[list[str]]] = {4: [], 6: []}
    for fam, icmp in ((4, "icmp"), (6, "ipv6-icmp")):
        rules[fam] += [
            ["-N", "TSE-EGRESS"],
            ["-A", "OUTPUT", "-j", "TSE-EGRESS"],
            ["-A", "TSE-EGRESS", "-o", "lo", "-j", "ACCEPT"],
            ["-A", "TSE-EGRESS", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "TSE-EGRESS", "-p", icmp, "-j", "ACCEPT"],
        ]
    n = 0
    for pol in policies:
        for rule in pol["spec"].get("egress") or []:
            ports: list[tuple[str, str | None]] = []
            for p in rule.get("ports") or []:
                proto = str(p.get("protocol", "TCP")).lower()
                port = p.get("port")
                if isinstance(port, str) and not port.isdigit():
                    raise TopologyError(f"named port {port!r} in relay egress policy unsupported")
                if port is None:
                    ports.append((proto, None))
                elif p.get("endPort"):
                    ports.append((proto, f"{port}:{p['endPort']}"))
                else:
                    ports.append((proto, str(port)))
            peers = rule.get("to")
            blocks: list[tuple[str, list[str]]] = []
            if not peers:
                blocks = [("0.0.0.0/0", []), ("::/0", [])]
            else:
                for peer in peers:
                    ib = peer.get("ipBlock")
                    if ib:
                        blocks.append((ib["cidr"], list(ib.get("except") or [])))
            for cidr, excepts in blocks:
                fam = ipaddress.ip_network(cidr, strict=False).version
                n += 1
                chain = f"TSE-P{n}"
                r = rules[fam]
                r.append(["-N", chain])
                r.append(["-A", "TSE-EGRESS", "-d", cidr, "-j", chain])
                for ex in excepts:
                    r.append(["-A", chain, "-d", ex, "-j", "RETURN"])
                if not ports:
                    r.append(["-A", chain, "-j", "ACCEPT"])
                for proto, port in ports:
                    rr = ["-A", chain, "-p", proto]
                    if port is not None:
                        rr += ["--dport", port]
                    r.append([*rr, "-j", "ACCEPT"])
    rules[4].append(["-A", "TSE-EGRESS", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"])
    rules[4].append(["-A", "TSE-EGRESS", "-j", "REJECT", "--reject-with", "icmp-port-unreachable"])
    rules[6].append(["-A", "TSE-EGRESS", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"])
    rules[6].append(["-A", "TSE-EGRESS", "-j", "REJECT", "--reject-with", "icmp6-port-unreachable"])
    return rules


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def issue_cert(ca_dir: Path, out: Path, name: str, san: str) -> None:
    """`out`/<name>.crt and .key for `san`, signed by the CA in `ca_dir` (ca.crt, ca.key)."""
    key, csr, crt, ext = (out / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_dir / "ca.crt"),
        "-CAkey",
        str(ca_dir / "ca.key"),
        "-CAcreateserial",
        "-CAserial",
        str(out / "ca.srl"),
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )


class Topology:
    def __init__(self, workdir: Path, bin_dir: Path, run_id: str | None = None, attach: bool = False) -> None:
        """`attach`: the topology of `run_id` that another process created and
        runs (the cluster's): its namespaces and files, nothing copied again
        (its binaries are running)."""
        # A run_id that is not "<pid>x<hex>" (the cluster's) is never reaped
        # by reap_stale: it outlives the process that created it.
        self.run_id = run_id or f"{os.getpid()}x{secrets.token_hex(2)}"
        self.prefix = f"{NS_TAG}{self.run_id}-"
        self.workdir = workdir
        # Copies of the binaries where the unprivileged relay user can execute
        # them, and what the relay sees at /usr/local/bin (start_relay).
        self.bin = self.workdir / "bin"
        self.image_bin = self.workdir / "image-bin"
        if not attach:
            self.workdir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.workdir, 0o755)
            self.bin.mkdir(exist_ok=True)
            for name in BIN_NAMES:
                shutil.copy2(bin_dir / name, self.bin / name)
            os.chmod(self.bin, 0o755)
            self.image_bin.mkdir(exist_ok=True)
            for name in ("tailscaled", "tailscale", "containerboot"):
                shutil.copy2(bin_dir / name, self.image_bin / name)
            os.chmod(self.image_bin, 0o755)
        self.bin_source = bin_dir
        self.procs: dict[str, Proc] = {}
        self.namespaces: list[str] = []
        # Leaves whose link shape_leaf replaced: the link, and what unshape_leaf restores.
        self.shaped: dict[str, tuple[WanLink, list[str], list[str], list[list[str]]]] = {}
        self.ca_cert = self.workdir / "ca.crt"
        self.hs_config = self.workdir / "control" / "config.yaml"
        self.relay_spec: RelaySpec | None = None
        self.relay_authkey = ""
        self.relay_policy_applied = False
        self.exit_authkey = ""
        # A Headscale policy file (HuJSON) for start_control; None: no policy (allow-all).
        self.hs_policy_path: Path | None = None
        # The policy in Headscale's database instead (no file): `headscale policy set`
        # writes it, as the emulated Tailscale API does (tests/support/tailscale_api.py).
        self.hs_policy_in_database = False

    # ---------------------------------------------------------------- basics
    def ns(self, role: str) -> str:
        return self.prefix + role

    def _host(self, args: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
        if check and p.returncode != 0:
            raise TopologyError(f"{shlex.join(args)} -> rc={p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def run(
        self,
        role: str,
        args: Sequence[str],
        check: bool = True,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        full = ["ip", "netns", "exec", self.ns(role), *args]
        p = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else {**os.environ, **env},
        )
        if check and p.returncode != 0:
            raise TopologyError(f"{shlex.join(full)} -> rc={p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def spawn(self, role: str, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        old = self.procs.get(name)
        if old is not None and old.alive():
            raise TopologyError(f"process {name} already running")
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("ab") as f:
            f.write(f"\n==== {time.strftime('%H:%M:%S')} start {shlex.join(args)}\n".encode())
            f.flush()
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(role), *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=dict(env) if env is not None else None,
            )
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    # ---------------------------------------------------------------- create
    @staticmethod
    def reap_stale() -> None:
        """Remove namespaces of earlier runs whose pytest/bench process is gone."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            name = line.split()[0] if line.split() else ""
            if not name.startswith(NS_TAG) or "-" not in name:
                continue
            owner = name[len(NS_TAG) :].split("x", 1)[0]
            if not owner.isdigit() or Path(f"/proc/{owner}").exists():
                continue
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)

    def create(self) -> None:
        self.reap_stale()
        self._add_namespace(ROUTER)
        self.run(ROUTER, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for role, (subnet, leaf) in LINKS.items():
            self.add_leaf(role, subnet, leaf)
        # The "pod network": the workload may reach only the relay's proxy ports
        # (stand-in for the protected namespace's NetworkPolicy); set in
        # restrict_workload() once the ports are known from the render.
        for rule in (
            "-A FORWARD -i v-workload -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "-N TSE-WORKLOAD",
            "-A FORWARD -i v-workload -j TSE-WORKLOAD",
            "-A FORWARD -i v-workload -j REJECT",
            "-A FORWARD -o v-workload -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "-A FORWARD -o v-workload -j REJECT",
        ):
            self.run(ROUTER, ["iptables", *rule.split()])
        # The lan (the laptop's home network) is reachable from the pod network
        # only, as on the laptop; the exit node and the internet cannot reach it.
        self.run(ROUTER, ["iptables", "-A", "FORWARD", "-o", "v-lan", "!", "-i", "v-relay", "-j", "REJECT"])
        self._make_certs()
        # /etc/hosts for the name of the echo server only where a user resolver
        # would run it: nowhere by default (the relay gets it from headscale).

    def restrict_workload(self, ports: Iterable[int]) -> None:
        self.run(ROUTER, ["iptables", "-F", "TSE-WORKLOAD"])
        for port in ports:
            self.run(
                ROUTER,
                ["iptables", "-A", "TSE-WORKLOAD", "-d", RELAY_IP, "-p", "tcp", "--dport", str(port), "-j", "ACCEPT"],
            )

    def _make_certs(self) -> None:
        d = self.workdir
        ossl = ["openssl"]
        self._host(
            [
                *ossl,
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=tse test CA",
                "-keyout",
                str(d / "ca.key"),
                "-out",
                str(self.ca_cert),
            ]
        )
        for name, san in (
            ("control", f"IP:{CONTROL_IP}"),
            ("internet", f"DNS:{ECHO_NAME},IP:{INTERNET_IP}"),
            ("lan", f"IP:{LAN_IP}"),
        ):
            issue_cert(d, d, name, san)
        # A CA bundle that trusts the test CA: bind-mounted as the relay's
        # /etc/ssl (like the image's bundle), SSL_CERT_FILE for the exit node.
        bundle = d / "ssl" / "certs" / "ca-certificates.crt"
        bundle.parent.mkdir(parents=True, exist_ok=True)
        system = Path("/etc/ssl/certs/ca-certificates.crt")
        bundle.write_text((system.read_text() if system.exists() else "") + self.ca_cert.read_text())
        os.chmod(d / "ssl", 0o755)
        os.chmod(d / "ssl" / "certs", 0o755)
        os.chmod(bundle, 0o644)
        self.ca_bundle = bundle

    # ---------------------------------------------------------------- internet / lan
    def start_echo(self, role: str = "internet") -> Proc:
        addr = LINKS[role][1]
        log = self.workdir / f"{role}-connections.jsonl"
        log.touch()
        p = self.spawn(
            role,
            f"echo-{role}",
            [
                sys.executable,
                str(HERE / "echo_server.py"),
                "--addr",
                addr,
                "--cert",
                str(self.workdir / f"{role}.crt"),
                "--key",
                str(self.workdir / f"{role}.key"),
                "--log",
                str(log),
            ],
        )
        wait_for(f"echo server in {role}", lambda: "ready" in p.log.read_text(), 15)
        return p

    def connections(self, role: str = "internet") -> list[dict[str, Any]]:
        log = self.workdir / f"{role}-connections.jsonl"
        if not log.exists():
            return []
        return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]

    # ---------------------------------------------------------------- control
    def start_control(self, derp_ip: str | None = None) -> Proc:
        """Headscale at CONTROL_IP. `derp_ip`: its embedded DERP and STUN
        served at that second address instead (as Tailscale's DERP servers
        are not at its control plane's addresses)."""
        d = self.workdir / "control"
        d.mkdir(exist_ok=True)
        cfg: dict[str, Any] = {
            "server_url": LOGIN_SERVER,
            "listen_addr": f"{CONTROL_IP}:443",
            "metrics_listen_addr": "127.0.0.1:9090",
            "grpc_listen_addr": "127.0.0.1:50443",
            "grpc_allow_insecure": False,
            "noise": {"private_key_path": str(d / "noise_private.key")},
            "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48", "allocation": "sequential"},
            "derp": {
                "server": {
                    "enabled": True,
                    "region_id": 999,
                    "region_code": "tse",
                    "region_name": "tse embedded DERP",
                    "verify_clients": True,
                    "stun_listen_addr": f"{CONTROL_IP}:3478",
                    "private_key_path": str(d / "derp_server_private.key"),
                    "automatically_add_embedded_derp_region": True,
                    "ipv4": CONTROL_IP,
                },
                "urls": [],
                "paths": [],
                "auto_update_enabled": False,
                "update_frequency": "3h",
            },
            "disable_check_updates": True,
            "node": {"expiry": 0, "ephemeral": {"inactivity_timeout": "30m"}},
            "database": {"type": "sqlite", "sqlite": {"path": str(d / "db.sqlite"), "write_ahead_log": True}},
            "tls_cert_path": str(self.workdir / "control.crt"),
            "tls_key_path": str(self.workdir / "control.key"),
            "log": {"level": "info", "format": "text"},
            "policy": {"mode": "database"}
            if self.hs_policy_in_database
            else {"mode": "file", "path": str(self.hs_policy_path or "")},
            "dns": {
                "magic_dns": True,
                "base_domain": "tailnet.test",
                "override_local_dns": False,
                "nameservers": {"global": [], "split": {}},
                "search_domains": [],
                # Resolved by the relay's tailscaled from the netmap (tsdial
                # resolveMagicDNS -> ExtraDNSByName); it only uses records with
                # an EMPTY type, so no "type": "A" here.
                "extra_records": [{"name": ECHO_NAME, "value": INTERNET_IP}],
            },
            "unix_socket": str(d / "headscale.sock"),
            "unix_socket_permission": "0770",
            "logtail": {"enabled": False},
            "taildrop": {"enabled": False},
        }
        if derp_ip is not None:
            self.run("control", ["ip", "addr", "add", f"{derp_ip}/24", "dev", "eth0"])
            cfg["listen_addr"] = "0.0.0.0:443"  # control at CONTROL_IP, DERP (same server) at derp_ip
            cfg["derp"]["server"] |= {"ipv4": derp_ip, "stun_listen_addr": f"{derp_ip}:3478"}
        self.hs_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        p = self.spawn("control", "headscale", [str(self.bin / "headscale"), "-c", str(self.hs_config), "serve"])
        wait_for("headscale socket", lambda: (d / "headscale.sock").exists() or not p.alive(), 30)
        if not p.alive():
            raise TopologyError(f"headscale exited:\n{p.tail()}")
        wait_for("headscale CLI", lambda: self.hs("users", "list") or True, 30)
        self.hs("users", "create", HS_USER)
        return p

    def hs(self, *args: str, check: bool = True) -> Any:
        p = self.run(
            "control",
            [str(self.bin / "headscale"), "-c", str(self.hs_config), *args, "-o", "json"],
            check=check,
            timeout=30,
        )
        out = p.stdout.strip()
        if not out:
            return {}
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            return out

    def user_id(self) -> str:
        for u in self.hs("users", "list") or []:
            if u.get("name") == HS_USER:
                return str(u["id"])
        raise TopologyError(f"headscale user {HS_USER} missing")

    def preauth_key(self, ephemeral: bool, reusable: bool = True, tags: Sequence[str] = ()) -> str:
        """A key of the one user; with `tags`, its nodes join tagged (owned by
        the tags, not the user), as the stack's Tailscale keys are."""
        args = ["preauthkeys", "create", "--user", self.user_id(), "--expiration", "2h"]
        if tags:
            args += ["--tags", ",".join(tags)]
        if reusable:
            args.append("--reusable")
        if ephemeral:
            args.append("--ephemeral")
        out = self.hs(*args)
        key = out.get("key") if isinstance(out, dict) else str(out)
        if not key:
            raise TopologyError(f"no preauth key in {out!r}")
        return str(key)

    def nodes(self) -> list[dict[str, Any]]:
        out = self.hs("nodes", "list")
        return list(out) if isinstance(out, list) else []  # JSON null: no nodes

    def node(self, hostname_prefix: str) -> dict[str, Any] | None:
        for n in self.nodes():
            if str(n.get("given_name", n.get("name", ""))).startswith(hostname_prefix) or str(
                n.get("name", "")
            ).startswith(hostname_prefix):
                return n
        return None

    # ---------------------------------------------------------------- exit node
    def exit_env(self) -> dict[str, str]:
        return {"TS_NO_LOGS_NO_SUPPORT": "true", "SSL_CERT_FILE": str(self.ca_bundle)}

    def ts_exit(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.run(
            "exit",
            [str(self.bin / "tailscale"), f"--socket={self.workdir / 'exit' / 'tailscaled.sock'}", *args],
            check=check,
            timeout=timeout,
            env=self.exit_env(),
        )

    def start_exit_daemon(self) -> Proc:
        d = self.workdir / "exit"
        d.mkdir(exist_ok=True)
        p = self.spawn(
            "exit",
            "exit-tailscaled",
            [
                str(self.bin / "tailscaled"),
                f"--statedir={d}",
                f"--socket={d / 'tailscaled.sock'}",
                "--tun=tailscale0",  # as on the VM: its cloud-init guard names it
                "--port=41641",
                "--no-logs-no-support",
            ],
            env={**os.environ, **self.exit_env()},
        )
        wait_for("exit tailscaled socket", lambda: (d / "tailscaled.sock").exists() or not p.alive(), 20)
        if not p.alive():
            raise TopologyError(f"exit tailscaled exited:\n{p.tail()}")
        return p

    def start_exit(self, approve: bool = True) -> str:
        """Start and register the exit node; return its tailnet IPv4."""
        self.run("exit", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.run("exit", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        self.run("exit", ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"])
        self.start_exit_daemon()
        # Like the product's exit node key: single-use, ephemeral, pre-authorized.
        self.exit_authkey = self.exit_authkey or self.preauth_key(ephemeral=True, reusable=False)
        self.exit_up()
        if approve:
            self.approve_exit(True)
        return self.exit_ip()

    def exit_up(self) -> None:
        self.ts_exit(
            "up",
            f"--login-server={LOGIN_SERVER}",
            f"--authkey={self.exit_authkey}",
            "--advertise-exit-node",
            "--hostname=exit",
            "--accept-dns=false",
            timeout=60,
        )

    def exit_ip(self) -> str:
        return self.ts_exit("ip", "-4").stdout.strip()

    def exit_node_id(self) -> str:
        n = wait_for("exit node in headscale", lambda: self.node("exit"), 20)
        return str(n["id"])

    def approve_exit(self, approve: bool) -> None:
        routes = "0.0.0.0/0,::/0" if approve else ""
        self.hs("nodes", "approve-routes", "--identifier", self.exit_node_id(), "--routes", routes)

    def stop_exit(self) -> int | None:
        p = self.procs.get("exit-tailscaled")
        return p.stop() if p else None

    # ---------------------------------------------------------------- more tailnet nodes
    def tagged_preauth_key(self, tags: Sequence[str], ephemeral: bool, reusable: bool = True) -> str:
        return self.preauth_key(ephemeral, reusable, tags)

    def _add_namespace(self, role: str) -> None:
        self._host(["ip", "netns", "add", self.ns(role)])
        self.namespaces.append(self.ns(role))
        etc = Path("/etc/netns") / self.ns(role)
        etc.mkdir(parents=True, exist_ok=True)
        # No resolver anywhere: lookups fail fast instead of leaving the topology.
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        self.run(role, ["ip", "link", "set", "lo", "up"])

    def add_leaf(self, role: str, subnet: str, leaf: str) -> None:
        """A namespace `role` on its own link (`subnet`, its address `leaf`) to the router."""
        self._add_namespace(role)
        net = ipaddress.ip_network(subnet)
        gw = str(next(net.hosts()))
        self._add_veth(role)
        # Default route to the router only: the router has no default route,
        # so nothing can leave the topology.
        default = ["-4", "route", "add", "default", "via", gw]
        self._relink_leaf(role, [f"{gw}/{net.prefixlen}"], [f"{leaf}/{net.prefixlen}"], [default])

    def _add_veth(self, role: str) -> None:
        """The leaf's link: `v-<role>` in the router, `eth0` in the leaf."""
        peer = ["type", "veth", "peer", "name", "eth0", "netns", self.ns(role)]
        self._host(["ip", "link", "add", f"v-{role}", "netns", self.ns(ROUTER), *peer])

    def _link_addresses(self, role: str, dev: str) -> list[str]:
        out = self.run(role, ["ip", "-j", "addr", "show", "dev", dev]).stdout
        return [
            f"{a['local']}/{a['prefixlen']}"
            for link in json.loads(out)
            for a in link.get("addr_info", [])
            if a.get("scope") == "global"
        ]

    def _default_routes(self, role: str) -> list[list[str]]:
        routes = []
        for family in ("-4", "-6"):
            for r in json.loads(self.run(role, ["ip", family, "-j", "route", "show", "default"]).stdout):
                routes.append([family, "route", "add", "default", "via", r["gateway"]])
        return routes

    def _relink_leaf(self, role: str, router_side: list[str], leaf_side: list[str], routes: list[list[str]]) -> None:
        for addr in router_side:
            self.run(ROUTER, ["ip", "addr", "add", addr, "dev", f"v-{role}"])
        self.run(ROUTER, ["ip", "link", "set", f"v-{role}", "up"])
        for addr in leaf_side:
            self.run(role, ["ip", "addr", "add", addr, "dev", "eth0"])
        self.run(role, ["ip", "link", "set", "eth0", "up"])
        for route in routes:
            self.run(role, ["ip", *route])

    def shape_leaf(self, role: str, shape: LinkShape, shape_file: Path) -> WanLink:
        """The leaf `role`'s link to the router (add_leaf's veth) replaced by
        `wanlink` shaped as `shape`, with the same names, addresses and
        default routes, so the router's rules still apply: the WAN bench's
        laptop link. unshape_leaf puts the veth back."""
        router_side, leaf_side = self._link_addresses(ROUTER, f"v-{role}"), self._link_addresses(role, "eth0")
        routes = self._default_routes(role)
        self.run(ROUTER, ["ip", "link", "del", f"v-{role}"])
        link = WanLink(self.bin_source / "wanlink", shape, self.ns(ROUTER), f"v-{role}", self.ns(role), f"w-{role}",
                       shape_file).start()  # fmt: skip
        self.run(role, ["ip", "link", "set", f"w-{role}", "name", "eth0"])
        self._relink_leaf(role, router_side, leaf_side, routes)
        self.shaped[role] = (link, router_side, leaf_side, routes)
        return link

    def unshape_leaf(self, role: str) -> list[dict[str, Any]]:
        """The veth of add_leaf back in place of shape_leaf's link; wanlink's counters."""
        link, router_side, leaf_side, routes = self.shaped.pop(role)
        counters = link.stop()
        self.run(ROUTER, ["ip", "link", "del", f"v-{role}"], check=False)
        self.run(role, ["ip", "link", "del", "eth0"], check=False)
        self._add_veth(role)
        self._relink_leaf(role, router_side, leaf_side, routes)
        return counters

    def ts(self, role: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`tailscale` against the tailscaled of namespace `role` (see start_tailnet_node)."""
        sock = self.workdir / role / "tailscaled.sock"
        return self.run(
            role,
            [str(self.bin / "tailscale"), f"--socket={sock}", *args],
            check=check,
            timeout=timeout,
            env=self.exit_env(),
        )

    def start_tailnet_node(self, role: str, subnet: str, leaf: str, authkey: str) -> str:
        """A plain tailnet device (tailscaled, kernel TUN) in a namespace of its
        own, e.g. the laptop; returns its tailnet IPv4."""
        self.add_leaf(role, subnet, leaf)
        d = self.workdir / role
        d.mkdir(exist_ok=True)
        p = self.spawn(
            role,
            f"{role}-tailscaled",
            [str(self.bin / "tailscaled"), f"--statedir={d}", f"--socket={d / 'tailscaled.sock'}", "--tun=tailscale0"],
            env={**os.environ, **self.exit_env()},
        )
        wait_for(f"{role} tailscaled socket", lambda: (d / "tailscaled.sock").exists() or not p.alive(), 20)
        if not p.alive():
            raise TopologyError(f"{role} tailscaled exited:\n{p.tail()}")
        self.ts(
            role,
            "up",
            f"--login-server={LOGIN_SERVER}",
            f"--authkey={authkey}",
            f"--hostname={role}",
            "--accept-dns=false",
            timeout=60,
        )
        return self.ts(role, "ip", "-4").stdout.strip()

    def start_listener(self, role: str, name: str, addr: str, port: int) -> Proc:
        """A plain HTTP echo server at addr:port in `role`; connections(name) lists its peers."""
        log = self.workdir / f"{name}-connections.jsonl"
        log.touch()
        p = self.spawn(
            role,
            f"listener-{name}",
            [sys.executable, str(HERE / "echo_server.py"), "--addr", addr, "--http-port", str(port), "--log", str(log)],
        )
        wait_for(f"listener {name}", lambda: "ready" in p.log.read_text() or not p.alive(), 15)
        if not p.alive():
            raise TopologyError(f"listener {name} exited:\n{p.tail()}")
        return p

    # ---------------------------------------------------------------- render
    def render(self, exit_ip: str, extra_config: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        pre = os.environ.get("TSE_DATAPATH_MANIFESTS")
        if pre:
            # Developer stand-in (not committed): a manifests dir whose
            # @EXIT_TAILNET_IP@ / @LOGIN_SERVER@ / @EXIT_PUBLIC_IP@ are filled in.
            out = self.workdir / "render" / "manifests"
            out.mkdir(parents=True, exist_ok=True)
            for p in Path(pre).glob("*.y*ml"):
                (out / p.name).write_text(
                    p.read_text()
                    .replace("@EXIT_TAILNET_IP@", exit_ip)
                    .replace("@LOGIN_SERVER@", LOGIN_SERVER)
                    .replace("@EXIT_PUBLIC_IP@", EXIT_PUBLIC_IP)
                )
            return load_manifests(out)
        config: dict[str, Any] = {
            "tailscale-egress:exitNode": {"existingTailnetIp": exit_ip, "existingPublicIps": [EXIT_PUBLIC_IP]},
            "tailscale-egress:tailnet": {"loginServer": LOGIN_SERVER},
            "tailscale-egress:cluster": {"relayNamespace": "tailscale-egress", "protectedNamespaces": ["default"]},
        }
        if not self.relay_authkey:
            self.relay_authkey = self.preauth_key(ephemeral=True)
        # Stored as `pulumi config set --secret` stores it (the program refuses a
        # plain one); the render shows "[secret]" in the relay's Secret, and this
        # harness writes the real (reusable, ephemeral) headscale key into the
        # file the relay reads (relay_env, start_relay).
        config["tailscale-egress:relayAuthKey"] = {"secure": "v1:datapath-harness"}
        config.update(extra_config or {})
        cfg_file = self.workdir / "Pulumi.datapath.yaml"
        cfg_file.write_text(yaml.safe_dump({"config": config}, sort_keys=False))
        out = self.workdir / "render"
        render = REPO / "tools" / "render.py"
        if not render.exists():
            raise TopologyError(f"{render} does not exist (and TSE_DATAPATH_MANIFESTS is not set)")
        proc = subprocess.run(
            [sys.executable, str(render), "datapath", "--config-file", str(cfg_file), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            check=False,
        )
        if proc.returncode != 0:
            raise TopologyError(f"tools/render.py failed rc={proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return load_manifests(out / "manifests")

    # ---------------------------------------------------------------- relay
    def relay_env(self) -> dict[str, str]:
        spec = self._spec()
        env = dict(spec.env)
        if spec.authkey_file is None:
            env[spec.authkey_env] = self.relay_authkey
        # What the kubelet and the image add around the Deployment's env.
        env.update(
            {
                "PATH": IMAGE_PATH,
                "HOSTNAME": "tailscale-egress-relay-0",
                "HOME": "/",
                "KUBERNETES_SERVICE_HOST": "10.43.0.1",
                "KUBERNETES_SERVICE_PORT": "443",
                "KUBERNETES_SERVICE_PORT_HTTPS": "443",
            }
        )
        return env

    def _spec(self) -> RelaySpec:
        if self.relay_spec is None:
            raise TopologyError("relay spec not loaded: call load_relay() first")
        return self.relay_spec

    def load_relay(self, objs: list[dict[str, Any]]) -> RelaySpec:
        self.relay_spec = relay_spec_from_manifests(objs)
        self.restrict_workload(self.relay_spec.proxy_ports)
        if not self.relay_authkey:
            self.relay_authkey = self.preauth_key(ephemeral=True)
        return self.relay_spec

    def apply_relay_policy(self) -> dict[int, list[list[str]]]:
        """Enforce the rendered relay egress NetworkPolicy in the relay netns."""
        spec = self._spec()
        if not spec.network_policies:
            raise TopologyError("render has no egress NetworkPolicy selecting the relay")
        rules = netpol_to_iptables(spec.network_policies)
        for fam, tool in ((4, "iptables"), (6, "ip6tables")):
            for r in rules[fam]:
                self.run("relay", [tool, *r])
        self.relay_policy_applied = True
        return rules

    def start_relay(self) -> Proc:
        spec = self._spec()
        env = self.relay_env()
        # The relay's own mount namespace looks like the container: the built
        # tailscale binaries at /usr/local/bin (as in the image), /etc/ssl with
        # the CA bundle plus the test CA, a private /tmp (the pod's emptyDir).
        # Then drop to the pod's uid/gid with no capabilities.
        steps = []
        if spec.authkey_file is not None:
            # The Secret volume: an overlay on /etc in this mount namespace holds the key file with the
            # volume's mode, owned by root and the pod's fsGroup, as the kubelet writes it.
            upper, work = self.workdir / "etc-upper", self.workdir / "etc-work"
            key_file = upper / Path(spec.authkey_file).relative_to("/etc")
            key_file.parent.mkdir(parents=True, exist_ok=True)
            work.mkdir(exist_ok=True)
            key_file.write_text(self.relay_authkey)
            os.chown(key_file, 0, spec.fs_group if spec.fs_group is not None else 0)
            key_file.chmod(spec.authkey_mode)
            steps.append(f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc")
        steps += [
            f"mount --bind {shlex.quote(str(self.workdir / 'ssl'))} /etc/ssl",
            f"mount --bind {shlex.quote(str(self.image_bin))} /usr/local/bin",
        ]
        if spec.read_only_root:  # readOnlyRootFilesystem: / read-only in this mount ns
            steps.append("mount -o remount,bind,ro /")
        steps.append("mount -t tmpfs -o mode=1777,size=64m tmpfs /tmp")
        # The kubelet adds the pod's fsGroup to the container's groups.
        groups = f"--groups={spec.fs_group}" if spec.fs_group is not None else "--clear-groups"
        if spec.authkey_file is not None and spec.read_only_root:
            steps.append("mount -o remount,ro /etc")  # the overlay; a Secret volume is read-only
        steps.append(
            f"exec setpriv --reuid={spec.run_as_user} --regid={spec.run_as_group} "
            f"{groups} --inh-caps=-all --bounding-set=-all --no-new-privs env -i "
            + " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
            + " /usr/local/bin/containerboot"
        )
        script = " && ".join(steps)
        return self.spawn("relay", "relay", ["/bin/sh", "-c", script])

    def relay_pid(self) -> int:
        p = self.procs.get("relay")
        if p is None or not p.alive():
            raise TopologyError("relay is not running")
        return p.pid

    def in_relay(self, args: Sequence[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """Run a command as the kubelet would exec it in the relay container."""
        spec = self._spec()
        env = self.relay_env()
        cmd = [
            "nsenter",
            f"--target={self.relay_pid()}",
            "--mount",
            "--net",
            "--",
            "setpriv",
            f"--reuid={spec.run_as_user}",
            f"--regid={spec.run_as_group}",
            "--clear-groups",
            "env",
            "-i",
            *[f"{k}={v}" for k, v in sorted(env.items())],
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def relay_ready(self) -> bool:
        return self.in_relay(self._spec().readiness).returncode == 0

    def relay_live(self) -> bool:
        spec = self._spec()
        url = f"http://{RELAY_IP}:{spec.liveness_port}{spec.liveness_path}"
        p = self.run(
            ROUTER,
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url],
            check=False,
            timeout=10,
        )
        return p.stdout.strip().startswith(("2", "3"))

    def wait_relay_ready(self, timeout: float = 90) -> None:
        def ok() -> bool:
            if not self.procs["relay"].alive():
                raise TopologyError(f"relay exited:\n{self.procs['relay'].tail()}")
            return self.relay_ready()

        try:
            wait_for("relay readiness probe", ok, timeout, interval=1)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- relay log ---\n{self.procs['relay'].tail()}") from None

    # ---------------------------------------------------------------- clients
    def curl(
        self,
        url: str,
        proxy: str | None = None,
        role: str = "workload",
        timeout: float = 10,
        output: str = "-",
        extra: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        args = [
            "curl",
            "-sS",
            "--max-time",
            str(timeout),
            "--cacert",
            str(self.ca_cert),
            "--fail",  # an HTTP error from the proxy is a failed request
            "--noproxy",
            "",
            "-o",
            output,
        ]
        if proxy:
            args += ["--proxy", proxy]
        return self.run(role, [*args, *extra, url], check=False, timeout=timeout + 10)

    def socks_proxy(self) -> str:
        return f"socks5h://{RELAY_IP}:{_port_of(self._spec().env['TS_SOCKS5_SERVER'])}"

    def http_proxy(self) -> str:
        return f"http://{RELAY_IP}:{_port_of(self._spec().env['TS_OUTBOUND_HTTP_PROXY_LISTEN'])}"

    # ---------------------------------------------------------------- kube-router on the node
    # The router namespace is the node. These stand in for k3s' kube-router
    # (v2.6 pkg/controllers/netpol) filtering the workload pod: its top-level
    # chains first in INPUT and FORWARD, the pod's firewall chain, and in it,
    # before the pod's policies, KUBE-NWPLCY-COMMON with its unconditional
    # ICMP accepts; KUBE-ROUTER-INPUT RETURNs the node's own NodePorts first.
    KUBE_ROUTER_SERVICE_CIDR = "10.43.0.0/16"
    KUBE_ROUTER_NODE_PORTS = "30000:32767"

    @staticmethod
    def workload_policy_rules(objs: list[dict[str, Any]], namespace: str = "default") -> list[list[str]]:
        """The rendered egress NetworkPolicies of the workload's namespace as
        chain KUBE-NWPLCY-WORKLOAD: a peer selecting the relay is RELAY_IP, one
        selecting this namespace's pods the workload's link, an ipBlock itself;
        selectors of pods this topology does not have (kube-dns) match nothing."""
        relay = _find_relay(objs)
        relay_ns = relay.get("metadata", {}).get("namespace", "default")
        relay_labels = relay["spec"]["template"].get("metadata", {}).get("labels") or {}
        pols = [
            o
            for o in objs
            if o.get("kind") == "NetworkPolicy"
            and o.get("metadata", {}).get("namespace", "default") == namespace
            and "Egress" in (o["spec"].get("policyTypes") or [])
        ]
        if not pols:
            raise TopologyError(f"render has no egress NetworkPolicy in namespace {namespace}")
        chain = "KUBE-NWPLCY-WORKLOAD"
        out: list[list[str]] = [["-N", chain]]
        n = 0
        for pol in pols:
            for rule in pol["spec"].get("egress") or []:
                dests: list[tuple[str, list[str]]] = []
                for peer in rule.get("to") or [{"ipBlock": {"cidr": "0.0.0.0/0"}}]:
                    if "ipBlock" in peer:
                        dests.append((peer["ipBlock"]["cidr"], list(peer["ipBlock"].get("except") or [])))
                    elif "namespaceSelector" in peer:
                        in_relay_ns = _selector_matches(
                            peer["namespaceSelector"], {"kubernetes.io/metadata.name": relay_ns}
                        )
                        if in_relay_ns and _selector_matches(peer.get("podSelector") or {}, relay_labels):
                            dests.append((f"{RELAY_IP}/32", []))
                    elif "podSelector" in peer and namespace == "default":
                        dests.append((LINKS["workload"][0], []))
                ports: list[tuple[str | None, str | None]] = []
                for p in rule.get("ports") or []:
                    port = p.get("port")
                    rng = f"{port}:{p['endPort']}" if p.get("endPort") else (None if port is None else str(port))
                    ports.append((str(p.get("protocol", "TCP")).lower(), rng))
                for cidr, excepts in dests:
                    if ipaddress.ip_network(cidr, strict=False).version != 4:
                        continue  # the topology is IPv4 only
                    n += 1
                    sub = f"KUBE-NWPLCY-WL{n}"
                    out += [["-N", sub], ["-A", chain, "-d", cidr, "-j", sub]]
                    out += [["-A", sub, "-d", ex, "-j", "RETURN"] for ex in excepts]
                    for proto, port in ports or [(None, None)]:
                        r = ["-A", sub] + (["-p", proto] if proto else []) + (["--dport", port] if port else [])
                        out.append([*r, "-j", "ACCEPT"])
        return out

    def kube_router_rules(self, objs: list[dict[str, Any]]) -> list[list[str]]:
        pod_fw = "KUBE-POD-FW-WORKLOAD"
        local_node_ports = ["-m", "addrtype", "--dst-type", "LOCAL", "-m", "multiport"]
        local_node_ports += ["--dports", self.KUBE_ROUTER_NODE_PORTS, "-j", "RETURN"]
        return [
            ["-N", "KUBE-ROUTER-INPUT"],
            ["-N", "KUBE-ROUTER-FORWARD"],
            ["-N", "KUBE-NWPLCY-COMMON"],
            ["-N", pod_fw],
            *self.workload_policy_rules(objs),
            ["-A", "KUBE-NWPLCY-COMMON", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
            ["-A", "KUBE-NWPLCY-COMMON", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
            *(
                ["-A", "KUBE-NWPLCY-COMMON", "-p", "icmp", "--icmp-type", t, "-j", "ACCEPT"]
                for t in ("echo-request", "destination-unreachable", "time-exceeded")
            ),
            ["-A", pod_fw, "-j", "KUBE-NWPLCY-COMMON"],
            ["-A", pod_fw, "-j", "KUBE-NWPLCY-WORKLOAD"],
            ["-A", pod_fw, "-j", "REJECT"],
            ["-A", "KUBE-ROUTER-INPUT", "-d", self.KUBE_ROUTER_SERVICE_CIDR, "-j", "RETURN"],
            ["-A", "KUBE-ROUTER-INPUT", "-p", "tcp", *local_node_ports],
            ["-A", "KUBE-ROUTER-INPUT", "-p", "udp", *local_node_ports],
            ["-A", "KUBE-ROUTER-INPUT", "-s", WORKLOAD_IP, "-j", pod_fw],
            ["-A", "KUBE-ROUTER-FORWARD", "-s", WORKLOAD_IP, "-j", pod_fw],
            ["-I", "INPUT", "1", "-j", "KUBE-ROUTER-INPUT"],
            ["-I", "FORWARD", "1", "-j", "KUBE-ROUTER-FORWARD"],
        ]

    def apply_kube_router(self, objs: list[dict[str, Any]], iptables: str = "iptables") -> list[list[str]]:
        """Filter the workload on the node as kube-router does (rendered policies)."""
        rules = self.kube_router_rules(objs)
        for r in rules:
            self.run(ROUTER, [iptables, *r])
        return rules

    # ---------------------------------------------------------------- close
    def close(self) -> None:
        for p in reversed(list(self.procs.values())):
            try:
                p.stop(timeout=5)
            except Exception as e:  # noqa: BLE001 - best effort teardown
                print(f"teardown: stopping {p.name}: {e!r}", file=sys.stderr)
        for name in reversed(self.namespaces):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        self.namespaces.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_full(
    workdir: Path, bin_dir: Path, approve: bool = True, policy: bool = False, start_relay: bool = True
) -> Topology:
    """internet + lan + control + exit (+ rendered relay); closes itself on error."""
    t = Topology(workdir, bin_dir)
    try:
        t.create()
        t.start_echo("internet")
        t.start_echo("lan")
        t.start_control()
        exit_ip = t.start_exit(approve=approve)
        t.load_relay(t.render(exit_ip))
        if policy:
            t.apply_relay_policy()
        if start_relay:
            t.start_relay()
        return t
    except BaseException:
        t.close()
        raise
