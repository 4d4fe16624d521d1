"""The real single-node cluster, shared by every test of a run.

A cluster already up (`make cluster-up`) is used as it is and left running;
otherwise the session starts one (building what is missing) and stops it at
the end. Prerequisites missing (not root, no containerd...): the tests are
skipped with the reason, except under CI=true, where that is a failure.

The cluster is one per machine (fixed network namespaces, ports and mount
points), so a run holds a machine-wide lock for its whole session: a second
run (another clone, another CI job) waits for the first instead of tearing
down the cluster under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from tests.support.cluster_env import Cluster, ClusterError, build_all, missing_artifacts, missing_prerequisites

MACHINE_LOCK = (Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")) / "tailscale-egress-cluster.lock"
LOCK_WAIT = 3600.0  # s: longer than a whole cluster run


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    with MACHINE_LOCK.open("a") as f:
        deadline = time.monotonic() + LOCK_WAIT
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another run held {MACHINE_LOCK} for {LOCK_WAIT:.0f} s (see `fuser {MACHINE_LOCK}`)")
                if not told:
                    print(f"\nwaiting for another run's cluster to finish ({MACHINE_LOCK})", file=sys.stderr)
                    told = True
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Whether this run started the cluster (then it may also tear it down early:
# the demo test does, as `make demo-down` does).
CLUSTER_STARTED_HERE = pytest.StashKey[bool]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The demo test ends with `make demo-down`, which removes the cluster: last.
    items.sort(key=lambda item: item.path.name == "test_demo.py")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"cluster tests cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    missing = missing_prerequisites()
    if missing:
        _unavailable("; ".join(missing) + " (make cluster-up shows how)")
    urllib3.disable_warnings()
    with machine_lock():
        yield from _cluster(request)


def _cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster()
    if c.is_up():
        yield c
        return
    try:
        if missing_artifacts(c.bin):
            build_all()
        c.up(tailnet=True)  # headscale and the exit node too: the e2e suite needs them
        request.config.stash[CLUSTER_STARTED_HERE] = True
    except ClusterError as e:
        _unavailable(f"cannot start the cluster: {e}")
    try:
        yield c
    finally:
        c.down()
