"""The README is the front door and docs/ the rest: a newcomer can follow
the README from the top, every command either gives exists, and every page
it points to is there."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from config import EXIT_NODE_IMAGES, HETZNER_LOCATIONS, HETZNER_SERVER_TYPES, StackConfig
from tests.stacks import repo_path
from tools.demo import WALK_THROUGH

# Commands as the docs write them: `make up STACK=<you>`, `sudo make demo`.
MAKE_COMMAND = re.compile(r"`(?:sudo )?make ([a-z][a-z0-9-]*)(?: [A-Z_]+=[^`]*)?`")
# Relative links: [text](path) or [text](path#anchor).
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def readme() -> str:
    return repo_path("README.md").read_text()


def docs() -> dict[str, str]:
    """Each page under docs/, by file name."""
    return {page.name: page.read_text() for page in sorted(repo_path("docs").glob("*.md"))}


def make_commands(text: str) -> set[str]:
    return set(MAKE_COMMAND.findall(text))


def readme_make_commands() -> set[str]:
    return make_commands(readme())


def documented_make_commands() -> set[str]:
    return readme_make_commands().union(*(make_commands(text) for text in docs().values()))


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


def test_every_make_command_in_the_readme_and_docs_is_a_target() -> None:
    assert {"demo", "up", "verify", "destroy", "preview", "render"} <= readme_make_commands()
    commands = documented_make_commands()
    assert {"test", "test-all", "bench", "bench-datapath", "bench-engine", "bench-cluster"} <= commands
    makefile = repo_path("Makefile").read_text()
    for target in sorted(commands):
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.MULTILINE), f"no rule for make {target}"
        done = subprocess.run(
            ["make", "-n", target, "STACK=readme"], cwd=repo_path(), capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"make {target}: {done.stderr}"
        assert "Nothing to be done" not in done.stdout, f"make {target} does nothing"


def test_ci_runs_the_whole_suite_command_the_docs_give() -> None:
    assert "make test-all" in repo_path(".ci", "run").read_text()
    assert "`make test-all`" in docs()["development.md"]


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
    # A pulumi on PATH that only notes that it ran.
    ran = tmp_path / "pulumi-ran"
    fake = tmp_path / "bin" / "pulumi"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {ran}\n')
    fake.chmod(0o755)
    try:
        done = make(target, f"STACK={stack}", path=str(fake.parent))
    finally:
        stack_file.unlink()
    assert done.returncode != 0
    assert f"Pulumi.{stack}.yaml: invalid stack configuration:" in done.stderr
    assert "tailscale-egress:clusters: unknown key; did you mean tailscale-egress:cluster?" in done.stderr
    assert not ran.exists(), f"pulumi ran before the stack file was checked: {ran.read_text()}"


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


# The README: what a newcomer reads first.


def test_the_readme_is_a_front_door_not_the_whole_manual() -> None:
    assert len(readme().splitlines()) <= 150, "the README grew: move the detail to a page under docs/"


def test_its_first_screen_says_what_it_is_what_it_needs_and_how_to_try_it_without_an_account() -> None:
    first_screen = "\n".join(readme().splitlines()[:60])
    assert "Hetzner" in first_screen and "Tailscale exit node" in first_screen
    assert "exit node VM" in first_screen, "the diagram"
    # The Hetzner token: its permission, where to create it, what the VM costs.
    assert "Read & Write" in first_screen and "Security, API tokens" in first_screen
    assert "EUR a" in first_screen and "price list" in first_screen
    # The Tailscale credentials: the OAuth client's scopes and tags.
    for scope in ("auth_keys", "devices:core:read", "devices:routes", "policy_file:read"):
        assert f"`{scope}`" in first_screen, scope
    assert "`tag:egress-exit`" in first_screen and "`tag:egress-relay`" in first_screen
    assert "`sudo make demo`" in first_screen


def test_the_walk_through_goes_from_a_new_stack_to_removing_it_in_order() -> None:
    text = readme()
    walk_through = text[text.index("## Deploy your stack") :]
    steps = [int(n) for n in re.findall(r"^(\d+)\. \*\*", walk_through, flags=re.MULTILINE)]
    assert steps == list(range(1, 8)), steps
    milestones = [
        "pulumi stack init <you>",
        "pulumi config set --secret hcloud:token",
        "pulumi config set --secret tailscale:apiKey",
        '"tag:egress-relay": ["autogroup:admin"]',
        '"dst": ["autogroup:internet"]',
        "policy `tests`",
        "`make up STACK=<you>`",
        "`make verify STACK=<you>`",
        "configMapRef: {name: tailscale-egress-proxy}",
        "`make destroy STACK=<you>`",
    ]
    where = [walk_through.find(milestone) for milestone in milestones]
    assert -1 not in where, [m for m, at in zip(milestones, where, strict=True) if at == -1]
    assert where == sorted(where), "the walk-through's steps are out of order"


def test_make_demo_names_the_walk_through_steps_it_follows_as_the_readme_numbers_them() -> None:
    # tests/cluster/test_demo.py checks that the demo prints them, in this order, and does each.
    walk_through = readme()[readme().index("## Deploy your stack") :]
    titles = {int(n): t for n, t in re.findall(r"^(\d+)\. \*\*([^*]+?):?\*\*", walk_through, flags=re.MULTILINE)}
    assert {n: titles[n] for n in WALK_THROUGH} == WALK_THROUGH
    assert list(WALK_THROUGH) == sorted(WALK_THROUGH) and {1, 4, 5, 6, 7} <= set(WALK_THROUGH)


def test_the_tailnet_policy_entries_the_readme_gives_are_the_ones_the_stack_asks_for() -> None:
    from builders.tailnet_policy import required_policy

    snippet = re.search(r"```json\n(.*?)```", readme(), flags=re.DOTALL)
    assert snippet, "the tailnet policy snippet"
    required = required_policy("tag:egress-exit", "tag:egress-relay", None)
    # The tests depend on the user's own policy: the preflight prints them.
    assert json.loads(snippet.group(1)) == {key: required[key] for key in ("tagOwners", "grants")}
    assert set(required) - {"tagOwners", "grants"} <= {"tests", "autoApprovers"}


def test_the_proxy_configmap_the_readme_names_is_the_one_the_stack_creates() -> None:
    from builders.proxy_env import PROXY_CONFIGMAP

    assert f"configMapRef: {{name: {PROXY_CONFIGMAP}}}" in readme()


def test_every_setting_the_readme_shows_is_a_key_with_the_default_it_says() -> None:
    defaults = StackConfig().model_dump(by_alias=True)
    rows = re.findall(r"^\| [^|]+ \| `([^`]*)` \| `pulumi config set --path '?([a-zA-Z.]+)", readme(), re.MULTILINE)
    assert len(rows) == 5, rows
    for default, key in rows:
        section, name = key.split(".")
        assert name in defaults[section], key
        assert default == shown(defaults[section][name]), key


# docs/: everything else, reachable from the README.


def test_every_page_under_docs_is_linked_from_the_readme() -> None:
    linked = set(LINK.findall(readme()))
    assert docs(), "no docs/"
    assert {f"docs/{page}" for page in docs()} - linked == set()


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{page}" for page in docs())])
def test_every_relative_link_leads_to_a_file(page: str) -> None:
    path = repo_path(page)
    for target in LINK.findall(path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"


def test_the_user_docs_point_at_tools_that_exist_and_never_at_developer_tooling() -> None:
    pages = {"README.md": readme(), **{name: text for name, text in docs().items() if name != "development.md"}}
    for name, text in pages.items():
        assert "devtools/" not in text, f"{name} points a user at developer tooling"
        for tool in re.findall(r"\btools/([a-z_]+\.py)", text):
            assert repo_path("tools", tool).is_file(), f"{name} names tools/{tool}, which does not exist"


def shown(value: object) -> str:
    """A default as the configuration reference writes it (YAML's spelling)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(item["name"] if isinstance(item, dict) else str(item) for item in value) + "]"
    return str(value)


def test_the_configuration_reference_gives_every_key_its_type_default_and_whether_it_is_required() -> None:
    reference = docs()["configuration.md"]
    for section, keys in StackConfig().model_dump(by_alias=True).items():
        for key, default in keys.items():
            row = re.search(rf"^\| `{section}\.{key}` \|(.*)$", reference, flags=re.MULTILINE)
            assert row, f"{section}.{key} is missing from docs/configuration.md"
            cells = [cell.strip() for cell in row.group(1).split(" | ")]
            assert len(cells) >= 4 and all(cells[:4]), f"{section}.{key}: type | default | required | meaning"
            assert cells[1] == f"`{shown(default)}`", f"{section}.{key}: the default is {shown(default)}"


def test_the_configuration_reference_lists_every_location_with_its_city_every_server_type_and_image() -> None:
    reference = docs()["configuration.md"]
    for code in HETZNER_LOCATIONS:
        assert re.search(rf"^\| `{code}` \| [A-Z][a-z]+", reference, flags=re.MULTILINE), f"{code} without a city"
    for name in (*HETZNER_SERVER_TYPES, *EXIT_NODE_IMAGES):
        assert f"`{name}`" in reference, name
    assert "pulumi config set --path" in reference and "--secret" in reference


def test_the_development_guide_names_developer_tooling_where_it_is() -> None:
    named = re.findall(r"\b((?:dev)?tools/[a-z_]+\.py)", docs()["development.md"])
    assert any(path.startswith("devtools/") for path in named)
    for path in named:
        assert repo_path(path).is_file(), f"docs/development.md names {path}, which does not exist"
