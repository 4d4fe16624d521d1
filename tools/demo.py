"""The whole promise on one Linux machine, with no account anywhere.

    sudo make demo        # build or reuse, start, deploy, verify, leave it running
    sudo make demo-down   # remove it all

`make demo` brings up the single-node test cluster of `make cluster-up`
(kubelet, containerd, kube-router enforcing the NetworkPolicies, CoreDNS) in
network namespaces, with the data-path topology around it: headscale as the
control server, a tailscaled exit node, an "internet", a "LAN" and the
"laptop" (the node's host). It then follows the README's walk-through where
the two overlap, each step printed with its number there: it creates the
stack (1), deploys it through the real Pulumi engine (4; the same deployment
the end-to-end suite checks, tests/support/deployment.py), runs `make
verify`'s checks (5) and uses the proxy from a workload the way step 6 shows
(6). Steps 2 and 3 are this machine's own: no account, Headscale mints the
relay's key and holds the tailnet policy. Nothing leaves the machine: the
"internet" is a namespace on it.

`make demo-down` first removes the stack with `pulumi destroy` (7), then
stops everything the demo started (processes, network namespaces, mounts,
cgroups, iptables rules) and removes its state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import urllib3

from builders.proxy_env import PROXY_CONFIGMAP
from builders.relay import HTTP_PROXY_PORT
from tests.datapath.topology import EXIT_PUBLIC_IP, LAN_IP, TopologyError
from tests.support.apiserver import bin_dir
from tests.support.cluster_env import (
    BUILD,
    CONTEXT,
    INTERNET_IP,
    Cluster,
    ClusterError,
    build_all,
    machine_lock,
    missing_artifacts,
    missing_prerequisites,
)
from tests.support.deployment import (
    OPEN,
    PROTECTED,
    PROTECTED_LABELS,
    RELAY_NS,
    DeployError,
    deploy,
    namespace_labels,
    verify_config,
)
from tests.support.engine import Engine
from tools.verify import exit_code, format_table, run_verify

STACK = "demo"
STATE = BUILD / "demo.json"  # written once the stack is deployed: what demo-down and a second demo read
PULUMI_STATE = BUILD / f"{STACK}-pulumi"
# The README's walk-through ("Deploy your stack"), by its step numbers: the
# steps the demo shares with it, in the same order (tests/test_readme.py).
WALK_THROUGH = {1: "Create your stack", 4: "Deploy", 5: "Check it", 6: "Use it from a workload", 7: "Remove it"}


def step(number: int, what: str) -> None:
    print(f"\nREADME step {number}, {WALK_THROUGH[number]}: {what}", flush=True)


class DemoError(Exception):
    """Why the demo cannot run here, with what to do about it."""


def check_machine() -> None:
    missing = missing_prerequisites()
    if missing:
        raise DemoError(
            "make demo runs a real cluster in network namespaces on this machine: it needs Linux, root "
            "and cgroup v1 (run it as `sudo make demo`). Missing here: " + "; ".join(missing)
        )


def look_around() -> str:
    kubectl = f"{bin_dir() / 'kubectl'} --kubeconfig {BUILD / 'kubeconfig'} --context {CONTEXT}"
    probe = f"{kubectl} exec -n {PROTECTED} workload -- sh -c"
    lines = [
        "",
        "Look around:",
        f"  export KUBECONFIG={BUILD / 'kubeconfig'}   # context {CONTEXT}; kubectl: {bin_dir() / 'kubectl'}",
        f"  {kubectl} get pods -A",
        f"  {kubectl} get networkpolicies -n {PROTECTED} -o yaml",
        f"  # a workload in the protected namespace {PROTECTED}: out through the relay, seen from the exit node "
        f"({EXIT_PUBLIC_IP})",
        f"  {probe} {shlex.quote(f'probe http http://{INTERNET_IP}/ip -proxy $HTTP_PROXY')}",
        "  # ... and nothing directly: the internet, the LAN",
        f"  {probe} {shlex.quote(f'probe tcp {INTERNET_IP}:80')}",
        f"  {probe} {shlex.quote(f'probe tcp {LAN_IP}:80')}",
        f"  # a pod of {OPEN} (not protected) cannot use the relay",
        f"  {kubectl} exec -n {OPEN} control -- sh -c "
        + shlex.quote(f"probe http http://{INTERNET_IP}/ip -proxy http://relay.{RELAY_NS}:{HTTP_PROXY_PORT}"),
        "",
        "Remove it all: sudo make demo-down (README step 7: pulumi destroy, then the cluster)",
    ]
    return "\n".join(lines)


def verify() -> int:
    print("\nmake verify, from a short-lived probe pod in each protected namespace:", flush=True)
    results = run_verify(verify_config())
    print(format_table(results))
    return exit_code(results)


def up() -> int:
    check_machine()
    cluster = Cluster()
    if STATE.exists() and cluster.is_up():
        print(f"the demo is already running (stack {STACK!r}); checking it again")
        code = verify()
        print(look_around())
        return code
    for tool in ("pulumi", "pulumi-resource-kubernetes", "kubectl"):
        if not (bin_dir() / tool).exists():
            raise DemoError(f"{bin_dir() / tool} is not built: run `make engine-bins` (make demo does)")
    if missing_artifacts(cluster.bin):
        t = time.monotonic()
        print("building the cluster's programs and images (minutes the first time, then reused)", flush=True)
        build_all()
        print(f"build: {time.monotonic() - t:.0f} s")
    t = time.monotonic()
    if not cluster.is_up():
        cluster.up(tailnet=True)
    print(cluster.describe())
    print(
        f"\ncluster up in {time.monotonic() - t:.0f} s; `pulumi up` of stack {STACK!r} through the real engine",
        flush=True,
    )
    step(1, f"the stack {STACK!r}, in a file backend of its own ({PULUMI_STATE})")
    print(
        "README steps 2 and 3 are this machine's: no Hetzner or Tailscale account; Headscale mints the relay's"
        " key (set with --secret) and holds the tailnet policy"
    )
    step(4, "pulumi up through the real engine, its preflight first")
    with contextlib.ExitStack() as undo_on_failure:
        d = deploy(cluster, undo_on_failure, stack_name=STACK)
        undo_on_failure.pop_all()  # deployed: it stays until `make demo-down`
    before = d.before["labels"][PROTECTED]  # what destroy must give back (step 7)
    STATE.write_text(json.dumps({"stack": STACK, "state": str(PULUMI_STATE), "labels": before}) + "\n")
    print(f"deployed in {d.timings['pulumi up']} s; relay in {RELAY_NS}, protected namespace {PROTECTED}")
    step(5, "make verify")
    code = verify()
    step(
        6, f"the pod {PROTECTED}/workload, with envFrom configMapRef {PROXY_CONFIGMAP}, fetches http://{INTERNET_IP}/ip"
    )
    r = d.workload("http", f"http://{INTERNET_IP}/ip", '-proxy "$HTTP_PROXY"', timeout="15s")
    seen = str(r.get("body", "")).strip()
    if r.get("ok") and seen == EXIT_PUBLIC_IP:
        print(f"  the internet saw it come from {seen}: the exit node's address")
    else:
        print(f"  FAILED: expected the exit node's address {EXIT_PUBLIC_IP}: {r}")
        code = code or 1
    print(look_around())
    return code


def destroy_stack(cluster: Cluster, labels_before: dict[str, str]) -> int:
    """README step 7: `pulumi destroy` of the demo's stack, then what it gave back."""
    step(7, f"pulumi destroy of the stack {STACK!r}")
    os.environ["PATH"] = f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"  # the preflight's kubectl
    output: list[str] = []
    try:
        Engine(PULUMI_STATE).setup().select(STACK).destroy(on_output=output.append, color="never")
    except Exception as e:  # noqa: BLE001  (the cluster comes down anyway: say why, then go on)
        print("".join(output[-30:]) + f"\n  FAILED: {e}")
        return 1
    api = cluster._api()
    relay = api.get("v1", "Namespace", RELAY_NS)
    labels = namespace_labels(api, PROTECTED)
    if (relay is None or relay["metadata"].get("deletionTimestamp")) and labels == labels_before:
        print(f"  the relay's namespace {RELAY_NS} is going, {PROTECTED} has its own labels back: {labels}")
        return 0
    print(f"  FAILED: {RELAY_NS} still there ({relay is not None}) or {PROTECTED}'s labels not given back: {labels}")
    return 1


def down() -> int:
    check_machine()
    cluster = Cluster()
    code = 0
    if STATE.exists() and cluster.is_up():
        code = destroy_stack(cluster, json.loads(STATE.read_text()).get("labels", PROTECTED_LABELS))
    cluster.down()
    STATE.unlink(missing_ok=True)
    shutil.rmtree(PULUMI_STATE, ignore_errors=True)
    print("demo down: the cluster, headscale, the exit node and the topology's namespaces are gone, with their state")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("check", "up", "down"), help="check: only whether this machine can run it")
    a = ap.parse_args(argv)
    urllib3.disable_warnings()
    try:
        if a.command == "check":
            check_machine()
            return 0
        with machine_lock():
            return up() if a.command == "up" else down()
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    except (DeployError, ClusterError, TopologyError, AssertionError) as e:  # AssertionError: pulumi up failed
        print(f"demo: {e}", file=sys.stderr)
        if a.command == "up":
            print("demo: the cluster is left as it is for a look; `sudo make demo-down` removes it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
