"""Performance where users live (`make bench-wan`, issue 20): the relay
against its peers over a laptop's WAN link, in the real cluster.

The cluster-only stack is deployed into the single-node cluster as for
`make bench-cluster` (devtools/bench_cluster.py: its paths, pods, kernel-mode
relay and HTTPS server in the topology's "internet"), then the node's link to
the router, which every path crosses (to the exit node, and straight out for
"direct"), becomes a WAN link: `wanlink` (scripts/go/wanlink) in place of
its veth, shaped both ways as each profile says; the exit node's side to the
internet stays unshaped (Hetzner's). This kernel has no netem (docs/
development.md, "The WAN link"), so the delay is made in user space.

For each profile, RUNS runs; in each run every cell once, in a random order:
a path x direction (down, up) x streams (1, 8) `probe stream` of SECONDS,
the first SKIP left out (slow start). Per cell: goodput, and the whole
machine's CPU from /proc/stat (softirq included: kernel work that no cgroup
is charged for) above its idle rate (measured before each profile) per GiB
moved. Ratios are judged with a bootstrap 95%
interval over the runs (devtools/bench_stats.py): met when the interval
clears the goal, not met when it misses it, inconclusive otherwise.

    sudo .venv/bin/python devtools/bench_wan.py [--profiles 250M-40ms,...] [--runs 5]
        [--paths ...] [--seconds 15] [--skip 3]

Not measured yet (issue 20): time to first byte, connections per second,
memory with 1000 idle tunnels, in-kernel WireGuard, CPU pinning at
1000 Mbit/s, the contention case, and every path from the same protected pod
(the kernel-mode paths run from a pod of the unprotected namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devtools.bench_cluster import (  # noqa: E402
    DEFAULT_ROUTES,
    BenchError,
    Route,
    a_cluster,
    check_routes,
    loadavg,
    probe,
    routes,
    set_up_clients,
    start_server,
)
from devtools.bench_stats import Interval, at_least, at_most, bootstrap, median  # noqa: E402
from tests.datapath.topology import ROUTER, Topology, cache_bin_dir  # noqa: E402
from tests.datapath.wan_link import LinkShape  # noqa: E402
from tests.support.cluster_env import BUILD, NODE_ROLE, RUN_ID, machine_lock  # noqa: E402
from tests.support.deployment import deploy, wait  # noqa: E402

PROFILES = {
    "50M-10ms": LinkShape(50, 10),
    "50M-40ms": LinkShape(50, 40),
    "250M-10ms": LinkShape(250, 10),
    "250M-40ms": LinkShape(250, 40),
    "1G-10ms": LinkShape(1000, 10),
    "1G-40ms": LinkShape(1000, 40),
    "250M-40ms-loss0.1": LinkShape(250, 40, loss_pct=0.1),
    "250M-40ms-reorder1": LinkShape(250, 40, reorder_pct=1),
}
# The link-delivery goals' profiles (the impaired ones have their own goal).
DELIVERY_PROFILES = ("50M-10ms", "50M-40ms", "250M-10ms", "250M-40ms")
IMPAIRED_PROFILES = ("250M-40ms-loss0.1", "250M-40ms-reorder1")
RUNS = 5
SECONDS, SKIP = 15, 3
DIRECTIONS = ("down", "up")
STREAMS = (1, 8)
WAN_PATHS = ("direct", "userspace CONNECT", "userspace SOCKS5", "kernel CONNECT", "kernel SOCKS5")
RESULTS = REPO / "build" / "bench-wan.json"
GIB = 1 << 30


def machine_cpu_seconds() -> float:
    """All CPUs' busy time (user, nice, system, irq, softirq, steal) from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def idle_cpu_rate(seconds: float = 5) -> float:
    """The machine's busy CPU-seconds per second with no cell running: the
    cluster's own background (kubelet, API server, kube-router), taken off
    each cell's CPU so that a slow link's cells are not charged for it."""
    before, t = machine_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return (machine_cpu_seconds() - before) / (time.monotonic() - t)


