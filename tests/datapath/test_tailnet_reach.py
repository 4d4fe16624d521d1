"""Issue 8, points 1 and 2: what the relay can reach on the tailnet, with the
real programs (headscale v0.29, tailscaled/containerboot v1.102.5).

The relay's proxies hand a tailnet address to the peer that owns it
(net/tsdial), past every NetworkPolicy: only the tailnet policy stands between
a pod and the other devices. A "laptop" (tailscaled in a namespace of its
own, a user's device, with a listener on its tailnet address) and listeners
on the exit node's own addresses show:

- with an allow-all policy (Headscale without a policy file, as Tailscale's
  default policy), the workload reaches the laptop and the exit node's
  services through the relay: the way around this issue closes;
- with the policy the stack writes (builders/tailnet_policy.merged_policy,
  which Headscale v0.29 enforces as written: `grants` with `via`,
  `autogroup:internet`, `tests`), the laptop and the exit node's tailnet
  address are out of reach and the internet is not; Headscale evaluates the
  policy's `tests` against the real nodes and refuses a hand edit that opens
  the tailnet to the relay;
- the exit node's public address is part of autogroup:internet, so the
  policy cannot close it: the guard the exit node's cloud-init installs,
  run here as the document carries it, does, and keeps doing so across a
  tailscaled restart.

The relay runs with its rendered egress NetworkPolicy enforced throughout.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from builders.relay import HEALTH_PORT, HTTP_PROXY_PORT, SOCKS5_PORT
from builders.tailnet_policy import policy_problems

from .stack_tailnet import EXIT_TAG, LAPTOP_LINK, RELAY_TAG, apply_guard, remove_guard, stack_policy_for_headscale
from .topology import ECHO_NAME, EXIT_PUBLIC_IP, INTERNET_IP, Topology, TopologyError, wait_for

pytestmark = pytest.mark.datapath

SERVICE_PORT = 8022  # "sshd": anything listening on a device's own address
ECHO_IP_URL = f"https://{ECHO_NAME}/ip"
TRY = 6.0  # seconds a request that must fail is given
# Names only the exit node's own resolver knows (tests/support/host_dns.py serves them).
DOH_DOMAIN = "doh.example.test"
HOST_DNS = Path(__file__).resolve().parents[1] / "support" / "host_dns.py"


class Tailnet:
    """A running topology with the laptop and listeners on every device address."""

    def __init__(self, t: Topology, laptop_ip: str, exit_ip: str, exit_ip6: str) -> None:
        self.t, self.laptop_ip, self.exit_ip, self.exit_ip6 = t, laptop_ip, exit_ip, exit_ip6

    def relay_ip(self) -> str:
        p = self.t.in_relay(["tailscale", "--socket=/tmp/tailscaled.sock", "ip", "-4"])
        return p.stdout.strip()

    def through(self, url: str, timeout: float = TRY) -> dict[str, str | None]:
        """{proxy: body or None} for one GET through each of the relay's proxies."""
        out: dict[str, str | None] = {}
        for proxy in (self.t.http_proxy(), self.t.socks_proxy()):
            p = self.t.curl(url, proxy=proxy, timeout=timeout, extra=["--globoff"])  # [IPv6] literals
            out[proxy] = p.stdout.strip() if p.returncode == 0 else None
        return out

    def services(self) -> dict[str, str]:
        return {
            "laptop": f"http://{self.laptop_ip}:{SERVICE_PORT}/ip",
            "exit-tailnet": f"http://{self.exit_ip}:{SERVICE_PORT}/ip",
            "exit-public": f"http://{EXIT_PUBLIC_IP}:{SERVICE_PORT}/ip",
            # The guard's ip6tables half: the exit node's tailnet IPv6 address.
            "exit-tailnet6": f"http://[{self.exit_ip6}]:{SERVICE_PORT}/",
        }

    def reached(self) -> dict[str, list[str]]:
        """For each device service: the proxies through which the workload got an answer."""
        return {name: [p for p, body in self.through(url).items() if body] for name, url in self.services().items()}

    def peer_api(self, role: str) -> str:
        """The peer API's URL of the device `role` (its tailnet IPv4), as its own tailscaled gives it."""
        status = json.loads(self.t.ts(role, "status", "--json").stdout)
        ipv4 = self.t.ts(role, "ip", "-4").stdout.strip()
        return str(next(u for u in status["Self"]["PeerAPIURL"] if u.startswith(f"http://{ipv4}:")))

    def relay_peers(self) -> list[str]:
        """The host names of the devices in the relay's netmap."""
        p = self.t.in_relay(["tailscale", "--socket=/tmp/tailscaled.sock", "status", "--json"])
        return sorted(peer["HostName"] for peer in (json.loads(p.stdout).get("Peer") or {}).values())

    def internet_ok(self) -> None:
        def ok() -> bool:
            return all(body == EXIT_PUBLIC_IP for body in self.through(ECHO_IP_URL, timeout=8).values())

        wait_for("the internet through both proxies, seen from the exit node", ok, 60, interval=1)


