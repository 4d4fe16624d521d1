"""The exit node's VM, booted for real: QEMU (TCG) booting a Debian image
built from the Debian mirror, seeded with the document `render_cloud_init`
renders, offline, on any data-path topology (tests/datapath/topology.py): the
boot suite's own, the default-stack test's and the cluster's (make demo
STACK=default).

- `load_boot_image(name)`: scripts/build-boot-image.sh builds (or reuses) the
  image's disk, kernel, initramfs, Debian mirror and Tailscale repository in
  the cache.
- `BootNet.on(topo)`: the topology's Headscale certificate from the test CA
  that the images trust (also naming controlplane.tailscale.com), and an apt
  server per image answering as pkgs.tailscale.com and deb.debian.org; each
  VM's DNS (dnsmasq on its tap device) points those names there.
- `VmBooter`: VMs booting the rendered document, the only difference being
  the test apt signing key, passed to the renderer.
- `BootingHooks`: the emulated Hetzner's servers as such VMs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from builders.cloud_init import AUTH_KEY_PATH, AptSigningKey, ExitNodeBoot, render_cloud_init
from tests.datapath.topology import (
    CONTROL_IP,
    ECHO_NAME,
    INTERNET_IP,
    LAN_IP,
    REPO,
    ROUTER,
    Proc,
    Topology,
    TopologyError,
    issue_cert,
    wait_for,
)
from tests.support.hetzner_api import PublicNet
from tests.support.vm import Vm, VmSpec, make_seed, tap_up


class BootError(RuntimeError):
    """An image could not be built."""


BUILD_SCRIPT = REPO / "scripts" / "build-boot-image.sh"
APT_SERVER = Path(__file__).resolve().parent / "apt_server.py"
CONTROL_NAME = "controlplane.tailscale.com"
PKGS_NAME = "pkgs.tailscale.com"
MIRROR_NAME = "deb.debian.org"
SECURITY_NAME = "security.debian.org"
# The apt servers' link, one address per image (their mirrors differ).
PKGS_LINK = ("198.18.0.0/24", "198.18.0.10")
APT_IP = {"debian-12": "198.18.0.12", "debian-13": "198.18.0.13"}


def cache_dir() -> Path:
    return Path(os.environ.get("TS_EGRESS_CACHE") or Path.home() / ".cache" / "tailscale-egress")


@dataclass(frozen=True)
class BootImage:
    name: str
    dir: Path
    codename: str
    tailscale_version: str
    upgrade_version: str
    signing_key: AptSigningKey

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.raw"


def load_boot_image(name: str) -> BootImage:
    """The image `name` from the cache, built first if it is missing or stale."""
    with builds_one_at_a_time():
        p = subprocess.run(["bash", str(BUILD_SCRIPT), name], capture_output=True, text=True, timeout=3000, check=False)
    if p.returncode != 0:
        raise BootError(f"{BUILD_SCRIPT} {name} failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    d = cache_dir() / "boot" / name
    keys = cache_dir() / "boot" / "keys"
    return BootImage(
        name=name,
        dir=d,
        codename=(d / "codename").read_text().strip(),
        tailscale_version=(d / "tailscale-version").read_text().strip(),
        upgrade_version=(d / "tailscale-upgrade-version").read_text().strip(),
        signing_key=AptSigningKey(
            fingerprint=(keys / "signing-key.fpr").read_text().strip(),
            armored=(keys / "signing-key.asc").read_text(),
        ),
    )


@contextlib.contextmanager
def builds_one_at_a_time() -> Iterator[None]:
    """`make test-boot`'s workers share the cache: one build (or the check
    that nothing needs building) at a time."""
    lock_path = cache_dir() / "boot" / ".build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def trust_boot_ca(topo: Topology) -> None:
    """The test CA the images trust replaces the topology's (created, its
    servers not started yet), and every certificate is issued again by it:
    Headscale's also names controlplane.tailscale.com, the VM's login
    server, and the apt servers' name Tailscale's and Debian's repositories."""
    keys = cache_dir() / "boot" / "keys"
    wd = topo.workdir
    shutil.copy(keys / "ca.crt", wd / "ca.crt")
    shutil.copy(keys / "ca.key", wd / "ca.key")
    issue_cert(wd, wd, "control", f"DNS:{CONTROL_NAME},IP:{CONTROL_IP}")
    issue_cert(wd, wd, "internet", f"DNS:{ECHO_NAME},IP:{INTERNET_IP}")
    issue_cert(wd, wd, "lan", f"IP:{LAN_IP}")
    issue_cert(wd, wd, "pkgs", f"DNS:{PKGS_NAME},DNS:{MIRROR_NAME},DNS:{SECURITY_NAME}")
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    topo.ca_bundle.write_text((system.read_text() if system.exists() else "") + (wd / "ca.crt").read_text())


