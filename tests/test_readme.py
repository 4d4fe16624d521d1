"""The README is the front door: every command it gives exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.stacks import repo_path


def readme_make_commands() -> set[str]:
    return set(re.findall(r"`make ([a-z-]+)(?: STACK=<name>)?`", repo_path("README.md").read_text()))


MAKE = shutil.which("make") or "make"


def virtualenv_stamps() -> list[str]:
    """The Makefile's virtualenv stamps (`<venv>/.installed`), from make's own database."""
    database = subprocess.run([MAKE, "-qp"], cwd=repo_path(), capture_output=True, text=True, check=False).stdout
    return re.findall(r"^([^#\s]+/\.installed):", database, flags=re.MULTILINE)


def make(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """`make` in the repository; `path` replaces PATH (the Makefile adds Go's directory)."""
    env = os.environ if path is None else {**os.environ, "PATH": path}
    # -o: never (re)install a virtualenv here; these tests are about what comes after.
    keep = [arg for stamp in virtualenv_stamps() for arg in ("-o", stamp)]
    return subprocess.run(
        [MAKE, *keep, *args],
        cwd=repo_path(),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_every_make_command_in_the_readme_is_a_target() -> None:
    commands = readme_make_commands()
    assert {"test", "test-all", "up", "preview", "render", "destroy", "bench", "bench-datapath"} <= commands
    makefile = repo_path("Makefile").read_text()
    for target in sorted(commands):
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.MULTILINE), f"no rule for make {target}"
        done = subprocess.run(
            ["make", "-n", target, "STACK=readme"], cwd=repo_path(), capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"make {target}: {done.stderr}"
        assert "Nothing to be done" not in done.stdout, f"make {target} does nothing"


def test_ci_runs_the_readmes_whole_suite_command() -> None:
    assert "make test-all" in repo_path(".ci", "run").read_text()
    assert "`make test-all`" in repo_path("README.md").read_text()


def test_make_help_lists_every_target_the_readme_names() -> None:
    done = make("help")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}
    assert readme_make_commands() - listed == set()
    # Each with what it does.
    assert all(len(line.split()) > 1 for line in done.stdout.splitlines() if line.startswith("  "))


@pytest.mark.parametrize("target", ["up", "preview", "destroy"])
def test_without_the_pulumi_cli_make_points_to_make_render(target: str, tmp_path: Path) -> None:
    done = make(target, "STACK=dev", path=str(tmp_path))  # an empty PATH: no pulumi
    assert done.returncode != 0
    assert "The Pulumi CLI is not installed: see https://www.pulumi.com/docs/install/" in done.stdout
    assert "without it: make render STACK=dev" in done.stdout


@pytest.mark.parametrize("target", ["up", "preview"])
def test_make_checks_the_stack_file_before_pulumi_runs(target: str, tmp_path: Path) -> None:
    stack = f"test-precheck-{uuid.uuid4().hex[:8]}"
    stack_file = repo_path(f"Pulumi.{stack}.yaml")  # where pulumi and make look for it
    stack_file.write_text("config:\n  tailscale-egress:clusters:\n    context: rd\n")
    try:
        done = make(target, f"STACK={stack}", path=str(tmp_path))
    finally:
        stack_file.unlink()
    assert done.returncode != 0
    assert f"Pulumi.{stack}.yaml: invalid stack configuration:" in done.stderr
    assert "tailscale-egress:clusters: unknown key; did you mean tailscale-egress:cluster?" in done.stderr
    assert "Pulumi CLI" not in done.stdout  # refused before anything needs the CLI


def test_make_demo_on_a_machine_that_cannot_run_it_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not root (or no cgroup v1...): one clear line, exit 2, before any build or cluster."""
    from tests.support.cluster_env import Cluster
    from tools import demo

    monkeypatch.setattr(demo, "missing_prerequisites", lambda: ["needs root (network namespaces, cgroups, containerd)"])
    monkeypatch.setattr(demo, "build_all", lambda: pytest.fail("built before checking the machine"))
    monkeypatch.setattr(Cluster, "up", lambda *_: pytest.fail("started a cluster on a machine that cannot run it"))
    for command in ("check", "up"):
        assert demo.main([command]) == 2
        err = capsys.readouterr().err
        assert "sudo make demo" in err and "needs root" in err and "Linux" in err, err
    # make demo asks before it builds anything (the engine's build takes many minutes cold).
    steps = make("-n", "demo").stdout
    assert "tools/demo.py check" in steps and steps.index("tools/demo.py check") < steps.index("engine-bins"), steps