def wait_addr(t: Topology, role: str, ip: str) -> None:
    wait_for(f"{ip} on {role}'s tailscale0", lambda: ip in t.run(role, ["ip", "addr", "show", "tailscale0"]).stdout, 20)


def start_listener6(t: Topology, role: str, name: str, addr: str, port: int) -> None:
    """A plain HTTP server on an IPv6 address (echo_server.py is IPv4 only)."""
    root = t.workdir / name
    root.mkdir(exist_ok=True)
    (root / "index.html").write_text(name)
    args = [sys.executable, "-m", "http.server", str(port), "--bind", addr, "--directory", str(root)]
    t.spawn(role, f"listener-{name}", args)
    url = f"http://[{addr}]:{port}/"

    def up() -> bool:
        probe = ["curl", "-sS", "--globoff", "-o", "/dev/null", "--max-time", "2", url]
        return t.run(role, probe, check=False).returncode == 0

    wait_for(f"listener {name}", up, 15)


def start_tailnet(workdir: Path, bin_dir: Path, policy: dict[str, Any] | None) -> Tailnet:
    t = Topology(workdir, bin_dir)
    try:
        t.create()
        if policy is not None:
            t.hs_policy_path = workdir / "policy.hujson"
            t.hs_policy_path.write_text(json.dumps(policy, indent=2))
        t.start_echo("internet")
        t.start_echo("lan")
        t.start_control()
        # Tagged, as the stack's keys are: the policy speaks of the tags.
        t.exit_authkey = t.tagged_preauth_key([EXIT_TAG], ephemeral=True, reusable=False)
        t.relay_authkey = t.tagged_preauth_key([RELAY_TAG], ephemeral=True)
        exit_ip = t.start_exit()
        laptop_ip = t.start_tailnet_node("laptop", *LAPTOP_LINK, authkey=t.preauth_key(ephemeral=True))
        t.load_relay(t.render(exit_ip))
        t.apply_relay_policy()
        t.start_relay()
        t.wait_relay_ready()
        exit_ip6 = t.ts_exit("ip", "-6").stdout.strip()
        for role, ip in (("laptop", laptop_ip), ("exit", exit_ip), ("exit", exit_ip6)):
            wait_addr(t, role, ip)
        t.start_listener("laptop", "laptop", laptop_ip, SERVICE_PORT)
        t.start_listener("exit", "exit-tailnet", exit_ip, SERVICE_PORT)
        t.start_listener("exit", "exit-public", EXIT_PUBLIC_IP, SERVICE_PORT)
        start_listener6(t, "exit", "exit-tailnet6", exit_ip6, SERVICE_PORT)
        net = Tailnet(t, laptop_ip, exit_ip, exit_ip6)
        net.internet_ok()
        return net
    except BaseException:
        t.close()
        raise


@pytest.fixture(scope="class")
def open_tailnet(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tailnet]:
    net = start_tailnet(tmp_path_factory.mktemp("open"), bin_dir, policy=None)
    try:
        yield net
    finally:
        net.t.close()


@pytest.fixture(scope="class")
def stack_tailnet(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tailnet]:
    net = start_tailnet(tmp_path_factory.mktemp("stack"), bin_dir, policy=stack_policy_for_headscale())
    try:
        yield net
    finally:
        net.t.close()


def hs_policy_check(t: Topology, policy: dict[str, Any]) -> tuple[int, str]:
    """`headscale policy check`: parses `policy` and runs its tests against the live nodes."""
    path = t.workdir / f"check-{time.monotonic_ns()}.hujson"
    path.write_text(json.dumps(policy, indent=2))
    p = t.run(
        "control",
        [str(t.bin / "headscale"), "-c", str(t.hs_config), "policy", "check", "--file", str(path)],
        check=False,
    )
    return p.returncode, p.stdout + p.stderr


# --------------------------------------------------------------- allow-all: the way around, documented
class TestAllowAllPolicy:
    def test_the_workload_reaches_the_laptop_and_the_exit_nodes_services(self, open_tailnet: Tailnet) -> None:
        """Today's behaviour on a default (allow-all) tailnet: the bypass this issue closes."""
        net = open_tailnet
        both = [net.t.http_proxy(), net.t.socks_proxy()]
        assert net.reached() == {"laptop": both, "exit-tailnet": both, "exit-public": both, "exit-tailnet6": both}
        # The laptop saw the relay's own tailnet address: WireGuard to the peer, not via the exit node.
        assert net.relay_ip() in {c["peer"] for c in net.t.connections("laptop")}

    def test_the_exit_node_guard_closes_its_services_whatever_the_policy(self, open_tailnet: Tailnet) -> None:
        net = open_tailnet
        apply_guard(net.t)
        apply_guard(net.t)  # idempotent: boot and cloud-init both run it
        before = len(net.t.connections("exit-tailnet")) + len(net.t.connections("exit-public"))
        reached = net.reached()
        assert reached["exit-tailnet"] == reached["exit-public"] == reached["exit-tailnet6"] == [], reached
        assert len(net.t.connections("exit-tailnet")) + len(net.t.connections("exit-public")) == before
        # The policy still lets the relay reach the laptop: only the policy can close that.
        assert reached["laptop"] != []
        net.internet_ok()


