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

import os
from collections.abc import Iterator

import pytest
import urllib3

from tests.support.cluster_env import (
    Cluster,
    ClusterError,
    build_all,
    machine_lock,
    missing_artifacts,
    missing_prerequisites,
)

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
    try:
        with machine_lock():
            yield from _cluster(request)
    except ClusterError as e:
        pytest.fail(str(e), pytrace=False)


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
