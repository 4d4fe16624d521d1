"""Fixtures for the boot tests (issue 17): the exit node's rendered cloud-init
document booted in a real QEMU VM, offline (tests/support/exit_vm.py).

- `boot_image(image)`: the image from the cache, built first if need be.
- `net`: the data-path topology (tests/datapath/topology.py: router,
  Headscale, the "internet" echo server) with the images' CA and apt
  servers (exit_vm.BootNet), plus a tailnet peer.
- `make_vm`: a VM booting the document `render_cloud_init` renders, the only
  difference being the test apt signing key, passed to the renderer.
- `boot_timings`: a test's boot figures, written with each test's outcome
  and the machine's load to build/boot-timings.json.

Not root, no /dev/net/tun, tools or binaries missing: skipped with the reason,
except under CI=true, where that fails.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tests.datapath.topology import (
    REPO,
    Topology,
    TopologyError,
    build_bins,
    missing_prerequisites,
)
from tests.support.exit_vm import (
    BootError,
    BootImage,
    BootNet,
    VmBooter,
    VmFactory,
    builds_one_at_a_time,
    load_boot_image,
    trust_boot_ca,
)
from tests.support.tools import in_ci

# A tailnet peer: the relay's place, here a plain tailscaled.
PEER_LINK = ("198.18.1.0/24", "198.18.1.10")
PEER = "peer"
# Every run writes its figures here, passed or failed (docs/development.md quotes them).
TIMINGS_FILE = REPO / "build" / "boot-timings.json"


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"boot tests cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _boot_selected(config: pytest.Config) -> bool:
    markexpr = config.option.markexpr or ""
    return "boot" in markexpr and "not boot" not in markexpr


class BootTimings:
    """What a run measured, written to TIMINGS_FILE when the session ends
    (whatever the outcome): per image, seconds from power-on to the exit node
    online at its first boot, after `systemctl reboot` and after a hard reset;
    the suite's wall time; the machine's load (1-minute load average sampled
    every 15 s) and each test's outcome.

    It lives in the process that collects the reports (pytest-xdist's
    controller when the VMs run on workers, `make test-boot`): the tests
    record their figures as the report's user properties (`TimingRecorder`)."""

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


TIMING_PROPERTY = "boot timing"


@dataclass
class TimingRecorder:
    """A test's boot figures, carried by its report to BootTimings."""

    item: pytest.Item

    def record(self, image: str, what: str, seconds: float) -> None:
        self.item.user_properties.append((TIMING_PROPERTY, (image, what, seconds)))
        print(f"\nboot timing: {image} {what}: {seconds:.1f}")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Not on a pytest-xdist worker: the controller gets every report.
    if _boot_selected(session.config) and not hasattr(session.config, "workerinput"):
        _CURRENT["timings"] = BootTimings()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    timings = _CURRENT.get("timings")
    if timings is None:
        return
    for name, value in report.user_properties:
        if name == TIMING_PROPERTY:
            image, what, seconds = cast(tuple[str, str, float], value)
            timings.record(image, what, seconds)
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


@pytest.fixture
def boot_timings(request: pytest.FixtureRequest) -> TimingRecorder:
    return TimingRecorder(request.node)


@pytest.fixture(scope="session")
def bin_dir(pytestconfig: pytest.Config) -> Path:
    # Minutes of image builds and VM boots: only when asked for (make test-boot).
    if not _boot_selected(pytestconfig):
        pytest.skip("the boot tests run with -m boot (make test-boot)")
    missing = missing_prerequisites()
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun missing (tap devices)")
    if missing:
        _unavailable("; ".join(missing))
    try:
        with builds_one_at_a_time():
            return build_bins()
    except (TopologyError, OSError) as e:
        _unavailable(f"cannot build the data-path binaries: {e}")
        raise  # unreachable


@pytest.fixture(scope="session")
def boot_image(bin_dir: Path) -> Callable[[str], BootImage]:
    built: dict[str, BootImage] = {}

    def get(image: str) -> BootImage:
        if image not in built:
            try:
                built[image] = load_boot_image(image)
            except BootError as e:
                _unavailable(str(e))
        return built[image]

    return get


@pytest.fixture(scope="session")
def net(
    bin_dir: Path, boot_image: Callable[[str], BootImage], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootNet]:
    boot_image("debian-12")  # the keys and the CA come with it
    topo = Topology(tmp_path_factory.mktemp("boot"), bin_dir)
    # The emulated Tailscale API writes the tailnet policy there (test_default_stack.py).
    topo.hs_policy_in_database = True
    try:
        topo.create()
        trust_boot_ca(topo)
        topo.start_control()
        topo.start_echo()
        b = BootNet.on(topo)
        key = topo.preauth_key(ephemeral=False, reusable=True)
        b.peer_ip = topo.start_tailnet_node(PEER, PEER_LINK[0], PEER_LINK[1], key)
        yield b
    finally:
        topo.close()


@pytest.fixture(scope="module")
def make_vm(net: BootNet, boot_image: Callable[[str], BootImage]) -> Iterator[VmFactory]:
    booter = VmBooter(net, boot_image)
    yield booter.make
    booter.close()