def cell(route: Route, direction: str, streams: int, seconds: int, skip: int, idle: float) -> dict[str, Any]:
    before, t = machine_cpu_seconds(), time.monotonic()
    flags = ["-direction", direction, "-streams", str(streams), "-seconds", f"{seconds}s", "-skip", f"{skip}s"]
    res = probe(route, "stream", route.base, "-cacert", "/ca/ca.crt", *flags, timeout=seconds + 90)
    cpu = machine_cpu_seconds() - before - idle * (time.monotonic() - t)
    if res.get("check") != "stream":
        raise BenchError(
            f"{route.name} {direction} x{streams}: {res} (a cluster started with an older probe image has no"
            " `probe stream`: `make cluster-down`, then the bench again, which rebuilds and imports it)"
        )
    moved = res.get("bytes", 0) * seconds / (seconds - skip)  # the whole cell's, estimated
    errors = res.get("errors") or ({} if moved else {"nothing moved after the first seconds": 1})
    return {"route": route.name, "direction": direction, "streams": streams, "mbit_s": res.get("mbit_s", 0.0),
            "ok": bool(res.get("ok")) and moved > 0, "failures": res.get("failures", 0), "errors": errors,
            "cpu_s": round(cpu, 3), "cpu_s_per_gib": round(cpu / (moved / GIB), 3) if moved else None}  # fmt: skip


def measure_profile(name: str, chosen: Sequence[Route], runs: int, seconds: int, skip: int) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    idle = idle_cpu_rate()
    print(f"  the machine idles at {idle:.2f} CPU-seconds per second (taken off each cell's CPU)", flush=True)
    plan = [(r, d, s) for r in chosen for d in DIRECTIONS for s in STREAMS]
    for run in range(runs):
        random.shuffle(plan)
        for route, direction, streams in plan:
            c = cell(route, direction, streams, seconds, skip, idle) | {"profile": name, "run": run, "idle": idle}
            cells.append(c)
            print(f"  {name} run {run + 1}/{runs}: {route.name:18} {direction:4} x{streams} "
                  f"{c['mbit_s']:7.1f} Mbit/s  {c['cpu_s_per_gib'] or 0:6.1f} CPU-s/GiB"
                  f"{'' if c['ok'] else '  FAILED ' + str(c['errors'])}", flush=True)  # fmt: skip
    return cells


# ---------------------------------------------------------------- the report
def samples(cells: Sequence[dict[str, Any]], profile: str, route: str, direction: str, streams: int,
            key: str = "mbit_s") -> list[float]:  # fmt: skip
    return [c[key] for c in cells if (c["profile"], c["route"], c["direction"], c["streams"]) ==
            (profile, route, direction, streams) and c["ok"]]  # fmt: skip


def ratio_of_medians(a: Sequence[float], b: Sequence[float]) -> float:
    return median(a) / median(b)


def goal_lines(cells: Sequence[dict[str, Any]], profiles: Sequence[str]) -> list[str]:
    """Each goal of issue 20 the cells can judge: its interval and verdict."""
    lines: list[str] = []
    pairs = (("userspace CONNECT", "kernel CONNECT"), ("userspace SOCKS5", "kernel SOCKS5"))

    def judge(what: str, interval: Interval, verdict: str, goal: str) -> None:
        lines.append(f"  {verdict.upper():12} {what}: {interval} (goal {goal})")

    for profile in profiles:
        rate = PROFILES[profile].rate_mbit
        for direction in DIRECTIONS:
            for streams in STREAMS:
                where = f"{profile} {direction} x{streams}"
                for relay, kernel in pairs:
                    ours, theirs = samples(cells, profile, relay, direction, streams), \
                        samples(cells, profile, kernel, direction, streams)  # fmt: skip
                    if ours and theirs and (profile in DELIVERY_PROFILES or profile in IMPAIRED_PROFILES):
                        goal = 0.95 if profile in DELIVERY_PROFILES else 0.8
                        i = bootstrap([ours, theirs], ratio_of_medians)
                        judge(f"{where}: {relay} / {kernel}", i, at_least(i, goal), f">= {goal}")
                    if ours and profile in DELIVERY_PROFILES:
                        i = bootstrap([ours], lambda a, rate=rate: median(a) / rate)
                        judge(f"{where}: {relay} / the link's rate", i, at_least(i, 0.86), ">= 0.86")
                for relay, kernel in pairs:
                    ours = samples(cells, profile, relay, direction, streams, "cpu_s_per_gib")
                    theirs = samples(cells, profile, kernel, direction, streams, "cpu_s_per_gib")
                    if ours and theirs and streams == 1:
                        i = bootstrap([ours, theirs], ratio_of_medians)
                        judge(f"{where}: machine CPU per GiB, {relay} / {kernel}", i, at_most(i, 1.3), "<= 1.3")
    return lines


