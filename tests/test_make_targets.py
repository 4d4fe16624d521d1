"""The Makefile's user targets: each acts only on a stack the user named,
destroy only on one named on its command line, the Pulumi CLI is looked for
before anything is installed, and `make help` shows the user's targets first."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.stacks import repo_path

MAKE = shutil.which("make") or "make"
USER_TARGETS = ["up", "preview", "destroy", "verify", "render", "exit-node-guard", "demo"]
STACK_TARGETS = ["up", "preview", "destroy", "verify", "render"]
# Never (re)install a virtualenv here: these tests are about what comes around it.
STAMPS = [".venv/.installed", ".venv/.deploy/.installed", "policy/venv/.installed"]


def make(
    *args: str, path: str | None = None, env: dict[str, str] | None = None, keep_venvs: bool = True
) -> subprocess.CompletedProcess[str]:
    keep = [arg for stamp in STAMPS for arg in ("-o", stamp)] if keep_venvs else []
    environment = {k: v for k, v in os.environ.items() if k != "STACK"} | (env or {})
    if path is not None:
        environment["PATH"] = path
    return subprocess.run(
        [MAKE, "--no-print-directory", *keep, *args],
        cwd=repo_path(),
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )


def stub_pulumi(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose `pulumi` only records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pulumi.log"
    (bin_dir / "pulumi").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bin_dir / "pulumi").chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin", log


@pytest.mark.parametrize("target", STACK_TARGETS)
def test_a_stack_target_without_a_stack_names_what_to_type_and_does_nothing(target: str, tmp_path: Path) -> None:
    path, log = stub_pulumi(tmp_path)
    done = make(target, path=path)
    assert done.returncode == 2
    assert f"make {target} STACK=<stack>" in done.stderr
    assert "pulumi stack init <you>" in done.stderr or target == "destroy"
    assert not log.exists(), "pulumi ran without a named stack"


def test_destroy_never_takes_the_stack_from_the_environment(tmp_path: Path) -> None:
    path, log = stub_pulumi(tmp_path)
    done = make("destroy", path=path, env={"STACK": "dev"})
    assert done.returncode == 2
    assert "name it on the command line, make destroy STACK=<stack>" in done.stderr
    assert not log.exists()
    named = make("destroy", "STACK=alice", path=path)
    assert named.returncode == 0, named.stderr
    # Only that stack, and never created by the destroy.
    assert log.read_text().splitlines() == ["destroy --stack alice"]


def test_without_the_cli_make_up_says_so_before_installing_anything(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = subprocess.run(
        [MAKE, "--no-print-directory", "up", "STACK=alice", f"VENV={venv}"],
        cwd=repo_path(),
        env={**os.environ, "PATH": str(tmp_path)},  # no pulumi, no pip
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert done.stdout.startswith("The Pulumi CLI is not installed: see https://www.pulumi.com/docs/install/")
    assert "make render STACK=alice" in done.stdout
    assert not venv.exists(), "a virtualenv was made before the CLI was found"


@pytest.mark.parametrize("target", ["up", "preview"])
def test_the_stack_file_is_checked_before_pulumi_runs(target: str, tmp_path: Path) -> None:
    path, log = stub_pulumi(tmp_path)
    stack = f"test-precheck-{uuid.uuid4().hex[:8]}"
    stack_file = repo_path(f"Pulumi.{stack}.yaml")
    stack_file.write_text("config:\n  tailscale-egress:clusters:\n    context: rd\n")
    try:
        done = make(target, f"STACK={stack}", path=path)
    finally:
        stack_file.unlink()
    assert done.returncode != 0
    assert "tailscale-egress:clusters: unknown key; did you mean tailscale-egress:cluster?" in done.stderr
    assert not log.exists(), "pulumi ran on a bad stack file"


def test_deploying_installs_the_programs_requirements_not_the_dev_toolchain() -> None:
    # -n -W: what make would run with requirements.txt changed, without running it.
    steps = make("-n", "up", "STACK=alice", "-W", "requirements.txt", keep_venvs=False).stdout
    installs = re.findall(r"pip install .*-r (\S+)", steps)
    assert installs == ["requirements.txt"], steps
    changed = ("-W", "requirements.txt", "-W", "policy/requirements.txt")
    preview = make("-n", "preview", "STACK=alice", *changed, keep_venvs=False).stdout
    assert re.findall(r"pip install .*-r (\S+)", preview) == ["requirements.txt", "policy/requirements.txt"]
    assert preview.index("command -v pulumi") < preview.index("pip install")


def test_make_help_lists_the_users_targets_first_in_groups() -> None:
    done = make("help")
    assert done.returncode == 0, done.stderr
    targets = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    targets.remove("help")
    assert targets[: len(USER_TARGETS)] == USER_TARGETS
    groups = [line for line in done.stdout.splitlines() if line and not line.startswith(("  ", "make "))]
    assert len(groups) >= 4 and groups[0].startswith("Deploy and use your stack"), groups
    assert "there is no default" in done.stdout.splitlines()[0]
