"""The Kubernetes objects a stack applies, with secrets in place (the
render redacts them, which would not validate), and their pod templates."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from devtools.mockstack import Evaluation, Registration
from tools.render import manifest_of

Manifest = dict[str, Any]

# Pod-creating kinds and where their pod template sits.
_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def kubernetes_resources(evaluation: Evaluation) -> list[Registration]:
    """Every Kubernetes resource of the stack (not the provider)."""
    return [r for r in evaluation.resources if r.type.startswith("kubernetes:")]


CONFIG_GROUP = "kubernetes:yaml/v2:ConfigGroup"


def applied_objects_of(resource: Registration) -> list[Manifest] | None:
    """What `resource` sends to the API server (the render's objects, secrets
    unwrapped), or None for a Kubernetes resource these tests cannot read."""
    if resource.type == CONFIG_GROUP:
        objs = resource.plain().get("objs")
        return list(objs) if isinstance(objs, list) else None
    rendered = manifest_of(resource)
    if rendered is None:
        return None
    plain = resource.plain()
    return [{key: (value if key in ("apiVersion", "kind") else plain[key]) for key, value in rendered.items()}]


def applied_objects(evaluation: Evaluation) -> list[Manifest]:
    return [m for r in kubernetes_resources(evaluation) for m in applied_objects_of(r) or []]


def identity(obj: Manifest) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def pod_templates(objects: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    """(description, pod template or Pod) for every object that makes pods."""
    for obj in objects:
        if obj["kind"] == "Pod":
            yield f"Pod {obj['metadata'].get('namespace')}/{obj['metadata']['name']}", obj
        elif obj["kind"] in _TEMPLATE_PATHS:
            template: Any = obj
            for key in _TEMPLATE_PATHS[obj["kind"]]:
                template = template[key]
            yield f"{obj['kind']} {obj['metadata'].get('namespace')}/{obj['metadata']['name']}", template


def containers(pod_spec: Manifest) -> list[Manifest]:
    return [c for key in ("initContainers", "containers", "ephemeralContainers") for c in pod_spec.get(key) or []]
