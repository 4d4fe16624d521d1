"""The exit node's rendered cloud-init document, booted for real (issue 17).

Each VM is QEMU (TCG) booting a Debian cloud image built from the Debian
mirror, seeded with exactly the document `render_cloud_init` renders (with
the test apt signing key as its input), offline: Headscale answers as
controlplane.tailscale.com, the local repositories as pkgs.tailscale.com and
deb.debian.org. Boots take a minute or more under TCG, so one VM per image
goes through its life in order (first boot, upgrade, reboot, hard reset,
power-off), one test class per VM; `make test-boot` runs the classes side by
side, one pytest-xdist worker each (`-k Debian13` runs one image).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest

from builders.cloud_init import AUTH_KEY_PATH, GUARD_UNIT
from tests.datapath.topology import INTERNET_IP, ROUTER, wait_for
from tests.support.exit_vm import BootedVm, BootNet, VmFactory

from .conftest import PEER, TimingRecorder

pytestmark = pytest.mark.boot

# Under TCG a first boot (cloud-init installing the packages) takes minutes.
# Under TCG on a shared 2-core machine a first boot took 13 min (cloud-init
# installing the packages), a reboot 3.
FIRST_BOOT_TIMEOUT = 1500
REBOOT_TIMEOUT = 600


def _first(pattern: str, journal: str) -> float | None:
    """The monotonic time of the first journal line matching `pattern`."""
    for line in journal.splitlines():
        m = re.match(r"\[\s*([0-9.]+)\]", line)
        if m and re.search(pattern, line):
            return float(m.group(1))
    return None


def assert_guarded(node: BootedVm) -> None:
    """The guard chain is first in mangle INPUT (IPv4 and IPv6), and it was in
    place before tailscaled started in this boot (so before any tailnet address)."""
    for ipt in ("iptables", "ip6tables"):
        rules = node.vm.sh(f"{ipt} -w -t mangle -S INPUT").out.splitlines()
        assert rules[:2] == ["-P INPUT ACCEPT", "-A INPUT -j TSE-GUARD"], f"{ipt} mangle INPUT: {rules}"
        chain = node.vm.sh(f"{ipt} -w -t mangle -S TSE-GUARD").out
        assert "-i tailscale0 -j DROP" in chain, chain
    journal = node.journal("-b -u tailscaled.service -u " + GUARD_UNIT)
    guarded = _first(rf"Finished {re.escape(GUARD_UNIT)}", journal)
    tailscaled = _first(r"Start(ing|ed) tailscaled\.service", journal)
    assert guarded is not None, journal
    assert tailscaled is not None, journal
    assert guarded < tailscaled, journal


def online_at(node: BootedVm) -> float:
    """Seconds from the kernel's start to tailscaled reaching Running in this boot (the guest's
    monotonic clock: power-on to online, less the firmware's fraction of a second)."""
    running = r"Switching ipn state \w+ -> Running"
    return float(
        wait_for(
            "tailscaled Running in this boot",
            lambda: _first(running, node.journal("-b -u tailscaled.service")),
            REBOOT_TIMEOUT,
            interval=2,
        )
    )


def assert_no_ordering_cycle(node: BootedVm) -> None:
    journal = node.journal("-b")
    cycles = [line for line in journal.splitlines() if re.search(r"ordering cycle|Job .* deleted to break", line, re.I)]
    assert not cycles, "\n".join(cycles)


@dataclass(frozen=True)
class NetworkService:
    """What brings an image's network up at boot: the unit, and the
    configuration cloud-init rendered for it at the first boot."""

    unit: str
    config: str


# Both images configure eth0 with ifupdown, as Hetzner's Debian images do
# (scripts/build-boot-image.sh: ifupdown with isc-dhcp-client on 12, with
# dhcpcd-base on 13): at the first boot cloud-init's ENI renderer writes eth0's
# stanzas from the datasource's network config (the seed's has Hetzner's shape:
# IPv4 by DHCP, a static IPv6 /64; conftest.hetzner_network_config), and
# networking.service (`ifup -a`) raises them at every boot.
NETWORK = {
    "debian-12": NetworkService("networking.service", "/etc/network/interfaces.d/50-cloud-init"),
    "debian-13": NetworkService("networking.service", "/etc/network/interfaces.d/50-cloud-init"),
}


