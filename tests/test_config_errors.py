"""Bad input is refused before any resource exists: one line per problem,
naming the key, the value and what is allowed; no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
import pytest

from config import ConfigError, StackConfig, parse_config
from preflight import PreflightError
from tests.stacks import dev_config, repo_path, with_config
from tools.mockstack import FakeProviders, evaluate


def refused(config: dict[str, Any], **kwargs: Any) -> str:
    """The message with which the stack refuses `config`; asserts nothing was created."""
    result = evaluate(config, "bad", **kwargs)
    assert result.error is not None, "the stack accepted a bad configuration"
    # RunError is what Pulumi prints as a plain message, without a traceback.
    assert isinstance(result.error, pulumi.RunError), repr(result.error)
    assert result.resources == [], [r.name for r in result.resources]
    return str(result.error)


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("exitNode", {"location": "fra1"}, "tailscale-egress:exitNode.location = 'fra1': must be one of fsn1, nbg1"),
        ("exitNode", {"serverType": "cx22"}, "exitNode.serverType = 'cx22': must be one of cx23"),
        ("exitNode", {"image": "ubuntu-20.04"}, "exitNode.image = 'ubuntu-20.04': must be one of ubuntu-24.04"),
        ("exitNode", {"sshAllowedCidrs": ["10.0.0.1/33"]}, "exitNode.sshAllowedCidrs = ['10.0.0.1/33']: must be a CIDR"),
        ("exitNode", {"existingTailnetIp": "192.168.1.4"}, "exitNode.existingTailnetIp = '192.168.1.4': must be a tailnet"),
        ("tailnet", {"relayTag": "egress-relay"}, "tailnet.relayTag = 'egress-relay': must look like \"tag:name\""),
        ("tailnet", {"exitNodeTag": "tag:"}, "tailnet.exitNodeTag = 'tag:': must look like"),
        ("tailnet", {"loginServer": "headscale.local"}, "tailnet.loginServer = 'headscale.local': must be the control"),
        ("tailnet", {"controlPlaneCidrs": ["10.0.0.0/8"]}, "tailnet.controlPlaneCidrs = ['10.0.0.0/8']: 10.0.0.0/8 is not"),
        ("cluster", {"relayImage": "ghcr.io/tailscale/tailscale:latest"}, "cluster.relayImage = 'ghcr.io/tailscale/tailscale:latest': must be pinned"),
        ("cluster", {"relayImage": "ghcr.io/tailscale/tailscale"}, "cluster.relayImage = 'ghcr.io/tailscale/tailscale': must be pinned"),
        ("cluster", {"protectedNamespaces": ["Team_A"]}, "cluster.protectedNamespaces[0] = 'Team_A': must be a DNS label"),
        ("cluster", {"protectedNamespaces": ["kube-system"]}, "cluster.protectedNamespaces[0] = 'kube-system': system namespaces"),
        ("cluster", {"protectedNamespaces": ["default", "default"]}, "cluster.protectedNamespaces[1] = 'default': listed twice"),
        ("cluster", {"protectedNamespaces": ["tailscale-egress"]}, "cluster.protectedNamespaces[0] = 'tailscale-egress': is the relay's own"),
        ("cluster", {"protectedNamespaces": []}, "cluster.protectedNamespaces = []: list at least one"),
        ("cluster", {"relayNamespace": "kube-system"}, "cluster.relayNamespace = 'kube-system': must be a namespace of its own"),
        ("cluster", {"podCidr": "10.42.0.0/8"}, "cluster.podCidr = '10.42.0.0/8': must be a CIDR"),
        ("cluster", {"relayReplica": 2}, "cluster.relayReplica = 2: unknown key"),
    ],
)  # fmt: skip
def test_each_bad_value_is_refused_with_key_value_and_what_is_allowed(
    section: str, values: dict[str, Any], expected: str
) -> None:
    assert expected in refused(with_config(dev_config(), section, **values))


def test_all_problems_are_reported_at_once() -> None:
    config = with_config(dev_config(), "exitNode", location="fra1", serverType="cx22")
    config = with_config(config, "tailnet", relayTag="tag:egress-exit")
    config = with_config(config, "cluster", protectedNamespaces=["default", "default"])
    message = refused(config)
    problems = [line for line in message.splitlines() if line.startswith("  tailscale-egress:")]
    assert len(problems) == 4, message
    assert "exitNode.location" in message and "exitNode.serverType" in message
    assert "tailnet.relayTag = 'tag:egress-exit': must differ from tailnet.exitNodeTag" in message
    assert "listed twice" in message


def test_self_hosted_control_server_needs_the_exit_node_tailnet_ip() -> None:
    message = refused(with_config(dev_config(), "tailnet", loginServer="https://hs.example.com"))
    assert "exitNode.existingTailnetIp = None: required with tailnet.loginServer" in message


def test_a_section_that_is_not_an_object_is_refused() -> None:
    config = dev_config()
    config["tailscale-egress:cluster"] = "rancher-desktop"
    assert "tailscale-egress:cluster = 'rancher-desktop': must be an object of keys" in refused(config)


def test_plain_namespace_names_mean_label_in_place() -> None:
    cfg = parse_config({"cluster": {"protectedNamespaces": ["default", {"name": "team-a", "create": True}]}})
    assert [(n.name, n.create) for n in cfg.cluster.protected_namespaces] == [("default", False), ("team-a", True)]


def test_the_dev_stack_file_is_valid_and_spells_out_every_key_at_its_default() -> None:
    raw = {k.split(":", 1)[1]: v for k, v in dev_config().items()}
    cfg = parse_config(raw)
    defaults = StackConfig().model_dump(by_alias=True)
    assert cfg.model_dump(by_alias=True) == defaults
    for section, keys in defaults.items():
        assert set(raw[section]) == set(keys), section


def test_config_error_is_a_pulumi_run_error() -> None:
    with pytest.raises(ConfigError):
        parse_config({"exitNode": {"location": "nowhere"}})


# Credentials, the cluster and the tailnet policy: checked before anything is created.


def kubeconfig(tmp_path: Path, server: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: rd, cluster: {{server: '{server}'}}}}]\n"
        "contexts: [{name: rancher-desktop, context: {cluster: rd, user: rd}}]\n"
        "users: [{name: rd, user: {}}]\n"
    )
    return str(path)


def test_missing_credentials_are_named_with_the_command_that_sets_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("HCLOUD_TOKEN", "TAILSCALE_API_KEY", "TAILSCALE_OAUTH_CLIENT_ID", "TAILSCALE_OAUTH_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    config = with_config(dev_config(), "cluster", kubeconfig=kubeconfig(tmp_path, "https://127.0.0.1:1"))
    message = refused(config, offline=False)
    assert isinstance(evaluate(config, "bad", offline=False).error, PreflightError)
    assert "hcloud:token is not set" in message
    assert "pulumi config set --secret hcloud:token <token>" in message
    assert "pulumi config set --secret tailscale:apiKey" in message


def test_credentials_from_stack_config_satisfy_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HCLOUD_TOKEN", raising=False)
    monkeypatch.delenv("TAILSCALE_API_KEY", raising=False)
    config = with_config(dev_config(), "cluster", kubeconfig=kubeconfig(tmp_path, "https://127.0.0.1:1"))
    config |= {"hcloud:token": "MOCK", "tailscale:apiKey": "MOCK"}
    message = refused(config, offline=False, secret_keys=("hcloud:token", "tailscale:apiKey"))
    assert "is not set" not in message
    # What is left is the cluster, which is not running here.
    assert "the API server https://127.0.0.1:1 is not reachable" in message
    assert "Start Rancher Desktop" in message


def test_an_unknown_kube_context_is_named_with_the_contexts_there(tmp_path: Path) -> None:
    config = with_config(
        dev_config(), "cluster", context="k3d-dev", kubeconfig=kubeconfig(tmp_path, "https://127.0.0.1:1")
    )
    config |= {"hcloud:token": "MOCK", "tailscale:apiKey": "MOCK"}
    message = refused(config, offline=False)
    assert "cluster.context = 'k3d-dev': no such context in" in message
    assert "(contexts there: rancher-desktop)" in message


def test_a_tailnet_policy_without_the_tags_stops_before_anything_is_created() -> None:
    message = refused(dev_config(), fakes=FakeProviders(policy={"acls": []}))
    assert 'tagOwners has no "tag:egress-exit"' in message
    assert 'tagOwners has no "tag:egress-relay"' in message
    assert 'no grant lets "tag:egress-relay" reach "autogroup:internet"' in message
    # The snippet to paste is in the message.
    assert '"autogroup:internet"' in message and '"tag:egress-relay": [' in message


def test_a_policy_that_owns_the_tags_but_lacks_the_internet_grant_is_refused() -> None:
    policy = {"tagOwners": {"tag:egress-exit": ["autogroup:admin"], "tag:egress-relay": ["autogroup:admin"]}}
    message = refused(dev_config(), fakes=FakeProviders(policy=policy))
    assert "tagOwners has no" not in message
    assert 'no grant lets "tag:egress-relay" reach "autogroup:internet"' in message


def test_a_legacy_acl_rule_to_the_internet_satisfies_the_policy_check() -> None:
    policy = {
        "tagOwners": {"tag:egress-exit": ["autogroup:admin"], "tag:egress-relay": ["autogroup:admin"]},
        "acls": [{"action": "accept", "src": ["tag:egress-relay"], "dst": ["autogroup:internet:*"]}],
    }
    assert evaluate(dev_config(), "ok", fakes=FakeProviders(policy=policy)).error is None


def test_the_readme_documents_every_key() -> None:
    readme = repo_path("README.md").read_text()
    for section, keys in StackConfig().model_dump(by_alias=True).items():
        for key in keys:
            assert f"| `{section}.{key}` |" in readme, f"{section}.{key} is missing from the README's reference"


# Pinned relay egress (the default) needs every address the relay uses.


def test_your_own_exit_node_without_its_public_ips_is_refused_while_pinned() -> None:
    message = refused(with_config(dev_config(), "exitNode", existingTailnetIp="100.64.0.7"))
    assert (
        "tailscale-egress:exitNode.existingPublicIps = []: required with exitNode.existingTailnetIp"
        " while tailnet.relayEgress is pinned (the default)"
    ) in message
    assert "or set tailnet.relayEgress to public" in message


def test_your_own_exit_node_without_public_ips_is_accepted_with_the_public_opt_in() -> None:
    config = with_config(dev_config(), "exitNode", existingTailnetIp="100.64.0.7")
    config = with_config(config, "tailnet", relayEgress="public")
    assert evaluate(config, "public").error is None


def test_a_login_server_named_by_host_name_needs_its_addresses_while_pinned() -> None:
    config = with_config(dev_config(), "exitNode", existingTailnetIp="100.64.0.7", existingPublicIps=["203.0.113.7"])
    message = refused(with_config(config, "tailnet", loginServer="https://hs.example.com"))
    assert (
        "tailnet.controlPlaneCidrs = []: required with tailnet.loginServer = 'https://hs.example.com'"
        " (a host name) while tailnet.relayEgress is pinned"
    ) in message
    config = with_config(config, "tailnet", loginServer="https://hs.example.com", controlPlaneCidrs=["203.0.113.0/28"])
    config["tailscale-egress:relayAuthKey"] = "tskey-auth-MOCK"
    assert evaluate(config, "ok", secret_keys=("tailscale-egress:relayAuthKey",)).error is None


def test_an_unknown_relay_egress_mode_is_refused() -> None:
    message = refused(with_config(dev_config(), "tailnet", relayEgress="open"))
    assert "tailscale-egress:tailnet.relayEgress = 'open': must be one of pinned, public" in message