@dataclass
class BootNet:
    """A topology with the apt servers' link; `peer_ip`: the boot suite's tailnet peer."""

    topo: Topology
    peer_ip: str = ""
    apt: dict[str, Proc] = field(default_factory=dict)
    next_vm: int = 1

    @classmethod
    def on(cls, topo: Topology) -> BootNet:
        """`topo` (created, its CA the images' one: trust_boot_ca) with the apt servers' link."""
        topo.add_leaf("pkgs", *PKGS_LINK)
        return cls(topo)

    @property
    def workdir(self) -> Path:
        return self.topo.workdir

    def start_apt(self, image: BootImage) -> None:
        """The apt server of `image`, serving www-1 (the first boot's repositories)."""
        if image.name in self.apt:
            return
        ip = APT_IP[image.name]
        self.topo.run("pkgs", ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        root = self.workdir / f"www-{image.name}"
        root.symlink_to(image.dir / "www-1")
        log = self.workdir / f"apt-{image.name}.log"
        log.touch()
        p = self.topo.spawn(
            "pkgs",
            f"apt-{image.name}",
            [
                sys.executable,
                str(APT_SERVER),
                "--addr",
                ip,
                "--root",
                str(root),
                "--cert",
                str(self.workdir / "pkgs.crt"),
                "--key",
                str(self.workdir / "pkgs.key"),
                "--log",
                str(log),
            ],
        )
        wait_for(f"apt server {image.name}", lambda: "ready" in p.log.read_text() or not p.alive(), 15)
        if not p.alive():
            raise TopologyError(f"apt server exited:\n{p.tail()}")
        self.apt[image.name] = p

    def publish_upgrade(self, image: BootImage) -> None:
        """Tailscale publishes a newer package: the server now serves www-2."""
        root = self.workdir / f"www-{image.name}"
        tmp = root.with_name(root.name + ".new")
        tmp.symlink_to(image.dir / "www-2")
        tmp.replace(root)

    def apt_requests(self, image: BootImage) -> list[str]:
        return (self.workdir / f"apt-{image.name}.log").read_text().splitlines()


@dataclass
class BootedVm:
    """One exit-node VM, its network (tap, dnsmasq) and what it was booted with."""

    vm: Vm
    net: BootNet
    image: BootImage
    hostname: str
    auth_key: str
    user_data: str
    index: int

    @property
    def public_ip(self) -> str:
        return f"198.19.{self.index}.10"

    @property
    def ipv6_prefix(self) -> str:
        """Its /64's address (hetzner_network_config gives it ::1 of it)."""
        return f"2001:db8:{self.index}::"

    @property
    def gateway(self) -> str:
        return f"198.19.{self.index}.1"

    def node(self) -> dict[str, Any] | None:
        return self.net.topo.node(self.hostname)

    def online(self) -> bool:
        n = self.node()
        return bool(n and n.get("online"))

    def wait_online(self, timeout: float) -> float:
        t0 = time.monotonic()
        wait_for(f"{self.hostname} online in Headscale", self.online, timeout, interval=1)
        return time.monotonic() - t0

    def wait_cloud_init(self, timeout: float) -> None:
        """Until cloud-init's last stage has written its result (`cloud-init
        status --wait` returns early once the up script has disabled cloud-init)."""
        self.vm.sh(
            f"for i in $(seq {int(timeout)}); do [ -e /run/cloud-init/result.json ] && exit 0; sleep 1; done; exit 1",
            timeout=timeout + 30,
        )

    def cloud_init_status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.vm.sh("cloud-init status --format json", check=False).out)
        return status

    def cloud_init_file(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.vm.sh(f"cat /run/cloud-init/{name}").out)
        return data

    def journal(self, args: str = "-b") -> str:
        return self.vm.sh(f"journalctl --no-pager -o short-monotonic {args}", timeout=300, check=False).out


VmFactory = Callable[..., BootedVm]


def hetzner_network_config(mac: str, index: int) -> str:
    """The network configuration Hetzner's metadata service gives a server
    with IPv4 and IPv6 (the program enables both): version 1, eth0 by its MAC,
    DHCP for IPv4 and the server's /64 as a static address with fe80::1 as
    gateway (here from the documentation prefix; nothing routes it). Without
    one, cloud-init falls back to DHCP on the first NIC, and from 24.x (trixie's
    25.1) for IPv6 as well: its ENI stanza `iface eth0 inet6 dhcp` needs a
    DHCPv6 client that ifupdown finds only in isc-dhcp-client, so on Debian 13
    (dhcpcd-base) `ifup -a` failed ("No DHCPv6 client software found!"),
    networking.service failed and took eth0's lease down with its dhcpcd."""
    return f"""version: 1
config:
  - type: physical
    name: eth0
    mac_address: "{mac}"
    subnets:
      - type: dhcp
        ipv4: true
      - type: static
        ipv6: true
        address: "2001:db8:{index}::1/64"
        gateway: "fe80::1"
"""


