"""The real Pulumi engine for the tests (issue 7).

What runs for real: the Pulumi CLI (engine, local file backend, passphrase
secrets provider), the Kubernetes provider plugin and the API server of
`tests/support/apiserver.py`, all built by `make engine-bins`. What does not:
the Python language host (`pulumi-language-python` is not served by the Go
module proxy), so the program runs as an Automation API inline program: the
SDK serves the language runtime in this process and runs the project's
`__main__.py` unchanged, with the stack's config from its stack file.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pulumi import automation as auto

from tests.support.apiserver import bin_dir, cache_dir

REPO = Path(__file__).resolve().parents[2]
PROJECT = "tailscale-egress"
PASSPHRASE = "engine-tests-only"
# The provider release the engine runs; requirements.txt pins the SDK to it.
KUBERNETES_PROVIDER_VERSION = "4.25.0"
# kubectl: the program's preflight reads the cluster with it.
ENGINE_BINARIES = ("pulumi", "pulumi-resource-kubernetes", "kubectl")


def missing_engine_binaries() -> list[str]:
    return [name for name in ENGINE_BINARIES if not (bin_dir() / name).exists()]


def run_project_program() -> None:
    """The inline program: the project's own __main__.py, as `pulumi up` runs it."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    runpy.run_path(str(REPO / "__main__.py"), run_name="__main__")


@dataclass
class Engine:
    """One Pulumi home (plugins), one file backend, one project directory."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.state_dir / "pulumi-home"

    @property
    def backend(self) -> Path:
        return self.state_dir / "backend"

    @property
    def workdir(self) -> Path:
        return self.state_dir / "project"

    def setup(self) -> Engine:
        missing = missing_engine_binaries()
        if missing:
            raise RuntimeError(f"not built: {', '.join(missing)} (in {bin_dir()}); build them with `make engine-bins`")
        for directory in (self.home, self.backend, self.workdir):
            directory.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PULUMI_HOME": str(self.home),
            "PULUMI_BACKEND_URL": f"file://{self.backend}",
            "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            # Only the plugin installed below, never one that happens to be on PATH.
            "PULUMI_IGNORE_AMBIENT_PLUGINS": "true",
        }
        plugin_dir = self.home / "plugins" / f"resource-kubernetes-v{KUBERNETES_PROVIDER_VERSION}"
        if not (plugin_dir / "pulumi-resource-kubernetes").exists():
            self.cli(
                "plugin", "install", "resource", "kubernetes", KUBERNETES_PROVIDER_VERSION,
                "--file", str(bin_dir() / "pulumi-resource-kubernetes"),
            )  # fmt: skip
        return self

    def install_plugin(self, name: str, version: str, binary: Path) -> None:
        """Installs the resource plugin `binary` (built by the repo's scripts) into
        this home as `name` at `version`, once: what the engine runs for a
        program whose SDK asks for that plugin and version."""
        if not (self.home / "plugins" / f"resource-{name}-v{version}" / f"pulumi-resource-{name}").exists():
            self.cli("plugin", "install", "resource", name, version, "--file", str(binary))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The Pulumi CLI itself, for what the Automation API does not cover."""
        env = {**os.environ, **self.env}
        return subprocess.run(
            [str(bin_dir() / "pulumi"), *args, "--non-interactive"],
            cwd=self.workdir,
            env=env,
            capture_output=True,
            text=True,
            check=check,
            timeout=600,
        )

    def workspace_options(self, project: str = PROJECT) -> auto.LocalWorkspaceOptions:
        """The Automation API's workspace on this engine's home, backend and
        project directory, for the project named `project`."""
        return auto.LocalWorkspaceOptions(
            work_dir=str(self.workdir),
            pulumi_home=str(self.home),
            pulumi_command=auto.PulumiCommand(root=str(cache_dir()), skip_version_check=True),
            env_vars=self.env,
            project_settings=auto.ProjectSettings(name=project, runtime="python"),
            secrets_provider="passphrase",
        )

    def stack(self, name: str, config: Mapping[str, Any], secret_keys: tuple[str, ...] = ()) -> auto.Stack:
        """The stack `name` with exactly `config` ({"<ns>:<key>": value}) in its stack file."""
        stack = auto.create_or_select_stack(
            stack_name=name, project_name=PROJECT, program=run_project_program, opts=self.workspace_options()
        )
        self.write_config(name, config, secret_keys)
        return stack

    def select(self, name: str) -> auto.Stack:
        """The existing stack `name`, with the config it was deployed with."""
        return auto.select_stack(
            stack_name=name, project_name=PROJECT, program=run_project_program, opts=self.workspace_options()
        )

    def stack_file(self, name: str) -> Path:
        return self.workdir / f"Pulumi.{name}.yaml"

    def write_config(self, name: str, config: Mapping[str, Any], secret_keys: tuple[str, ...] = ()) -> None:
        """Writes the plain keys as YAML (objects stay objects, as users write
        them), then sets each secret key through the CLI, which encrypts it."""
        path = self.stack_file(name)
        document = yaml.safe_load(path.read_text()) if path.exists() else {}
        document = document or {}
        document["config"] = {k: v for k, v in config.items() if k not in secret_keys}
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        for key in secret_keys:
            self.cli("config", "set", "--secret", "--stack", name, key, str(config[key]))

    def remove_stack(self, name: str) -> None:
        self.cli("stack", "rm", "--yes", "--force", "--stack", name, check=False)
        self.stack_file(name).unlink(missing_ok=True)


def plugin_engine(state: Path, plugins: Mapping[str, tuple[str, Path]], built_by: str) -> Engine:
    """A fresh Pulumi home with only the resource plugins {name: (version,
    binary)}, built by the repo's scripts, a file backend and a project
    directory, for a provider's own tests (no Kubernetes plugin). A plugin not
    built skips the test, and fails it under CI=true."""
    missing = [str(p) for p in (bin_dir() / "pulumi", *(b for _, b in plugins.values())) if not p.exists()]
    if missing:
        message = f"not built: {', '.join(missing)}; run `make engine-bins` ({built_by})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    shutil.rmtree(state, ignore_errors=True)
    engine = Engine(state)
    for directory in (engine.home, engine.backend, engine.workdir):
        directory.mkdir(parents=True)
    # As Engine.setup, without the Kubernetes plugin.
    engine.env = {
        "PULUMI_HOME": str(engine.home),
        "PULUMI_BACKEND_URL": f"file://{engine.backend}",
        "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_IGNORE_AMBIENT_PLUGINS": "true",
    }
    for name, (version, binary) in plugins.items():
        engine.install_plugin(name, version, binary)
    return engine


def events_of(kind: str) -> tuple[list[Any], Callable[[auto.EngineEvent], None]]:
    """A list and the `on_event` callback that fills it with events of `kind`
    (`resource_pre_event`, `diagnostic_event`, ...)."""
    found: list[Any] = []

    def collect(event: auto.EngineEvent) -> None:
        value = getattr(event, kind, None)
        if value is not None:
            found.append(value)

    return found, collect


def export_state(engine: Engine, stack: str) -> dict[str, Any]:
    """`pulumi stack export` (secrets stay encrypted)."""
    out = engine.cli("stack", "export", "--stack", stack)
    state: dict[str, Any] = json.loads(out.stdout)
    return state


def wipe(engine: Engine) -> None:
    shutil.rmtree(engine.state_dir, ignore_errors=True)
