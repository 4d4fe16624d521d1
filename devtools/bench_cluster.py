"""The relay's data path in the real pod path (`make bench-cluster`, issue 9).

Deploys the cluster-only stack through the real engine into the single-node
cluster (tests/support/deployment.py, as the e2e suite does; it starts and
stops its own cluster unless one is up), then, from pods, against an HTTPS
server in the topology's "internet" (`probe serve`, Go, so the server is
never the limit):

  direct               a pod of a namespace with no policy, straight out
  userspace CONNECT    the protected workload through the relay's HTTP CONNECT
                       proxy (its HTTPS_PROXY from the stack's ConfigMap)
  userspace SOCKS5     the same through ALL_PROXY (socks5h)
  kernel CONNECT       a kernel-mode relay (the relay's own container settings
                       but TS_USERSPACE=false, privileged, in the unprotected
                       namespace, same exit node), through its HTTP CONNECT
                       proxy behind a Service, from the direct pod
  kernel routed        a client container in the kernel-mode relay's pod: its
                       traffic routed through tailscale0, no proxy hop (what
                       devtools/bench_datapath.py compares with)

Each with 1, 10 and 100 concurrent clients (`probe load`): a 64 MiB download
split across the clients, and small HTTPS requests, each on a fresh
connection (proxy tunnel and TLS handshake included). RUNS runs, paths
interleaved within a run; figures are medians over runs, ratios and added
latency taken within a run. The relay container's memory (cgroup v1 peak,
working set sampled every 0.2 s) against its limit, and the CPU time of the
relay, the exit node, the server and the client per cell, which says what
dominates; then each relay's own CPU profile while downloads run through
its HTTP CONNECT proxy, at each number of clients, by component
(devtools/cpu_profile.py), which says what inside the relay. Results also go
to build/bench-cluster.json, the profiles to build/bench-cluster-profiles/
(for `go tool pprof`).

    sudo .venv/bin/python devtools/bench_cluster.py [--runs 5] [--paths ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builders.relay import (  # noqa: E402
    AUTH_SECRET_KEY,
    HTTP_PROXY_PORT,
    RELAY_CONTAINER,
    SOCKET,
    SOCKS5_PORT,
    RelaySettings,
    relay_container,
    relay_volumes,
)
from devtools import cpu_profile  # noqa: E402
from tests.datapath.topology import ECHO_NAME, EXIT_PUBLIC_IP  # noqa: E402
from tests.support.cgroups import Cgroup, CgroupError, pod_cgroup  # noqa: E402
from tests.support.cluster_env import (  # noqa: E402
    BUILD,
    INTERNET_IP,
    PROBE_IMAGE,
    Cluster,
    ClusterError,
    build_all,
    machine_lock,
    missing_artifacts,
    missing_prerequisites,
)
from tests.support.deployment import (  # noqa: E402
    OPEN,
    PROTECTED,
    RELAY_IMAGE,
    RELAY_NS,
    RESTRICTED_CONTAINER,
    RESTRICTED_POD_SECURITY,
    DeployError,
    Deployment,
    deploy,
    kubectl,
    kubectl_command,
    running_pod,
    stop_process,
    wait,
)

RUNS = 5  # a 64 MiB download lasts under a second here: 3 runs left the ratios swinging by 0.3
CONCURRENCY = (1, 10, 100)
DOWNLOAD_BYTES = 64 << 20  # per cell, split across the clients
REQUESTS = 100  # small requests per cell at least; at least 2 per client
SERVER_PORT = 8443
CA_CONFIGMAP = "bench-ca"
DIRECT_POD = "bench-direct"
KRELAY = "bench-krelay"
KRELAY_SECRET = "bench-krelay-key"
RESULTS = REPO / "build" / "bench-cluster.json"
PROFILES = REPO / "build" / "bench-cluster-profiles"
PROFILE_SECONDS = 5
# Each relay profiled while its HTTP CONNECT proxy carries downloads.
PROFILED = {"userspace": "userspace CONNECT", "kernel": "kernel CONNECT"}
MiB = 1 << 20


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------- the paths
@dataclass(frozen=True)
class Route:
    name: str
    relay: str  # "direct", "userspace" or "kernel": what the figures compare
    ns: str
    pod: str
    container: str
    base: str  # scheme://host:port of the server as this client names it
    proxy: str = ""  # a shell word for `probe -proxy` (may expand a variable)


def routes() -> list[Route]:
    by_ip = f"https://{INTERNET_IP}:{SERVER_PORT}"
    # Through a proxy by name, as a workload asks and the relay resolves it
    # (headscale's record); straight out by address (no lookup per request).
    by_name = f"https://{ECHO_NAME}:{SERVER_PORT}"
    krelay = f"{KRELAY}.{OPEN}.svc.cluster.local"
    return [
        Route("direct", "direct", OPEN, DIRECT_POD, "main", by_ip),
        Route("userspace CONNECT", "userspace", PROTECTED, "workload", "main", by_name, '"$HTTPS_PROXY"'),
        Route("userspace SOCKS5", "userspace", PROTECTED, "workload", "main", by_name, '"$ALL_PROXY"'),
        Route("kernel CONNECT", "kernel", OPEN, DIRECT_POD, "main", by_name, f"http://{krelay}:{HTTP_PROXY_PORT}"),
        Route("kernel SOCKS5", "kernel", OPEN, DIRECT_POD, "main", by_name, f"socks5h://{krelay}:{SOCKS5_PORT}"),
        Route("kernel routed", "kernel", OPEN, KRELAY, "client", by_ip),
    ]


DEFAULT_ROUTES = ("direct", "userspace CONNECT", "userspace SOCKS5", "kernel CONNECT", "kernel routed")


def probe(route: Route, *args: str, timeout: float = 180) -> dict[str, Any]:
    """`probe <args>` in the route's client container: its JSON line."""
    script = "exec /usr/local/bin/probe " + " ".join(shlex.quote(a) for a in args)
    if route.proxy:
        script += f" -proxy {route.proxy}"
    p = kubectl(
        "exec", "-n", route.ns, route.pod, "-c", route.container, "--", "/bin/sh", "-c", script, timeout=timeout
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise BenchError(f"probe {' '.join(args)} in {route.ns}/{route.pod} printed nothing (rc={p.returncode}): "
                         f"{p.stdout}{p.stderr}")  # fmt: skip
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---------------------------------------------------------------- processes
def snmp(pid: int, counter: str) -> int:
    """A counter of /proc/<pid>/net/snmp (the process's network namespace), e.g. "Tcp RetransSegs"."""
    proto, name = counter.split()
    lines = Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=True):
        keys, nums = head.split(), values.split()
        if keys[0] == f"{proto}:" and name in keys:
            return int(nums[keys.index(name)])
    raise BenchError(f"no {counter} in /proc/{pid}/net/snmp")


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(") ", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


@dataclass
class Meters:
    """CPU counters read around each cell, and the relays' memory sampled all along."""

    cpu: dict[str, Callable[[], float]]
    memory: dict[str, Cgroup]
    label: str = "idle"
    peak_ws: dict[str, dict[str, int]] = field(default_factory=dict)  # meter -> label -> bytes
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def cpu_now(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, read in self.cpu.items():
            with contextlib.suppress(OSError, KeyError, CgroupError):
                out[k] = read()
        return out

    def _sample(self) -> None:
        while not self._stop.is_set():
            for k, cg in self.memory.items():
                with contextlib.suppress(OSError):
                    per = self.peak_ws.setdefault(k, {})
                    per[self.label] = max(per.get(self.label, 0), cg.working_set())
            time.sleep(0.2)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


# ---------------------------------------------------------------- the pods and the server
def client_pod(name: str) -> dict[str, Any]:
    """A restricted probe pod with the topology's CA at /ca/ca.crt."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": OPEN, "labels": {"app": name}},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
            "securityContext": RESTRICTED_POD_SECURITY,
            "containers": [client_container("main")],
            "volumes": [{"name": "ca", "configMap": {"name": CA_CONFIGMAP}}],
        },
    }


def client_container(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "image": PROBE_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", "-c", "exec sleep 86400"],
        "securityContext": {**RESTRICTED_CONTAINER, "runAsNonRoot": True, "runAsUser": 65532},
        "volumeMounts": [{"name": "ca", "mountPath": "/ca", "readOnly": True}],
    }


def kernel_relay_pod(exit_ip: str, login_server: str) -> dict[str, Any]:
    """The relay's container as the stack renders it, in kernel mode: tailscaled
    on a TUN device (privileged, root), the same exit node, resources, memory
    limit and readiness; LAN access on so that the pod network (the proxy's
    clients, the kubelet's probes) is not sent to the exit node; netfilter
    off (a client needs no firewall rules, and the image may have no
    iptables). Plus a client container in the same network namespace."""
    s = RelaySettings(
        namespace=OPEN, image=RELAY_IMAGE, replicas=1, hostname=KRELAY, exit_node_ip=exit_ip,
        auth_secret_name=KRELAY_SECRET, login_server=login_server,
    )  # fmt: skip
    c = relay_container(s)
    for var in c["env"]:
        if var["name"] == "TS_USERSPACE":
            var["value"] = "false"
        elif var["name"] == "TS_EXTRA_ARGS":
            args = var["value"].replace("--exit-node-allow-lan-access=false", "--exit-node-allow-lan-access=true")
            var["value"] = f"{args} --netfilter-mode=off"
    c["securityContext"] = {"privileged": True, "runAsUser": 0, "runAsGroup": 0}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": KRELAY,
            "namespace": OPEN,
            "labels": {"app": KRELAY},
            "annotations": {"kubectl.kubernetes.io/default-container": "client"},
        },
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 10,
            "containers": [c, client_container("client")],
            "volumes": [*relay_volumes(s), {"name": "ca", "configMap": {"name": CA_CONFIGMAP}}],
        },
    }


def start_server(cluster: Cluster, cleanup: contextlib.ExitStack) -> subprocess.Popen[str]:
    """`probe serve` in the "internet" namespace with its certificate (echo.example.test and its IP)."""
    topo = BUILD / "topology"
    log = (BUILD / "logs" / "bench-server.log").open("w")
    cleanup.callback(log.close)
    p = subprocess.Popen(
        ["ip", "netns", "exec", cluster.ns("internet"), str(cluster.bin / "probe"), "serve",
         f"{INTERNET_IP}:{SERVER_PORT}", "-cert", str(topo / "internet.crt"), "-key", str(topo / "internet.key")],
        stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
    )  # fmt: skip
    cleanup.callback(stop_process, p)
    assert p.stdout is not None
    line = p.stdout.readline()
    if '"ok":true' not in line:
        raise BenchError(f"probe serve did not start: {line!r} (log {BUILD / 'logs' / 'bench-server.log'})")
    return p


def set_up_clients(d: Deployment, cleanup: contextlib.ExitStack, kernel: bool) -> None:
    api, tailnet = d.api, d.cluster.state.tailnet
    api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CA_CONFIGMAP, "namespace": OPEN},
               "data": {"ca.crt": Path(tailnet["ca"]).read_text()}})  # fmt: skip
    running_pod(api, client_pod(DIRECT_POD))
    if not kernel:
        return
    api.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": KRELAY_SECRET, "namespace": OPEN},
               "stringData": {AUTH_SECRET_KEY: d.tailnet.relay_key()}})  # fmt: skip
    ports = [{"name": "http-proxy", "port": HTTP_PROXY_PORT}, {"name": "socks5", "port": SOCKS5_PORT}]
    api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": KRELAY, "namespace": OPEN},
               "spec": {"selector": {"app": KRELAY}, "ports": ports}})  # fmt: skip
    # Logged out of headscale on deletion (ephemeral, as the relay).
    cleanup.callback(api.delete, "v1", "Pod", KRELAY, OPEN, 10)
    running_pod(api, kernel_relay_pod(tailnet["exit_tailnet_ip"], tailnet["login_server"]), timeout=150)


def check_routes(chosen: Sequence[Route]) -> None:
    """Each path works and leaves as it should: through a relay from the exit node's address."""
    for r in chosen:
        res = probe(r, "http", f"{r.base}/ip", "-cacert", "/ca/ca.crt", "-timeout", "20s", timeout=60)
        if not res.get("ok"):
            raise BenchError(f"{r.name}: {res}")
        seen = str(res.get("body", "")).strip()
        if (seen == EXIT_PUBLIC_IP) != (r.relay != "direct"):
            raise BenchError(f"{r.name}: the server saw {seen}; through a relay it must be {EXIT_PUBLIC_IP}")
        print(f"  {r.name:18} ok, the server sees {seen}", flush=True)
    res = probe(chosen[0], "load", f"{chosen[0].base}/ip", "-cacert", "/ca/ca.crt", timeout=60)
    if res.get("check") != "load":
        raise BenchError(
            f"the cluster's {PROBE_IMAGE} has no `probe load` (an older image): "
            f"`make cluster-down` and run the bench again (it rebuilds and imports the image): {res}"
        )


# ---------------------------------------------------------------- measuring
def cell(route: Route, kind: str, clients: int, meters: Meters) -> dict[str, Any]:
    if kind == "download":
        size = DOWNLOAD_BYTES // clients
        args = ["-bytes", str(size), "-requests", "1"]
        url = f"{route.base}/bytes/{size}"
    else:
        args = ["-requests", str(max(2, REQUESTS // clients))]
        url = f"{route.base}/ip"
    meters.label = f"{route.name} {kind} x{clients}"
    before = meters.cpu_now()
    res = probe(route, "load", url, "-cacert", "/ca/ca.crt", "-clients", str(clients), "-timeout", "150s", *args)
    after = meters.cpu_now()
    meters.label = "between"
    if res.get("check") != "load":
        raise BenchError(f"{route.name} {kind} x{clients}: {res}")
    res["deltas"] = {k: round(after[k] - before[k], 3) for k in after if k in before}
    return {"route": route.name, "relay": route.relay, "kind": kind, "clients": clients, **res}


# ---------------------------------------------------------------- where each relay's CPU goes
def profile_relay(route: Route, pod: tuple[str, str], clients: int, mbit_s: float, seconds: int) -> Path:
    """tailscaled's CPU profile (from its LocalAPI) while `clients` clients download
    through the route, sized from the rate measured with as many to outlast the profile."""
    size = int(mbit_s * 1e6 / 8 * (seconds + 4)) // clients
    errors: list[BaseException] = []

    def download() -> None:
        try:
            probe(route, "load", f"{route.base}/bytes/{size}", "-cacert", "/ca/ca.crt", "-clients", str(clients),
                  "-bytes", str(size), "-requests", "1", "-timeout", "150s")  # fmt: skip
        except (BenchError, subprocess.TimeoutExpired) as e:
            errors.append(e)

    load = threading.Thread(target=download)
    load.start()
    time.sleep(1.5)  # past the handshakes and slow start
    ns, name = pod
    done = subprocess.run(
        kubectl_command("exec", "-n", ns, name, "-c", RELAY_CONTAINER, "--", "tailscale", f"--socket={SOCKET}",
                        "debug", "--cpu-profile=-", f"--profile-seconds={seconds}"),
        capture_output=True, timeout=seconds + 60, check=False,
    )  # fmt: skip
    load.join()
    if done.returncode != 0 or not done.stdout:
        raise BenchError(f"profiling {ns}/{name} failed: {done.stderr.decode(errors='replace').strip()}")
    if errors:
        raise BenchError(f"the download through {route.name} failed while profiling: {errors[0]}")
    PROFILES.mkdir(parents=True, exist_ok=True)
    out = PROFILES / f"{route.relay}-x{clients}.pprof"
    out.write_bytes(done.stdout)
    return out


def profile_relays(
    s: Summary, chosen: Sequence[Route], pods: dict[str, tuple[str, str]], concurrency: Sequence[int], seconds: int
) -> dict[str, dict[str, dict[str, float]]]:
    """CPU seconds by component of each relay whose CONNECT path was measured, at
    each number of clients (keys as JSON keeps them: strings)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for relay, name in PROFILED.items():
        route = next((r for r in chosen if r.name == name), None)
        if route is None:
            continue
        for clients in concurrency:
            rate = s.metric(name, "download", clients, "mbit_s")
            path = profile_relay(route, pods[relay], clients, rate, seconds)
            out.setdefault(relay, {})[str(clients)] = cpu_profile.by_component(cpu_profile.read(path))
            print(f"  {relay} relay profiled with {clients} clients: {path}", flush=True)
    return out


# ---------------------------------------------------------------- the report
def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Summary:
    cells: list[dict[str, Any]]

    def of(self, route: str, kind: str, clients: int) -> dict[int, dict[str, Any]]:
        return {
            c["run"]: c for c in self.cells if c["route"] == route and c["kind"] == kind and c["clients"] == clients
        }

    def metric(self, route: str, kind: str, clients: int, key: str) -> float:
        return med([c[key] for c in self.of(route, kind, clients).values()])

    def ratio(self, a: str, b: str, kind: str, clients: int, key: str) -> float:
        """Median over runs of a/b, each within one run."""
        ra, rb = self.of(a, kind, clients), self.of(b, kind, clients)
        return med([ra[n][key] / rb[n][key] for n in ra if n in rb and rb[n][key]])

    def added(self, a: str, b: str, kind: str, clients: int, key: str) -> float:
        ra, rb = self.of(a, kind, clients), self.of(b, kind, clients)
        return med([ra[n][key] - rb[n][key] for n in ra if n in rb])

    def failures(self, route: str, kind: str, clients: int) -> int:
        return sum(int(c["failures"]) for c in self.of(route, kind, clients).values())

    def delta(self, route: str, kind: str, clients: int, meter: str) -> float:
        """Median over runs of what a meter counted during the cell (CPU seconds, packets)."""
        cells = self.of(route, kind, clients).values()
        return med([c.get("deltas", c.get("cpu_s", {})).get(meter, float("nan")) for c in cells])


def table(s: Summary, chosen: Sequence[Route], concurrency: Sequence[int]) -> str:
    rows = [
        "| clients | path | download Mbit/s | x direct | small p50 ms | +p50 over direct ms | p99 ms | failed | "
        "relay CPU s (throttled) | exit node CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in concurrency:
        for r in chosen:
            relay_cpu = "-"
            meter = {"userspace": "relay", "kernel": "kernel relay"}.get(r.relay)
            if meter:
                relay_cpu = (
                    f"{s.delta(r.name, 'download', clients, meter):.2f}"
                    f" ({s.delta(r.name, 'download', clients, meter + ' throttled'):.2f})"
                )
            fails = s.failures(r.name, "download", clients) + s.failures(r.name, "requests", clients)
            rows.append(
                f"| {clients} | {r.name} | {s.metric(r.name, 'download', clients, 'mbit_s'):.0f} | "
                f"{s.ratio(r.name, 'direct', 'download', clients, 'mbit_s'):.2f} | "
                f"{s.metric(r.name, 'requests', clients, 'p50_ms'):.1f} | "
                f"{s.added(r.name, 'direct', 'requests', clients, 'p50_ms'):+.1f} | "
                f"{s.metric(r.name, 'requests', clients, 'p99_ms'):.1f} | {fails} | {relay_cpu} | "
                f"{s.delta(r.name, 'download', clients, 'exit node'):.2f} |"
            )
    return "\n".join(rows)


def goals(s: Summary, names: set[str], concurrency: Sequence[int], peak: int, ws_peak: int) -> list[str]:
    out: list[str] = []
    kernels = [k for k in ("kernel CONNECT", "kernel routed") if k in names]
    users = [u for u in ("userspace CONNECT", "userspace SOCKS5") if u in names]
    for u in users:
        for k in kernels:
            thr = [s.ratio(u, k, "download", c, "mbit_s") for c in concurrency]
            ok = all(x >= 1 for x in thr)
            out.append(
                f"{'MET' if ok else 'NOT MET'}: {u} at least as fast as {k}: throughput ratio "
                + ", ".join(f"x{c} {x:.2f}" for c, x in zip(concurrency, thr, strict=True))
            )
            lat = [
                (s.added(u, "direct", "requests", c, "p50_ms"), s.added(k, "direct", "requests", c, "p50_ms"))
                for c in concurrency
            ]
            ok = all(a <= b for a, b in lat)
            out.append(
                f"{'MET' if ok else 'NOT MET'}: {u} adds no more p50 latency than {k}: "
                + ", ".join(f"x{c} {a:+.1f} vs {b:+.1f} ms" for c, (a, b) in zip(concurrency, lat, strict=True))
            )
    if users:
        ok = max(peak, ws_peak) <= 128 * MiB
        out.append(
            f"{'MET' if ok else 'NOT MET'}: relay memory at most 128 MiB: cgroup peak {peak / MiB:.1f} MiB "
            f"(page cache included), working set peak {ws_peak / MiB:.1f} MiB"
        )
    top = max(concurrency)
    fails = {u: s.failures(u, "download", top) + s.failures(u, "requests", top) for u in users}
    out.append(
        f"{'MET' if not any(fails.values()) else 'NOT MET'}: no client failing at {top} concurrent connections: "
        + ", ".join(f"{u} {n} failed" for u, n in fails.items())
    )
    return out


LOSS_METERS = (
    "server TCP retransmits",
    "relay UDP receive errors",
    "kernel relay UDP receive errors",
    "exit node UDP receive errors",
)


def dominates(s: Summary, names: set[str], concurrency: Sequence[int]) -> list[str]:
    """CPU seconds per 64 MiB download and per small-request cell, by component."""
    out: list[str] = []
    meters = ("relay", "kernel relay", "exit node", "server", "client")
    for kind in ("download", "requests"):
        for c in (concurrency[0], concurrency[-1]):
            for r in ("direct", "userspace CONNECT", "userspace SOCKS5", "kernel CONNECT", "kernel routed"):
                if r not in names:
                    continue
                parts = {m: s.delta(r, kind, c, m) for m in meters}
                parts = {m: v for m, v in parts.items() if v == v and v >= 0.005}  # not NaN, not ~0
                losses = {m: s.delta(r, kind, c, m) for m in LOSS_METERS}
                lost = ", ".join(f"{m} {v:.0f}" for m, v in losses.items() if v == v and v > 0)
                wall = s.metric(r, kind, c, "elapsed_s")
                out.append(
                    f"{kind:8} x{c:<3} {r:18} wall {wall:6.2f} s; CPU s: "
                    + ", ".join(f"{m} {v:.2f}" for m, v in sorted(parts.items(), key=lambda kv: -kv[1]))
                    + (f"; {lost}" if lost else "")
                )
    return out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------- main
@contextlib.contextmanager
def a_cluster(build: bool) -> Iterator[Cluster]:
    """The cluster that is up (left up), or one started here and stopped at the end."""
    missing = missing_prerequisites()
    if missing:
        raise BenchError("cannot run the cluster here: " + "; ".join(missing))
    c = Cluster()
    if c.is_up():
        print("using the cluster that is up (left running)", flush=True)
        yield c
        return
    if build:
        if missing_artifacts(c.bin):
            build_all()
        # Idempotent: rebuilds the probe and its image when the probe's source changed.
        subprocess.run(["bash", str(REPO / "scripts" / "build-cluster-bins.sh"), "probe", "images"], check=True)
    t = time.monotonic()
    try:
        c.up(tailnet=True)
        print(f"cluster up in {time.monotonic() - t:.0f} s", flush=True)
        yield c
    finally:
        t = time.monotonic()
        c.down()
        print(f"cluster down in {time.monotonic() - t:.0f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=RUNS)
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="e.g. 1,10,100")
    names = [r.name for r in routes()]
    ap.add_argument("--paths", default=",".join(DEFAULT_ROUTES), help=f"of: {', '.join(names)}")
    ap.add_argument("--no-build", action="store_true", help="do not run the build scripts")
    ap.add_argument("--report", type=Path, help="print the report of a results file again, measure nothing")
    ap.add_argument("--profile-seconds", type=int, default=PROFILE_SECONDS,
                    help="length of each relay's CPU profile at each number of clients (0: none)")  # fmt: skip
    a = ap.parse_args(argv)
    if a.report:
        report(json.loads(a.report.read_text()))
        return 0
    wanted = [x.strip() for x in a.paths.split(",") if x.strip()]
    bad = [w for w in wanted if w not in names]
    if bad or "direct" not in wanted:
        ap.error(f"--paths {a.paths!r}: unknown {bad}; known: {', '.join(names)}; 'direct' is required (ratios)")
    chosen = [r for r in routes() if r.name in wanted]
    concurrency = [int(x) for x in a.concurrency.split(",")]
    kernel = any(r.relay == "kernel" for r in chosen)

    t0 = time.monotonic()
    load_start = loadavg()
    timings: dict[str, float] = {}
    with machine_lock(), a_cluster(not a.no_build) as cluster, contextlib.ExitStack() as cleanup:
        timings["cluster ready"] = round(time.monotonic() - t0, 1)
        d = deploy(cluster, cleanup, stack_name="bench")
        wait("the relay pod Ready", d.relay_ready, 120)
        timings["pulumi up"] = d.timings["pulumi up"]
        t = time.monotonic()
        server = start_server(cluster, cleanup)
        set_up_clients(d, cleanup, kernel)
        check_routes(chosen)
        timings["clients and kernel relay ready"] = round(time.monotonic() - t, 1)

        api = d.api
        relay_pod = next(
            p["metadata"]["name"]
            for p in d.relay_pods()
            if any(c["name"] == RELAY_CONTAINER for c in p["spec"]["containers"])
        )
        relay = pod_cgroup(api, RELAY_NS, relay_pod, RELAY_CONTAINER)
        cpu: dict[str, Callable[[], float]] = {
            "relay": relay.cpu_seconds,
            "relay throttled": relay.throttled_seconds,
            "exit node": lambda: process_tree_cpu(cluster.state.pids["exit-tailscaled"]),
            "server": lambda: process_tree_cpu(server.pid),
            # Where packets are lost: the server retransmits what did not arrive;
            # a tunnel end whose UDP socket overflows drops WireGuard packets.
            "server TCP retransmits": lambda: snmp(server.pid, "Tcp RetransSegs"),
            "exit node UDP receive errors": lambda: snmp(cluster.state.pids["exit-tailscaled"], "Udp InErrors"),
            "relay UDP receive errors": lambda: snmp(relay.pid(), "Udp InErrors"),
        }
        memory = {"relay": relay}
        clients_cg = {r.pod: pod_cgroup(api, r.ns, r.pod, r.container) for r in chosen}
        if kernel:
            krelay = pod_cgroup(api, OPEN, KRELAY, RELAY_CONTAINER)
            cpu |= {
                "kernel relay": krelay.cpu_seconds,
                "kernel relay throttled": krelay.throttled_seconds,
                "kernel relay UDP receive errors": lambda: snmp(krelay.pid(), "Udp InErrors"),
            }
            memory["kernel relay"] = krelay
        meters = Meters(cpu=cpu, memory=memory)
        # The client of the cell running: its container's CPU.
        current: dict[str, Cgroup] = {}
        meters.cpu["client"] = lambda: current["cg"].cpu_seconds()
        idle = {k: cg.working_set() for k, cg in memory.items()}
        limits = {k: cg.limit() for k, cg in memory.items()}
        for cg in memory.values():
            cg.reset_peak()
        meters.start()
        t = time.monotonic()
        try:
            cells = measure_with_clients(chosen, a.runs, concurrency, meters, clients_cg, current)
        finally:
            meters.stop()
        timings["measuring"] = round(time.monotonic() - t, 1)
        peaks = {k: cg.peak() for k, cg in memory.items()}
        rss = {k: cg.rss() for k, cg in memory.items()}
        profiles: dict[str, dict[str, dict[str, float]]] = {}
        if a.profile_seconds > 0:
            t = time.monotonic()
            pods = {"userspace": (RELAY_NS, relay_pod), "kernel": (OPEN, KRELAY)}
            profiles = profile_relays(Summary(cells), chosen, pods, concurrency, a.profile_seconds)
            timings["profiling"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
    timings["teardown"] = round(time.monotonic() - t, 1)
    timings["total"] = round(time.monotonic() - t0, 1)
    load_end = loadavg()

    data = {
        "runs": a.runs, "concurrency": concurrency, "paths": wanted, "cells": cells, "timings": timings,
        "load": {"start": load_start, "end": load_end, "cpus": os.cpu_count()}, "memory": {
            "idle": idle, "working_set_peak": {k: max(v.values(), default=0) for k, v in meters.peak_ws.items()},
            "cgroup_peak": peaks, "rss_end": rss, "limit": limits, "working_set_by_cell": meters.peak_ws},
        "profiles": {"seconds": a.profile_seconds, "by_component": profiles},
    }  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    report(data)
    print(f"results: {RESULTS} (print them again: devtools/bench_cluster.py --report {RESULTS})")
    return 0


def report(data: dict[str, Any]) -> None:
    s = Summary(data["cells"])
    wanted, concurrency = data["paths"], data["concurrency"]
    chosen = [r for r in routes() if r.name in wanted]
    mem, load = data["memory"], data["load"]
    print(f"\nmedians of {data['runs']} runs ('x direct' and '+p50': medians of each run's own ratio and "
          f"difference); load average (1, 5, 15 min) {load['start']} at the start, {load['end']} at the end; "
          f"{load['cpus']} CPUs\n")  # fmt: skip
    print(table(s, chosen, concurrency))
    print("\nmemory (cgroup v1 of the container; working set = usage - inactive file, sampled every 0.2 s):")
    for k in mem["limit"]:
        print(f"  {k:13} idle {mem['idle'][k] / MiB:6.1f} MiB, "
              f"working set peak {mem['working_set_peak'].get(k, 0) / MiB:6.1f} MiB, "
              f"cgroup peak {mem['cgroup_peak'][k] / MiB:6.1f} MiB, rss at the end {mem['rss_end'][k] / MiB:6.1f} MiB, "
              f"limit {mem['limit'][k] / MiB:.0f} MiB")  # fmt: skip
    worst = sorted(mem["working_set_by_cell"].get("relay", {}).items(), key=lambda kv: -kv[1])[:3]
    print("  relay's working set was highest during: " + "; ".join(f"{k} {v / MiB:.1f} MiB" for k, v in worst))
    print("\ngoals:")
    for line in goals(
        s, set(wanted), concurrency, mem["cgroup_peak"]["relay"], mem["working_set_peak"].get("relay", 0)
    ):
        print(f"  {line}")
    print(
        "\nwhere the CPU goes (medians per cell: 64 MiB in all / the small requests; a container's CPU is its "
        "cgroup's, so the kernel's TCP/IP work, charged to whoever runs, is partly left out of the kernel-mode "
        "relay's; then packets lost on the way, counted where they show):"
    )
    for line in dominates(s, set(wanted), concurrency):
        print(f"  {line}")
    profiles = data.get("profiles", {})
    if profiles.get("by_component"):
        print(f"\nwhat each relay's tailscaled spends its CPU on, from its own CPU profile ({profiles['seconds']} s"
              " while that many clients download through its HTTP CONNECT proxy; the kernel's TCP/IP work is not"
              " in a Go profile):")  # fmt: skip
        for relay, by_clients in profiles["by_component"].items():
            if all(isinstance(v, (int, float)) for v in by_clients.values()):
                by_clients = {"1": by_clients}  # results written before each count was profiled
            for clients, totals in by_clients.items():
                print(f"  {relay:9} x{clients:<3} {cpu_profile.shares(totals)}")
    print("\ntimings (s): " + ", ".join(f"{k} {v}" for k, v in data["timings"].items()))


def measure_with_clients(
    chosen: Sequence[Route],
    runs: int,
    concurrency: Sequence[int],
    meters: Meters,
    clients_cg: dict[str, Cgroup],
    current: dict[str, Cgroup],
) -> list[dict[str, Any]]:
    """measure(), with the "client" meter pointing at the cell's client container."""
    out: list[dict[str, Any]] = []
    for run in range(1, runs + 1):
        t = time.monotonic()
        for clients in concurrency:
            for r in chosen:
                current["cg"] = clients_cg[r.pod]
                for kind in ("download", "requests"):
                    c = cell(r, kind, clients, meters)
                    c["run"] = run
                    out.append(c)
                    fail = f" FAILED {c['failures']}: {c.get('errors')}" if c["failures"] else ""
                    print(f"  run {run} x{clients:<3} {r.name:18} {kind:8} {c['mbit_s']:9.1f} Mbit/s "
                          f"p50 {c['p50_ms']:8.2f} ms{fail}", flush=True)  # fmt: skip
        print(f"run {run}: {time.monotonic() - t:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, CgroupError, ClusterError, DeployError, cpu_profile.ProfileError) as e:
        print(f"bench-cluster: {e}", file=sys.stderr)
        sys.exit(1)
