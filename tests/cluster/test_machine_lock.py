"""The cluster is one per machine: two runs never drive it at once (fast, no
root: the lock alone, on a file of the test's own)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import cluster_env
from tests.support.cluster_env import LOCK_HELD_ENV, ClusterError, machine_lock

# Another run: holds the lock (on the file given) until killed.
HOLD = """
import sys, time
from pathlib import Path
from tests.support import cluster_env
cluster_env.MACHINE_LOCK = Path(sys.argv[1])
with cluster_env.machine_lock():
    print("held", flush=True)
    time.sleep(30)
"""


@pytest.fixture
def lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cluster.lock"
    monkeypatch.setattr(cluster_env, "MACHINE_LOCK", path)
    monkeypatch.delenv(LOCK_HELD_ENV, raising=False)
    return path


def test_a_second_run_waits_for_the_first_and_then_names_the_lock(lock_file: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t = time.monotonic()
        with pytest.raises(ClusterError, match=str(lock_file)), machine_lock(wait=1.5):
            pytest.fail("took the cluster while another run held it")
        assert time.monotonic() - t >= 1.5, "gave up without waiting"
    finally:
        holder.kill()
        holder.wait()
    with machine_lock(wait=5):  # free again once the holder is gone
        pass


def test_what_the_holder_starts_goes_through_and_nobody_else(lock_file: Path) -> None:
    with machine_lock():
        # A child of the holder (the demo test's `make demo`) has the lock through its parent.
        child = subprocess.run(
            [sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ.get(sys.argv[1]) == '1' else 1)",
             LOCK_HELD_ENV], check=False,
        )  # fmt: skip
        assert child.returncode == 0
    assert LOCK_HELD_ENV not in os.environ
