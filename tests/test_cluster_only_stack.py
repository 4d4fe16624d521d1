"""A stack with your own exit node and the relay's key given deploys the
cluster part only: no Tailscale API key, no Hetzner token, no call to either
cloud, and the key stays a secret."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml

from builders.cloud_init import ExitNodeBoot, render_cloud_init
from builders.exit_node_guard import guard_files
from devtools.mockstack import Evaluation, FakeProviders, evaluate
from tests.stacks import RELAY_AUTH_KEY, cluster_only_config, dev_config, kube_objects, with_config
from tests.support.cloud_init import shellcheck
from tools.exit_node_guard import write_guard


class NoCloud(FakeProviders):
    """Fails the evaluation on any call to Tailscale's or Hetzner's provider."""

    def __init__(self) -> None:
        super().__init__()
        self.cloud: list[str] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        if args.typ.startswith(("tailscale:", "hcloud:", "pulumi:providers:tailscale", "pulumi:providers:hcloud")):
            self.cloud.append(args.typ)
        return super().new_resource(args)

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:  # type: ignore[override]
        self.cloud.append(args.token)
        return super().call(args)


def cluster_only(config: dict[str, Any] | None = None, **kwargs: Any) -> tuple[Evaluation, NoCloud]:
    fakes = NoCloud()
    result = evaluate(
        config or cluster_only_config(), "cluster-only", fakes=fakes, secret_keys=(RELAY_AUTH_KEY,), **kwargs
    )
    return result, fakes


def kubeconfig(tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        "clusters: [{name: rd, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "contexts: [{name: rancher-desktop, context: {cluster: rd, user: rd}}]\n"
        "users: [{name: rd, user: {}}]\n"
    )
    return str(path)


def test_uses_neither_tailscale_nor_hetzner() -> None:
    result, fakes = cluster_only()
    assert result.error is None, result.error
    assert fakes.cloud == []
    packages = {r.type.removeprefix("pulumi:providers:").split(":")[0] for r in result.resources}
    assert packages == {"kubernetes", "tailscale-egress"}


def test_needs_no_cloud_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HCLOUD_TOKEN", "TAILSCALE_API_KEY", "TAILSCALE_OAUTH_CLIENT_ID", "TAILSCALE_OAUTH_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    config = with_config(cluster_only_config(), "cluster", kubeconfig=kubeconfig(tmp_path))
    result, _ = cluster_only(config, offline=False)
    # The only thing left to complain about is the cluster, which is not running here.
    message = str(result.error)
    assert "is not set" not in message
    assert "the API server https://127.0.0.1:1 is not reachable" in message


def test_the_relay_gets_the_given_key_as_a_secret() -> None:
    result, _ = cluster_only()
    (secret,) = [r for r in result.of_type("kubernetes:core/v1:Secret")]
    assert secret.secret_paths() == ["stringData"]
    assert secret.plain()["stringData"]["authkey"] == cluster_only_config()[RELAY_AUTH_KEY]
    (deployment,) = kube_objects(result, "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "--exit-node=100.64.0.1" in env["TS_EXTRA_ARGS"]["value"].split()
    # The key itself is only in the Secret, which the relay reads as a file.
    assert env["TS_AUTHKEY"]["value"] == "file:/etc/tailscale-egress/auth/authkey"


def test_a_given_key_without_your_own_exit_node_is_refused() -> None:
    config = cluster_only_config()
    del config["tailscale-egress:exitNode"]["existingTailnetIp"]
    del config["tailscale-egress:exitNode"]["existingPublicIps"]
    result, fakes = cluster_only(config)
    assert isinstance(result.error, pulumi.RunError)
    assert "tailscale-egress:exitNode.existingTailnetIp = None: required with relayAuthKey" in str(result.error)
    assert "pulumi config rm relayAuthKey" in str(result.error)
    assert result.resources == [] and fakes.cloud == []


def test_a_given_key_with_a_managed_policy_is_refused() -> None:
    result, _ = cluster_only(with_config(cluster_only_config(), "tailnet", managePolicy=True))
    assert "tailscale-egress:tailnet.managePolicy = True: not possible with relayAuthKey" in str(result.error)
    assert result.resources == []


# Your own exit node: the stack says what it cannot check, and gives you the
# exit node guard to install yourself (issue 19, point 5).


def captured_warnings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The list every `pulumi.log.warn` of the program is appended to from now on."""
    printed: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda message, *args, **kwargs: printed.append(str(message)))
    return printed


def warnings_of(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    printed = captured_warnings(monkeypatch)
    result, _ = cluster_only(config)
    assert result.error is None, result.error
    return printed


def test_your_own_exit_node_is_named_unguarded_with_the_command_that_guards_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    printed = warnings_of(cluster_only_config(), monkeypatch)
    (guard,) = [w for w in printed if w.startswith("tailscale-egress:exitNode.existingTailnetIp")]
    assert "'100.64.0.1' (your own exit node): the stack cannot install the exit node guard there" in guard
    assert "make exit-node-guard" in guard and "install.sh" in guard
    (policy,) = [w for w in printed if w.startswith("tailscale-egress:relayAuthKey")]
    assert "relayAuthKey is given" in policy and "does not read or check the tailnet policy" in policy


def test_a_self_hosted_control_server_is_named_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    config = with_config(cluster_only_config(), "tailnet", loginServer="http://198.51.100.10:8080")
    printed = warnings_of(config, monkeypatch)
    (policy,) = [w for w in printed if w.startswith("tailscale-egress:tailnet.loginServer")]
    assert "cannot read this control server's policy" in policy and "headscale policy check" in policy


def test_the_default_stack_has_nothing_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    printed = captured_warnings(monkeypatch)
    assert evaluate(dev_config(), "dev").error is None
    assert not [w for w in printed if "cannot" in w], printed


def test_the_guard_for_your_own_exit_node_is_the_hetzner_vms_own(tmp_path: Path) -> None:
    document = yaml.safe_load(render_cloud_init(ExitNodeBoot(hostname="exit-1", image="debian-12", auth_key="k")))
    vm_files = {f["path"]: (f["permissions"], f["content"]) for f in document["write_files"]}
    written = write_guard(tmp_path / "guard")
    assert {f"/{p.relative_to(tmp_path / 'guard')}" for p in written} == {*guard_files(), "/install.sh"}
    for path, (mode, content) in guard_files().items():
        assert vm_files[path] == (mode, content), path
        on_disk = tmp_path / "guard" / path.lstrip("/")
        assert on_disk.read_text() == content and oct(on_disk.stat().st_mode & 0o777) == f"0o{mode[1:]}"
    install = tmp_path / "guard" / "install.sh"
    result = shellcheck(install)
    assert result.ok, result.output
    for path in guard_files():
        assert f'"$here{path}" {path}' in install.read_text()


def test_the_guards_install_script_refuses_to_run_as_anyone_but_root(tmp_path: Path) -> None:
    write_guard(tmp_path / "guard")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    script = (tmp_path / "guard" / "install.sh").read_text()
    done = subprocess.run([*nobody, "sh", "-s"], input=script, capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "run as root" in done.stderr
