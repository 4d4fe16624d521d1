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
import dataclasses
import importlib.metadata
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
import yaml

from builders.proxy_env import PROXY_CONFIGMAP
from builders.relay import HTTP_PROXY_PORT
from tests.datapath.topology import EXIT_PUBLIC_IP, LAN_IP, TopologyError
from tests.stacks import dev_config
from tests.support.apiserver import bin_dir
from tests.support.clouds import SECRET_KEYS as CLOUD_SECRET_KEYS
from tests.support.clouds import Clouds
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
    Probe,
    deploy,
    namespace_labels,
    pod,
    running_pod,
    verify_config,
)
from tests.support.engine import Engine
from tests.support.headscale import HeadscaleCLI
from tools.verify import exit_code, format_table, run_verify

STACK = "demo"
# make demo-default: the stack file users start from, as shipped.
DEFAULT_STACK = "dev"
DEFAULT_STACK_CONTEXT = "rancher-desktop"  # Pulumi.dev.yaml's cluster.context
DEFAULT_PROTECTED = "default"  # Pulumi.dev.yaml's protectedNamespaces
DEFAULT_RELAY_NS = "tailscale-egress"  # the program's default cluster.relayNamespace
DEFAULT_KUBECONFIG = BUILD / "default-kubeconfig"
DEFAULT_PULUMI_STATE = BUILD / "default-pulumi"
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
    if not fetch_from_workload(d.workload, [EXIT_PUBLIC_IP], "the exit node's address"):
        code = code or 1
    print(look_around())
    return code


def fetch_from_workload(workload: Probe, exit_ips: Sequence[str], whose: str) -> bool:
    """README step 6: the workload pod (envFrom the proxy ConfigMap) fetches
    through $HTTP_PROXY; True when the internet saw one of `exit_ips`."""
    step(
        6,
        f"the pod {workload.ns}/{workload.name}, with envFrom configMapRef {PROXY_CONFIGMAP},"
        f" fetches http://{INTERNET_IP}/ip",
    )
    r = workload("http", f"http://{INTERNET_IP}/ip", '-proxy "$HTTP_PROXY"', timeout="15s")
    seen = str(r.get("body", "")).strip()
    if r.get("ok") and seen in exit_ips:
        print(f"  the internet saw it come from {seen}: {whose}")
        return True
    print(f"  FAILED: expected the exit node's address {', '.join(exit_ips)}: {r}")
    return False


def default_kubeconfig(cluster: Cluster) -> Path:
    """The cluster's kubeconfig with its context named as Pulumi.dev.yaml names
    it (`rancher-desktop`), so that the stack file is used as shipped."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    for context in config["contexts"]:
        if context["name"] == CONTEXT:
            context["name"] = DEFAULT_STACK_CONTEXT
    config["current-context"] = DEFAULT_STACK_CONTEXT
    DEFAULT_KUBECONFIG.write_text(yaml.safe_dump(config))
    DEFAULT_KUBECONFIG.chmod(0o600)
    return DEFAULT_KUBECONFIG


def default_engine() -> Engine:
    """The default stack's engine: the hcloud provider built here and the
    Tailscale provider's stand-in (tests/support/engine.py says why)."""
    engine = Engine(DEFAULT_PULUMI_STATE).setup()
    # The program runs in this process (the engine's inline program): both.
    engine.env["KUBECONFIG"] = os.environ["KUBECONFIG"] = str(DEFAULT_KUBECONFIG)
    for name in ("hcloud", "tailscale"):
        engine.install_plugin(name, importlib.metadata.version(f"pulumi-{name}"), bin_dir() / f"pulumi-resource-{name}")
    return engine


