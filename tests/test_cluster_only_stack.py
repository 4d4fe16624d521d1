"""A stack with your own exit node and the relay's key given deploys the
cluster part only: no Tailscale API key, no Hetzner token, no call to either
cloud, and the key stays a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
import pytest

from devtools.mockstack import Evaluation, FakeProviders, evaluate
from tests.stacks import RELAY_AUTH_KEY, cluster_only_config, kube_objects, with_config


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
