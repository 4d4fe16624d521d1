"""Order of creation, names that stay put across runs and never collide
between stacks, and a teardown that leaves nothing behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from builders.cloud_init import LOGOUT_UNIT, logout_script, logout_unit
from builders.names import StackNames
from devtools.mockstack import Evaluation, FakeProviders, Registration, evaluate
from tests.stacks import dev, dev_config, kube_objects, pinned, with_config

DEPLOYMENT = "kubernetes:apps/v1:Deployment"
POLICY = "kubernetes:networking.k8s.io/v1:NetworkPolicy"
ROUTES = "tailscale:index/deviceSubnetRoutes:DeviceSubnetRoutes"
SERVER = "hcloud:index/server:Server"
FIREWALL = "hcloud:index/firewall:Firewall"


def depends_on(evaluation: Evaluation, resource: Registration) -> set[str]:
    """URNs `resource` waits for, directly or through what those wait for."""
    seen: set[str] = set()
    todo = list(resource.dependencies)
    while todo:
        urn = todo.pop()
        if urn in seen:
            continue
        seen.add(urn)
        todo += [d for r in evaluation.resources if r.urn == urn for d in r.dependencies]
        # Waiting for a component means waiting for everything in it.
        todo += [r.urn for r in evaluation.resources if r.parent == urn]
    return seen


def urns(resources: Iterable[Registration]) -> set[str]:
    return {r.urn for r in resources}


def test_the_relay_starts_only_after_the_exit_node_is_approved() -> None:
    evaluation = dev()
    (deployment,) = evaluation.of_type(DEPLOYMENT)
    (routes,) = evaluation.of_type(ROUTES)
    assert routes.urn in depends_on(evaluation, deployment)


def test_every_network_policy_exists_before_the_relay_starts() -> None:
    for evaluation in (dev(), pinned()):
        (deployment,) = evaluation.of_type(DEPLOYMENT)
        policies = evaluation.of_type(POLICY)
        assert len(policies) == 3 + len(evaluation.outputs["protectedNamespaces"])
        assert urns(policies) <= depends_on(evaluation, deployment)


def test_the_approval_waits_for_the_server_and_the_server_for_its_firewall_and_key() -> None:
    evaluation = dev()
    (server,) = evaluation.of_type(SERVER)
    (routes,) = evaluation.of_type(ROUTES)
    needs = depends_on(evaluation, server)
    assert urns(evaluation.of_type("hcloud:index/firewall:Firewall")) <= needs
    assert any(r.name == "tailnet-exit-node-key" and r.urn in needs for r in evaluation.resources)
    assert server.urn in depends_on(evaluation, routes)


def test_names_are_stable_across_runs() -> None:
    first, second = evaluate(dev_config(), "dev"), evaluate(dev_config(), "dev")
    # (Registration order is not program order: compare as sets.)
    assert sorted((r.type, r.name) for r in first.resources) == sorted((r.type, r.name) for r in second.resources)
    assert first.outputs == second.outputs
    key = lambda m: (m["kind"], m["metadata"].get("namespace", ""), m["metadata"]["name"])  # noqa: E731
    assert sorted(kube_objects(first), key=key) == sorted(kube_objects(second), key=key)


def _external_names(evaluation: Evaluation) -> set[str]:
    """Names that live outside the developer's own cluster: Hetzner and the tailnet."""
    (server,) = evaluation.of_type(SERVER)
    (firewall,) = evaluation.of_type("hcloud:index/firewall:Firewall")
    keys = evaluation.of_type("tailscale:index/tailnetKey:TailnetKey")
    (deployment,) = kube_objects(evaluation, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    return {
        server.plain()["name"],
        firewall.plain()["name"],
        env["TS_HOSTNAME"],
        *(k.plain()["description"] for k in keys),
    }


def test_two_stacks_side_by_side_share_no_name_in_hetzner_or_the_tailnet() -> None:
    alice, bob = evaluate(dev_config(), "alice"), evaluate(dev_config(), "bob")
    alice_names, bob_names = _external_names(alice), _external_names(bob)
    assert len(alice_names) == 5 and len(bob_names) == 5
    assert not alice_names & bob_names
    # Stack names that differ only in characters a hostname cannot hold still differ.
    assert not _external_names(evaluate(dev_config(), "Alice.Dev")) & _external_names(
        evaluate(dev_config(), "alice-dev")
    )


def test_two_developers_dev_stacks_in_separate_backends_share_no_name_in_hetzner_or_the_exit_nodes_hostname() -> None:
    # Same project, same stack name, each its own backend: the keys each one
    # mints (and so its VM generation) are its own, as in a real tailnet.
    alice = evaluate(dev_config(), "dev", fakes=FakeProviders(tailnet="alice's backend"))
    bob = evaluate(dev_config(), "dev", fakes=FakeProviders(tailnet="bob's backend"))
    for typ in (SERVER, FIREWALL):
        (a,), (b,) = alice.of_type(typ), bob.of_type(typ)
        assert a.plain()["name"] != b.plain()["name"], typ
    assert alice.outputs["exitNodeHostname"] != bob.outputs["exitNodeHostname"]
    # Still readable: which stack, and which kind of thing.
    (firewall,) = alice.of_type(FIREWALL)
    assert firewall.plain()["name"].startswith("te-dev-")
    assert alice.outputs["exitNodeHostname"].startswith("te-dev-") and "-exit-" in alice.outputs["exitNodeHostname"]


def test_the_firewall_is_renamed_with_each_new_exit_node_vm() -> None:
    # A new key is a new VM generation: the firewall goes with the VM it guards.
    names = StackNames.for_stack("tailscale-egress", "dev")
    assert names.firewall("kAAAA1111CNTRL") != names.firewall("kBBBB2222CNTRL")
    assert names.firewall("kAAAA1111CNTRL") == names.firewall("kAAAA1111CNTRL")
    assert names.firewall("kAAAA1111CNTRL") != names.exit_node_hostname("kAAAA1111CNTRL")


def test_hetzner_resources_say_which_stack_owns_them() -> None:
    evaluation = evaluate(dev_config(), "alice")
    for typ in (SERVER, "hcloud:index/firewall:Firewall"):
        (resource,) = evaluation.of_type(typ)
        assert resource.plain()["labels"]["managed-by"] == "tailscale-egress"
        assert resource.plain()["labels"]["stack"].startswith("te-alice-")


def test_existing_namespaces_are_only_labelled_and_new_ones_are_created() -> None:
    evaluation = pinned()
    patched = {r.plain()["metadata"]["name"] for r in evaluation.of_type("kubernetes:core/v1:NamespacePatch")}
    created = {r.plain()["metadata"]["name"] for r in evaluation.of_type("kubernetes:core/v1:Namespace")}
    # Destroying a patch removes only the labels the stack set; destroying a
    # Namespace deletes it: so the stack must never create default or team-b.
    assert patched == {"default", "team-b"}
    assert created == {"team-a", "tailscale-egress", "tailscale-egress-node-guard"}


def test_system_and_other_namespaces_are_untouched() -> None:
    objects = kube_objects(pinned())
    touched = {m["metadata"]["namespace"] for m in objects if "namespace" in m["metadata"]}
    touched |= {m["metadata"]["name"] for m in objects if m["kind"] == "Namespace"}
    assert touched == {"default", "team-a", "team-b", "tailscale-egress", "tailscale-egress-node-guard"}


def test_the_relay_leaves_the_tailnet_when_its_pod_stops() -> None:
    (deployment,) = kube_objects(dev(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    # In-memory state + an ephemeral key: tailscaled logs out on SIGTERM.
    assert env["TS_KUBE_SECRET"] == "" and "TS_STATE_DIR" not in env
    assert pod["terminationGracePeriodSeconds"] >= 10
    (relay_key,) = [r for r in dev().of_type("tailscale:index/tailnetKey:TailnetKey") if r.name == "tailnet-relay-key"]
    assert relay_key.plain()["ephemeral"] is True


def test_destroying_the_server_logs_the_exit_node_out_first() -> None:
    (server,) = dev().of_type(SERVER)
    inputs = server.plain()
    assert inputs["shutdownBeforeDeletion"] is True
    user_data = yaml.safe_load(inputs["userData"])
    units = [f for f in user_data["write_files"] if f["path"] == f"/etc/systemd/system/{LOGOUT_UNIT}"]
    assert units and "ExecStop=" in units[0]["content"]


def test_a_new_exit_node_key_means_a_new_vm_with_a_new_hostname() -> None:
    (server,) = dev().of_type(SERVER)
    (exit_key,) = [r for r in dev().of_type("tailscale:index/tailnetKey:TailnetKey") if "exit" in r.name]
    # The fake key ID is derived from the key's resource name; the hostname carries it.
    key_id = "k" + __import__("devtools.mockstack", fromlist=["_short_hash"])._short_hash(exit_key.name)
    assert server.plain()["name"].endswith(key_id[-8:].lower())
    assert dev().outputs["exitNodeHostname"] == server.plain()["name"]


@pytest.mark.parametrize(
    "change", [{"serverType": "cpx22"}, {"location": "hel1"}, {"image": "debian-13"}], ids=lambda c: next(iter(c))
)
def test_a_change_the_vm_cannot_take_in_place_mints_a_new_key_and_so_a_new_vm(change: dict[str, str]) -> None:
    # The hcloud provider resizes a server in place with a hard power-off and leaves it off (seen with the
    # real plugin, tests/engine/test_hcloud_provider.py): the exit node would be gone. The VM's spec is in the
    # exit node key's description, which replaces the key when it changes (replace_on_changes), and a new key
    # is a new VM generation (hostname, firewall, user_data), created before the old VM is shut down.
    def exit_key_description(config: dict[str, Any]) -> str:
        evaluation = evaluate(config, "dev")
        assert evaluation.error is None, evaluation.error
        description: str = evaluation.one("tailscale:index/tailnetKey:TailnetKey", "tailnet-exit-node-key").plain()[
            "description"
        ]
        return description

    before = exit_key_description(dev_config())
    assert exit_key_description(dev_config()) == before, "the same spec must keep the key (and the VM)"
    after = exit_key_description(with_config(dev_config(), "exitNode", **change))
    assert after != before and len(after) <= 50
    # An SSH rule changes only the firewall, in place: no new VM for it.
    ssh = exit_key_description(with_config(dev_config(), "exitNode", sshAllowedCidrs=["198.51.100.7/32"]))
    assert ssh == before


def test_bring_your_own_exit_node_creates_nothing_on_hetzner() -> None:
    config = with_config(dev_config(), "exitNode", existingTailnetIp="100.64.0.7", existingPublicIps=["203.0.113.7"])
    evaluation = evaluate(config, "byo")
    assert evaluation.error is None, evaluation.error
    assert not [r for r in evaluation.resources if r.type.startswith("hcloud:")]
    assert not evaluation.of_type(ROUTES)
    assert [r.name for r in evaluation.of_type("tailscale:index/tailnetKey:TailnetKey")] == ["tailnet-relay-key"]
    (deployment,) = kube_objects(evaluation, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "--exit-node=100.64.0.7" in env["TS_EXTRA_ARGS"].split()


def _run_logout_script(tmp_path: Path, system_state: str, jobs: str) -> bool:
    """Runs the exit node's logout script with `systemctl` answering as a VM
    would; returns whether it logged out."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = is-system-running ]; then echo {system_state}; exit 1; fi\n'
        f'if [ "$1" = list-jobs ]; then printf "%s\\n" "{jobs}"; fi\n'
    )
    (bin_dir / "tailscale").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/tailscale-called\n')
    script = tmp_path / "logout"
    script.write_text(logout_script())
    for f in (bin_dir / "systemctl", bin_dir / "tailscale", script):
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["/bin/sh", str(script)], env=env, check=True, timeout=10)
    called = tmp_path / "tailscale-called"
    return called.exists() and called.read_text().strip() == "logout"


def test_powering_off_the_vm_logs_the_exit_node_out(tmp_path: Path) -> None:
    assert _run_logout_script(tmp_path, "stopping", "1 poweroff.target start waiting")


def test_a_reboot_or_an_upgrade_restarting_tailscaled_keeps_the_exit_node(tmp_path: Path) -> None:
    (tmp_path / "reboot").mkdir()
    assert not _run_logout_script(tmp_path / "reboot", "stopping", "7 reboot.target start waiting")
    (tmp_path / "upgrade").mkdir()
    assert not _run_logout_script(tmp_path / "upgrade", "running", "")
    # An upgrade restarts tailscaled: a unit that Requires= it would be stopped with it.
    assert "Requires=tailscaled" not in logout_unit() and "BindsTo=" not in logout_unit()
