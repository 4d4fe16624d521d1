"""The README is the front door: every command it gives exists."""

from __future__ import annotations

import re
import subprocess

from tests.stacks import repo_path


def test_every_make_command_in_the_readme_is_a_target() -> None:
    readme = repo_path("README.md").read_text()
    commands = set(re.findall(r"`make ([a-z-]+)(?: STACK=<name>)?`", readme))
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
