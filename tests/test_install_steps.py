"""Each step installs what its own tests and builds run, so that CI passes on a
fresh machine: `make test` does not lean on packages a later step (the
cluster's) happened to install on an earlier run, and
scripts/build-cluster-bins.sh does not stop at "umoci not found"."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.stacks import repo_path
from tests.support import cluster_env

INSTALL = repo_path("scripts", "install-test-tools.sh")
BUILD_CLUSTER = repo_path("scripts", "build-cluster-bins.sh")

# Programs the fast suite looks up that no Debian package of its step provides,
# each with where it comes from instead.
NOT_FROM_APT = {
    "make": "it runs the suite (`make test`)",
    "go": "the machine image's /usr/local/go (Debian 12's golang is 1.19; the builds need 1.26)",
    "kubectl": "the machine image (Debian 12's kubernetes-client 1.20 has no `kubectl auth whoami`)",
    "getent": "libc-bin, an Essential package",
    "nslookup": "optional: the test uses getent when there is no nslookup",
}
# Built by `make tools` itself (Makefile), not by apt.
BUILT_BY_MAKE_TOOLS = {"nca": "$(NCA_STAMP)", "actionlint": "scripts/build-lint-bins.sh"}
LOOKUPS = re.compile(r"""(?:executable|shutil\.which|_need)\(\s*["']([^"']+)["']""")


def install_set(name: str = "") -> dict[str, str]:
    """`install-test-tools.sh --list <name>`: {program or path: Debian package}."""
    done = subprocess.run(
        ["bash", str(INSTALL), "--list", *([name] if name else [])], capture_output=True, text=True, check=True
    )
    return dict(line.split(":", 1) for line in done.stdout.splitlines())


def fast_suite_modules() -> list[Path]:
    """The default suite's test modules and the support modules they import at the top."""
    modules = sorted(repo_path("tests").glob("test_*.py"))
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.support"):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    found = repo_path(*name.split(".")).with_suffix(".py")
                    if found.is_file():
                        todo.append(found)
    return sorted(seen)


def programs_looked_up(paths: list[Path]) -> dict[str, list[str]]:
    """{program: [modules that look it up]} for `executable("x"`, `shutil.which("x"` and `_need("x"`."""
    found: dict[str, list[str]] = {}
    for path in paths:
        if path == Path(__file__):
            continue  # this module names programs in its own text, it runs none of them
        for name in LOOKUPS.findall(path.read_text()):
            found.setdefault(name, []).append(path.name)
    return found


# --- make test ---


def test_make_tests_own_step_installs_every_program_the_fast_suite_looks_up() -> None:
    needed = programs_looked_up(fast_suite_modules())
    # The scan is real: the tools these modules are known to drive are among what it finds.
    assert {"busybox", "cloud-init", "shellcheck", "nca", "actionlint", "curl"} <= set(needed)
    installed = install_set()
    uncovered = {
        name: where
        for name, where in needed.items()
        if name not in installed and name not in BUILT_BY_MAKE_TOOLS and name not in NOT_FROM_APT
    }
    assert uncovered == {}, "install them in scripts/install-test-tools.sh's default set"


def test_make_test_runs_the_install_step_and_builds_its_other_tools_first() -> None:
    steps = subprocess.run(["make", "-n", "test"], cwd=repo_path(), capture_output=True, text=True, check=True).stdout
    lines = steps.splitlines()
    pytest_line = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    install_line = next(i for i, line in enumerate(lines) if line.strip() == "bash scripts/install-test-tools.sh")
    lint_line = next(i for i, line in enumerate(lines) if "scripts/build-lint-bins.sh" in line)
    assert install_line < pytest_line and lint_line < pytest_line
    makefile = repo_path("Makefile").read_text()
    assert re.search(r"^tools: .*\$\(NCA_STAMP\)", makefile, flags=re.MULTILINE)
    # Every skip is printed with its reason, which names the command that installs what is missing.
    assert "-rs" in lines[pytest_line].split()


# --- the later steps ---


def test_the_cluster_step_installs_every_program_the_cluster_harness_needs() -> None:
    installed = install_set("--cluster")
    assert set(cluster_env.TOOLS) - set(installed) == set()
    assert "/usr/lib/cni/bridge" in installed


def test_the_datapath_step_installs_every_program_the_topology_checks() -> None:
    text = repo_path("tests", "datapath", "topology.py").read_text()
    (listed,) = re.findall(r"for tool in \(([^)]*)\):", text)
    tools = set(ast.literal_eval(f"({listed})")) - {"go"}
    assert {"ip", "iptables", "curl"} <= tools
    assert tools - set(install_set("--datapath")) == set()


def test_build_cluster_bins_installs_what_it_runs_before_building() -> None:
    text = BUILD_CLUSTER.read_text()
    checked = set(re.findall(r"command -v (\S+) ", text)) - {"go"}
    assert {"umoci", "gcc"} <= checked
    (busybox,) = re.findall(r"^BUSYBOX=(\S+)$", text, flags=re.MULTILINE)
    (multi,) = re.findall(r"^IPTABLES_MULTI=\(([^)]*)\)$", text, flags=re.MULTILINE)
    installed = install_set("--cluster-bins")
    assert (checked | {busybox, *multi.split()}) - set(installed) == set()
    main = text[text.index("\nmain() {") :]
    assert main.index('install-test-tools.sh" --cluster-bins') < main.index("for c in")


def test_the_boot_step_installs_what_the_boot_image_build_and_the_boot_suite_run() -> None:
    installed = set(install_set("--boot"))
    script = repo_path("scripts", "build-boot-image.sh").read_text()
    # The image build runs these (its own commands, and through mmdebstrap's hooks).
    for program in ("mmdebstrap", "mkfs.ext4", "dpkg-deb", "dpkg-scanpackages", "apt-ftparchive", "gpg"):
        assert re.search(rf"(^|[\s(\"']){re.escape(program)}\s", script, flags=re.MULTILINE), program
        assert program in installed, program
    assert "install-test-tools.sh --boot" in script
    # The suite: QEMU and its tools, the DHCP/DNS server, and the data-path topology it extends.
    suite = "".join(
        p.read_text()
        for p in (
            *repo_path("tests", "boot").glob("*.py"),
            repo_path("tests", "support", "vm.py"),
            repo_path("tests", "support", "exit_vm.py"),
        )
    )
    run = set(re.findall(r'"(qemu-system-x86_64|qemu-img|genisoimage|dnsmasq|openssl)"', suite))
    assert {"qemu-system-x86_64", "qemu-img", "genisoimage", "dnsmasq"} <= run
    assert run - installed == set()
    assert set(install_set("--datapath")) <= installed


# --- the scripts for real, with apt-get stubbed ---


def stub_path(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose PATH has coreutils but none of the test tools, as
    root, where `apt-get` only records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sort", "env", "flock", "mkdir", "date", "dirname", "cat", "rm"):
        real = shutil.which(tool)
        assert real is not None, tool
        (bin_dir / tool).symlink_to(real)
    log = tmp_path / "apt-get.log"
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")
    for stub in ("apt-get", "id"):
        (bin_dir / stub).chmod(0o755)
    env = {"PATH": str(bin_dir), "TMPDIR": str(tmp_path), "HOME": str(tmp_path), "TS_EGRESS_CACHE": str(tmp_path)}
    return env, log


def installed_packages(log: Path) -> set[str]:
    """The packages of every `apt-get ... install ...` call the stub saw."""
    out: set[str] = set()
    for call in log.read_text().splitlines() if log.exists() else []:
        words = call.split()
        if "install" in words:
            out |= {w for w in words[words.index("install") + 1 :] if not w.startswith("-")}
    return out


def test_on_a_fresh_machine_make_tests_step_installs_busybox_and_the_rest(tmp_path: Path) -> None:
    env, log = stub_path(tmp_path)
    done = subprocess.run(["/bin/bash", str(INSTALL)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert installed_packages(log) == {"busybox-static", "cloud-init", "curl", "gnupg", "shellcheck"}


def test_on_a_fresh_machine_build_cluster_bins_installs_umoci_itself(tmp_path: Path) -> None:
    env, log = stub_path(tmp_path)
    done = subprocess.run(
        ["/bin/bash", str(BUILD_CLUSTER), "images"], env=env, capture_output=True, text=True, check=False
    )
    # apt-get is a stub here, so umoci is still missing after the install step: the
    # build then stops, but only after asking for it.
    assert "umoci" in installed_packages(log), done.stdout + done.stderr
    assert {"gcc", "binutils"} <= installed_packages(log)
    assert done.returncode != 0 and "umoci not found" in done.stderr


def test_without_apt_under_ci_a_missing_tool_is_an_error(tmp_path: Path) -> None:
    env, _ = stub_path(tmp_path)
    (Path(env["PATH"]) / "apt-get").unlink()
    done = subprocess.run(
        ["/bin/bash", str(INSTALL)], env={**env, "CI": "true"}, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "apt-get install busybox-static cloud-init curl gnupg shellcheck" in done.stderr
    outside = subprocess.run(["/bin/bash", str(INSTALL)], env=env, capture_output=True, text=True, check=False)
    assert outside.returncode == 0 and "will be skipped" in outside.stderr


@pytest.mark.parametrize("step", ["", "--datapath", "--engine", "--cluster", "--cluster-bins", "--boot"])
def test_every_set_names_debian_packages(step: str) -> None:
    entries = install_set(step)
    assert entries
    for tool, package in entries.items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", package), (tool, package)
        assert tool.startswith("/") or os.sep not in tool
