"""`make demo-default` and `make demo-down` as a user runs them (issue 18):
the default stack (`Pulumi.dev.yaml` as shipped) deployed through the real
engine into the real cluster (kubelet, containerd, kube-router), its exit node
a VM that the emulated Hetzner booted from the user_data the real hcloud
provider sent, its relay joining Headscale as Tailscale's hosted control
plane and leaving through that VM; make verify passes, a workload's request
reaches the internet from the VM's address, and demo-down's `pulumi destroy`
powers the VM off and leaves no device in the tailnet, then removes the
cluster.

It starts and stops the cluster itself: skipped when one is already up
(make cluster-up, a demo), which it would tear down.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster_env import BUILD, Cluster, missing_prerequisites
from tools.demo import WALK_THROUGH

pytestmark = [pytest.mark.boot, pytest.mark.default_stack]

REPO = Path(__file__).resolve().parents[2]
# The emulated Hetzner's servers have the VM's own address (its tap network
# 198.19.<n>.0/24, exit_vm.BootedVm), not a documentation address.
VM_ADDRESS = re.compile(r"^198\.19\.\d+\.10$")


def demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO,
    )  # fmt: skip


def netns_names() -> set[str]:
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in p.stdout.splitlines() if line.strip()}


def test_demo_default_deploys_the_default_stack_through_a_booted_exit_node_and_demo_down_leaves_nothing() -> None:
    missing = missing_prerequisites()
    assert not missing, f"the cluster cannot run here: {missing}"
    cluster = Cluster()
    if cluster.is_up():
        pytest.skip("a cluster is up (make cluster-up or a demo): this test would tear it down")
    try:
        up = demo("up", "--default-stack", timeout=2400)
        out = up.stdout + up.stderr
        assert up.returncode == 0, out[-8000:]
        # The README's walk-through, where the demo shares it, in order.
        printed = re.findall(r"^README step (\d+), ([^:]+):", out, flags=re.MULTILINE)
        assert printed == [(str(n), t) for n, t in WALK_THROUGH.items() if n != 7], printed
        table = out[out.index("make verify, from") :]
        assert "PASS" in table and "FAIL" not in table, table
        exit_ips = json.loads((BUILD / "demo.json").read_text())["exit_ips"]
        assert exit_ips and all(VM_ADDRESS.match(ip) for ip in exit_ips), exit_ips
        assert any(ip in table for ip in exit_ips), f"make verify did not see the way out from {exit_ips}:\n{table}"
        seen = re.search(r"the internet saw it come from (\S+): the exit node VM's address", out)
        assert seen and seen.group(1) in exit_ips, out[-3000:]
    finally:
        down = demo("down", timeout=900)
    assert down.returncode == 0, down.stdout[-5000:] + down.stderr[-3000:]
    assert "README step 7, Remove it: pulumi destroy" in down.stdout
    assert "no device left in the tailnet" in down.stdout, down.stdout[-3000:]
    assert "powered off (ACPI" in down.stdout, down.stdout[-3000:]
    assert not {n for n in netns_names() if n.startswith(cluster.ns(""))}, netns_names()
    assert not (BUILD / "demo.json").exists() and not (BUILD / "default-pulumi").exists()
    assert not (BUILD / "clouds.json").exists()
