"""The policy pack run by the real engine (`pulumi preview --policy-pack`):
the cluster-only stack passes, a weakened one fails before anything exists.

The engine built from the Go module proxy has no Python language host, so the
pack is started through `policy/analyzer`, which the engine launches as a
binary analyzer plugin; it runs the pack's own code (policy/__main__.py) with
this interpreter (POLICY_PYTHON), which has pulumi-policy installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pulumi
import pulumi_kubernetes as k8s
import pytest
from pulumi import automation as auto

from tests.engine.test_engine_lifecycle import bob_config
from tests.stacks import RELAY_AUTH_KEY
from tests.support.apiserver import Cluster
from tests.support.engine import Engine, run_project_program

pytestmark = pytest.mark.engine

PACK = str(Path(__file__).resolve().parents[2] / "policy" / "analyzer")


def preview_output(stack: auto.Stack) -> tuple[bool, str]:
    lines: list[str] = []
    try:
        stack.preview(policy_packs=[PACK], diff=True, color="never", on_output=lines.append)
    except auto.CommandError as err:
        return False, "\n".join(lines) + str(err)
    return True, "\n".join(lines)


def test_the_cluster_only_stack_passes_the_policy_pack(cluster: Cluster, engine: Engine) -> None:
    engine.env["POLICY_PYTHON"] = sys.executable
    stack = engine.stack("guarded", bob_config(cluster), secret_keys=(RELAY_AUTH_KEY,))
    ok, output = preview_output(stack)
    engine.remove_stack("guarded")
    assert ok, output
    assert "tailscale-egress-guardrails" in output
    assert "mandatory" not in output


def test_a_privileged_pod_in_a_protected_namespace_fails_the_preview(cluster: Cluster, engine: Engine) -> None:
    engine.env["POLICY_PYTHON"] = sys.executable

    def weakened() -> None:
        # What a later change could add: a debugging pod with the host's network.
        run_project_program()
        provider = k8s.Provider("debug-cluster", kubeconfig=str(cluster.kubeconfig), context=cluster.context())
        k8s.core.v1.Pod(
            "debug",
            metadata={"name": "debug", "namespace": "team-b"},
            spec={"hostNetwork": True, "containers": [{"name": "c", "image": "busybox:1.36.1"}]},
            opts=pulumi.ResourceOptions(provider=provider),
        )

    stack = engine.stack("weakened", bob_config(cluster), secret_keys=(RELAY_AUTH_KEY,))
    lines: list[str] = []
    with pytest.raises(auto.CommandError):
        stack.preview(policy_packs=[PACK], color="never", program=weakened, on_output=lines.append)
    engine.remove_stack("weakened")
    output = "\n".join(lines)
    assert "mandatory" in output and "hostNetwork" in output, output
