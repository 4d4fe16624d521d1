"""`make demo-default` and `make demo-down` as a user runs them (issue 18):
the default stack (`Pulumi.dev.yaml` as shipped) deployed through the real
engine into the real cluster (kubelet, containerd, kube-router), its exit node
a VM that the emulated Hetzner booted from the user_data the real hcloud
provider sent, its relay joining Headscale as Tailscale's hosted control
plane and leaving through that VM; make verify passes, a workload's request
reaches the internet from the VM's address. While it runs, the relay's key is
renewed and the server type changed (a new VM replaces the old one), with a
workload fetching through the proxy all along: the internet sees it only from
an exit node VM, never from the node itself, and the LAN never. demo-down's
`pulumi destroy` powers the VMs off and leaves no device in the tailnet, then
removes the cluster.

It starts and stops the cluster itself: skipped when one is already up
(make cluster-up, a demo), which it would tear down.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pulumi import automation as auto

from builders.proxy_env import PROXY_CONFIGMAP
from components import tailnet_access
from config import StackConfig
from tests.stacks import dev_config, with_config
from tests.support.apiserver import bin_dir
from tests.support.clouds import SECRET_KEYS, Clouds
from tests.support.cluster_env import BUILD, INTERNET_IP, LAN_IP, Cluster, missing_prerequisites
from tests.support.deployment import kubectl_command, pod, running_pod, wait
from tools import demo as demo_tool
from tools.demo import WALK_THROUGH

pytestmark = [pytest.mark.boot, pytest.mark.default_stack]

REPO = Path(__file__).resolve().parents[2]
# The emulated Hetzner's servers have the VM's own address (its tap network
# 198.19.<n>.0/24, exit_vm.BootedVm), not a documentation address.
VM_ADDRESS = re.compile(r"^198\.19\.\d+\.10$")
WATCHER = "egress-watcher"
# What the module measured (issue 18's goals): up, make verify, the renewal's and the replacement's gaps.
TIMINGS_FILE = REPO / "build" / "default-stack-demo-timings.json"


def record(**figures: float) -> None:
    done = json.loads(TIMINGS_FILE.read_text()) if TIMINGS_FILE.exists() else {}
    TIMINGS_FILE.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS_FILE.write_text(json.dumps(done | figures, indent=2) + "\n")


# Pulumi.dev.yaml keeps the program's default (cx23); another type sold in its location.
NEW_SERVER_TYPE = "cpx22"


def demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO,
    )  # fmt: skip


def netns_names() -> set[str]:
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in p.stdout.splitlines() if line.strip()}


@dataclass
class DemoRun:
    cluster: Cluster
    up: subprocess.CompletedProcess[str]
    down: subprocess.CompletedProcess[str] | None = None

    def take_down(self) -> subprocess.CompletedProcess[str]:
        if self.down is None:
            self.down = demo("down", timeout=900)
        return self.down


@pytest.fixture(scope="module")
def run() -> Iterator[DemoRun]:
    missing = missing_prerequisites()
    assert not missing, f"the cluster cannot run here: {missing}"
    cluster = Cluster()
    if cluster.is_up():
        pytest.skip("a cluster is up (make cluster-up or a demo): this test would tear it down")
    demo_run = DemoRun(cluster, subprocess.CompletedProcess([], 1, "", "not started"))
    TIMINGS_FILE.unlink(missing_ok=True)
    try:
        demo_run.up = demo("up", "--default-stack", timeout=2400)
        yield demo_run
    finally:
        demo_run.take_down()


def deployed_exit_ips() -> list[str]:
    ips: list[str] = json.loads((BUILD / "demo.json").read_text())["exit_ips"]
    return ips


def test_demo_default_deploys_the_default_stack_through_a_booted_exit_node(run: DemoRun) -> None:
    out = run.up.stdout + run.up.stderr
    assert run.up.returncode == 0, out[-8000:]
    # The README's walk-through, where the demo shares it, in order.
    printed = re.findall(r"^README step (\d+), ([^:]+):", out, flags=re.MULTILINE)
    assert printed == [(str(n), t) for n, t in WALK_THROUGH.items() if n != 7], printed
    table = out[out.index("make verify, from") :]
    assert "PASS" in table and "FAIL" not in table, table
    exit_ips = deployed_exit_ips()
    assert exit_ips and all(VM_ADDRESS.match(ip) for ip in exit_ips), exit_ips
    assert any(ip in table for ip in exit_ips), f"make verify did not see the way out from {exit_ips}:\n{table}"
    seen = re.search(r"the internet saw it come from (\S+): the exit node VM's address", out)
    assert seen and seen.group(1) in exit_ips, out[-3000:]
    up = re.search(r"deployed in (\d+) s", out)
    joined = re.search(r"registered in the tailnet (\d+) s after pulumi up began; after that, (\d+) s", out)
    verify = re.search(r"make verify took (\d+) s", out)
    assert up and joined and verify, out[-3000:]
    record(
        up_s=float(up.group(1)),
        vm_registered_s=float(joined.group(1)),
        up_after_registered_s=float(joined.group(2)),
        verify_s=float(verify.group(1)),
        load_after_up=os.getloadavg()[0],
    )


@dataclass
class Attempt:
    at: float
    target: str
    ok: bool
    seen: str


def watched_attempts() -> list[Attempt]:
    """The watcher pod's log: one line per request through $HTTP_PROXY, `<epoch> <probe's JSON>`."""
    p = subprocess.run(
        kubectl_command("logs", "-n", demo_tool.DEFAULT_PROTECTED, WATCHER),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    attempts = []
    for line in p.stdout.splitlines():
        stamp, _, result = line.partition(" ")
        if stamp.isdigit() and result.startswith("{"):
            r = json.loads(result)
            attempts.append(Attempt(float(stamp), r["target"], bool(r["ok"]), str(r.get("body", "")).strip()))
    return attempts


def longest_gap(attempts: list[Attempt], start: float, end: float) -> float:
    """The longest time between two successful fetches of the internet in [start, end]."""
    times = [start] + [a.at for a in attempts if a.ok and a.target.endswith("/ip") and start <= a.at <= end] + [end]
    return max(b - a for a, b in itertools.pairwise(times))


def test_renewing_the_key_and_replacing_the_server_never_lets_the_workload_out_but_through_an_exit_node(
    run: DemoRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18, point 4: the relay key's renewal at half its life and a new
    server type (a new VM first, then the old one powered off), through the
    real engine against the running demo, while a workload in the protected
    namespace fetches through $HTTP_PROXY about three times a second. Every answer the
    internet gives it names an exit node VM's address (the old or the new),
    none the node's own; the LAN answers never; after each `up` the workload
    gets out again, and after the replacement only through the new VM."""
    assert run.up.returncode == 0, "the demo did not come up (the test above says why)"
    old_ips = deployed_exit_ips()
    monkeypatch.setenv("PATH", f"{bin_dir()}:{os.environ['PATH']}")  # the preflight's kubectl
    monkeypatch.setenv("KUBECONFIG", str(demo_tool.DEFAULT_KUBECONFIG))
    engine = demo_tool.default_engine()
    clouds = Clouds.load(BUILD)

    def stack(config: dict[str, Any]) -> auto.Stack:
        return engine.stack(demo_tool.DEFAULT_STACK, {**config, **clouds.stack_config()}, secret_keys=SECRET_KEYS)

    # One write per line (two loops share the log): `<epoch> <probe's JSON>`.
    fetch = 'echo "$(date +%s) $(/usr/local/bin/probe http {} -proxy "$HTTP_PROXY" -timeout 3s)"'
    internet, lan = fetch.format(f"http://{INTERNET_IP}/ip"), fetch.format(f"http://{LAN_IP}/")
    # The LAN's attempts wait out their timeout: in a loop of their own, so the internet's come every ~0.3 s.
    loop = f"(while :; do {lan}; sleep 1; done) & while :; do {internet}; sleep 0.2; done"
    watcher = pod(WATCHER, demo_tool.DEFAULT_PROTECTED, loop)
    watcher["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": PROXY_CONFIGMAP}}]  # as README step 6
    running_pod(run.cluster._api(), watcher)

    def fetched_through(ips: list[str], since: float) -> bool:
        return any(a.ok and a.seen in ips for a in watched_attempts() if a.at > since)

    # The renewal: the program's clock at half the key's life (in this process, which runs the program).
    replaced: set[str] = set()

    def note_replacements(event: auto.EngineEvent) -> None:
        step = event.resource_pre_event
        if step is not None and step.metadata.op == auto.OpType.REPLACE:
            replaced.add(step.metadata.type)

    later = time.time() + StackConfig().tailnet.relay_key_expiry_hours * 3600 // 2
    start = time.time()
    with monkeypatch.context() as clock:
        clock.setattr(tailnet_access, "time", SimpleNamespace(time=lambda: later))
        stack(dev_config()).up(on_output=lambda line: None, on_event=note_replacements)
    renewed = time.time()
    assert replaced <= {"tailscale:index/tailnetKey:TailnetKey", "kubernetes:core/v1:Secret"}, replaced
    assert "tailscale:index/tailnetKey:TailnetKey" in replaced
    wait("the workload out again after the renewal", lambda: fetched_through(old_ips, renewed), 120, 2)
    renewal_gap = longest_gap(watched_attempts(), start, time.time())

    # The replacement: another server type is a new VM generation, the old one removed after it.
    old_host = engine.select(demo_tool.DEFAULT_STACK).outputs()["exitNodeHostname"].value
    resize_start = time.time()
    result = stack(with_config(dev_config(), "exitNode", serverType=NEW_SERVER_TYPE)).up(on_output=lambda line: None)
    resized = time.time()
    new_ips = [ip for ip in result.outputs["exitNodePublicIps"].value if ":" not in ip]
    assert new_ips and set(new_ips).isdisjoint(old_ips), (old_ips, new_ips)
    (BUILD / "demo.json").write_text(json.dumps({"stack": "dev", "default": True, "exit_ips": new_ips}) + "\n")
    wait("the workload out through the new VM", lambda: fetched_through(new_ips, resized), 120, 2)
    attempts = watched_attempts()
    resize_gap = longest_gap(attempts, resize_start, time.time())
    out = [a for a in attempts if a.ok]
    assert all(a.target.endswith("/ip") for a in out), [a for a in out if not a.target.endswith("/ip")]
    strays = [a for a in out if a.seen not in old_ips + new_ips]
    assert not strays, f"the internet saw the workload from elsewhere than an exit node: {strays}"
    assert not any(a.seen in old_ips for a in out if a.at > resized + 5), "still out through the old VM after up"
    # make verify, all of it, against the new exit node.
    assert demo_tool.verify_default(new_ips) == 0
    record(
        watched_requests=len([a for a in attempts if a.target.endswith("/ip")]),
        watched_answered=len(out),
        renewal_up_s=round(renewed - start, 1),
        renewal_longest_gap_s=round(renewal_gap, 1),
        resize_up_s=round(resized - resize_start, 1),
        resize_longest_gap_s=round(resize_gap, 1),
    )
    # The old VM: powered off by its button, its device gone from the tailnet; the new one in it.
    new_host = result.outputs["exitNodeHostname"].value

    def devices() -> set[str]:
        # A Cluster read now: run.cluster's state is from before the demo started it.
        return {str(n.get("name")) for n in demo_tool.headscale_cli(Cluster()).cli("nodes", "list") or []}

    wait("the old exit node to leave the tailnet", lambda: old_host not in devices(), 60, 2)
    assert new_host in devices() and new_host != old_host
    consoles = {c.parent.name: c.read_text(errors="replace") for c in (BUILD / "topology" / "vm").glob("*/console.log")}
    assert sum("reboot: Power down" in text for text in consoles.values()) == 1, sorted(consoles)


def test_demo_down_powers_the_vms_off_and_leaves_nothing(run: DemoRun) -> None:
    down = run.take_down()
    assert down.returncode == 0, down.stdout[-5000:] + down.stderr[-3000:]
    assert "README step 7, Remove it: pulumi destroy" in down.stdout
    assert "no device left in the tailnet" in down.stdout, down.stdout[-3000:]
    assert "powered off (ACPI" in down.stdout, down.stdout[-3000:]
    assert not {n for n in netns_names() if n.startswith(run.cluster.ns(""))}, netns_names()
    assert not (BUILD / "demo.json").exists() and not (BUILD / "default-pulumi").exists()
    assert not (BUILD / "clouds.json").exists()
