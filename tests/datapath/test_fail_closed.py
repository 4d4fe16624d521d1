"""Issue 8 point 3: the DEFAULT configuration fails closed, with the real programs.

The default stack is a Hetzner exit node and Tailscale's hosted control
plane, with `tailnet.relayEgress: pinned`: the relay may reach the exit
node's public IPs on UDP 41641 and the control plane's ranges, nothing else.
Neither Hetzner nor Tailscale's servers exist here, so the mapping is:

- the relay egress NetworkPolicy is the one `tools/render.py` renders for
  the default stack file (Pulumi.dev.yaml: Hetzner exit node, no login
  server) with `tailnet.controlPlaneCidrs` set to headscale's address:
  headscale stands in for the hosted control plane at a "public" TEST-NET
  address, exactly as the key overrides Tailscale's published ranges. The
  render's fake Hetzner server has 203.0.113.10, the topology's exit node
  address (asserted below);
- the relay itself runs as the harness renders it (the Deployment of a
  stack pointed at headscale: same image, env, user and probes), under that
  policy, translated to iptables in its namespace;
- headscale's embedded DERP and STUN are served at DERP_IP, a second
  address the policy does not list, as Tailscale's DERP servers lie outside
  its control plane's ranges;
- the relay sits behind a NAT as on a laptop: nothing outside the cluster
  opens a connection to it (the router lets in replies only).

Shown: the relay comes up, reaches the exit node directly over UDP 41641 and
carries traffic although every DERP and STUN attempt is refused; and when
the exit node goes away for good (removed after an outage, VM destroyed, not
yet in the netmap, before the relay's first netmap) a request through the
proxies reaches nothing.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import TailnetConfig

from .test_datapath import (
    ECHO_IP_URL,
    INTERNET_BY_IP_URL,
    LAN_URL,
    PROBE_WINDOW,
    Attempts,
    exit_peer,
    get_through,
    peers,
    proxies,
    relay_status,
    wait_traffic_via_exit,
)
from .topology import (
    CONTROL_IP,
    EXIT_PUBLIC_IP,
    REPO,
    ROUTER,
    Topology,
    TopologyError,
    load_manifests,
    relay_spec_from_manifests,
    wait_for,
)

pytestmark = pytest.mark.datapath

DERP_IP = "198.51.100.11"
# headscale allocates tailnet IPs in order (prefixes.allocation: sequential):
# a relay that registers first gets .1, an exit node joining after it .2.
EXIT_IP_WHEN_RELAY_FIRST = "100.64.0.2"


# ------------------------------------------------------------------ the stack
def default_stack_relay_policies(t: Topology) -> list[dict[str, Any]]:
    """The relay's egress NetworkPolicy as rendered for the default stack,
    its control plane at headscale's address."""
    # The example stack sets only what a user chooses; everything else is the program's default.
    config = yaml.safe_load((REPO / "Pulumi.dev.yaml").read_text())["config"]
    exit_node, tailnet = config.get("tailscale-egress:exitNode") or {}, config.get("tailscale-egress:tailnet") or {}
    assert exit_node.get("existingTailnetIp") is None, "the default is a Hetzner exit node"
    assert tailnet.get("loginServer") is None, "the default is Tailscale's control plane"
    assert tailnet.get("relayEgress", TailnetConfig().relay_egress) == "pinned"
    config["tailscale-egress:tailnet"] = {**tailnet, "controlPlaneCidrs": [f"{CONTROL_IP}/32"]}
    stack_file = t.workdir / "Pulumi.default.yaml"
    stack_file.write_text(yaml.safe_dump({"config": config}, sort_keys=False))
    out = t.workdir / "render-default"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "render.py"), "default", "--config-file", str(stack_file), "--out", out],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise TopologyError(f"tools/render.py failed rc={done.returncode}:\n{done.stdout}\n{done.stderr}")
    policies = relay_spec_from_manifests(load_manifests(out / "manifests")).network_policies
    blocks = {
        (peer["ipBlock"]["cidr"], port["protocol"], port["port"])
        for policy in policies
        for rule in policy["spec"]["egress"]
        for peer in rule["to"]
        if "ipBlock" in peer
        for port in rule["ports"]
    }
    # Pinned: the fake Hetzner server's IPv4 is the topology's exit node; no
    # block wider than the control plane's and the exit node's addresses.
    assert (f"{EXIT_PUBLIC_IP}/32", "UDP", 41641) in blocks, blocks
    assert (f"{CONTROL_IP}/32", "TCP", 443) in blocks, blocks
    assert all(ipaddress.ip_network(cidr).num_addresses == 1 for cidr, _, _ in blocks), blocks
    return policies


def count_attempts(t: Topology) -> None:
    """Counters (rules without a target) in the relay's OUTPUT, ahead of the policy."""
    for proto, port in (("tcp", 443), ("udp", 3478), ("tcp", 80)):
        t.run("relay", ["iptables", "-I", "OUTPUT", "1", "-d", DERP_IP, "-p", proto, "--dport", str(port)])