def up_default() -> int:
    """The default stack: Pulumi.dev.yaml as shipped, only the credentials and
    endpoints of the emulated Hetzner and Tailscale set; its exit node a VM
    booting the user_data the hcloud provider sent."""
    check_machine()
    cluster = Cluster()
    if cluster.is_up() and not cluster.state.tailnet.get("hosted"):
        raise DemoError("the cluster-only demo (or make cluster-up) is running: `sudo make demo-down` first")
    if STATE.exists() and cluster.is_up():
        print(f"the demo is already running (stack {DEFAULT_STACK!r}); checking it again")
        code = verify_default(json.loads(STATE.read_text())["exit_ips"])
        print(look_around_default())
        return code
    for tool in ("pulumi", "pulumi-resource-kubernetes", "pulumi-resource-hcloud", "pulumi-resource-tailscale"):
        if not (bin_dir() / tool).exists():
            raise DemoError(f"{bin_dir() / tool} is not built: run `make engine-bins` (make demo-default does)")
    if missing_artifacts(cluster.bin):
        print("building the cluster's programs and images (minutes the first time, then reused)", flush=True)
        build_all()
    t = time.monotonic()
    if not cluster.is_up():
        cluster.up(hosted=True)
    print(cluster.describe())
    print(f"\ncluster up in {time.monotonic() - t:.0f} s", flush=True)
    clouds = Clouds.load(BUILD)
    step(1, f"the stack {DEFAULT_STACK!r}: Pulumi.dev.yaml as shipped, in a file backend of its own")
    print(
        "README steps 2 and 3 are this machine's: the Hetzner token and the Tailscale API key are the emulated"
        " APIs' (set with --secret), and the emulated tailnet holds the policy step 3 asks for"
    )
    os.environ["PATH"] = f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"  # the preflight's kubectl
    default_kubeconfig(cluster)
    engine = default_engine()
    stack = engine.stack(DEFAULT_STACK, {**dev_config(), **clouds.stack_config()}, secret_keys=CLOUD_SECRET_KEYS)
    step(4, "pulumi up through the real engine: the Hetzner server boots the exit node's VM (minutes under QEMU)")
    output: list[str] = []
    up_started = time.time()
    try:
        result = stack.up(on_output=output.append, color="never")
    except Exception as e:  # noqa: BLE001  (the engine's own error: say it, leave everything for a look)
        raise DemoError("".join(output[-40:]) + f"\npulumi up failed: {e}") from None
    deployed = time.time() - up_started
    exit_ips = [ip for ip in result.outputs["exitNodePublicIps"].value if ":" not in ip]
    STATE.write_text(json.dumps({"stack": DEFAULT_STACK, "default": True, "exit_ips": exit_ips}) + "\n")
    print(f"deployed in {deployed:.0f} s; the exit node's public address {', '.join(exit_ips)}")
    joined = registered_at(cluster, result.outputs["exitNodeHostname"].value) - up_started
    # Issue 18's goal: up to a working exit path within the VM's boot plus 30 s.
    print(
        f"  the exit node VM registered in the tailnet {joined:.0f} s after pulumi up began;"
        f" after that, {deployed - joined:.0f} s to approve its routes and bring the relay up"
    )
    step(5, "make verify")
    t = time.monotonic()
    code = verify_default(exit_ips)
    print(f"make verify took {time.monotonic() - t:.0f} s")
    workload = pod("workload", DEFAULT_PROTECTED, "exec sleep 3600")
    workload["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": PROXY_CONFIGMAP}}]
    running_pod(cluster._api(), workload)
    if not fetch_from_workload(Probe(DEFAULT_PROTECTED, "workload"), exit_ips, "the exit node VM's address"):
        code = code or 1
    print(look_around_default())
    return code


def headscale_cli(cluster: Cluster) -> HeadscaleCLI:
    return HeadscaleCLI(cluster.bin / "headscale", Path(cluster.state.tailnet["headscale_config"]))


def registered_at(cluster: Cluster, hostname: str) -> float:
    """When the control server registered the device `hostname` (epoch seconds)."""
    (node,) = [n for n in headscale_cli(cluster).cli("nodes", "list") or [] if n.get("name") == hostname]
    return float(node["created_at"]["seconds"])


