"""`make render`: what a reviewer reads, written without the CLI or credentials."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.stacks import repo_path

RENDER = [sys.executable, str(repo_path("tools", "render.py"))]


def test_render_writes_every_object_resources_and_outputs(tmp_path: Path) -> None:
    out = tmp_path / "dev"
    done = subprocess.run([*RENDER, "dev", "--out", str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (out / "manifests").iterdir())
    assert "deployment-tailscale-egress-relay.yaml" in files
    assert "namespace-_cluster-default.yaml" in files  # labelled in place, shown as a Namespace
    assert len([f for f in files if f.startswith("networkpolicy-")]) == 4
    default_ns = yaml.safe_load((out / "manifests" / "namespace-_cluster-default.yaml").read_text())
    assert default_ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    resources = json.loads((out / "resources.json").read_text())
    assert {"type", "name", "parent", "inputs"} <= set(resources[0])
    assert any(r["type"] == "hcloud:index/server:Server" for r in resources)
    outputs = json.loads((out / "outputs.json").read_text())
    assert outputs["relayHttpProxy"].startswith("http://relay.")


def test_invalid_config_writes_nothing_and_says_what_is_wrong(tmp_path: Path) -> None:
    stack_file = tmp_path / "Pulumi.broken.yaml"
    stack_file.write_text("config:\n  tailscale-egress:exitNode:\n    location: mars1\n")
    out = tmp_path / "out"
    done = subprocess.run(
        [*RENDER, "broken", "--config-file", str(stack_file), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "tailscale-egress:exitNode.location = 'mars1': must be one of" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_a_missing_stack_file_is_named(tmp_path: Path) -> None:
    done = subprocess.run([*RENDER, "nosuchstack"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "Pulumi.nosuchstack.yaml" in done.stderr
