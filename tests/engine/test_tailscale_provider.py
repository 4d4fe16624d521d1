"""The Tailscale provider plugin the engine runs for the program's Tailscale
resources (issue 18, point 3).

`pulumi-resource-tailscale` is a test-only stand-in (no real Tailscale
provider is served by the Go module proxy), built by
`scripts/build-tailscale-provider.sh` from `scripts/go/tailscale-provider/`,
whose own Go tests cover its behaviour against a throwaway API. These tests
hold the built plugin to the pinned `pulumi_tailscale` SDK: the schema it
serves to the engine has every token the program uses, with the SDK's
property names, types and secrets, and it reports the SDK's version, so the
engine runs it when the SDK asks for the plugin.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pulumi._types
import pulumi_tailscale as tailscale
import pytest
from google.protobuf import empty_pb2
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

from tests.support.apiserver import bin_dir
from tests.support.engine import REPO, Engine, plugin_engine
from tests.support.plugin_schema import plugin_inputs, sdk_inputs

pytestmark = pytest.mark.engine

STATE = REPO / "build" / "engine-tailscale"
# The SDK the program imports; the plugin is built to report the same version.
SDK_VERSION = importlib.metadata.version("pulumi-tailscale")

# What the program uses (components/tailnet_access.py, components/exit_node_approval.py,
# preflight.py): the SDK's resource classes with their Args, and its functions
# with their result classes. The tokens are read from the SDK, not written here.
USED_RESOURCES: dict[type, type] = {
    tailscale.TailnetKey: tailscale.TailnetKeyArgs,
    tailscale.DeviceSubnetRoutes: tailscale.DeviceSubnetRoutesArgs,
    tailscale.Acl: tailscale.AclArgs,
}
USED_FUNCTIONS: dict[Callable[..., Any], type] = {
    tailscale.get_device: tailscale.GetDeviceResult,
    tailscale.get_acl: tailscale.GetAclResult,
}


def plugin() -> Path:
    return bin_dir() / "pulumi-resource-tailscale"


def sdk_token(sdk_object: Any) -> str:
    """The token the SDK sends for a resource class or function (from its source)."""
    match = re.search(r"'(tailscale:index/[A-Za-z0-9]+:[A-Za-z0-9]+)'", inspect.getsource(sdk_object))
    assert match, f"no token in {sdk_object}"
    return match.group(1)


def sdk_function_args(function: Callable[..., Any]) -> set[str]:
    """The argument names a function sends (`__args__['waitFor'] = wait_for`)."""
    return set(re.findall(r"__args__\['([A-Za-z0-9]+)'\]", inspect.getsource(function)))


def sdk_secret_outputs(resource_class: type) -> set[str]:
    """The outputs the SDK marks secret (`additional_secret_outputs=[...]`)."""
    match = re.search(r"additional_secret_outputs=\[([^\]]*)\]", inspect.getsource(resource_class))
    return set(re.findall(r'"([A-Za-z0-9]+)"', match.group(1))) if match else set()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return plugin_engine(STATE, {"tailscale": (SDK_VERSION, plugin())}, "scripts/build-tailscale-provider.sh")


@pytest.fixture(scope="module")
def installed(engine: Engine) -> Path:
    """The plugin as the engine runs it, from its Pulumi home."""
    path = engine.home / "plugins" / f"resource-tailscale-v{SDK_VERSION}" / "pulumi-resource-tailscale"
    assert path.exists()
    return path


@pytest.fixture(scope="module")
def provider(installed: Path) -> Iterator[provider_pb2_grpc.ResourceProviderStub]:
    """The installed plugin, started as the engine starts a provider: it prints
    its port and serves the resource provider protocol over gRPC."""
    process = subprocess.Popen([str(installed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline().strip())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            yield provider_pb2_grpc.ResourceProviderStub(channel)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def plugin_schema(engine: Engine) -> dict[str, Any]:
    """The schema the engine reads from the built plugin."""
    out = engine.cli("package", "get-schema", str(plugin()))
    schema: dict[str, Any] = json.loads(out.stdout)
    return schema


def test_the_plugin_reports_the_pinned_sdk_version(provider: provider_pb2_grpc.ResourceProviderStub) -> None:
    pinned = re.search(r"^pulumi-tailscale==(\S+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert pinned and pinned.group(1) == SDK_VERSION
    info = provider.GetPluginInfo(empty_pb2.Empty())
    assert info.version == SDK_VERSION
    served = json.loads(provider.GetSchema(provider_pb2.GetSchemaRequest()).schema)
    assert (served["name"], served["version"]) == ("tailscale", SDK_VERSION)


@pytest.mark.parametrize("resource_class", list(USED_RESOURCES), ids=lambda c: c.__name__)
def test_the_plugin_has_each_resource_the_program_uses_with_the_sdk_s_properties(
    plugin_schema: dict[str, Any], resource_class: type
) -> None:
    resource = plugin_schema["resources"].get(sdk_token(resource_class))
    assert resource is not None, f"no {sdk_token(resource_class)} in the plugin's schema"
    # Inputs: names, types and whether required, as the SDK's Args class has them.
    expected = sdk_inputs(USED_RESOURCES[resource_class])
    assert plugin_inputs(resource["inputProperties"], resource.get("requiredInputs", [])) == expected
    # Outputs: every property the SDK's resource class reads.
    assert set(resource["properties"]) == set(pulumi._types.resource_pulumi_to_py_names(resource_class))
    secret = {name for name, spec in resource["properties"].items() if spec.get("secret")}
    assert secret == sdk_secret_outputs(resource_class)


@pytest.mark.parametrize("function", list(USED_FUNCTIONS), ids=lambda f: f.__name__)
def test_the_plugin_has_each_function_the_program_uses_with_the_sdk_s_properties(
    plugin_schema: dict[str, Any], function: Callable[..., Any]
) -> None:
    spec = plugin_schema["functions"].get(sdk_token(function))
    assert spec is not None, f"no {sdk_token(function)} in the plugin's schema"
    assert set(spec.get("inputs", {}).get("properties", {})) == sdk_function_args(function)
    result = pulumi._types.resource_pulumi_to_py_names(USED_FUNCTIONS[function])
    assert set(spec["outputs"]["properties"]) == set(result)


def test_the_plugin_s_configuration_is_the_sdk_s_with_the_credentials_secret(plugin_schema: dict[str, Any]) -> None:
    expected = sdk_inputs(tailscale.ProviderArgs)
    config = plugin_schema["config"]["variables"]
    assert plugin_inputs(config, []) == expected
    assert plugin_inputs(plugin_schema["provider"]["inputProperties"], []) == expected
    secret = {name for name, spec in config.items() if spec.get("secret")}
    assert secret == sdk_secret_outputs(tailscale.Provider)
    # The two this stack relies on: the TailnetKey's key and the API key.
    assert "apiKey" in secret
    assert plugin_schema["resources"][sdk_token(tailscale.TailnetKey)]["properties"]["key"]["secret"] is True