def report(data: dict[str, Any]) -> None:
    cells, chosen = data["cells"], data["paths"]
    load = data["load"]
    print(f"\nmedians of {data['runs']} runs of {data['seconds']} s cells ({data['skip']} s of slow start left out); "
          f"load average {load['start']} at the start, {load['end']} at the end; {load['cpus']} CPUs")  # fmt: skip
    for profile in data["profiles"]:
        shape = PROFILES[profile]
        print(f"\n{profile}: {shape.rate_mbit:g} Mbit/s, RTT {shape.rtt_ms:g} ms, loss {shape.loss_pct:g}%, "
              f"reordering {shape.reorder_pct:g}% (TCP's ceiling {shape.tcp_ceiling_mbit():.1f} Mbit/s)")  # fmt: skip
        head = "".join(f"{d + ' x' + str(s):>22}" for d in DIRECTIONS for s in STREAMS)
        print(f"  {'path':18}{head}")
        for route in chosen:
            row = ""
            for d in DIRECTIONS:
                for s in STREAMS:
                    got, cpu = (
                        samples(cells, profile, route, d, s),
                        samples(cells, profile, route, d, s, "cpu_s_per_gib"),
                    )
                    row += f" {median(got):7.1f} {median(got) / shape.rate_mbit:4.0%} {median(cpu):5.1f}c/G" if got \
                        else f"{'failed':>22}"  # fmt: skip
            print(f"  {route:18}{row}")
    print("  (Mbit/s, share of the link's rate, whole-machine CPU-seconds per GiB above idle; medians)")
    print("\ngoals:")
    for line in goal_lines(cells, data["profiles"]):
        print(line)


# ---------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=",".join(PROFILES), help=f"of: {', '.join(PROFILES)}")
    ap.add_argument("--runs", type=int, default=RUNS)
    ap.add_argument("--paths", default=",".join(WAN_PATHS), help=f"of: {', '.join(DEFAULT_ROUTES)}, kernel SOCKS5")
    ap.add_argument("--seconds", type=int, default=SECONDS)
    ap.add_argument("--skip", type=int, default=SKIP)
    ap.add_argument("--no-build", action="store_true", help="do not run the build scripts")
    ap.add_argument("--report", type=Path, help="print the report of a results file again, measure nothing")
    a = ap.parse_args(argv)
    if a.report:
        report(json.loads(a.report.read_text()))
        return 0
    profiles = [p.strip() for p in a.profiles.split(",") if p.strip()]
    wanted = [p.strip() for p in a.paths.split(",") if p.strip()]
    names = [r.name for r in routes()]
    if bad := [p for p in profiles if p not in PROFILES] + [w for w in wanted if w not in names]:
        ap.error(f"unknown {bad}; profiles: {', '.join(PROFILES)}; paths: {', '.join(names)}")
    if a.skip >= a.seconds:
        ap.error("--skip must be shorter than --seconds")
    chosen = [r for r in routes() if r.name in wanted]
    kernel = any(r.relay == "kernel" for r in chosen)
    load_start, t0 = loadavg(), time.monotonic()
    cells: list[dict[str, Any]] = []
    with machine_lock(), a_cluster(not a.no_build) as cluster, contextlib.ExitStack() as cleanup:
        d = deploy(cluster, cleanup, stack_name="bench")
        wait("the relay pod Ready", d.relay_ready, 120)
        start_server(cluster, cleanup)
        set_up_clients(d, cleanup, kernel)
        check_routes(chosen)
        topo = Topology(BUILD / "topology", cache_bin_dir(), run_id=RUN_ID, attach=True)
        if not (cache_bin_dir() / "wanlink").exists():
            raise BenchError(f"{cache_bin_dir() / 'wanlink'} is not built: make datapath-bins")
        link = topo.shape_leaf(NODE_ROLE, PROFILES[profiles[0]], BUILD / "wan-shape")
        cleanup.callback(topo.unshape_leaf, NODE_ROLE)
        print(f"the node's link to the router ({topo.ns(ROUTER)}) is now wanlink's", flush=True)
        for profile in profiles:
            link.reshape(PROFILES[profile])
            print(f"\nprofile {profile}: {PROFILES[profile]}", flush=True)
            check_routes(chosen)  # every path still works, and leaves where it should
            cells += measure_profile(profile, chosen, a.runs, a.seconds, a.skip)
    data = {"profiles": profiles, "shapes": {p: asdict(PROFILES[p]) for p in profiles}, "paths": wanted,
            "runs": a.runs, "seconds": a.seconds, "skip": a.skip, "cells": cells,
            "load": {"start": load_start, "end": loadavg(), "cpus": os.cpu_count()},
            "wall_s": round(time.monotonic() - t0, 1)}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    report(data)
    print(f"results: {RESULTS} (again: devtools/bench_wan.py --report {RESULTS}); {data['wall_s']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
