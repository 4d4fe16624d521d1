"""Comparing a provider plugin's schema with the pinned Python SDK that the
program imports (its Args classes, resources and functions), for the engine
suite's provider plugins (hcloud, tailscale)."""

from __future__ import annotations

import collections.abc
import inspect
import json
import typing
from typing import Any

import pulumi
import pulumi._types


def sdk_type(annotation: Any) -> Any:
    """An SDK annotation (pulumi.Input[Optional[Sequence[...]]]) in the schema's terms."""
    if isinstance(annotation, typing.ForwardRef | str):
        name = annotation.__forward_arg__ if isinstance(annotation, typing.ForwardRef) else annotation
        return None if name.startswith("Output[") else f"ref:{name.removesuffix('Args')}"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        kept = {
            json.dumps(sdk_type(a))
            for a in args
            if a is not type(None) and typing.get_origin(a) is not collections.abc.Awaitable and sdk_type(a) is not None
        }
        assert len(kept) == 1, f"no single type in {annotation}"
        return json.loads(kept.pop())
    if origin is collections.abc.Sequence:
        return ["array", sdk_type(args[0])]
    if origin is collections.abc.Mapping:
        return ["map", sdk_type(args[1])]
    return {str: "string", int: "integer", bool: "boolean", float: "number"}[annotation]


def schema_type(spec: dict[str, Any]) -> Any:
    if "$ref" in spec:
        return f"ref:{spec['$ref'].rsplit(':', 1)[-1]}"
    if spec.get("type") == "array":
        return ["array", schema_type(spec["items"])]
    if spec.get("type") == "object" and "additionalProperties" in spec:
        return ["map", schema_type(spec["additionalProperties"])]
    return spec["type"]


def sdk_inputs(args_class: type) -> dict[str, tuple[Any, bool]]:
    """{schema name: (type, required)} of an SDK Args class."""
    to_pulumi: dict[str, str] = pulumi._types.input_type_py_to_pulumi_names(args_class)
    init = vars(args_class)["__init__"]
    parameters = inspect.signature(init).parameters
    annotations: dict[str, Any] = init.__annotations__
    return {
        to_pulumi[name]: (sdk_type(annotations[name]), parameters[name].default is inspect.Parameter.empty)
        for name in to_pulumi
    }


def plugin_inputs(properties: dict[str, Any], required: list[str]) -> dict[str, tuple[Any, bool]]:
    return {name: (schema_type(spec), name in required) for name, spec in properties.items()}


def referenced_types(inputs: dict[str, tuple[Any, bool]]) -> set[str]:
    return {t for t, _ in inputs.values() for t in (t if isinstance(t, list) else [t]) if str(t).startswith("ref:")}