def _unit_state(node: BootedVm, unit: str) -> dict[str, str]:
    out = node.vm.sh(f"systemctl show -p ActiveState,SubState,Result,Job {unit}", check=False).out
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def assert_network_up(node: BootedVm) -> None:
    """The image's own network service raised eth0 in this boot from the
    configuration cloud-init rendered at the first boot: it ran to the end and
    succeeded (waited for: the node can be online before the unit has
    finished), eth0 has the VM's public address and the default route through
    its gateway, and the static IPv6 address."""
    svc = NETWORK[node.image.name]
    conf = node.vm.sh(f"cat {svc.config}").out
    for stanza in (r"^auto eth0$", r"^iface eth0 inet dhcp$", r"^iface eth0 inet6 static$"):
        assert re.search(stanza, conf, re.M), conf
    first = _unit_state(node, svc.unit)

    def settled() -> dict[str, str] | None:
        st = _unit_state(node, svc.unit)
        return st if not st.get("Job") and st.get("ActiveState") in ("active", "failed", "inactive") else None

    try:
        state = wait_for(f"{svc.unit} to settle", settled, 300, interval=2)
    except TimeoutError:
        state = _unit_state(node, svc.unit)
    diag = node.vm.sh(
        f"systemctl status --no-pager {svc.unit} ifup@eth0.service | head -30; systemctl list-jobs --no-pager;"
        f" journalctl -b --no-pager -o short-monotonic -u {svc.unit} -u ifup@eth0.service | tail -30",
        check=False,
        timeout=300,
    ).out
    assert (state.get("ActiveState"), state.get("Result")) == ("active", "success"), (
        f"{svc.unit} at first look {first}, then {state}\n{diag}"
    )
    journal = node.journal(f"-b -u {svc.unit}")
    assert _first(rf"Finished {re.escape(svc.unit)}", journal) is not None, journal
    assert node.public_ip in node.vm.sh("ip -4 -o addr show dev eth0").out
    assert f"default via {node.gateway} dev eth0" in node.vm.sh("ip -4 route show default").out
    # The static IPv6 address of the seed's network config (Hetzner's shape).
    assert f"2001:db8:{node.index}::1/64" in node.vm.sh("ip -6 -o addr show dev eth0").out


def node_routes(node: BootedVm) -> dict[str, set[str]]:
    n = node.node()
    assert n is not None
    return {
        "available": set(n.get("available_routes") or n.get("availableRoutes") or []),
        "approved": set(n.get("approved_routes") or n.get("approvedRoutes") or []),
    }


def peer_tcp(net: BootNet, ip: str, port: int, role: str = PEER) -> bool:
    """Whether a TCP connection from `role` to ip:port opens (5 s)."""
    script = f"exec 3<>/dev/tcp/{ip}/{port}"
    p = net.topo.run(role, ["timeout", "5", "bash", "-c", script], check=False, timeout=15)
    return p.returncode == 0


def tailnet_ip(node: BootedVm) -> str:
    return node.vm.sh("tailscale ip -4").out.strip()


def _peer_uses_exit_node(net: BootNet) -> bool:
    return "default dev tailscale0" in net.topo.run(PEER, ["ip", "route", "show", "table", "52"]).stdout


def assert_exit_traffic(node: BootedVm) -> None:
    """From the peer, through the VM as its exit node: the internet sees the VM's public address."""
    net = node.net
    net.topo.ts(PEER, "set", f"--exit-node={tailnet_ip(node)}")
    try:

        def seen() -> str:
            p = net.topo.run(PEER, ["curl", "-sS", "--max-time", "5", f"http://{INTERNET_IP}/ip"], check=False)
            return p.stdout.strip() if p.returncode == 0 else ""

        assert wait_for("traffic through the exit node", seen, 60, interval=2) == node.public_ip
    finally:
        net.topo.ts(PEER, "set", "--exit-node=")


def apt_diagnostics(node: BootedVm) -> str:
    """What apt and cloud-init said, for a failure message."""
    return node.vm.sh(
        "grep -E '^(W|E|Err|Ign)[:]|WARNING|ERROR' /var/log/cloud-init-output.log /var/log/cloud-init.log | tail -40;"
        " ls -l /etc/apt/cloud-init.gpg.d /etc/apt/sources.list.d; cat /etc/apt/sources.list.d/*",
        check=False,
    ).out


def _node_id(node: BootedVm) -> str:
    n = node.node()
    assert n is not None, f"{node.hostname} is not in Headscale"
    return str(n["id"])


@pytest.fixture(scope="class")
def node(request: pytest.FixtureRequest, make_vm: VmFactory) -> BootedVm:
    """The class's VM, booted when its first test needs it."""
    image: str = request.cls.image
    node = make_vm(image, image.replace("ebian-", ""))
    node.vm.wait_agent(FIRST_BOOT_TIMEOUT)
    return node


@pytest.fixture(scope="class")
def broken(make_vm: VmFactory) -> BootedVm:
    node = make_vm("debian-12", "nonft", cmdline="module_blacklist=nf_tables")
    node.vm.wait_agent(FIRST_BOOT_TIMEOUT)
    return node


