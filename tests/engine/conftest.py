"""Session fixtures of the engine suite: one real API server and one real
Pulumi engine (CLI, file backend, Kubernetes provider plugin) for the run.

Under CI=true a missing binary fails the run; elsewhere the suite is skipped
with the command that builds what is missing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import apiserver
from tests.support.engine import Engine, missing_engine_binaries
from tests.support.headscale import Headscale
from tests.support.tailscale_api import TailscaleAPI

STATE = Path(__file__).resolve().parents[2] / "build" / "engine"


def _missing() -> list[str]:
    return sorted(set(apiserver.missing_binaries()) | set(missing_engine_binaries()))


@pytest.fixture(scope="session")
def cluster() -> Iterator[apiserver.Cluster]:
    # The program's preflight and the tests run kubectl: the one built with the API server.
    os.environ["PATH"] = f"{apiserver.bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
    missing = _missing()
    if missing:
        message = f"not built: {', '.join(missing)}; run `make engine-bins`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    # Free ports: a `make cluster-api` or a benchmark may be running beside the suite.
    with apiserver.running(STATE / "cluster", fresh=True, ports=apiserver.Ports.free()) as running:
        yield running


@pytest.fixture(scope="session")
def engine(cluster: apiserver.Cluster) -> Iterator[Engine]:
    state = STATE / "pulumi"
    shutil.rmtree(state / "backend", ignore_errors=True)
    shutil.rmtree(state / "project", ignore_errors=True)
    yield Engine(state).setup()


# The control server behind the emulated Tailscale API, and the node that joins it (`make datapath-bins`).
TAILNET_BINARIES = ("headscale", "tailscaled", "tailscale")


@pytest.fixture
def headscale(tmp_path: Path) -> Iterator[Headscale]:
    """A real Headscale of the test's own, on loopback."""
    missing = [name for name in TAILNET_BINARIES if not (apiserver.bin_dir() / name).exists()]
    if missing:
        message = f"not built: {', '.join(missing)}; run `make datapath-bins`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with Headscale(tmp_path / "headscale").running() as running:
        yield running


@pytest.fixture
def tailnet(headscale: Headscale) -> Iterator[TailscaleAPI]:
    """A fresh tailnet: the test's Headscale behind the emulated Tailscale API."""
    with TailscaleAPI(headscale).running() as api:
        yield api
