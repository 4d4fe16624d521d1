"""Fixtures for the boot tests (issue 17): the exit node's rendered cloud-init
document booted in a real QEMU VM, offline.

- `boot_image(image)`: scripts/build-boot-image.sh builds (or reuses) the
  image's disk, kernel, initramfs, Debian mirror and Tailscale repository in
  the cache.
- `net`: the data-path topology (tests/datapath/topology.py: router,
  Headscale, the "internet" echo server) plus an apt server per image and a
  tailnet peer. Headscale answers as controlplane.tailscale.com, the apt
  server as pkgs.tailscale.com and deb.debian.org, with certificates from
  the test CA that the image trusts; each VM's DNS (dnsmasq on its tap
  device) points those names there.
- `make_vm`: a VM booting the document `render_cloud_init` renders, the only
  difference being the test apt signing key, passed to the renderer.

Not root, no /dev/net/tun, tools or binaries missing: skipped with the reason,
except under CI=true, where that fails.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from builders.cloud_init import AptSigningKey, ExitNodeBoot, render_cloud_init
from tests.datapath.topology import (
    CONTROL_IP,
    REPO,
    ROUTER,
    Proc,
    Topology,
    TopologyError,
    build_bins,
    missing_prerequisites,
    wait_for,
)
from tests.support.tools import in_ci
from tests.support.vm import Vm, VmSpec, make_seed, tap_up

BUILD_SCRIPT = REPO / "scripts" / "build-boot-image.sh"
HERE = Path(__file__).resolve().parent
CONTROL_NAME = "controlplane.tailscale.com"
PKGS_NAME = "pkgs.tailscale.com"
MIRROR_NAME = "deb.debian.org"
SECURITY_NAME = "security.debian.org"
# The apt servers' link, one address per image (their mirrors differ).
PKGS_LINK = ("198.18.0.0/24", "198.18.0.10")
APT_IP = {"debian-12": "198.18.0.12", "debian-13": "198.18.0.13"}
# A tailnet peer: the relay's place, here a plain tailscaled.
PEER_LINK = ("198.18.1.0/24", "198.18.1.10")
PEER = "peer"


# Every run writes its figures here, passed or failed (docs/development.md quotes them).
TIMINGS_FILE = REPO / "build" / "boot-timings.json"


def cache_dir() -> Path:
    return Path(os.environ.get("TS_EGRESS_CACHE") or Path.home() / ".cache" / "tailscale-egress")


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"boot tests cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


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


def _boot_selected(config: pytest.Config) -> bool:
    markexpr = config.option.markexpr or ""
    return "boot" in markexpr and "not boot" not in markexpr


class BootTimings:
    """What a run measured, written to TIMINGS_FILE when the session ends
    (whatever the outcome): per image, seconds from power-on to the exit node
    online at its first boot, after `systemctl reboot` and after a hard reset;
    the suite's wall time; the machine's load (1-minute load average sampled
    every 15 s) and each test's outcome."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.UTC)
        self.images: dict[str, dict[str, float]] = {}
        self.outcomes: dict[str, str] = {}
        self.load: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(15):
            self.load.append(os.getloadavg()[0])

    def record(self, image: str, what: str, seconds: float) -> None:
        self.images.setdefault(image, {})[what] = round(seconds, 1)
        print(f"\nboot timing: {image} {what}: {seconds:.1f}")

    def write(self, path: Path) -> None:
        self._stop.set()
        self.load.append(os.getloadavg()[0])
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        data = {
            "started": self.started_at.isoformat(timespec="seconds"),
            "suite_wall_s": round(time.monotonic() - self.started, 1),
            "host": {
                "cpus": os.cpu_count(),
                "load1_mean": round(sum(self.load) / len(self.load), 2),
                "load1_max": round(max(self.load), 2),
                "load1_samples": len(self.load),
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            },
            "images": self.images,
            "outcomes": counts,
            "tests": self.outcomes,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)


_CURRENT: dict[str, BootTimings] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    timings = _CURRENT.get("timings")
    if timings is None:
        return
    if report.when == "call":
        outcome: str = report.outcome
    elif report.failed:
        outcome = "error"
    elif report.skipped:
        outcome = "skipped"
    else:
        return
    if timings.outcomes.get(report.nodeid) in (None, "passed"):
        timings.outcomes[report.nodeid] = outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    # After every test's teardown (the VMs' included): the file is written on
    # every run that booted anything, passed or failed.
    timings = _CURRENT.pop("timings", None)
    if timings is not None:
        timings.write(TIMINGS_FILE)


@pytest.fixture(scope="session")
def boot_timings(pytestconfig: pytest.Config) -> BootTimings:
    if not _boot_selected(pytestconfig):
        pytest.skip("the boot tests run with -m boot (make test-boot)")
    if "timings" not in _CURRENT:
        _CURRENT["timings"] = BootTimings()
    return _CURRENT["timings"]


