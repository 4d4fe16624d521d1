"""Times of the real engine (`make bench-engine`): `pulumi preview` and
`pulumi up` of the cluster-only stack with 1 and with 20 protected
namespaces, against the same engine running a one-ConfigMap program.

Starts the loopback control plane of `make cluster-api` (fresh), runs each
case RUNS times (each `up` from an empty stack, then destroyed, untimed),
prints medians, the ratios, and how the time splits: the program's own
evaluation (timed inside the inline program) and the rest (CLI and plugin
start, the engine, API calls, await).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi
import pulumi_kubernetes as k8s

from tests.stacks import RELAY_AUTH_KEY, cluster_only_config_on
from tests.support import apiserver
from tests.support.engine import Engine, run_project_program

RUNS = 3
STATE = Path(__file__).resolve().parent.parent / "build" / "bench-engine"


def config(cluster: apiserver.Cluster, namespaces: int) -> dict[str, Any]:
    protected: list[Any] = [{"name": f"bench-{namespaces}-{i}", "create": True} for i in range(namespaces)]
    return cluster_only_config_on(str(cluster.kubeconfig), cluster.context(), f"bench-relay-{namespaces}", protected)


def one_configmap(cluster: apiserver.Cluster) -> Callable[[], None]:
    def program() -> None:
        provider = k8s.Provider("cluster", kubeconfig=str(cluster.kubeconfig), context=cluster.context())
        k8s.core.v1.ConfigMap(
            "one",
            metadata={"name": "bench-one", "namespace": "default"},
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


def measure(engine: Engine, name: str, stack_config: dict[str, Any], program: Callable[[], None]) -> dict[str, Any]:
    timed = Timed(program)
    secret = (RELAY_AUTH_KEY,) if RELAY_AUTH_KEY in stack_config else ()
    stack = engine.stack(name, stack_config, secret_keys=secret)
    previews, ups = [], []
    for _ in range(RUNS):
        start = time.perf_counter()
        stack.preview(color="never", program=timed)
        previews.append(time.perf_counter() - start)
    preview_eval = statistics.median(timed.seconds)
    timed.seconds.clear()
    for _ in range(RUNS):
        start = time.perf_counter()
        stack.up(color="never", program=timed)
        ups.append(time.perf_counter() - start)
        stack.destroy(color="never")
    engine.remove_stack(name)
    return {
        "preview": statistics.median(previews),
        "up": statistics.median(ups),
        "preview_eval": preview_eval,
        "up_eval": statistics.median(timed.seconds),
    }


def main() -> int:
    with apiserver.running(STATE / "cluster", fresh=True, ports=apiserver.Ports.free()) as cluster:
        engine = Engine(STATE / "pulumi").setup()
        results = {
            "one ConfigMap": measure(engine, "bench-one", {}, one_configmap(cluster)),
            "1 namespace": measure(engine, "bench-1", config(cluster, 1), run_project_program),
            "20 namespaces": measure(engine, "bench-20", config(cluster, 20), run_project_program),
        }
    print(f"medians of {RUNS} runs (seconds)")
    print(f"{'case':<16}{'preview':>9}{'(program)':>11}{'up':>9}{'(program)':>11}")
    for case, r in results.items():
        print(f"{case:<16}{r['preview']:>9.2f}{r['preview_eval']:>11.2f}{r['up']:>9.2f}{r['up_eval']:>11.2f}")
    one, single, twenty = (results[k] for k in ("one ConfigMap", "1 namespace", "20 namespaces"))
    print(f"preview, 1 namespace / one ConfigMap: {single['preview'] / one['preview']:.2f} (goal <= 1.5)")
    print(f"preview, 20 namespaces / 1 namespace: {twenty['preview'] / single['preview']:.2f} (goal <= 2)")
    print(f"up, 20 namespaces / 1 namespace: {twenty['up'] / single['up']:.2f}")
    fixed = one["preview"] - one["preview_eval"]
    print(
        f"preview of 1 namespace: {fixed:.2f} s engine and plugin start (the one-ConfigMap preview),"
        f" {single['preview_eval']:.2f} s the program itself,"
        f" {single['preview'] - single['preview_eval'] - fixed:.2f} s the rest (checks and diffs per resource)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
