"""Fixtures for the real data-path tests (issue #4).

Prerequisites missing (not root, no `ip`/iptables, binaries not buildable):
the tests are skipped with the reason, except with CI=true, where that is a
hard failure. The binaries come from scripts/build-datapath-bins.sh, which
the session fixture runs (it is idempotent; the first build takes minutes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .topology import Topology, TopologyError, build_bins, missing_prerequisites, start_full


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "datapath: real tailscale/headscale data path in network namespaces (root)")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"data-path tests cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    missing = missing_prerequisites()
    if missing:
        _unavailable("; ".join(missing))
    try:
        return build_bins()
    except (TopologyError, OSError) as e:
        _unavailable(f"cannot build data-path binaries: {e}")
        raise  # unreachable


TopoFactory = Callable[..., Topology]


@pytest.fixture
def make_topology(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TopoFactory]:
    """Build a fresh full topology per call; all are torn down after the test."""
    made: list[Topology] = []

    def make(**kw: bool) -> Topology:
        t = start_full(tmp_path_factory.mktemp("dp"), bin_dir, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture(scope="module")
def base(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """One healthy topology shared by the happy-path tests of a module."""
    t = start_full(tmp_path_factory.mktemp("base"), bin_dir)
    try:
        t.wait_relay_ready()
        yield t
    finally:
        t.close()