@pytest.fixture(scope="session")
def bin_dir(pytestconfig: pytest.Config, boot_timings: BootTimings) -> Path:
    # Minutes of image builds and VM boots: only when asked for (make test-boot).
    if not _boot_selected(pytestconfig):
        pytest.skip("the boot tests run with -m boot (make test-boot)")
    missing = missing_prerequisites()
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun missing (tap devices)")
    if missing:
        _unavailable("; ".join(missing))
    try:
        return build_bins()
    except (TopologyError, OSError) as e:
        _unavailable(f"cannot build the data-path binaries: {e}")
        raise  # unreachable


@pytest.fixture(scope="session")
def boot_image(bin_dir: Path) -> Callable[[str], BootImage]:
    built: dict[str, BootImage] = {}

    def get(image: str) -> BootImage:
        if image not in built:
            p = subprocess.run(
                ["bash", str(BUILD_SCRIPT), image], capture_output=True, text=True, timeout=3000, check=False
            )
            if p.returncode != 0:
                _unavailable(
                    f"{BUILD_SCRIPT} {image} failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
                )
            d = cache_dir() / "boot" / image
            keys = cache_dir() / "boot" / "keys"
            built[image] = BootImage(
                name=image,
                dir=d,
                codename=(d / "codename").read_text().strip(),
                tailscale_version=(d / "tailscale-version").read_text().strip(),
                upgrade_version=(d / "tailscale-upgrade-version").read_text().strip(),
                signing_key=AptSigningKey(
                    fingerprint=(keys / "signing-key.fpr").read_text().strip(),
                    armored=(keys / "signing-key.asc").read_text(),
                ),
            )
        return built[image]

    return get


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def issue_cert(ca_dir: Path, out: Path, name: str, san: str) -> None:
    """`out`/<name>.crt and .key for `san`, signed by the boot test CA."""
    key, csr, crt, ext = (out / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_dir / "ca.crt"),
        "-CAkey",
        str(ca_dir / "ca.key"),
        "-CAcreateserial",
        "-CAserial",
        str(out / "ca.srl"),
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )


@dataclass
class BootNet:
    topo: Topology
    peer_ip: str = ""
    apt: dict[str, Proc] = field(default_factory=dict)
    next_vm: int = 1

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
                str(HERE / "apt_server.py"),
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


@pytest.fixture(scope="session")
def net(
    bin_dir: Path, boot_image: Callable[[str], BootImage], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootNet]:
    boot_image("debian-12")  # the keys and the CA come with it
    keys = cache_dir() / "boot" / "keys"
    topo = Topology(tmp_path_factory.mktemp("boot"), bin_dir)
    # The emulated Tailscale API writes the tailnet policy there (test_default_stack.py).
    topo.hs_policy_in_database = True
    try:
        topo.create()
        # The test CA the image trusts replaces the topology's: Headscale's
        # certificate also names controlplane.tailscale.com, the VM's login server.
        wd = topo.workdir
        shutil.copy(keys / "ca.crt", wd / "ca.crt")
        shutil.copy(keys / "ca.key", wd / "ca.key")
        issue_cert(wd, wd, "control", f"DNS:{CONTROL_NAME},IP:{CONTROL_IP}")
        issue_cert(wd, wd, "pkgs", f"DNS:{PKGS_NAME},DNS:{MIRROR_NAME},DNS:{SECURITY_NAME}")
        system = Path("/etc/ssl/certs/ca-certificates.crt")
        topo.ca_bundle.write_text((system.read_text() if system.exists() else "") + (wd / "ca.crt").read_text())
        topo.start_control()
        topo.start_echo()
        topo.add_leaf("pkgs", *PKGS_LINK)
        b = BootNet(topo)
        key = topo.preauth_key(ephemeral=False, reusable=True)
        b.peer_ip = topo.start_tailnet_node(PEER, PEER_LINK[0], PEER_LINK[1], key)
        yield b
    finally:
        topo.close()


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


@pytest.fixture(scope="module")
def make_vm(net: BootNet, boot_image: Callable[[str], BootImage]) -> Iterator[VmFactory]:
    made: list[tuple[BootedVm, Proc]] = []

    def make(
        image_name: str, name: str, cmdline: str = "", start: bool = True, boot: ExitNodeBoot | None = None
    ) -> BootedVm:
        """A VM of `image_name` booting the rendered document: of `boot` when
        given (a server the emulated Hetzner was asked for), else of a new
        hostname and a fresh single-use key of the topology's Headscale."""
        image = boot_image(image_name)
        net.start_apt(image)
        index = net.next_vm
        net.next_vm += 1
        tap = f"tap-{name}"[:15]
        topo = net.topo
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
        booted = BootedVm(Vm(spec, seed), net, image, hostname, auth_key, user_data, index)
        made.append((booted, dns))
        if start:
            booted.vm.start()
        return booted

    yield make
    for booted, dns in made:
        booted.vm.kill()
        dns.stop()
        with contextlib.suppress(subprocess.SubprocessError):
            net.topo.run(ROUTER, ["ip", "link", "del", booted.vm.spec.tap], check=False)