# --------------------------------------------------------------- the stack's policy
class TestStackPolicy:
    def test_the_laptop_and_the_exit_nodes_tailnet_address_are_out_of_reach(self, stack_tailnet: Tailnet) -> None:
        net = stack_tailnet
        before = len(net.t.connections("laptop"))
        reached = net.reached()
        assert reached["laptop"] == reached["exit-tailnet"] == reached["exit-tailnet6"] == [], reached
        assert len(net.t.connections("laptop")) == before, "the laptop saw a connection"
        net.internet_ok()

    def test_headscale_runs_the_policys_tests_and_refuses_an_edit_that_opens_the_tailnet(
        self, stack_tailnet: Tailnet
    ) -> None:
        t = stack_tailnet.t
        policy = stack_policy_for_headscale()
        rc, out = hs_policy_check(t, policy)
        assert rc == 0, out
        opened = json.loads(json.dumps(policy))
        opened["grants"].append({"src": [RELAY_TAG], "dst": ["*"], "ip": ["*"]})
        rc, out = hs_policy_check(t, opened)
        assert rc != 0, f"headscale accepted a policy that opens the tailnet to the relay:\n{out}"
        assert f"{RELAY_TAG} -> autogroup:member:22" in out and "expected DENIED, got ALLOWED" in out, out
        assert f"{RELAY_TAG} -> {EXIT_TAG}:22" in out, out

    @pytest.mark.parametrize(
        "edit",
        [
            pytest.param({"src": [RELAY_TAG], "dst": ["*"], "ip": ["*"]}, id="everything"),
            # A narrow edit, one port of members' devices (issue 19's example).
            pytest.param({"src": [RELAY_TAG], "dst": ["autogroup:member"], "ip": ["tcp:8022"]}, id="members-8022"),
        ],
    )
    def test_a_hand_edit_of_the_live_policy_file_is_refused_and_the_laptop_stays_out_of_reach(
        self, stack_tailnet: Tailnet, edit: dict[str, Any]
    ) -> None:
        """The write boundary itself: the edited file, reloaded (SIGHUP), fails its tests and is not applied."""
        net = stack_tailnet
        path, headscale = net.t.hs_policy_path, net.t.procs["headscale"]
        assert path is not None
        original = path.read_text()
        opened = json.loads(original)
        opened["grants"].append(edit)
        path.write_text(json.dumps(opened, indent=2))
        mark = len(headscale.log.read_text())
        try:
            headscale.send_signal(signal.SIGHUP)

            def refused() -> bool:
                tail = headscale.log.read_text()[mark:]
                return "reloading policy" in tail and "expected DENIED, got ALLOWED" in tail

            wait_for("headscale to refuse the edited policy", refused, 15)
            assert net.reached()["laptop"] == []
        finally:
            path.write_text(original)
            headscale.send_signal(signal.SIGHUP)
        net.internet_ok()

    def test_no_devices_peer_api_is_in_reach(self, stack_tailnet: Tailnet) -> None:
        """Issue 19, point 2: Tailscale opens a device's peer API to every peer
        that has it in its netmap, whatever the policy says; under the stack's
        policy nothing may reach the relay, so the laptop does not know the relay
        and its peer API does not answer (contrast: the members test below)."""
        assert stack_tailnet.through(stack_tailnet.peer_api("laptop") + "/") == dict.fromkeys(
            (stack_tailnet.t.http_proxy(), stack_tailnet.t.socks_proxy())
        )

    @pytest.mark.parametrize("port", [HEALTH_PORT, HTTP_PROXY_PORT, SOCKS5_PORT], ids=["health", "http", "socks5"])
    def test_the_relays_own_ports_are_out_of_reach_at_its_tailnet_address(
        self, stack_tailnet: Tailnet, port: int
    ) -> None:
        """Issue 19, point 2: netstack hands a connection to the relay's own
        tailnet address to 127.0.0.1:<port> in the pod; the relay listens on its
        pod address only, so nothing answers there."""
        assert stack_tailnet.t.relay_live(), "the relay's health port does not answer at its pod address"
        url = f"http://{stack_tailnet.relay_ip()}:{port}/healthz"
        assert set(stack_tailnet.through(url).values()) == {None}, url

    def test_names_resolved_through_the_exit_node_still_resolve_behind_its_guard(self, stack_tailnet: Tailnet) -> None:
        """With an exit node, tailscaled's proxies resolve a name they do not
        know (not MagicDNS, not an extra record) by DoH to the exit node's peer
        API, on its tailnet address (tsdial's userDialResolve): real names such
        as api.ipify.org go that way. The guard must let that through."""
        net = stack_tailnet
        log = net.t.workdir / "exit-resolver.jsonl"
        # The exit node's own resolver (its resolv.conf says 127.0.0.1), which knows two names:
        # one asked before the guard, one after (the relay caches what it has resolved).
        before, after = (f"{n}.{DOH_DOMAIN}" for n in ("before", "after"))
        records = [a for name in (before, after) for a in ("--record", f"{name}={INTERNET_IP}")]
        net.t.spawn(
            "exit", "exit-resolver", [sys.executable, str(HOST_DNS), "--addr", "127.0.0.1", *records, "--log", str(log)]
        )

        def resolves(name: str) -> Callable[[], bool]:
            return lambda: all(body == EXIT_PUBLIC_IP for body in net.through(f"http://{name}/ip", timeout=8).values())

        wait_for(f"{before} through both proxies, without the guard", resolves(before), 60, interval=1)
        assert before in log.read_text(), "the name was not resolved by the exit node"
        apply_guard(net.t)
        try:
            assert after not in log.read_text()
            wait_for(f"{after} through both proxies, behind the guard", resolves(after), 30, interval=1)
            assert after in log.read_text(), "the name was not resolved by the exit node"
            # And the guard still closes the exit node's own services.
            reached = net.reached()
            assert reached["exit-tailnet"] == reached["exit-public"] == reached["exit-tailnet6"] == [], reached
        finally:
            remove_guard(net.t)
        assert net.reached()["exit-public"] != [], "the guard was not removed"

    def test_the_exit_nodes_public_address_needs_the_guard_which_survives_a_restart(
        self, stack_tailnet: Tailnet
    ) -> None:
        """The VM's public address is part of autogroup:internet: the policy lets
        it through, and packets to it arrive on tailscale0 and are delivered locally."""
        net = stack_tailnet
        both = [net.t.http_proxy(), net.t.socks_proxy()]
        assert net.reached()["exit-public"] == both, "expected today's way around: the VM's own public address"
        apply_guard(net.t)
        before = len(net.t.connections("exit-public"))
        assert net.reached()["exit-public"] == []
        net.internet_ok()
        # tailscaled re-creates its own chains (ts-input accepts tailscale0) when it starts.
        net.t.stop_exit()
        net.t.start_exit_daemon()
        wait_addr(net.t, "exit", net.exit_ip)
        net.internet_ok()
        rules = net.t.run("exit", ["iptables", "-S", "ts-input"], check=False).stdout
        if "-i tailscale0 -j ACCEPT" not in rules:
            raise TopologyError(f"tailscaled did not install its ts-input accept; nothing was shown:\n{rules}")
        assert net.reached()["exit-public"] == []
        assert len(net.t.connections("exit-public")) == before


