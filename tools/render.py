"""Render a stack without the Pulumi CLI, credentials or a cluster.

    python tools/render.py <stack> [--config-file Pulumi.<stack>.yaml] [--out build/render/<stack>]

Writes manifests/ (every Kubernetes object as YAML, one file each, exactly
as it would be applied, secret values redacted), resources.json (every
resource: type, name, parent, inputs) and outputs.json. Secret values appear
only as "[secret]"; in a manifest each key of a secret map keeps its name
(`stringData: {authkey: "[secret]"}`), so that every object stays a valid
Kubernetes object. A namespace the stack only labels is written as
namespace-patch-*.yaml, under a comment saying that it is a patch of an
existing namespace. The output is deterministic: the same stack renders to
the same bytes, so that two renders can be diffed.
Invalid config or stack file: exit 1, the messages, nothing written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.mockstack import ROOT, Evaluation, Registration, StackInputError, evaluate_stack_file, stack_arguments

_PATCH = "kubernetes:core/v1:NamespacePatch"
_KINDS = {
    "kubernetes:core/v1:Namespace": ("v1", "Namespace"),
    _PATCH: ("v1", "Namespace"),
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
# The conventional order of a manifest's keys and of its metadata's; every
# other map is written with its keys sorted, so that a render is the same
# bytes whatever order the program built its maps in.
_TOP_ORDER = ("apiVersion", "kind", "metadata", "spec", "data", "stringData", "type")
_METADATA_ORDER = ("name", "namespace", "labels", "annotations")


def _ordered(value: Any, order: tuple[str, ...] = ()) -> Any:
    if isinstance(value, dict):
        rank = {k: i for i, k in enumerate(order)}
        keys = sorted(value, key=lambda k: (rank.get(k, len(order)), k))
        return {k: _ordered(value[k], _METADATA_ORDER if k == "metadata" else ()) for k in keys}
    if isinstance(value, list):
        return [_ordered(v) for v in value]  # a list's order is its meaning: kept
    return value


def manifest_of(resource: Registration) -> dict[str, Any] | None:
    """The Kubernetes object a resource applies (secret values redacted, their keys kept), or None."""
    if resource.type not in _KINDS:
        return None
    api_version, kind = _KINDS[resource.type]
    inputs = resource.redacted(keep_keys=True)
    body = {k: v for k, v in inputs.items() if k not in ("apiVersion", "kind")}
    return _ordered({"apiVersion": api_version, "kind": kind, **body}, _TOP_ORDER)  # type: ignore[no-any-return]


def _sorted_resources(evaluation: Evaluation) -> list[Registration]:
    # The engine registers resources in the order their inputs resolve, which varies.
    return sorted(evaluation.resources, key=lambda r: r.urn)


def manifest_filename(manifest: dict[str, Any], *, patch: bool = False) -> str:
    meta = manifest["metadata"]
    kind = manifest["kind"].lower() + ("-patch" if patch else "")
    return f"{kind}-{meta.get('namespace', '_cluster')}-{meta['name']}.yaml"


def _patch_header(manifest: dict[str, Any]) -> str:
    name = manifest["metadata"]["name"]
    return (
        f'# A patch of the existing namespace "{name}", not a new namespace: the stack\n'
        "# neither creates nor deletes it. Only the labels below are applied (server-side\n"
        "# apply, kubernetes:core/v1:NamespacePatch), and destroy removes only them.\n"
    )


def rendered_manifests(evaluation: Evaluation) -> list[tuple[str, str, dict[str, Any]]]:
    """(file name, file text, object) of every Kubernetes object, by file name."""
    files = []
    for resource in _sorted_resources(evaluation):
        manifest = manifest_of(resource)
        if manifest is None:
            continue
        patch = resource.type == _PATCH
        text = yaml.safe_dump(manifest, sort_keys=False)
        files.append(
            (manifest_filename(manifest, patch=patch), (_patch_header(manifest) if patch else "") + text, manifest)
        )
    return sorted(files, key=lambda f: f[0])


def manifests(evaluation: Evaluation) -> list[dict[str, Any]]:
    return [manifest for _, _, manifest in rendered_manifests(evaluation)]


def write_render(evaluation: Evaluation, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    (out / "manifests").mkdir(parents=True)
    for filename, text, _ in rendered_manifests(evaluation):
        (out / "manifests" / filename).write_text(text)
    resources = [
        {"type": r.type, "name": r.name, "parent": r.parent or None, "inputs": r.redacted()}
        for r in _sorted_resources(evaluation)
    ]
    (out / "resources.json").write_text(json.dumps(resources, indent=2, sort_keys=True) + "\n")
    outputs = {k: "[secret]" if k in evaluation.secret_outputs else v for k, v in evaluation.outputs.items()}
    (out / "outputs.json").write_text(json.dumps(outputs, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = stack_arguments(__doc__)
    parser.add_argument("--out", type=Path, help="default: build/render/<stack>")
    args = parser.parse_args(argv)
    try:
        evaluation = evaluate_stack_file(args.stack, args.config_file)
    except StackInputError as err:
        print(f"render: {err}", file=sys.stderr)
        if err.missing:
            # A newcomer's first render: say how to get a stack file.
            print(
                f"render: create it with `pulumi stack init {args.stack}` (then `pulumi config set --path ...`),"
                f" or copy the example: cp Pulumi.dev.yaml Pulumi.{args.stack}.yaml",
                file=sys.stderr,
            )
        return 2 if err.missing else 1
    out = args.out or ROOT / "build" / "render" / args.stack
    write_render(evaluation, out)
    print(f"render: {len(manifests(evaluation))} manifests, {len(evaluation.resources)} resources -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