def attempts(t: Topology) -> dict[str, int]:
    """Packets the relay sent towards DERP_IP, per protocol/port (all refused by the policy)."""
    out = t.run("relay", ["iptables", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        f = line.split()
        if DERP_IP in f and "dpt:" in line and len(f) > 3:
            proto = {"6": "tcp", "17": "udp"}.get(f[2], f[2])  # -n prints protocol numbers
            counts[f"{proto}/{line.split('dpt:')[1].split()[0]}"] = int(f[0])
    return counts


def behind_nat(t: Topology) -> None:
    """Nothing outside the cluster opens a connection to the relay: replies only."""
    t.run(ROUTER, ["iptables", "-A", "FORWARD", "-o", "v-relay", "!", "-i", "v-workload", "-m", "conntrack",
                   "--ctstate", "NEW", "-j", "DROP"])  # fmt: skip


def start_default_stack(workdir: Path, bin_dir: Path, *, exit_first: bool = True, relay: bool = True) -> Topology:
    t = Topology(workdir, bin_dir)
    try:
        t.create()
        t.start_echo("internet")
        t.start_echo("lan")
        t.start_control(derp_ip=DERP_IP)
        exit_ip = t.start_exit() if exit_first else EXIT_IP_WHEN_RELAY_FIRST
        spec = t.load_relay(t.render(exit_ip))
        spec.network_policies = default_stack_relay_policies(t)
        behind_nat(t)
        t.apply_relay_policy()
        count_attempts(t)
        if relay:
            t.start_relay()
        return t
    except BaseException:
        t.close()
        raise


@pytest.fixture
def default_stack(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Topology]]:
    made: list[Topology] = []

    def make(**kw: bool) -> Topology:
        t = start_default_stack(tmp_path_factory.mktemp("fc"), bin_dir, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


# ------------------------------------------------------------------ probing
def probe(t: Topology, window: float = PROBE_WINDOW) -> Attempts:
    """Try, for `window` seconds, to get anywhere through both proxies."""
    inet0, lan0 = len(t.connections("internet")), len(t.connections("lan"))
    ready = t.relay_ready()
    succeeded: list[str] = []
    end = time.monotonic() + window
    while time.monotonic() < end:
        for proxy in proxies(t):
            for url in (ECHO_IP_URL, INTERNET_BY_IP_URL, LAN_URL):
                body = get_through(t, url, proxy, timeout=4)
                if body is not None:
                    succeeded.append(f"{proxy} {url} -> {body}")
        time.sleep(1)
    return Attempts(
        ready_after_break=ready or t.relay_ready(),
        succeeded=succeeded,
        internet_peers=peers(t, "internet", inet0),
        lan_peers=peers(t, "lan", lan0),
    )


def assert_nothing_gets_out(a: Attempts, case: str) -> None:
    print(f"{case}: {a}")
    assert a.succeeded == [], f"{case}: requests got through: {a.succeeded}"
    assert a.internet_peers == [], f"{case}: the internet saw {a.internet_peers}"
    assert a.lan_peers == [], f"{case}: the lan saw {a.lan_peers}"


def exit_gone(t: Topology) -> bool:
    return exit_peer(t) is None


def exit_offline(t: Topology) -> bool:
    peer = exit_peer(t)
    return peer is None or not peer.get("Online")


def delete_exit_node(t: Topology) -> None:
    """What the control plane does to an ephemeral node offline for long."""
    t.hs("nodes", "delete", "--identifier", t.exit_node_id(), "--force")
    wait_for("exit node deleted from headscale", lambda: t.node("exit") is None, 20)


# ------------------------------------------------------------------ DERP
def test_the_relay_reaches_the_exit_node_directly_with_derp_and_stun_refused(
    default_stack: Callable[..., Topology],
) -> None:
    """Seen with tailscale v1.102.5: the relay keeps trying STUN (3478) and
    DERP's TLS port (443) at DERP_IP, every attempt refused; it still names
    the unreachable region its home DERP (magicsock's fallback pick), and
    talks to the exit node on the direct path, its public UDP 41641."""
    t = default_stack()
    t.wait_relay_ready()
    wait_traffic_via_exit(t)
    assert set(peers(t, "internet")) == {EXIT_PUBLIC_IP}
    status = relay_status(t)
    peer = exit_peer(t)
    assert peer is not None
    tried = attempts(t)
    print(f"relay home DERP: {status['Self'].get('Relay')!r}; exit peer CurAddr {peer.get('CurAddr')!r}, "
          f"Relay {peer.get('Relay')!r}; refused attempts towards DERP {DERP_IP}: {tried}")  # fmt: skip
    # The WireGuard path is the direct one, to the exit node's public UDP port.
    assert peer.get("CurAddr") == f"{EXIT_PUBLIC_IP}:41641", peer
    # DERP (TLS) and STUN were tried, and refused by the policy.
    assert tried.get("tcp/443", 0) > 0 and tried.get("udp/3478", 0) > 0, tried

    # Counter-check: with UDP to the exit node dropped as well, nothing carries
    # the traffic any more, so no DERP path was hiding behind the direct one.
    drop = ["OUTPUT", "-d", EXIT_PUBLIC_IP, "-p", "udp", "-j", "DROP"]
    t.run("relay", ["iptables", "-I", *drop[:1], "1", *drop[1:]])
    time.sleep(3)
    a = probe(t, window=8)
    assert a.succeeded == [] and a.internet_peers == [], a
    t.run("relay", ["iptables", "-D", *drop])
    wait_traffic_via_exit(t, timeout=60)


# ------------------------------------------------------------------ the exit node gone for good
def test_an_ephemeral_exit_node_removed_after_an_outage(default_stack: Callable[..., Topology]) -> None:
    """The VM loses its network; the control plane removes the ephemeral node;
    the VM comes back but its node no longer exists (its key was single-use)."""
    t = default_stack()
    t.wait_relay_ready()
    wait_traffic_via_exit(t)
    t.run("exit", ["ip", "link", "set", "eth0", "down"])
    # The control plane may still list it as online: its connection died silently.
    assert_nothing_gets_out(probe(t), "exit node unreachable (outage)")
    delete_exit_node(t)
    t.run("exit", ["ip", "link", "set", "eth0", "up"])
    t.run("exit", ["ip", "route", "replace", "default", "via", "203.0.113.1"])
    wait_for("relay sees the exit node gone", lambda: exit_gone(t), 60, interval=1)
    assert_nothing_gets_out(probe(t), "removed after an outage")
    assert not t.relay_ready()


def test_the_exit_node_vm_destroyed(default_stack: Callable[..., Topology]) -> None:
    """tailscaled killed (no logout), the address unreachable; then the control
    plane removes the ephemeral node: fails closed before and after."""
    t = default_stack()
    t.wait_relay_ready()
    wait_traffic_via_exit(t)
    t.procs["exit-tailscaled"].kill_all()
    t.run("exit", ["ip", "link", "set", "eth0", "down"])
    wait_for("relay sees the exit node offline", lambda: exit_offline(t), 90, interval=1)
    assert_nothing_gets_out(probe(t), "VM destroyed, node still listed")
    delete_exit_node(t)
    wait_for("relay sees the exit node gone", lambda: exit_gone(t), 60, interval=1)
    assert_nothing_gets_out(probe(t), "VM destroyed, node removed")
    assert not t.relay_ready()
    # The residual docs/security.md names: a direct dial still reaches what the
    # pinned policy allows, the control plane's own addresses (TCP 443, 80).
    reached = {proxy: get_through(t, f"https://{CONTROL_IP}/health", proxy, timeout=5) for proxy in proxies(t)}
    print(f"VM destroyed, node removed: direct dial to the control plane through the proxies: {reached}")
    assert all(body is not None for body in reached.values()), reached


def test_the_relay_started_before_its_exit_node_exists(default_stack: Callable[..., Topology]) -> None:
    """Not yet in the netmap: fails closed; then the exit node joins and the
    same relay carries traffic through it."""
    t = default_stack(exit_first=False)
    wait_for("relay logged in", lambda: relay_status(t).get("BackendState") == "Running", 90, interval=1)
    assert exit_peer(t) is None
    assert_nothing_gets_out(probe(t), "exit node not yet in the netmap")
    assert not t.relay_ready()
    assert t.start_exit() == EXIT_IP_WHEN_RELAY_FIRST
    t.wait_relay_ready(timeout=120)
    wait_traffic_via_exit(t, timeout=90)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "no-policy"])
