"""The default stack, through the real engine, booting the real exit node
(issue 18): `Pulumi.dev.yaml` as shipped, only the credentials and endpoints
set here.

What runs for real: the Pulumi CLI and engine, the program, the hcloud
provider plugin (terraform-provider-hcloud bridged), the Kubernetes provider
and API server (kwok's node: pods get ready, nothing runs in them), the exit
node's VM in QEMU booting the user_data the hcloud provider sent, cloud-init,
tailscaled and Headscale. Emulated: Hetzner's API (its server create boots
that VM, its ACPI shutdown presses the VM's power button) and Tailscale's API
over that Headscale. Stand-in: the `tailscale` provider plugin
(scripts/go/tailscale-provider). The relay's own data path and `make verify`
need the real cluster: not here.

The VM boots `render_cloud_init` of what the provider sent with the test apt
repository's signing key as the renderer's input (Tailscale's own key cannot
sign an offline repository); the hook first checks that the user_data sent is
exactly that document with Tailscale's key.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pulumi import automation as auto

from builders.cloud_init import AUTH_KEY_PATH, ExitNodeBoot, render_cloud_init
from builders.names import StackNames
from builders.networks import EXIT_ROUTES
from tests.boot.conftest import BootedVm, BootNet, VmFactory
from tests.datapath.stack_tailnet import EXIT_TAG, RELAY_TAG, stack_policy_for_headscale
from tests.datapath.topology import wait_for
from tests.stacks import dev_config
from tests.support import apiserver
from tests.support.engine import PROJECT, Engine, export_state, run_project_program
from tests.support.headscale import HeadscaleCLI
from tests.support.hetzner_api import HetznerAPI
from tests.support.tailscale_api import KEY_OWNER, TailscaleAPI

pytestmark = [pytest.mark.boot, pytest.mark.default_stack]

STATE = Path(__file__).resolve().parents[2] / "build" / "default-stack"
STACK = "dev"
HCLOUD_TOKEN = "h" * 64
# A separate deployer identity: the stack's context is not kubectl's default (the README's advice).
DEPLOYER_CONTEXT = "rancher-desktop"
FIRST_BOOT_TIMEOUT = 600


@dataclass
class BootingHooks:
    """The emulated Hetzner's servers are real VMs: created, one boots the
    document the provider sent; the ACPI shutdown presses its power button
    and waits until it is off; deleted, it is gone."""

    make_vm: VmFactory
    vms: dict[str, BootedVm] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def on_server_created(self, server: dict[str, Any], user_data: str) -> None:
        document = yaml.safe_load(user_data)
        (auth_key,) = [f["content"] for f in document["write_files"] if f["path"] == AUTH_KEY_PATH]
        boot = ExitNodeBoot(hostname=document["hostname"], image=server["image"]["name"], auth_key=auth_key)
        if render_cloud_init(boot) != user_data:
            self.problems.append(f"{server['name']}: the user_data sent is not the rendered document")
        self.events.append(("created", server["name"]))
        self.vms[server["name"]] = self.make_vm(boot.image, f"s{server['id']}", boot=boot)

    def on_server_shutdown(self, server: dict[str, Any], command: Literal["shutdown", "poweroff"]) -> None:
        self.events.append((command, server["name"]))
        vm = self.vms[server["name"]].vm
        if command == "shutdown":
            vm.powerdown()
            vm.wait_exit(180)
        else:
            vm.kill()

    def on_server_deleted(self, server: dict[str, Any]) -> None:
        self.events.append(("deleted", server["name"]))
        self.vms.pop(server["name"]).vm.kill()


@dataclass
class World:
    engine: Engine
    hetzner: HetznerAPI
    tailnet: TailscaleAPI
    hooks: BootingHooks
    net: BootNet
    cluster: apiserver.Cluster
    warnings: list[str] = field(default_factory=list)

    def stack(self) -> auto.Stack:
        stack = auto.create_or_select_stack(
            stack_name=STACK, project_name=PROJECT, program=run_project_program, opts=self.engine.workspace_options()
        )
        self.engine.write_config(
            STACK,
            {
                **dev_config(),
                "hcloud:token": HCLOUD_TOKEN,
                "hcloud:endpoint": self.hetzner.endpoint,
                "tailscale:apiKey": self.tailnet.api_key,
                "tailscale:baseUrl": self.tailnet.base_url,
            },
            secret_keys=("hcloud:token", "tailscale:apiKey"),
        )
        return stack

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.tailnet.headscale.cli("nodes", "list") or [])


def sdk_version(package: str) -> str:
    return importlib.metadata.version(package)


def deployer_kubeconfig(cluster: apiserver.Cluster, path: Path) -> Path:
    """The test cluster's kubeconfig with the admin context renamed to the
    stack's `rancher-desktop` and the current context another user's."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    for context in config["contexts"]:
        if context["name"] == apiserver.Cluster.context("admin"):
            context["name"] = DEPLOYER_CONTEXT
    config["current-context"] = apiserver.Cluster.context("alice")
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def world(net: BootNet, make_vm: VmFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    os.environ["PATH"] = f"{apiserver.bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
    missing = apiserver.missing_binaries() + [
        name
        for name in ("pulumi", "pulumi-resource-kubernetes", "pulumi-resource-hcloud", "pulumi-resource-tailscale")
        if not (apiserver.bin_dir() / name).exists()
    ]
    if missing:
        pytest.fail(f"not built: {', '.join(missing)}; run `make engine-bins`")
    tmp = tmp_path_factory.mktemp("default-stack")
    headscale = HeadscaleCLI(apiserver.bin_dir() / "headscale", net.topo.hs_config)
    hooks = BootingHooks(make_vm)
    with (
        apiserver.running(STATE / "cluster", fresh=True, ports=apiserver.Ports.free()) as cluster,
        HetznerAPI({HCLOUD_TOKEN: "read_write"}, hooks=hooks).running() as hetzner,
        TailscaleAPI(headscale).running() as tailnet,
    ):
        kubeconfig = deployer_kubeconfig(cluster, tmp / "kubeconfig")
        os.environ["KUBECONFIG"] = str(kubeconfig)
        engine = Engine(STATE / "pulumi")
        engine.setup()
        engine.env["KUBECONFIG"] = str(kubeconfig)
        engine.install_plugin("hcloud", sdk_version("pulumi-hcloud"), apiserver.bin_dir() / "pulumi-resource-hcloud")
        engine.install_plugin(
            "tailscale", sdk_version("pulumi-tailscale"), apiserver.bin_dir() / "pulumi-resource-tailscale"
        )
        # The user's tailnet: the policy the README asks for, owned by the API's user.
        headscale.user_id(KEY_OWNER)
        policy = stack_policy_for_headscale(auto_approve=False, owner=f"{KEY_OWNER}@")
        tailnet_policy_write(tailnet, policy)
        yield World(engine, hetzner, tailnet, hooks, net, cluster)
        engine.remove_stack(STACK)
        os.environ.pop("KUBECONFIG", None)


def tailnet_policy_write(tailnet: TailscaleAPI, policy: dict[str, Any]) -> None:
    request = urllib.request.Request(
        tailnet.base_url + "/api/v2/tailnet/-/acl", data=json.dumps(policy).encode(), method="POST"
    )
    request.add_header("Authorization", f"Bearer {tailnet.api_key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def diagnostics(events: list[auto.EngineEvent]) -> list[str]:
    return [
        f"{e.diagnostic_event.severity}: {e.diagnostic_event.message}"
        for e in events
        if e.diagnostic_event is not None and e.diagnostic_event.severity in ("warning", "error")
    ]


@dataclass
class Deployed:
    preview: auto.PreviewResult
    preview_diagnostics: list[str]
    up: auto.UpResult
    up_seconds: float


@pytest.fixture(scope="module")
def deployed(world: World) -> Deployed:
    stack = world.stack()
    preview_events: list[auto.EngineEvent] = []
    preview = stack.preview(on_event=preview_events.append)
    began = time.monotonic()
    up = stack.up(on_output=lambda line: None)
    return Deployed(preview, diagnostics(preview_events), up, time.monotonic() - began)


def test_preview_of_the_default_stack_plans_its_resources_without_warning(deployed: Deployed) -> None:
    assert deployed.preview_diagnostics == []
    creates = deployed.preview.change_summary.get(auto.OpType.CREATE, 0)
    assert creates > 0 and set(deployed.preview.change_summary) == {auto.OpType.CREATE}


def test_up_creates_the_firewall_and_the_server_and_boots_the_document_the_provider_sent(
    world: World, deployed: Deployed
) -> None:
    assert world.hooks.problems == []
    (server,) = world.hetzner.servers.values()
    (firewall,) = world.hetzner.firewalls.values()
    assert [e[0] for e in world.hooks.events] == ["created"]
    assert server["public_net"]["firewalls"] == [{"id": firewall["id"], "status": "applied"}]
    assert deployed.up.outputs["exitNodeHostname"].value == server["name"]


def test_the_exit_node_joined_tagged_with_its_exit_routes_approved(world: World, deployed: Deployed) -> None:
    hostname = deployed.up.outputs["exitNodeHostname"].value
    (node,) = [n for n in world.nodes() if n["name"] == hostname]
    assert node["tags"] == [EXIT_TAG]
    assert sorted(node.get("approved_routes") or []) == sorted(EXIT_ROUTES)
    assert deployed.up.outputs["exitNodeTailnetIp"].value in node["ip_addresses"]


def test_the_relay_key_is_reusable_and_tagged_and_the_exit_key_spent(world: World, deployed: Deployed) -> None:
    keys = [world.tailnet.key_record(k) for k in world.tailnet.minted_key_ids()]
    by_tag = {tuple(k["capabilities"]["devices"]["create"]["tags"]): k for k in keys}
    assert set(by_tag) == {(EXIT_TAG,), (RELAY_TAG,)}
    assert by_tag[(EXIT_TAG,)]["invalid"] is True  # single-use, spent by the VM's join
    relay = by_tag[(RELAY_TAG,)]
    assert relay["invalid"] is False and relay["capabilities"]["devices"]["create"]["reusable"] is True


def test_a_second_up_changes_nothing(world: World, deployed: Deployed) -> None:
    result = world.stack().up(on_output=lambda line: None)
    assert set(result.summary.resource_changes or {}) == {"same"}
    assert [e[0] for e in world.hooks.events] == ["created"]


def test_the_state_holds_no_key_token_or_user_data_in_plain_text(world: World, deployed: Deployed) -> None:
    state = json.dumps(export_state(world.engine, STACK))
    assert HCLOUD_TOKEN not in state and world.tailnet.api_key not in state
    assert "#cloud-config" not in state and "hskey-auth-" not in state


def test_destroy_powers_the_vm_off_the_device_leaves_and_the_keys_are_revoked(world: World, deployed: Deployed) -> None:
    hostname = deployed.up.outputs["exitNodeHostname"].value
    world.stack().destroy(on_output=lambda line: None)
    assert [e[0] for e in world.hooks.events] == ["created", "shutdown", "deleted"]
    assert world.hetzner.servers == {} and world.hetzner.firewalls == {}
    # The VM's logout unit ran at the ACPI shutdown: the device left the tailnet.
    assert wait_for(
        "the exit node to leave the tailnet", lambda: not any(n["name"] == hostname for n in world.nodes()), 30
    )
    assert all(world.tailnet.key_record(k)["invalid"] for k in world.tailnet.minted_key_ids())
    names = StackNames.for_stack(PROJECT, STACK)
    status, _ = world.cluster.request("GET", f"/api/v1/namespaces/{names.prefix}")
    assert status == 404
