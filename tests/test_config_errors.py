"""Bad input is refused before any resource exists: one line per problem,
naming the key, the value and what is allowed; no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pulumi
import pytest

from builders.tailnet_policy import policy_tests
from config import ConfigError, check_config, parse_config
from devtools.mockstack import FakeProviders, evaluate
from preflight import PreflightError, protected_namespace_problems, server_type_problem
from tests.stacks import dev_config, pinned_config, repo_path, with_config
from tools.check_stack_file import main as check_stack_file_main


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
        ("cluster", {"relayReplica": 2}, "cluster.relayReplica = 2: unknown key; did you mean cluster.relayReplicas?"),
        ("cluster", {"protectedNamespaces": [{"name": "a", "crate": True}]}, "cluster.protectedNamespaces[0].crate = True: unknown key; did you mean cluster.protectedNamespaces[0].create?"),
        ("exitNode", {"sshAllowedCidr": ["203.0.113.7/32"]}, "exitNode.sshAllowedCidr = ['203.0.113.7/32']: unknown key; did you mean exitNode.sshAllowedCidrs?"),
        ("tailnet", {"loginserver": "https://hs.example.com"}, "tailnet.loginserver = 'https://hs.example.com': unknown key; did you mean tailnet.loginServer?"),
        ("cluster", {"relayImage": "ghcr.io/tailscale/tailscale:stable"}, "cluster.relayImage = 'ghcr.io/tailscale/tailscale:stable': must be pinned to an exact version or a digest (the tag 'stable' can move to another image), such as ghcr.io/tailscale/tailscale:v1.102.5"),
        ("cluster", {"relayImage": "ghcr.io/tailscale/tailscale:unstable"}, "cluster.relayImage = 'ghcr.io/tailscale/tailscale:unstable': must be pinned to an exact version"),
        ("cluster", {"relayImage": "ghcr.io/tailscale/tailscale:v1"}, "cluster.relayImage = 'ghcr.io/tailscale/tailscale:v1': must be pinned to an exact version"),
        ("cluster", {"relayImage": "ghcr.io/tailscale/tailscale:1.102"}, "cluster.relayImage = 'ghcr.io/tailscale/tailscale:1.102': must be pinned to an exact version"),
        ("cluster", {"relayImage": "ghcr.io/tailscale/tailscale@sha256:abc"}, "or ghcr.io/tailscale/tailscale@sha256:<64 hex digits>"),
        ("exitNode", {"sshAllowedCidrs": ["0.0.0.0/0"]}, "exitNode.sshAllowedCidrs = ['0.0.0.0/0']: 0.0.0.0/0 opens SSH to the whole internet"),
        ("exitNode", {"sshAllowedCidrs": ["203.0.113.7/32", "::/0"]}, "exitNode.sshAllowedCidrs = ['203.0.113.7/32', '::/0']: ::/0 opens SSH to the whole internet"),
        ("exitNode", {"sshAllowedCidrs": ["0.0.0.0/1", "128.0.0.0/1"]}, "0.0.0.0/1, 128.0.0.0/1 opens SSH to the whole internet"),
        ("exitNode", {"sshAllowedCidrs": ["2000::/3"]}, "or set exitNode.sshAllowWholeInternet: true to accept it"),
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


def test_the_dev_stack_file_is_valid_and_sets_only_what_a_user_chooses() -> None:
    raw = {k.split(":", 1)[1]: v for k, v in dev_config().items()}
    parse_config(raw)
    # A copy must not freeze defaults that later releases move (the relay image...).
    assert "relayImage" not in raw.get("cluster", {})
    assert "image" not in raw.get("exitNode", {})
    chosen = {f"{section}.{key}" for section, keys in raw.items() for key in keys}
    assert chosen == {"exitNode.location", "cluster.context", "cluster.protectedNamespaces"}
    # Each one with a comment saying what it is.
    lines = repo_path("Pulumi.dev.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("    ") and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), line


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
        "tests": policy_tests("tag:egress-exit", "tag:egress-relay"),
    }
    assert evaluate(dev_config(), "ok", fakes=FakeProviders(policy=policy)).error is None


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


# Front door: typos are refused with the closest known name, images must be
# pinned exactly, SSH from the whole internet must be acknowledged.


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("tailscale-egress:clusters", "tailscale-egress:clusters: unknown key; did you mean tailscale-egress:cluster?"),
        ("tailscale-egress:exitnode", "tailscale-egress:exitnode: unknown key; did you mean tailscale-egress:exitNode?"),
        ("tailscale-egress:relayAuthkey", "did you mean tailscale-egress:relayAuthKey?"),
        ("tailscale_egress:cluster", "tailscale_egress:cluster: unknown namespace 'tailscale_egress'; did you mean tailscale-egress:cluster?"),
        ("tailscale-egres:cluster", "tailscale-egres:cluster: unknown namespace 'tailscale-egres'; did you mean tailscale-egress:cluster?"),
        ("tailscale_egress:clustre", "did you mean tailscale-egress:cluster?"),
        ("tailscale-egress:verbose", "tailscale-egress:verbose: unknown key; the keys are exitNode, tailnet, cluster"),
    ],
)  # fmt: skip
def test_an_unknown_key_is_refused_with_the_closest_known_one(key: str, expected: str) -> None:
    config = dev_config() | {key: {"context": "rancher-desktop"}}
    message = refused(config)
    assert expected in message
    assert "{'context'" not in message  # the value of an unknown key may be a secret: not shown


def test_an_unknown_key_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # How the CLI hands config to some language hosts: one JSON object in PULUMI_CONFIG.
    monkeypatch.setenv("PULUMI_CONFIG", '{"tailscale-egress:clusters": "{}"}')
    assert "did you mean tailscale-egress:cluster?" in refused(dev_config())


def test_keys_of_other_namespaces_and_the_relay_key_are_left_alone() -> None:
    config = pinned_config() | {
        "hcloud:token": "MOCK",
        "tailscale:apiKey": "MOCK",
        "tailscale:tailnet": "example.com",
        "kubernetes:enableServerSideApply": "true",
        "pulumi:disable-default-providers": '["*"]',
        "aws:region": "eu-central-1",
    }
    assert "tailscale-egress:relayAuthKey" in config
    result = evaluate(config, "ok", secret_keys=("tailscale-egress:relayAuthKey", "hcloud:token", "tailscale:apiKey"))
    assert result.error is None, result.error


def test_unknown_keys_and_bad_values_are_reported_together() -> None:
    config = with_config(dev_config(), "cluster", relayImage="ghcr.io/tailscale/tailscale:stable")
    config["tailscale-egress:exitnode"] = {}
    message = refused(config)
    assert "tailscale-egress:exitnode: unknown key" in message and "cluster.relayImage" in message


@pytest.mark.parametrize(
    "image",
    [
        "ghcr.io/tailscale/tailscale:v1.102.5",
        "ghcr.io/tailscale/tailscale:1.102.5",
        "ghcr.io/tailscale/tailscale@sha256:" + "0123456789abcdef" * 4,
        "ghcr.io/tailscale/tailscale:v1.102.5@sha256:" + "0123456789abcdef" * 4,
        "registry.example.com:5000/mirror/tailscale:v1.102.5",
    ],
)
def test_an_image_pinned_to_an_exact_version_or_digest_is_accepted(image: str) -> None:
    assert parse_config({"cluster": {"relayImage": image}}).cluster.relay_image == image


def test_ssh_from_the_whole_internet_is_accepted_when_acknowledged() -> None:
    cfg = parse_config({"exitNode": {"sshAllowedCidrs": ["0.0.0.0/0", "::/0"], "sshAllowWholeInternet": True}})
    assert cfg.exit_node.ssh_allowed_cidrs == ["0.0.0.0/0", "::/0"]
    # The largest blocks one organisation holds are not the whole internet.
    cfg = parse_config({"exitNode": {"sshAllowedCidrs": ["17.0.0.0/8", "2003::/19"]}})
    assert cfg.exit_node.ssh_allowed_cidrs == ["17.0.0.0/8", "2003::/19"]


def test_the_firewall_opens_ssh_only_to_acknowledged_whole_internet() -> None:
    config = with_config(dev_config(), "exitNode", sshAllowedCidrs=["0.0.0.0/0"], sshAllowWholeInternet=True)
    result = evaluate(config, "ssh")
    assert result.error is None, result.error
    (firewall,) = result.of_type("hcloud:index/firewall:Firewall")
    ssh = [r for r in firewall.plain()["rules"] if r.get("port") == "22"]
    assert [r["sourceIps"] for r in ssh] == [["0.0.0.0/0"]]


# The stack file, checked offline before `pulumi` runs (make preview, make up).
CHECK = [sys.executable, str(repo_path("tools", "check_stack_file.py"))]


def check_stack_file(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHECK, str(path)], capture_output=True, text=True, check=False)


def test_the_stack_file_check_accepts_the_dev_stack_and_a_stack_not_created_yet(tmp_path: Path) -> None:
    assert check_stack_file_main([str(repo_path("Pulumi.dev.yaml"))]) == 0
    assert check_stack_file_main([str(tmp_path / "Pulumi.new.yaml")]) == 0


def test_the_stack_file_check_refuses_a_yaml_error_in_one_line(tmp_path: Path) -> None:
    stack_file = tmp_path / "Pulumi.broken.yaml"
    stack_file.write_text("config:\n  tailscale-egress:exitNode:\n    location: fsn1\n   serverType: cx23\n")
    done = check_stack_file(stack_file)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{stack_file}:4:4: not valid YAML: expected <block end>, but found '<block mapping start>'"
        " (while parsing a block mapping on line 2)"
    ]


def test_the_stack_file_check_refuses_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    stack_file = tmp_path / "Pulumi.typo.yaml"
    stack_file.write_text(
        "config:\n"
        "  tailscale:apiKey:\n    secure: v1:AAAA\n"
        "  tailscale_egress:cluster:\n    context: rd\n"
        "  tailscale-egress:exitNode:\n    sshAllowedCidrs: [0.0.0.0/0]\n"
        "  tailscale-egress:cluster:\n    relayImage: ghcr.io/tailscale/tailscale:stable\n"
    )
    done = check_stack_file(stack_file)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == f"{stack_file}: invalid stack configuration:"
    assert len(lines) == 4, done.stderr
    assert lines[1].startswith(
        "  tailscale_egress:cluster: unknown namespace 'tailscale_egress'; did you mean tailscale-egress:cluster?"
    )
    assert "tailscale-egress:exitNode.sshAllowedCidrs = ['0.0.0.0/0']: 0.0.0.0/0 opens SSH" in done.stderr
    assert "tailscale-egress:cluster.relayImage = 'ghcr.io/tailscale/tailscale:stable': must be pinned" in done.stderr


# The namespaces the stack labels in place: read from the cluster before anything is created.


def test_a_namespace_to_label_that_does_not_exist_is_named_with_the_fix() -> None:
    cfg = parse_config({"cluster": {"protectedNamespaces": ["default", "team-x", {"name": "new", "create": True}]}})
    (problem,) = protected_namespace_problems(cfg, {"default": {}})
    assert problem.startswith("tailscale-egress:cluster.protectedNamespaces[1] = 'team-x': no such namespace")
    assert "kubectl create namespace team-x" in problem and "{name: team-x, create: true}" in problem


def test_a_pod_security_label_of_another_value_is_refused_and_the_same_value_is_fine() -> None:
    cfg = parse_config({"cluster": {"protectedNamespaces": ["default", "team-a"]}})
    existing = {
        "default": {"pod-security.kubernetes.io/enforce": "restricted", "team": "x"},
        "team-a": {"pod-security.kubernetes.io/enforce": "baseline"},
    }
    (problem,) = protected_namespace_problems(cfg, existing)
    assert problem == (
        "tailscale-egress:cluster.protectedNamespaces[1] = 'team-a': the namespace has"
        " pod-security.kubernetes.io/enforce=baseline and the stack sets restricted; destroy could not give that"
        " label back. Set it first (kubectl label --overwrite namespace team-a"
        " pod-security.kubernetes.io/enforce=restricted) or remove it (kubectl label namespace team-a"
        " pod-security.kubernetes.io/enforce-), then run again"
    )


# What a newcomer typed: each message says what to type instead.


def test_a_nested_key_set_without_path_names_the_command_with_path() -> None:
    # `pulumi config set exitNode.location hel1` stores the literal key "exitNode.location".
    with pytest.raises(ConfigError) as err:
        check_config({"tailscale-egress:exitNode.location": "hel1"})
    assert (
        "tailscale-egress:exitNode.location: a nested key needs --path; remove this one and set it again with:"
        " pulumi config rm 'exitNode.location' && pulumi config set --path 'exitNode.location' <value>"
    ) in str(err.value)
    assert "did you mean" not in str(err.value)


def test_a_single_namespace_where_a_list_belongs_is_shown_as_a_list() -> None:
    with pytest.raises(ConfigError) as err:
        check_config({"tailscale-egress:cluster": {"protectedNamespaces": "default"}})
    message = str(err.value)
    assert (
        "tailscale-egress:cluster.protectedNamespaces = 'default': must be a list, such as [default, team-a]" in message
    )
    assert "Input should be" not in message


def test_render_of_a_stack_without_a_stack_file_says_how_to_create_one(capsys: pytest.CaptureFixture[str]) -> None:
    from tools import render

    assert render.main(["no-such-stack"]) == 2
    err = capsys.readouterr().err
    assert "pulumi stack init no-such-stack" in err
    assert "cp Pulumi.dev.yaml Pulumi.no-such-stack.yaml" in err


# A server type Hetzner does not sell in the chosen location: asked of Hetzner before anything is created.


def test_a_server_type_not_sold_in_the_location_is_refused_before_anything_is_created() -> None:
    result = evaluate(with_config(dev_config(), "exitNode", serverType="cax11", location="ash"), "notsold")
    assert isinstance(result.error, pulumi.RunError), repr(result.error)
    assert result.resources == [], [r.name for r in result.resources]
    assert (
        "tailscale-egress:exitNode.serverType = 'cax11' is not sold in exitNode.location = 'ash'; it is sold in"
        " fsn1, hel1, nbg1: pulumi config set --path exitNode.location fsn1, or choose another server type"
    ) in str(result.error)


def test_a_server_type_sold_but_not_available_now_says_so() -> None:
    problem = server_type_problem("cx23", "fsn1", {"fsn1": False, "nbg1": True})
    assert problem is not None and "'cx23' is not available at the moment in exitNode.location = 'fsn1'" in problem
    assert "pulumi config set --path exitNode.location nbg1" in problem
    assert server_type_problem("cx23", "nbg1", {"fsn1": False, "nbg1": True}) is None


def test_an_ingress_source_that_is_no_namespace_name_is_refused_naming_the_key() -> None:
    message = refused(with_config(dev_config(), "cluster", ingressFrom=["Kube_System"]))
    assert "tailscale-egress:cluster.ingressFrom[0] = 'Kube_System': must be a DNS label" in message


# A cloud API that refuses the stack's credentials: named, with the fix, before anything is created.


class RefusingProviders(FakeProviders):
    """Answers as the providers do when the API refuses the credential."""

    def __init__(self, refused_token: str, answer: str) -> None:
        super().__init__()
        self.refused_token, self.answer = refused_token, answer

    def call(  # type: ignore[override]
        self, args: pulumi.runtime.MockCallArgs
    ) -> dict[str, Any] | tuple[dict[str, Any], list[tuple[str, str]]]:
        if args.token == self.refused_token:
            return {}, [("", self.answer)]  # a failed invoke: the SDK raises "invoke of <token> failed: ..."
        return super().call(args)


def test_a_hetzner_token_the_api_refuses_is_named_with_the_fix_before_anything_is_created() -> None:
    answer = "unable to authenticate (unauthorized)"
    fakes = RefusingProviders("hcloud:index/getServerType:getServerType", answer)
    config = dev_config() | {"hcloud:endpoint": "http://127.0.0.1:9/v1"}
    result = evaluate(config, "badtoken", fakes=fakes)
    message = str(result.error)
    assert "Hetzner's API did not give the exit node's server type" in message
    assert "(at hcloud:endpoint http://127.0.0.1:9/v1: check that address too)" in message
    assert ": unable to authenticate (unauthorized)" in message and "invoke of" not in message
    assert "pulumi config set --secret hcloud:token <token>" in message
    assert result.resources == [], [r.name for r in result.resources]


def test_a_tailscale_key_the_api_refuses_is_named_with_the_fix_before_anything_is_created() -> None:
    answer = "the Tailscale API answered HTTP 401: API token invalid"
    result = evaluate(dev_config(), "badkey", fakes=RefusingProviders("tailscale:index/getAcl:getAcl", answer))
    message = str(result.error)
    assert "Tailscale's API did not give the tailnet policy file: the Tailscale API answered HTTP 401" in message
    assert (
        "pulumi config set --secret tailscale:apiKey <tskey-api-...>" in message and "check that address" not in message
    )
    assert result.resources == [], [r.name for r in result.resources]
