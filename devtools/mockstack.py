"""Evaluate the Pulumi program without the CLI, credentials or a cluster.

Pulumi's mock monitor stands in for the engine; the providers' answers are
realistic fakes (documentation addresses, Tailscale-shaped IDs). Used by
`tools/render.py` and by the tests, so both see the same thing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc, settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from builders.tailnet_policy import policy_tests
from config import HETZNER_SERVER_TYPES
from preflight import CREDENTIAL_KEYS

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "tailscale-egress"
SECRET = "[secret]"
_SECRET_SIG = rpc._special_sig_key
_SECRET_VALUE = rpc._special_secret_sig

# A policy file that allows everything the stack needs (see builders/tailnet_policy.py).
PERMISSIVE_POLICY: dict[str, Any] = {
    "tagOwners": {"tag:egress-exit": ["autogroup:admin"], "tag:egress-relay": ["autogroup:admin"]},
    "grants": [{"src": ["tag:egress-relay"], "dst": ["autogroup:internet"], "ip": ["*"]}],
    "tests": policy_tests("tag:egress-exit", "tag:egress-relay"),
}
# Where Hetzner sells each server type (its /server_types), for getServerType:
# the cost-optimised x86 (cx) and Arm (cax) types only in Europe.
EU_LOCATIONS: tuple[str, ...] = ("fsn1", "nbg1", "hel1")
ALL_LOCATIONS: tuple[str, ...] = (*EU_LOCATIONS, "ash", "hil", "sin")
HETZNER_OFFER: dict[str, tuple[str, ...]] = {
    t: EU_LOCATIONS if t.startswith(("cx", "cax")) else ALL_LOCATIONS for t in HETZNER_SERVER_TYPES
}
EXIT_NODE_TAILNET_IP = "100.101.102.103"
EXIT_NODE_PUBLIC_IPV4 = "203.0.113.10"
EXIT_NODE_PUBLIC_IPV6 = "2001:db8:1::1"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class FakeProviders(pulumi.runtime.Mocks):
    """Answers as Tailscale, Hetzner and Kubernetes would, with fixed fakes."""

    def __init__(self, policy: Mapping[str, Any] | None = None, tailnet: str = "") -> None:
        self.policy = dict(PERMISSIVE_POLICY if policy is None else policy)
        # The IDs Tailscale gives keys differ from one tailnet (or one stack's
        # backend) to another; "" keeps renders the same from run to run.
        self.tailnet = tailnet

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        state = dict(args.inputs)
        typ, name = args.typ, args.name
        if typ == "tailscale:index/tailnetKey:TailnetKey":
            key_id = f"k{_short_hash(self.tailnet + name)}CNTRL"
            state["key"] = {_SECRET_SIG: _SECRET_VALUE, "value": f"tskey-auth-{key_id}-MOCKSECRET"}
            return key_id, state
        if typ == "hcloud:index/firewall:Firewall":
            return str(int(_short_hash(name), 16) % 10_000_000), state
        if typ == "hcloud:index/server:Server":
            state.update(ipv4Address=EXIT_NODE_PUBLIC_IPV4, ipv6Address=EXIT_NODE_PUBLIC_IPV6, status="running")
            return str(int(_short_hash(name), 16) % 100_000_000), state
        if typ.startswith("kubernetes:") and isinstance(state.get("metadata"), dict):
            meta = state["metadata"]
            return "/".join(p for p in (meta.get("namespace"), meta.get("name")) if p) or name, state
        return f"{name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:  # type: ignore[override]
        if args.token == "tailscale:index/getAcl:getAcl":
            text = json.dumps(self.policy)
            return {"id": "acl", "json": text, "hujson": text}
        if args.token == "tailscale:index/getDevice:getDevice":
            hostname = args.args.get("hostname", "")
            return {
                "addresses": [EXIT_NODE_TAILNET_IP, "fd7a:115c:a1e0::6566:6667"],
                "hostname": hostname,
                "name": f"{hostname}.tail0000.ts.net",
                "id": "1234567890",
                "nodeId": f"n{_short_hash(hostname)}CNTRL",
                "authorized": True,
                "tags": ["tag:egress-exit"],
            }
        if args.token == "hcloud:index/getServerType:getServerType":
            name = args.args.get("name", "")
            locations = [
                {"name": loc, "id": i, "available": True, "recommended": False, "isDeprecated": False,
                 "deprecationAnnounced": "", "unavailableAfter": ""}
                for i, loc in enumerate(HETZNER_OFFER.get(name, ()), start=1)
            ]  # fmt: skip
            return {
                "id": 100 + sorted(HETZNER_OFFER).index(name) if name in HETZNER_OFFER else 0,
                "name": name,
                "locations": locations,
            }
        raise NotImplementedError(f"no fake for invoke {args.token}")


@dataclass
class Registration:
    type: str
    name: str
    urn: str
    parent: str
    dependencies: list[str]
    inputs: Any  # secrets still wrapped; see `plain()` and `redacted()`

    def redacted(self, *, keep_keys: bool = False) -> Any:
        """The inputs with each secret as "[secret]"; with `keep_keys`, a secret
        map or list keeps its shape and only its values are redacted
        (`{authkey: "[secret]"}`), so that a Kubernetes object stays valid."""
        return _map_secrets(self.inputs, _redact_leaves if keep_keys else lambda _: SECRET)

    def plain(self) -> Any:
        return _map_secrets(self.inputs, lambda v: v)

    def secret_paths(self) -> list[str]:
        found: list[str] = []
        _walk_secrets(self.inputs, "", found)
        return found


def _redact_leaves(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact_leaves(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_leaves(v) for v in value]
    return SECRET


def _is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(_SECRET_SIG) == _SECRET_VALUE


def _map_secrets(value: Any, fn: Any) -> Any:
    """Apply `fn` to each secret's value; also turn the whole floats that
    Pulumi's wire format makes of every number back into ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if _is_secret(value):
        return fn(_map_secrets(value["value"], lambda v: v))
    if isinstance(value, dict):
        return {k: _map_secrets(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_secrets(v, fn) for v in value]
    return value


def _walk_secrets(value: Any, path: str, found: list[str]) -> None:
    if _is_secret(value):
        found.append(path)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk_secrets(v, f"{path}.{k}" if path else k, found)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk_secrets(v, f"{path}[{i}]", found)


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """The mock monitor, also keeping parent and dependencies of each resource."""

    def __init__(self, fakes: pulumi.runtime.Mocks) -> None:
        super().__init__(fakes)
        self.registrations: list[Registration] = []

    def RegisterResource(self, request: Any) -> Any:  # noqa: N802  (gRPC method name)
        response = super().RegisterResource(request)  # type: ignore[no-untyped-call]
        if request.type != "pulumi:pulumi:Stack":
            pulumi_mocks._ensure_event_loop()  # type: ignore[attr-defined,no-untyped-call]  # as MockMonitor does
            self.registrations.append(
                Registration(
                    type=request.type,
                    name=request.name,
                    urn=response.urn,
                    parent=request.parent,
                    dependencies=list(request.dependencies),
                    inputs=rpc.deserialize_properties(request.object),
                )
            )
        return response


@dataclass
class Evaluation:
    resources: list[Registration] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: set[str] = field(default_factory=set)
    error: BaseException | None = None

    def of_type(self, typ: str) -> list[Registration]:
        return [r for r in self.resources if r.type == typ]

    def one(self, typ: str, name: str) -> Registration:
        found = [r for r in self.resources if r.type == typ and r.name == name]
        if len(found) != 1:
            raise LookupError(f"{len(found)} resources of type {typ} named {name}")
        return found[0]

    def by_urn(self, urn: str) -> Registration:
        return next(r for r in self.resources if r.urn == urn)


class StackFileError(ValueError):
    """A stack file that cannot be read: one line, `<file>:<line>:<column>: <what>`."""


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _load_stack_yaml(path: Path) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        """Refuses a key given twice in one map, as Pulumi does, instead of keeping the last."""

    def mapping(loader: Loader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                raise StackFileError(
                    f"{_display(path)}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}:"
                    f" {key} is given twice (first on line {seen[key]}); keep one"
                )
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(path.read_text(), Loader=Loader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{mark.line + 1}:{mark.column + 1}:" if mark else ""
        what = err.problem or ""
        if err.context:
            started = err.context_mark
            on_line = f" on line {started.line + 1}" if started and mark and started.line != mark.line else ""
            what += f" ({err.context}{on_line})"
        raise StackFileError(f"{_display(path)}:{where} not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise StackFileError(f"{_display(path)}: not valid YAML: {err}") from None


def _redact_secure(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"secure"}:
            return SECRET
        return {k: _redact_secure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_secure(v) for v in value]
    return value


def stack_file_config(path: Path) -> dict[str, Any]:
    """The `config:` of a Pulumi.<stack>.yaml; encrypted values become "[secret]".

    Raises StackFileError for a file that is not YAML or not a stack file.
    """
    doc = _load_stack_yaml(path)
    if doc is None:
        return {}
    if not isinstance(doc, dict) or not isinstance(doc.get("config") or {}, dict):
        raise StackFileError(
            f"{_display(path)}: not a stack file: expected `config:` and under it `<key>: <value>` lines"
        )
    config = {}
    for key, value in (doc.get("config") or {}).items():
        full = key if ":" in str(key) else f"{PROJECT}:{key}"
        config[full] = _redact_secure(value)
    return config


class StackInputError(ValueError):
    """A stack the tools cannot evaluate: no stack file (`missing`), a file that
    is not one, or a config the program refuses. One line, naming what to fix."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def stack_arguments(description: str | None) -> argparse.ArgumentParser:
    """The command line every tool over one stack file shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack")
    parser.add_argument("--config-file", type=Path, help="default: Pulumi.<stack>.yaml")
    return parser


def evaluate_stack_file(stack: str, config_file: Path | None = None) -> Evaluation:
    """The mock evaluation of Pulumi.<stack>.yaml (or `config_file`), offline."""
    path = config_file or ROOT / f"Pulumi.{stack}.yaml"
    if not path.is_file():
        raise StackInputError(f"no stack file {path}", missing=True)
    try:
        config = stack_file_config(path)
    except StackFileError as err:
        raise StackInputError(str(err)) from None
    # What the file stores encrypted (`secure:`) is a secret; the rest is plain, as written.
    evaluation = evaluate(config, stack=stack, secret_keys=tuple(k for k, v in config.items() if v == SECRET))
    if evaluation.error is not None:
        raise StackInputError(str(evaluation.error))
    return evaluation


def evaluate(
    config: Mapping[str, Any],
    stack: str = "dev",
    *,
    fakes: pulumi.runtime.Mocks | None = None,
    secret_keys: tuple[str, ...] | None = None,
    offline: bool = True,
    preview: bool = False,
) -> Evaluation:
    """Run __main__.py once under mocks with `config` ({"<ns>:<key>": value}).

    `secret_keys`: the keys stored encrypted; by default the credentials in
    `config`, as `pulumi config set --secret` stores them (pass () for a stack
    file that holds them in plain text).

    `offline` skips the checks that need credentials and a cluster (as
    `tools/render.py` does); tests of those checks pass False.
    """
    settings.ROOT.set(None)
    monitor = RecordingMonitor(fakes or FakeProviders())
    pulumi.runtime.set_mocks(monitor.mocks, project=PROJECT, stack=stack, preview=preview, monitor=monitor)
    pulumi.runtime.set_all_config(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()},
        list(secret_keys if secret_keys is not None else (k for k in CREDENTIAL_KEYS if k in config)),
    )
    result = Evaluation()
    previous_offline = os.environ.get("TAILSCALE_EGRESS_OFFLINE")
    os.environ["TAILSCALE_EGRESS_OFFLINE"] = "1" if offline else "0"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    def program() -> Any:
        runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")
        root = settings.get_root_resource()
        exported: dict[str, Any] = dict(getattr(root, "outputs", {}) or {})
        return pulumi.Output.all(**{k: pulumi.Output.from_input(v) for k, v in exported.items()}).apply(
            lambda values: _collect(result, exported, values)
        )

    try:
        _sync_await(run_pulumi_func(lambda: _sync_await(pulumi.Output.from_input(program()).future())))
    except BaseException as err:  # noqa: BLE001  (the error is the result)
        result.error = err
    finally:
        if previous_offline is None:
            os.environ.pop("TAILSCALE_EGRESS_OFFLINE", None)
        else:
            os.environ["TAILSCALE_EGRESS_OFFLINE"] = previous_offline
    result.resources = list(monitor.registrations)
    return result


def _collect(result: Evaluation, exported: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    for name, output in exported.items():
        result.outputs[name] = values[name]
        if isinstance(output, pulumi.Output) and _sync_await(output.is_secret()):
            result.secret_outputs.add(name)
