"""Render a stack without the Pulumi CLI, credentials or a cluster.

    python tools/render.py <stack> [--config-file Pulumi.<stack>.yaml] [--out build/render/<stack>]

Writes manifests/ (every Kubernetes object as YAML, one file each, as it
would be applied; a namespace labelled in place appears as a Namespace with
the labels the stack sets), resources.json (every resource: type, name,
parent, inputs) and outputs.json. Secret values appear only as "[secret]".
Invalid config: exit 1, the messages, nothing written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.mockstack import ROOT, Evaluation, Registration, evaluate, stack_file_config

_KINDS = {
    "kubernetes:core/v1:Namespace": ("v1", "Namespace"),
    "kubernetes:core/v1:NamespacePatch": ("v1", "Namespace"),
    "kubernetes:core/v1:ConfigMap": ("v1", "ConfigMap"),
    "kubernetes:core/v1:Secret": ("v1", "Secret"),
    "kubernetes:core/v1:Service": ("v1", "Service"),
    "kubernetes:apps/v1:Deployment": ("apps/v1", "Deployment"),
    "kubernetes:apps/v1:DaemonSet": ("apps/v1", "DaemonSet"),
    "kubernetes:networking.k8s.io/v1:NetworkPolicy": ("networking.k8s.io/v1", "NetworkPolicy"),
    "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicy": (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicy",
    ),
    "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicyBinding": (
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicyBinding",
    ),
}
_BODY_FIELDS = ("type", "data", "stringData", "spec")


def manifest_of(resource: Registration) -> dict[str, Any] | None:
    """The Kubernetes object a resource applies (secrets redacted), or None."""
    if resource.type not in _KINDS:
        return None
    api_version, kind = _KINDS[resource.type]
    inputs = resource.redacted()
    manifest = {"apiVersion": api_version, "kind": kind, "metadata": inputs["metadata"]}
    manifest.update({f: inputs[f] for f in _BODY_FIELDS if inputs.get(f) is not None})
    return manifest


def manifests(evaluation: Evaluation) -> list[dict[str, Any]]:
    return [m for r in evaluation.resources if (m := manifest_of(r)) is not None]


def manifest_filename(manifest: dict[str, Any]) -> str:
    meta = manifest["metadata"]
    return f"{manifest['kind'].lower()}-{meta.get('namespace', '_cluster')}-{meta['name']}.yaml"


def write_render(evaluation: Evaluation, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    (out / "manifests").mkdir(parents=True)
    for manifest in manifests(evaluation):
        (out / "manifests" / manifest_filename(manifest)).write_text(yaml.safe_dump(manifest, sort_keys=False))
    resources = [
        {"type": r.type, "name": r.name, "parent": r.parent or None, "inputs": r.redacted()}
        for r in evaluation.resources
    ]
    (out / "resources.json").write_text(json.dumps(resources, indent=2, sort_keys=True) + "\n")
    outputs = {k: "[secret]" if k in evaluation.secret_outputs else v for k, v in evaluation.outputs.items()}
    (out / "outputs.json").write_text(json.dumps(outputs, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack")
    parser.add_argument("--config-file", type=Path, help="default: Pulumi.<stack>.yaml")
    parser.add_argument("--out", type=Path, help="default: build/render/<stack>")
    args = parser.parse_args(argv)
    config_file = args.config_file or ROOT / f"Pulumi.{args.stack}.yaml"
    if not config_file.is_file():
        print(f"render: no stack file {config_file}", file=sys.stderr)
        return 2
    evaluation = evaluate(stack_file_config(config_file), stack=args.stack)
    if evaluation.error is not None:
        print(f"render: {evaluation.error}", file=sys.stderr)
        return 1
    out = args.out or ROOT / "build" / "render" / args.stack
    write_render(evaluation, out)
    print(f"render: {len(manifests(evaluation))} manifests, {len(evaluation.resources)} resources -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
