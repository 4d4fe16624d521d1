"""Times of the real engine (`make bench-engine`): `pulumi preview` and
`pulumi up` of the cluster-only stack with 1 and with 20 protected
namespaces, against the same engine running a one-ConfigMap program.

Starts the loopback control plane of `make cluster-api` (fresh); after one
untimed preview of each case, previews the cases in turn PREVIEW_RUNS times
(so that a change of the machine's load falls on every case alike), then runs
each case's `up` RUNS times (each from an empty stack, then destroyed,
untimed); prints medians, the ratios, and how the time splits: the program's own
evaluation (timed inside the inline program) and the rest (CLI and plugin
start, the engine, API calls, await). A preview of 20 independent ConfigMaps
(as many Kubernetes objects as the 1-namespace stack, with no dependency and
no program work) gives the engine's cost per object, and so the floor of any
program that creates that many objects. It also counts the debug-log RPCs
that Pulumi's Python SDK sends the engine, synchronously on the program's
one thread, for every resource it registers (by wrapping the SDK's
`pulumi.log._log`), and the time they take.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi
import pulumi.log
import pulumi_kubernetes as k8s
from pulumi.runtime.proto import engine_pb2

from tests.stacks import RELAY_AUTH_KEY, cluster_only_config_on
from tests.support import apiserver
from tests.support.engine import Engine, run_project_program

RUNS = 3
PREVIEW_RUNS = 5
STATE = Path(__file__).resolve().parent.parent / "build" / "bench-engine"


def config(cluster: apiserver.Cluster, namespaces: int) -> dict[str, Any]:
    protected: list[Any] = [{"name": f"bench-{namespaces}-{i}", "create": True} for i in range(namespaces)]
    return cluster_only_config_on(str(cluster.kubeconfig), cluster.context(), f"bench-relay-{namespaces}", protected)


def configmaps(cluster: apiserver.Cluster, count: int = 1) -> Callable[[], None]:
    """`count` independent ConfigMaps in `default` (the first is named bench-one)."""

    def program() -> None:
        provider = k8s.Provider("cluster", kubeconfig=str(cluster.kubeconfig), context=cluster.context())
        for i in range(count):
            k8s.core.v1.ConfigMap(
                "one" if i == 0 else f"cm-{i}",
                metadata={"name": "bench-one" if i == 0 else f"bench-cm-{i}", "namespace": "default"},
                data={"a": "b"},
                opts=pulumi.ResourceOptions(provider=provider),
            )

    return program


class Timed:
    """Wraps a program to time its own evaluation."""

    def __init__(self, program: Callable[[], None]) -> None:
        self.program = program
        self.seconds: list[float] = []

    def __call__(self) -> None:
        start = time.perf_counter()
        self.program()
        self.seconds.append(time.perf_counter() - start)


class SdkLogMeter:
    """Counts the SDK's debug-log RPCs to the engine and the time spent in them.

    `pulumi.log._log` is private: without it the figures read nan and the
    bench still runs."""

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._send: Callable[..., None] | None = getattr(pulumi.log, "_log", None)
        if self._send is not None:
            pulumi.log._log = self._timed

    def _timed(self, engine: Any, severity: Any, *rest: Any) -> None:
        assert self._send is not None
        start = time.perf_counter()
        try:
            self._send(engine, severity, *rest)
        finally:
            if severity == engine_pb2.DEBUG:
                self.calls += 1
                self.seconds += time.perf_counter() - start

    def take(self) -> tuple[float, float]:
        """(calls, seconds) since the last take; nan when the SDK changed."""
        if self._send is None:
            return float("nan"), float("nan")
        taken = float(self.calls), self.seconds
        self.calls, self.seconds = 0, 0.0
        return taken


SDK_LOG = SdkLogMeter()


class Case:
    """One stack and its program, with the times measured."""

    def __init__(
        self, engine: Engine, name: str, stack_config: dict[str, Any], program: Callable[[], None], up: bool = True
    ) -> None:
        self.engine, self.name, self.up = engine, name, up
        self.timed = Timed(program)
        secret = (RELAY_AUTH_KEY,) if RELAY_AUTH_KEY in stack_config else ()
        self.stack = engine.stack(name, stack_config, secret_keys=secret)
        self.previews: list[float] = []
        self.log_rpcs: list[tuple[float, float]] = []
        self.resources = 0

    def preview(self, timed: bool = True) -> None:
        SDK_LOG.take()
        start = time.perf_counter()
        result = self.stack.preview(color="never", program=self.timed)
        if timed:
            self.previews.append(time.perf_counter() - start)
            self.log_rpcs.append(SDK_LOG.take())
        else:
            self.timed.seconds.clear()
        self.resources = sum((result.change_summary or {}).values())

    def result(self) -> dict[str, Any]:
        preview_eval = statistics.median(self.timed.seconds)
        self.timed.seconds.clear()
        ups = []
        for _ in range(RUNS if self.up else 0):
            start = time.perf_counter()
            self.stack.up(color="never", program=self.timed)
            ups.append(time.perf_counter() - start)
            self.stack.destroy(color="never")
        self.engine.remove_stack(self.name)
        return {
            "preview": statistics.median(self.previews),
            "up": statistics.median(ups) if ups else float("nan"),
            "preview_eval": preview_eval,
            "up_eval": statistics.median(self.timed.seconds) if ups else float("nan"),
            "resources": self.resources,
            "previews": self.previews,
            "log_rpcs": statistics.median(n for n, _ in self.log_rpcs),
            "log_seconds": statistics.median(t for _, t in self.log_rpcs),
        }


def main() -> int:
    # The preflight's kubectl: yours if it is on PATH, else the one `make engine-bins` built.
    os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{apiserver.bin_dir()}"
    with apiserver.running(STATE / "cluster", fresh=True, ports=apiserver.Ports.free()) as cluster:
        engine = Engine(STATE / "pulumi").setup()
        cases = {
            "one ConfigMap": Case(engine, "bench-one", {}, configmaps(cluster)),
            "1 namespace": Case(engine, "bench-1", config(cluster, 1), run_project_program),
            "20 namespaces": Case(engine, "bench-20", config(cluster, 20), run_project_program),
            "20 ConfigMaps": Case(engine, "bench-cms", {}, configmaps(cluster, 20), up=False),
        }
        for case in cases.values():
            case.preview(timed=False)
        for _ in range(PREVIEW_RUNS):
            for case in cases.values():
                case.preview()
        load = os.getloadavg()
        results = {name: case.result() for name, case in cases.items()}
    print(f"load average during the previews {' '.join(f'{x:.2f}' for x in load)}, on {os.cpu_count()} cores")
    print(f"medians of {PREVIEW_RUNS} previews and {RUNS} ups (seconds)")
    print(f"{'case':<16}{'resources':>10}{'preview':>9}{'(program)':>11}{'(SDK logs)':>18}{'up':>9}{'(program)':>11}")
    for name, r in results.items():
        logs = f"{r['log_rpcs']:.0f} in {r['log_seconds']:.2f}"
        print(
            f"{name:<16}{r['resources']:>10}{r['preview']:>9.2f}{r['preview_eval']:>11.2f}{logs:>18}"
            f"{r['up']:>9.2f}{r['up_eval']:>11.2f}"
        )
    for name, r in results.items():
        print(f"  previews of {name}, in order: {' '.join(f'{t:.2f}' for t in r['previews'])}")
    one, single, twenty, many = (results[k] for k in ("one ConfigMap", "1 namespace", "20 namespaces", "20 ConfigMaps"))
    print(f"preview, 1 namespace / one ConfigMap: {single['preview'] / one['preview']:.2f} (goal <= 1.5)")
    print(f"preview, 20 namespaces / 1 namespace: {twenty['preview'] / single['preview']:.2f} (goal <= 2)")
    print(f"up, 20 namespaces / 1 namespace: {twenty['up'] / single['up']:.2f}")
    fixed = one["preview"] - one["preview_eval"]
    print(
        f"preview of 1 namespace: {fixed:.2f} s engine and plugin start (the one-ConfigMap preview),"
        f" {single['preview_eval']:.2f} s the program itself,"
        f" {single['preview'] - single['preview_eval'] - fixed:.2f} s the rest (checks and diffs per resource)"
    )
    print(
        f"the SDK's debug-log RPCs to the engine, synchronous on the program's thread: {single['log_rpcs']:.0f}"
        f" per preview of 1 namespace ({single['log_seconds']:.2f} s), {one['log_rpcs']:.0f} of one ConfigMap"
        f" ({one['log_seconds']:.2f} s)"
    )
    per_object = (many["preview"] - one["preview"]) / 19
    print(
        f"per Kubernetes object (20 ConfigMaps against one): {per_object * 1000:.0f} ms; 20 independent objects,"
        f" as many as the 1-namespace stack creates, with no program work: {many['preview']:.2f} s"
        f" = {many['preview'] / one['preview']:.2f} x one ConfigMap (the floor of a 20-object preview)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