class VmBooter:
    """Exit-node VMs on `net`, each on its own tap device of the router."""

    def __init__(self, net: BootNet, load_image: Callable[[str], BootImage] = load_boot_image) -> None:
        self.net = net
        self.load_image = load_image
        self.images: dict[str, BootImage] = {}
        self.made: list[tuple[BootedVm, Proc]] = []

    def image(self, name: str) -> BootImage:
        if name not in self.images:
            self.images[name] = self.load_image(name)
        return self.images[name]

    def make(
        self, image_name: str, name: str, cmdline: str = "", start: bool = True, boot: ExitNodeBoot | None = None
    ) -> BootedVm:
        """A VM of `image_name` booting the rendered document: of `boot` when
        given (a server the emulated Hetzner was asked for), else of a new
        hostname and a fresh single-use key of the topology's Headscale."""
        image = self.image(image_name)
        self.net.start_apt(image)
        index = self.net.next_vm
        self.net.next_vm += 1
        tap = f"tap-{name}"[:15]
        topo = self.net.topo
        tap_up(topo.ns(ROUTER), tap, f"198.19.{index}.1/24")
        apt_ip = APT_IP[image.name]
        dns = topo.spawn(
            ROUTER,
            f"dnsmasq-{name}",
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                f"--interface={tap}",
                "--except-interface=lo",
                f"--listen-address=198.19.{index}.1",
                f"--dhcp-range=198.19.{index}.10,198.19.{index}.10,255.255.255.0,1h",
                "--dhcp-authoritative",
                f"--dhcp-leasefile={topo.workdir / f'{name}.leases'}",
                f"--pid-file={topo.workdir / f'{name}.dnsmasq.pid'}",
                f"--address=/{CONTROL_NAME}/{CONTROL_IP}",
                f"--address=/{PKGS_NAME}/{apt_ip}",
                f"--address=/{MIRROR_NAME}/{apt_ip}",
                f"--address=/{SECURITY_NAME}/{apt_ip}",
                "--log-queries",
                "--log-dhcp",
            ],
        )
        if boot is not None and boot.image != image.name:
            raise ValueError(f"the document is for {boot.image}, the VM would boot {image.name}")
        if boot is None:
            auth_key = topo.preauth_key(ephemeral=True, reusable=False)
            boot = ExitNodeBoot(hostname=f"tse-exit-{name}-{secrets.token_hex(2)}", image=image.name, auth_key=auth_key)
        hostname, auth_key = boot.hostname, boot.auth_key
        user_data = render_cloud_init(boot, signing_key=image.signing_key)
        workdir = topo.workdir / "vm" / name
        workdir.mkdir(parents=True)
        seed = workdir / "seed.iso"
        mac = f"52:54:00:7e:00:{index:02x}"
        make_seed(
            seed,
            user_data,
            instance_id=f"i-{name}-{secrets.token_hex(4)}",
            hostname=hostname,
            network_config=hetzner_network_config(mac, index),
        )
        spec = VmSpec(
            name=name,
            workdir=workdir,
            kernel=image.kernel,
            initrd=image.initrd,
            base_disk=image.disk,
            netns=topo.ns(ROUTER),
            tap=tap,
            mac=mac,
            cmdline=cmdline,
        )
        booted = BootedVm(Vm(spec, seed), self.net, image, hostname, auth_key, user_data, index)
        self.made.append((booted, dns))
        if start:
            booted.vm.start()
        return booted

    def close(self) -> None:
        for booted, dns in self.made:
            booted.vm.kill()
            dns.stop()
            with contextlib.suppress(subprocess.SubprocessError):
                self.net.topo.run(ROUTER, ["ip", "link", "del", booted.vm.spec.tap], check=False)
        self.made.clear()


@dataclass
class BootingHooks:
    """The emulated Hetzner's servers are real VMs: created, one boots the
    document the provider sent; the ACPI shutdown presses its power button
    and waits until it is off; deleted, it is gone."""

    make_vm: VmFactory
    vms: dict[str, BootedVm] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def on_server_created(self, server: dict[str, Any], user_data: str) -> PublicNet:
        document = yaml.safe_load(user_data)
        (auth_key,) = [f["content"] for f in document["write_files"] if f["path"] == AUTH_KEY_PATH]
        boot = ExitNodeBoot(hostname=document["hostname"], image=server["image"]["name"], auth_key=auth_key)
        if render_cloud_init(boot) != user_data:
            self.problems.append(f"{server['name']}: the user_data sent is not the rendered document")
        self.events.append(("created", server["name"]))
        vm = self.make_vm(boot.image, f"s{server['id']}", boot=boot)
        self.vms[server["name"]] = vm
        return PublicNet(ipv4=vm.public_ip, ipv6=f"{vm.ipv6_prefix}/64")

    def on_server_shutdown(self, server: dict[str, Any], command: Literal["shutdown", "poweroff"]) -> None:
        self.events.append((command, server["name"]))
        vm = self.vms[server["name"]].vm
        if command == "shutdown":
            vm.powerdown()
            vm.wait_exit(180)
        else:
            vm.kill()

    def on_server_deleted(self, server: dict[str, Any]) -> None:
        self.events.append(("deleted", server["name"]))
        self.vms.pop(server["name"]).vm.kill()
