"""`make demo` and `make demo-down` as a user runs them (issue 9): the demo
deploys the stack through the real engine into the running cluster, prints
make verify's table with every check passing, and demo-down removes
everything, the cluster included. It tears the cluster down, so the
cluster conftest runs it last, and only on a cluster this run started."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import CLUSTER_STARTED_HERE
from tests.datapath.topology import EXIT_PUBLIC_IP
from tests.support.cluster_env import BUILD, Cluster, _alive
from tools.demo import WALK_THROUGH

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def demo(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), command],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO,
    )  # fmt: skip


def netns_names() -> set[str]:
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in p.stdout.splitlines() if line.strip()}


def test_demo_deploys_and_verifies_and_demo_down_leaves_nothing(
    cluster: Cluster, request: pytest.FixtureRequest
) -> None:
    if not request.config.stash.get(CLUSTER_STARTED_HERE, False):
        pytest.skip("the cluster was up before this run (make cluster-up): the demo test would tear it down")
    try:
        up = demo("up", 900)
        out = up.stdout + up.stderr
        assert up.returncode == 0, out[-6000:]
        table = out[out.index("make verify") :]
        assert "PASS" in table and "FAIL" not in table, table
        assert EXIT_PUBLIC_IP in table, f"the way out was not seen from the exit node {EXIT_PUBLIC_IP}:\n{table}"
        assert "KUBECONFIG=" in out and "make demo-down" in out, out[-3000:]
        # The README's walk-through, where the demo shares it: each step by its number and title, in order.
        printed = re.findall(r"^README step (\d+), ([^:]+):", out, flags=re.MULTILINE)
        assert printed == [(str(n), t) for n, t in WALK_THROUGH.items() if n != 7], printed
        assert f"the internet saw it come from {EXIT_PUBLIC_IP}" in out, out[-3000:]
        assert (BUILD / "demo.json").exists()
        pids = list(json.loads((BUILD / "state.json").read_text())["pids"].values())
        ours = {n for n in netns_names() if n.startswith(cluster.ns(""))}
        assert ours, "the demo's cluster runs in no network namespace of its own"
    finally:
        down = demo("down", 300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "README step 7, Remove it: pulumi destroy" in down.stdout
    assert "has its own labels back" in down.stdout, down.stdout[-3000:]
    assert not {n for n in netns_names() if n.startswith(cluster.ns(""))}, netns_names()
    # Zombies do not count: the processes this pytest started for the cluster
    # are its children, and demo-down (another process) cannot reap them.
    assert not [p for p in pids if _alive(p)], "processes of the demo outlive demo-down"
    mounts = Path("/proc/mounts").read_text()
    assert str(BUILD) not in mounts, [m for m in mounts.splitlines() if str(BUILD) in m]
    assert not (BUILD / "demo.json").exists() and not (BUILD / "demo-pulumi").exists()
