"""The whole promise on one Linux machine, with no account anywhere.

    sudo make demo        # build or reuse, start, deploy, verify, leave it running
    sudo make demo-down   # remove it all

`make demo` brings up the single-node test cluster of `make cluster-up`
(kubelet, containerd, kube-router enforcing the NetworkPolicies, CoreDNS) in
network namespaces, with the data-path topology around it: headscale as the
control server, a tailscaled exit node, an "internet", a "LAN" and the
"laptop" (the node's host). It then deploys the cluster-only stack through
the real Pulumi engine (the same deployment the end-to-end suite checks,
tests/support/deployment.py), runs `make verify`'s checks against it, prints
their table and says how to look around. Nothing leaves the machine: the
"internet" is a namespace on it.

`make demo-down` stops everything the demo started (processes, network
namespaces, mounts, cgroups, iptables rules) and removes its state. The
cluster is torn down as a whole, so the stack's objects and the relay's node
in headscale go with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import urllib3

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
from tests.support.deployment import OPEN, PROTECTED, RELAY_NS, DeployError, deploy, verify_config
from tools.verify import exit_code, format_table, run_verify

STACK = "demo"
STATE = BUILD / "demo.json"  # written once the stack is deployed: what demo-down and a second demo read


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
        "Remove it all: sudo make demo-down",
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
    with contextlib.ExitStack() as undo_on_failure:
        d = deploy(cluster, undo_on_failure, stack_name=STACK)
        undo_on_failure.pop_all()  # deployed: it stays until `make demo-down`
    STATE.write_text(json.dumps({"stack": STACK, "state": str(BUILD / f"{STACK}-pulumi")}) + "\n")
    print(f"deployed in {d.timings['pulumi up']} s; relay in {RELAY_NS}, protected namespace {PROTECTED}")
    code = verify()
    print(look_around())
    return code


def down() -> int:
    check_machine()
    cluster = Cluster()
    cluster.down()
    STATE.unlink(missing_ok=True)
    shutil.rmtree(BUILD / f"{STACK}-pulumi", ignore_errors=True)
    print("demo down: the cluster, headscale, the exit node and the topology's namespaces are gone, with their state")
    return 0


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