class ExitNodeLife:
    """One VM's life in the order of its tests: first boot, the nightly
    upgrade, reboot, hard reset, power-off. One subclass per image; `make
    test-boot` runs each class on its own pytest-xdist worker (--dist
    loadscope), each with its own topology, so the VMs live side by side."""

    image: ClassVar[str]

    def test_first_boot_cloud_init_done_without_errors(self, node: BootedVm) -> None:
        node.wait_cloud_init(FIRST_BOOT_TIMEOUT)
        # What this boot's cloud-init run did: every stage finished, no errors,
        # no recoverable errors (warnings), in cloud-init's own records.
        errors = node.cloud_init_file("result.json")["v1"]["errors"]
        assert errors == [], f"{errors}\n{apt_diagnostics(node)}"
        stages = node.cloud_init_file("status.json")["v1"]
        for stage in ("init-local", "init", "modules-config", "modules-final"):
            assert stages[stage]["finished"], (stage, stages[stage])
            assert stages[stage]["errors"] == [], (stage, stages[stage])
            assert not stages[stage].get("recoverable_errors"), (stage, stages[stage])
        # `cloud-init status` itself: the up script turned cloud-init off after
        # the join (its marker file), and from then on it says so instead of "done".
        status = node.cloud_init_status()
        assert status["status"] in ("done", "disabled"), status
        assert status["errors"] == [], status
        assert not status.get("recoverable_errors"), status
        if status["status"] == "disabled":
            assert status.get("boot_status_code") == "disabled-by-marker-file", status

    def test_first_boot_joins_with_rendered_hostname_and_advertises_exit_routes(
        self, node: BootedVm, boot_timings: TimingRecorder
    ) -> None:
        node.wait_online(120)
        boot_timings.record(node.image.name, "first boot: power-on to online (s)", online_at(node))
        n = node.node()
        assert n is not None
        assert n.get("given_name") == node.hostname or n.get("name") == node.hostname, n
        assert {"0.0.0.0/0", "::/0"} <= node_routes(node)["available"]

    def test_first_boot_guard_first_before_tailscaled_and_forwarding_on(self, node: BootedVm) -> None:
        assert_guarded(node)
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            assert node.vm.sh(f"sysctl -n {key}").out.strip() == "1", key

    def test_first_boot_serves_nothing_to_the_tailnet(self, node: BootedVm) -> None:
        net = node.net
        n = node.node()
        assert n is not None
        net.topo.hs("nodes", "approve-routes", "--identifier", str(n["id"]), "--routes", "0.0.0.0/0,::/0")
        # sshd listens: the router (the internet side, no Hetzner firewall here) reaches it.
        assert peer_tcp(net, node.public_ip, 22, role=ROUTER)
        # From the tailnet: neither its tailnet address nor, through it as exit
        # node, its public address.
        assert not peer_tcp(net, tailnet_ip(node), 22)
        net.topo.ts(PEER, "set", f"--exit-node={tailnet_ip(node)}")
        try:
            wait_for("peer routes through the exit node", lambda: _peer_uses_exit_node(net), 30)
            assert not peer_tcp(net, node.public_ip, 22)
        finally:
            net.topo.ts(PEER, "set", "--exit-node=")

    def test_first_boot_traffic_through_the_exit_node(self, node: BootedVm) -> None:
        assert_exit_traffic(node)

    def test_no_copy_of_the_auth_key_in_any_file_after_the_join(self, node: BootedVm) -> None:
        # Every file on the VM's disk (/var/lib/cloud included; /proc, /sys, /run
        # and other non-disk mounts excluded). The raw blocks are searched after
        # the power-off below.
        found = node.vm.sh(
            f"find / -xdev -type f -print0 | xargs -0 grep -lF -e '{node.auth_key}' -- || true", timeout=600
        ).out
        assert found.strip() == "", found
        assert node.vm.sh("test -e /etc/cloud/cloud-init.disabled", check=False).rc == 0

    def test_nightly_upgrade_installs_the_newer_tailscale_and_stays_guarded(self, node: BootedVm) -> None:
        node_id = _node_id(node)
        node.net.publish_upgrade(node.image)
        node.vm.sh("apt-get update -q", timeout=180)
        # apt saw the newer package: its lists were fetched again, not kept (a 304).
        policy = node.vm.sh("apt-cache policy tailscale").out
        candidate = re.search(r"Candidate: (\S+)", policy)
        assert candidate and candidate.group(1) == node.image.upgrade_version, (
            policy + "\n" + "\n".join(node.net.apt_requests(node.image)[-8:])
        )
        dry = node.vm.sh("unattended-upgrade --dry-run -d 2>&1", timeout=300).out
        assert re.search(r"Packages that will be upgraded:.*\btailscale\b", dry), dry
        node.vm.sh("unattended-upgrade -d 2>&1", timeout=300)
        version = node.vm.sh("dpkg-query -W -f '${Version}' tailscale").out.strip()
        assert version == node.image.upgrade_version
        # The package restarted tailscaled: the node stays, guarded, not logged out.
        node.wait_online(120)
        assert _node_id(node) == node_id
        assert_guarded(node)

    def test_reboot_comes_back_online_guarded_without_a_key(self, node: BootedVm, boot_timings: TimingRecorder) -> None:
        node_id = _node_id(node)
        t0 = time.monotonic()
        node.vm.send_only("systemctl reboot")
        wait_for("the node to go offline", lambda: not node.online(), 120, interval=1)
        node.vm.forget_agent_output()
        node.vm.wait_agent(REBOOT_TIMEOUT)
        node.wait_online(REBOOT_TIMEOUT)
        boot_timings.record(node.image.name, "reboot: `systemctl reboot` to online (s)", time.monotonic() - t0)
        boot_timings.record(node.image.name, "reboot: power-on to online (s)", online_at(node))
        # The same node, not a new registration (the key was single-use and is gone).
        assert _node_id(node) == node_id
        assert node.vm.sh(f"test -e {AUTH_KEY_PATH}", check=False).rc != 0
        assert_no_ordering_cycle(node)
        assert_network_up(node)
        assert_guarded(node)
        # Still the upgraded package, started again after the reboot.
        assert node.vm.sh("dpkg-query -W -f '${Version}' tailscale").out.strip() == node.image.upgrade_version
        assert_exit_traffic(node)

    def test_hard_reset_comes_back_online_guarded(self, node: BootedVm, boot_timings: TimingRecorder) -> None:
        node_id = _node_id(node)
        boot_id = node.vm.sh("cat /proc/sys/kernel/random/boot_id").out.strip()
        t0 = time.monotonic()
        node.vm.reset()
        node.vm.forget_agent_output()

        def new_boot() -> bool:
            node.vm.wait_agent(REBOOT_TIMEOUT)
            return node.vm.sh("cat /proc/sys/kernel/random/boot_id").out.strip() != boot_id

        wait_for("the VM to boot again after the reset", new_boot, REBOOT_TIMEOUT, interval=2)
        wait_for(
            "tailscaled running again",
            lambda: '"BackendState": "Running"' in node.vm.sh("tailscale status --json", check=False).out,
            REBOOT_TIMEOUT,
            interval=2,
        )
        node.wait_online(REBOOT_TIMEOUT)
        boot_timings.record(node.image.name, "hard reset: reset to online (s)", time.monotonic() - t0)
        boot_timings.record(node.image.name, "hard reset: power-on to online (s)", online_at(node))
        assert _node_id(node) == node_id
        assert_no_ordering_cycle(node)
        assert_network_up(node)
        assert_guarded(node)
        assert_exit_traffic(node)

    def test_power_off_logs_the_node_out(self, node: BootedVm) -> None:
        assert node.node() is not None
        node.vm.powerdown()
        rc = node.vm.wait_exit(120)
        assert rc == 0
        # The logout unit's ExecStop ran before tailscaled stopped: the ephemeral
        # node is gone from the control server by the time the VM is off.
        assert wait_for("the node to leave Headscale", lambda: node.node() is None, 30, interval=1)
        console = node.vm.console_log.read_text(errors="replace")
        assert "reboot: Power down" in console, node.vm.console_tail()

    def test_no_copy_of_the_auth_key_in_the_disk_blocks(self, node: BootedVm) -> None:
        # The whole disk as the guest saw it, every block, used or free (fstrim
        # discarded the freed ones through discard=unmap).
        assert not node.vm.alive()
        assert not node.vm.disk_contains(node.auth_key.encode())


class TestDebian12(ExitNodeLife):
    image = "debian-12"


class TestDebian13(ExitNodeLife):
    image = "debian-13"


class TestBrokenDocument:
    """A kernel without nf_tables: iptables (Debian's nft backend) cannot
    create the guard's chains. (ipv6.disable=1 does not break the guard:
    ip6tables-nft still works without the IPv6 stack.)"""

    def test_guard_that_cannot_install_its_rules_keeps_tailscaled_from_starting(self, broken: BootedVm) -> None:
        broken.wait_cloud_init(FIRST_BOOT_TIMEOUT)
        # The up script stopped at the guard: the document failed, visibly.
        assert broken.cloud_init_file("result.json")["v1"]["errors"] != []
        assert broken.vm.sh(f"systemctl is-failed {GUARD_UNIT}", check=False).out.strip() == "failed"
        assert broken.vm.sh("systemctl is-active tailscaled", check=False).out.strip() != "active"
        journal = broken.journal("-b -u tailscaled.service")
        assert _first(r"Started tailscaled\.service", journal) is None, journal
        assert broken.vm.sh("ip link show tailscale0", check=False).rc != 0
        assert broken.node() is None