def test_before_the_relays_first_netmap(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory, pinned: bool) -> None:
    """The relay's proxies listen before it has logged in. Its control server
    unreachable, it has no netmap: tailscaled dials every request directly.
    Pinned, nothing gets out; without the policy (as upstream behaves) the
    request leaves from the relay's own address."""
    t = start_default_stack(tmp_path_factory.mktemp("fc"), bin_dir, relay=False)
    try:
        if not pinned:
            for tool in ("iptables", "ip6tables"):
                t.run("relay", [tool, "-F", "TSE-EGRESS"])
                t.run("relay", [tool, "-A", "TSE-EGRESS", "-j", "ACCEPT"])
        t.run(ROUTER, ["iptables", "-I", "FORWARD", "1", "-i", "v-relay", "-d", CONTROL_IP, "-j", "DROP"])
        t.start_relay()
        ports = t._spec().proxy_ports
        wait_for(f"relay proxy ports {ports} listening", lambda: all(_listening(t, p) for p in ports), 30)
        a = probe(t, window=10)
        print(f"before the first netmap, pinned={pinned}: {a}")
        assert not relay_status(t).get("Self", {}).get("TailscaleIPs")
        if pinned:
            assert_nothing_gets_out(a, "before the first netmap")
        else:
            assert a.leaked_direct, f"expected tailscaled to dial directly before its first netmap: {a}"
    finally:
        t.close()


def _listening(t: Topology, port: int) -> bool:
    out = t.run("relay", ["ss", "-Htln", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())
