"""make bench-default-stack: `preview`, `up` and `destroy` of the default
stack, timed (issue 18).

Each run is the default-stack test's own path (tests/boot/test_default_stack.py:
the real engine and hcloud provider, the stand-in tailscale plugin, the
emulated Hetzner booting the exit node's VM in QEMU, the emulated Tailscale API
over Headscale, kwok's pods), selected with -k so that only `preview`, `up`
from nothing and `destroy` run; it writes build/default-stack-timings.json,
read here after each run. Printed: the medians of the runs, `up` split at its
milestones, and the two goals:

- the program's own share of `up`, everything but the wait for the VM (from
  its server created to its device registered in Headscale): at most 15 s;
- `up` from nothing to the relay ready, within the VM's boot time plus 30 s
  (the relay's pods are kwok's here: a verified exit path needs the real
  cluster, not measured here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TIMINGS_FILE = ROOT / "build" / "default-stack-timings.json"
SELECTION = "preview_of_the_default_stack or exit_node_joined or destroy_powers"
OWN_SHARE_GOAL = 15.0
MARGIN_GOAL = 30.0


def one_run() -> dict[str, Any]:
    TIMINGS_FILE.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-m", "boot and default_stack", "-k", SELECTION]
    done = subprocess.run([*command, "tests/boot/test_default_stack.py"], cwd=ROOT, check=False)
    if done.returncode != 0 or not TIMINGS_FILE.exists():
        raise SystemExit(f"bench-default-stack: the run failed (exit {done.returncode}); see its output above")
    timings: dict[str, Any] = json.loads(TIMINGS_FILE.read_text())
    return timings


# `up`'s splits: from one point to the next (seconds after `up` started).
SPLITS = (
    ("provider calls to the server created", "start", "server_created"),
    ("the VM's boot to its join (Headscale)", "server_created", "joined"),
    ("join to routes approved", "joined", "routes_approved"),
    ("approval to the relay ready", "routes_approved", "relay_ready"),
)


def at(up: dict[str, Any], point: str) -> float:
    if point == "start":
        return 0.0
    return float(up["joined"] if point == "joined" else up["milestones"][point])


def between(up: dict[str, Any], start: str, end: str) -> float:
    return at(up, end) - at(up, start)


def own_share(up: dict[str, Any]) -> float:
    """`up` but the wait for the VM: from its server created to its join."""
    return float(up["wall"]) - between(up, "server_created", "joined")


def report(runs: Sequence[dict[str, Any]]) -> list[str]:
    ups = [run["up"] for run in runs]
    loads = [round(float(r["load_before"]), 2) for r in runs]
    lines = [f"default stack, medians of {len(runs)} runs (load before each: {loads})"]
    for phase in ("preview", "up", "destroy"):
        wall = statistics.median(float(r[phase]["wall"]) for r in runs)
        cpu = statistics.median(float(r[phase]["cpu"]) for r in runs)
        whose = "the program, the CLI, the plugins" + (
            " and the VM, reaped at its deletion" if phase == "destroy" else ""
        )
        lines.append(f"  {phase:8} {wall:7.1f} s wall  {cpu:6.1f} s CPU ({whose})")
    for name, start, end in SPLITS:
        lines.append(f"    {name:40} {statistics.median(between(u, start, end) for u in ups):7.1f} s")
    share = statistics.median(own_share(u) for u in ups)
    margin = statistics.median(between(u, "joined", "relay_ready") for u in ups)
    lines.append(
        f"  the program's own share of up: {share:.1f} s"
        f" (goal <= {OWN_SHARE_GOAL:.0f} s: {verdict(share, OWN_SHARE_GOAL)})"
    )
    lines.append(
        f"  up beyond the VM's join, to the relay ready: {margin:.1f} s (goal <= {MARGIN_GOAL:.0f} s:"
        f" {verdict(margin, MARGIN_GOAL)}; a verified exit path needs the real cluster)"
    )
    return lines


def verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "not met"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    runs = [one_run() for _ in range(args.runs)]
    print("\n".join(report(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
