"""`make render`: what a reviewer reads, written without the CLI or credentials:
the same bytes every time, and every object a valid Kubernetes object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from devtools.mockstack import Evaluation
from tests.stacks import RELAY_AUTH_KEY, dev, pinned, pinned_config, repo_path
from tools.render import main as render_main
from tools.render import write_render

RENDER = [sys.executable, str(repo_path("tools", "render.py"))]
NEWEST_MINOR = "1.35"
# The conventional order of a manifest's keys.
TOP_KEYS = ("apiVersion", "kind", "metadata", "spec", "data", "stringData", "type")


def render(stack: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RENDER, stack, *args], capture_output=True, text=True, check=False, env=env)


def test_render_writes_every_object_resources_and_outputs(tmp_path: Path) -> None:
    out = tmp_path / "dev"
    done = render("dev", "--out", str(out))
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (out / "manifests").iterdir())
    assert "deployment-tailscale-egress-relay.yaml" in files
    assert "namespace-patch-_cluster-default.yaml" in files  # labelled in place
    assert len([f for f in files if f.startswith("networkpolicy-")]) == 4
    default_ns = yaml.safe_load((out / "manifests" / "namespace-patch-_cluster-default.yaml").read_text())
    assert default_ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    resources = json.loads((out / "resources.json").read_text())
    assert {"type", "name", "parent", "inputs"} <= set(resources[0])
    assert any(r["type"] == "hcloud:index/server:Server" for r in resources)
    outputs = json.loads((out / "outputs.json").read_text())
    assert outputs["relayHttpProxy"].startswith("http://relay.")


def test_two_renders_of_a_stack_are_byte_identical(tmp_path: Path) -> None:
    # Two processes with different hash seeds: set and dict orders differ between them.
    stack_file = tmp_path / "Pulumi.pinned.yaml"
    config = pinned_config() | {RELAY_AUTH_KEY: {"secure": "v1:encrypted-by-the-cli"}}  # as `--secret` stores it
    stack_file.write_text(yaml.safe_dump({"config": config}))
    outs = [tmp_path / "first", tmp_path / "second"]
    for seed, out in zip(("1", "2"), outs, strict=True):
        done = render(
            "pinned", "--config-file", str(stack_file), "--out", str(out), env={**os.environ, "PYTHONHASHSEED": seed}
        )
        assert done.returncode == 0, done.stderr
    first, second = ({p.relative_to(o): p.read_bytes() for p in sorted(o.rglob("*")) if p.is_file()} for o in outs)
    assert len(first) > 10
    assert sorted(first) == sorted(second)
    assert [str(name) for name in first if first[name] != second[name]] == []


def test_manifests_keep_the_conventional_key_order(tmp_path: Path) -> None:
    write_render(pinned(), tmp_path)
    for path in sorted((tmp_path / "manifests").iterdir()):
        keys = list(yaml.safe_load(path.read_text()))
        assert keys[:3] == ["apiVersion", "kind", "metadata"], path.name
        assert keys == sorted(keys, key=TOP_KEYS.index), path.name


@pytest.mark.parametrize("stack", [dev, pinned], ids=["dev", "pinned"])
def test_every_rendered_file_is_a_valid_kubernetes_object(stack: Callable[[], Evaluation], tmp_path: Path) -> None:
    write_render(stack(), tmp_path)
    errors = []
    for path in sorted((tmp_path / "manifests").iterdir()):
        try:
            kubernetes_validate.validate(yaml.safe_load(path.read_text()), NEWEST_MINOR, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{path.name}: {'.'.join(map(str, e.path))}: {e.message}")
    assert errors == []


def test_a_secret_is_rendered_with_its_keys_and_redacted_values(tmp_path: Path) -> None:
    write_render(dev(), tmp_path)
    secret = yaml.safe_load((tmp_path / "manifests" / "secret-tailscale-egress-relay-auth.yaml").read_text())
    assert secret["stringData"] == {"authkey": "[secret]"}


def test_a_namespace_the_stack_only_labels_reads_as_a_patch(tmp_path: Path) -> None:
    write_render(pinned(), tmp_path)
    manifests = tmp_path / "manifests"
    patches = sorted(p.name for p in manifests.glob("namespace-patch-*"))
    created = sorted(p.name for p in manifests.glob("namespace-_cluster-*"))
    # pinned: default and team-b are labelled in place; team-a and the relay's namespace are created.
    assert patches == ["namespace-patch-_cluster-default.yaml", "namespace-patch-_cluster-team-b.yaml"]
    assert {"namespace-_cluster-tailscale-egress.yaml", "namespace-_cluster-team-a.yaml"} <= set(created)
    assert not {"namespace-_cluster-default.yaml", "namespace-_cluster-team-b.yaml"} & set(created)
    text = (manifests / "namespace-patch-_cluster-team-b.yaml").read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert text.startswith(header) and 'A patch of the existing namespace "team-b", not a new namespace' in header
    assert "Only the labels below are applied (server-side" in header
    patch = yaml.safe_load(text)
    assert set(patch["metadata"]) == {"name", "labels"}
    assert not (manifests / "namespace-_cluster-team-a.yaml").read_text().startswith("#")


def test_invalid_config_writes_nothing_and_says_what_is_wrong(tmp_path: Path) -> None:
    stack_file = tmp_path / "Pulumi.broken.yaml"
    stack_file.write_text("config:\n  tailscale-egress:exitNode:\n    location: mars1\n")
    out = tmp_path / "out"
    done = render("broken", "--config-file", str(stack_file), "--out", str(out))
    assert done.returncode == 1
    assert "tailscale-egress:exitNode.location = 'mars1': must be one of" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "config:\n  tailscale-egress:exitNode:\n    location: fsn1\n   serverType: cx23\n",
            ":4:4: not valid YAML: expected <block end>",
            id="indentation",
        ),
        pytest.param(
            'config:\n  tailscale-egress:cluster: {context: "rd}\n',
            ":3:1: not valid YAML: found unexpected end of stream (while scanning a quoted scalar on line 2)",
            id="unclosed-quote",
        ),
        pytest.param(
            "config:\n  tailscale-egress:cluster:\n    context: a\n  tailscale-egress:cluster:\n    context: b\n",
            ":4:3: tailscale-egress:cluster is given twice (first on line 2)",
            id="duplicate-key",
        ),
        pytest.param("- config\n", ": not a stack file: expected `config:`", id="not-a-map"),
    ],
)
def test_a_broken_stack_file_gives_one_line_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    stack_file = tmp_path / "Pulumi.broken.yaml"
    stack_file.write_text(text)
    out = tmp_path / "out"
    assert render_main(["broken", "--config-file", str(stack_file), "--out", str(out)]) == 1
    stderr = capsys.readouterr().err
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"render: {stack_file}{expected}"), stderr
    assert not out.exists()


def test_a_missing_stack_file_is_named(tmp_path: Path) -> None:
    done = render("nosuchstack")
    assert done.returncode == 2 and "Pulumi.nosuchstack.yaml" in done.stderr