def verify_default(exit_ips: list[str]) -> int:
    print("\nmake verify, from a short-lived probe pod in each protected namespace:", flush=True)
    config = dataclasses.replace(
        verify_config(),
        namespaces=(DEFAULT_PROTECTED,),
        relay_namespace=DEFAULT_RELAY_NS,
        expected_exit_ips=tuple(exit_ips),
        kubeconfig=str(DEFAULT_KUBECONFIG),
        context=DEFAULT_STACK_CONTEXT,
    )
    results = run_verify(config)
    print(format_table(results))
    return exit_code(results)


def look_around_default() -> str:
    kubectl = f"{bin_dir() / 'kubectl'} --kubeconfig {DEFAULT_KUBECONFIG}"
    return "\n".join(
        [
            "",
            "Look around:",
            f"  {kubectl} get pods -A",
            f"  {kubectl} get networkpolicies -n {DEFAULT_PROTECTED} -o yaml",
            f"  the emulated clouds' endpoints and credentials: {BUILD / 'clouds.json'}",
            f"  the exit node VM's console: {BUILD / 'topology' / 'vm'}/*/console.log",
            "",
            "Remove it all: sudo make demo-down (README step 7: pulumi destroy powers the VM off, then the cluster)",
        ]
    )


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


def destroy_default() -> int:
    """README step 7 of the default stack: `pulumi destroy`, which presses the VM's power button."""
    step(7, f"pulumi destroy of the stack {DEFAULT_STACK!r}")
    os.environ["PATH"] = f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
    output: list[str] = []
    try:
        default_engine().select(DEFAULT_STACK).destroy(on_output=output.append, color="never")
    except Exception as e:  # noqa: BLE001  (the cluster comes down anyway: say why, then go on)
        print("".join(output[-30:]) + f"\n  FAILED: {e}")
        return 1
    # What a user checks in the admin console: no device of the stack is left in the tailnet.
    left = [n.get("given_name") or n.get("name") for n in headscale_cli(Cluster()).cli("nodes", "list") or []]
    if left:
        print(f"  FAILED: devices left in the tailnet: {left}")
        return 1
    # The emulated Hetzner pressed the power button before deleting the server.
    consoles = sorted((BUILD / "topology" / "vm").glob("*/console.log"))
    off = [c.parent.name for c in consoles if "reboot: Power down" in c.read_text(errors="replace")]
    if not consoles or len(off) != len(consoles):
        print(f"  FAILED: not every exit node VM powered off cleanly: {off} of {[c.parent.name for c in consoles]}")
        return 1
    print(f"  the exit node VM powered off (ACPI, {', '.join(off)}) and was deleted, the relay removed:")
    print("  no device left in the tailnet")
    return 0


def down() -> int:
    check_machine()
    cluster = Cluster()
    code = 0
    if STATE.exists() and cluster.is_up():
        state = json.loads(STATE.read_text())
        code = (
            destroy_default() if state.get("default") else destroy_stack(cluster, state.get("labels", PROTECTED_LABELS))
        )
    cluster.down()
    STATE.unlink(missing_ok=True)
    shutil.rmtree(PULUMI_STATE, ignore_errors=True)
    shutil.rmtree(DEFAULT_PULUMI_STATE, ignore_errors=True)
    print("demo down: the cluster, headscale, the exit node and the topology's namespaces are gone, with their state")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("check", "up", "down"), help="check: only whether this machine can run it")
    ap.add_argument(
        "--default-stack",
        action="store_true",
        help="up: the default stack (Pulumi.dev.yaml, its exit node a VM), not the cluster-only one",
    )
    a = ap.parse_args(argv)
    urllib3.disable_warnings()
    try:
        if a.command == "check":
            check_machine()
            return 0
        with machine_lock():
            if a.command == "down":
                return down()
            return up_default() if a.default_stack else up()
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