# --------------------------------------------------------------- a tailnet with its own rules
def test_with_members_rules_and_the_grant_without_via_the_laptop_stays_out_of_reach(
    bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A lived-in tailnet: members may reach everything. Headscale v0.29.0 then
    no longer gives the relay its exit node through the `via` grant (the relay
    stays not ready: it fails closed), so a Headscale tailnet uses the grant
    without `via`, which the preflight accepts with a warning. The relay's
    tag still reaches the internet only."""
    policy = stack_policy_for_headscale()
    policy["grants"] = [
        {"src": ["autogroup:member"], "dst": ["*"], "ip": ["*"]},
        {"src": [RELAY_TAG], "dst": ["autogroup:internet"], "ip": ["*"]},
    ]
    net = start_tailnet(tmp_path_factory.mktemp("members"), bin_dir, policy=policy)
    try:
        reached = net.reached()
        assert reached["laptop"] == reached["exit-tailnet"] == reached["exit-tailnet6"] == [], reached
        rc, out = hs_policy_check(net.t, policy)
        assert rc == 0, out
        # But members may reach the relay ("dst": ["*"]): the laptop is the relay's peer, and its peer
        # API answers through both proxies (issue 19, point 2). The preflight refuses this rule.
        assert "laptop" in net.relay_peers()
        answered = net.through(net.peer_api("laptop") + "/")
        assert all(body is not None for body in answered.values()), answered
        problems = policy_problems(policy, EXIT_TAG, RELAY_TAG)
        assert any(p.startswith('grants[0] lets its src reach "tag:egress-relay" (through "*")') for p in problems)
    finally:
        net.t.close()
