"""The node guard: the one privileged part of the stack, and the script it runs.

The script is run here for real (busybox sh, the tailscale image's shell), with
stand-ins on PATH for the iptables binaries: `*-save` print a node's rules, the
others record how they were called. The rules' effect on real packets is
proven in tests/datapath/test_node_guard.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from builders.node_guard import chain_name
from config import ConfigError, parse_config
from devtools.mockstack import Evaluation, evaluate
from tests.stacks import dev, dev_config, kube_objects, with_config
from tests.support.kube import applied_objects
from tests.support.tools import executable

Manifest = dict[str, Any]
GUARD_NS = "tailscale-egress-node-guard"


def guard(evaluation: Evaluation) -> Manifest:
    (daemonset,) = kube_objects(evaluation, "DaemonSet")
    return daemonset


def guard_pod(evaluation: Evaluation) -> Manifest:
    spec: Manifest = guard(evaluation)["spec"]["template"]["spec"]
    return spec


def script_of(evaluation: Evaluation) -> str:
    command = guard_pod(evaluation)["containers"][0]["command"]
    assert command[:2] == ["/bin/sh", "-c"] and command[3:] == ["node-guard"]
    return str(command[2])


def busybox() -> Path:
    return executable("busybox", "sudo apt-get install busybox-static (the tailscale image's shell)")


def stub_bin(tmp_path: Path, saves: dict[str, str] | None = None) -> Path:
    """iptables stand-ins: `<fam>tables-<backend>-save` print `saves[...]`;
    `<fam>tables-<backend>` append their arguments to calls.log and fail only
    for -D (nothing to delete) and -S (print nothing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for fam in ("iptables", "ip6tables"):
        for backend in ("legacy", "nft"):
            name = f"{fam}-{backend}"
            out = tmp_path / f"{name}-save.out"
            out.write_text((saves or {}).get(f"{name}-save", ""))
            save = bin_dir / f"{name}-save"
            save.write_text(f"#!/bin/sh\ncat {out}\n")
            tool = bin_dir / name
            tool.write_text(
                f'#!/bin/sh\necho "{name} $*" >> {tmp_path / "calls.log"}\n'
                'for a in "$@"; do case "$a" in -D) exit 1;; esac; done\nexit 0\n'
            )
            save.chmod(0o755)
            tool.chmod(0o755)
    return bin_dir


def run_script(script: str, mode: str, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(
        [str(busybox()), "sh", "-c", script, "node-guard", mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


# ------------------------------------------------------------------ backend detection
KUBE_ROUTER = ":KUBE-ROUTER-INPUT - [0:0]\n:KUBE-ROUTER-FORWARD - [0:0]\n-A INPUT -j KUBE-ROUTER-INPUT\n"
KUBELET_HINT = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
NFT, LEGACY, NFT6, LEGACY6 = "iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"


def rules(n: int) -> str:
    return "*filter\n" + "".join(f"-A FORWARD -s 10.0.{i}.0/24 -j ACCEPT\n" for i in range(n)) + "COMMIT\n"


@pytest.mark.parametrize(
    ("saves", "expected"),
    [
        pytest.param({NFT: KUBE_ROUTER, LEGACY: rules(50)}, "nft", id="kube-router-nft"),
        pytest.param({LEGACY: KUBE_ROUTER, NFT: rules(50)}, "legacy", id="kube-router-legacy"),
        pytest.param({LEGACY6: KUBE_ROUTER}, "legacy", id="kube-router-legacy-ipv6-only"),
        pytest.param({NFT: KUBELET_HINT, LEGACY: rules(20)}, "nft", id="kubelet-hint-nft"),
        pytest.param({LEGACY: KUBELET_HINT + rules(1), NFT: rules(20)}, "legacy", id="kubelet-hint-legacy"),
        pytest.param({LEGACY: rules(12), NFT: rules(3)}, "legacy", id="more-rules-legacy"),
        pytest.param({LEGACY: rules(3), NFT6: rules(12)}, "nft", id="more-rules-nft"),
        # kube-router's chains left in both (after a switch): the rules decide.
        pytest.param(
            {LEGACY: KUBE_ROUTER, NFT: KUBE_ROUTER + rules(30)}, "nft", id="stale-both"
        ),
    ],
)  # fmt: skip
def test_the_guard_uses_the_iptables_backend_kube_router_uses(
    tmp_path: Path, saves: dict[str, str], expected: str
) -> None:
    p = run_script(script_of(dev()), "detect", stub_bin(tmp_path, saves))
    assert (p.returncode, p.stdout.strip()) == (0, expected), p.stderr


def test_with_no_rules_in_either_backend_the_guard_installs_nothing(tmp_path: Path) -> None:
    bin_dir = stub_bin(tmp_path)
    assert run_script(script_of(dev()), "detect", bin_dir).returncode != 0
    p = run_script(script_of(dev()), "apply", bin_dir)
    assert p.returncode != 0
    assert calls(tmp_path) == []


# ------------------------------------------------------------------ the rules
def applied(tmp_path: Path, evaluation: Evaluation, backend: str = "nft") -> list[str]:
    """The iptables calls the guard makes to install its rules."""
    p = run_script(script_of(evaluation), "apply", stub_bin(tmp_path, {f"iptables-{backend}-save": KUBE_ROUTER}))
    assert p.returncode == 0, p.stderr
    return calls(tmp_path)


def test_rules_go_to_mangle_prerouting_of_the_detected_backend_for_pod_traffic_only(tmp_path: Path) -> None:
    chain = chain_name(GUARD_NS)
    made = applied(tmp_path, dev(), "legacy")
    assert all(c.startswith("iptables-legacy -w 5 -t mangle ") for c in made), made
    jumps = [c.split(" -t mangle ", 1)[1] for c in made if " PREROUTING " in c and " -D " not in c]
    assert jumps == [f"-I PREROUTING 1 -s 10.42.0.0/16 -j {chain}"]


def test_ipv4_rules_drop_new_icmp_leaving_the_cluster_and_pod_traffic_to_node_ports(tmp_path: Path) -> None:
    chain = chain_name(GUARD_NS)
    made = applied(tmp_path, dev())
    prefix = f"iptables-nft -w 5 -t mangle -A {chain} "
    not_reply = "-m conntrack ! --ctstate RELATED,ESTABLISHED"
    local_ports = "-m addrtype --dst-type LOCAL -m multiport --dports 30000:32767"
    assert [c.removeprefix(prefix) for c in made if c.startswith(prefix)] == [
        # The node's own addresses on the NodePort range, before the cluster
        # ranges: cni0's address is inside the pod range.
        f"-p tcp {local_ports} {not_reply} -j DROP",
        f"-p udp {local_ports} {not_reply} -j DROP",
        "-d 10.42.0.0/16 -j RETURN",
        "-d 10.43.0.0/16 -j RETURN",
        f"-p icmp {not_reply} -j DROP",
    ]
    assert not [c for c in made if c.startswith("ip6tables")]


def test_ipv6_pod_ranges_get_the_same_rules_from_ip6tables(tmp_path: Path) -> None:
    config = with_config(dev_config(), "cluster", podCidr="fd00:10:42::/56", serviceCidr="fd00:10:43::/112")
    chain = chain_name(GUARD_NS)
    made = applied(tmp_path, evaluate(config, "dev6"))
    prefix = f"ip6tables-nft -w 5 -t mangle -A {chain} "
    not_reply = "-m conntrack ! --ctstate RELATED,ESTABLISHED"
    assert [c.removeprefix(prefix) for c in made if c.startswith(prefix)][2:] == [
        "-d fd00:10:42::/56 -j RETURN",
        "-d fd00:10:43::/112 -j RETURN",
        "-d fe80::/10 -j RETURN",  # neighbour discovery stays on the link
        "-d ff00::/8 -j RETURN",
        f"-p ipv6-icmp {not_reply} -j DROP",
    ]
    assert f"ip6tables-nft -w 5 -t mangle -I PREROUTING 1 -s fd00:10:42::/56 -j {chain}" in made
    assert not [c for c in made if c.startswith("iptables-")]


def test_two_stacks_in_one_cluster_keep_their_own_guard_and_chain() -> None:
    other = evaluate(with_config(dev_config(), "cluster", relayNamespace="egress-b"), "other")
    ours, theirs = guard(dev())["metadata"]["namespace"], guard(other)["metadata"]["namespace"]
    assert (ours, theirs) == (GUARD_NS, "egress-b-node-guard")
    assert f"CHAIN='{chain_name(GUARD_NS)}'" in script_of(dev())
    assert f"CHAIN='{chain_name(theirs)}'" in script_of(other)
    assert chain_name(GUARD_NS) != chain_name(theirs)


# ------------------------------------------------------------------ the pod and its namespace
def test_the_guard_namespace_is_the_only_privileged_one() -> None:
    enforce = {
        n["metadata"]["name"]: n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for n in kube_objects(dev(), "Namespace")
    }
    assert {n for n, level in enforce.items() if level != "restricted"} == {GUARD_NS}
    assert enforce[GUARD_NS] == "privileged"
    assert guard(dev())["metadata"]["namespace"] == GUARD_NS


def test_the_guard_runs_on_every_node_with_the_least_it_needs() -> None:
    pod = guard_pod(dev())
    (container,) = pod["containers"]
    assert pod["hostNetwork"] is True
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["automountServiceAccountToken"] is False
    assert container["image"] == dev_config()["tailscale-egress:cluster"]["relayImage"]
    sc = container["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    assert [v["hostPath"]["path"] for v in pod["volumes"]] == ["/run/xtables.lock"]


def test_turning_the_guard_off_removes_it_and_its_privileged_namespace() -> None:
    off = evaluate(with_config(dev_config(), "cluster", nodeGuard=False), "noguard")
    assert off.error is None
    assert kube_objects(off, "DaemonSet") == []
    assert [r for r in off.resources if "NodeGuard" in r.type] == []
    enforce = {n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] for n in kube_objects(off, "Namespace")}
    assert enforce == {"restricted"}
    assert not [o for o in applied_objects(off) if o["metadata"].get("namespace") == GUARD_NS]


def test_the_guard_is_on_by_default() -> None:
    assert parse_config({}).cluster.node_guard is True
    assert dev_config()["tailscale-egress:cluster"]["nodeGuard"] is True


# ------------------------------------------------------------------ config errors
@pytest.mark.parametrize(
    ("cluster", "needle"),
    [
        ({"nodeGuard": "maybe"}, "tailscale-egress:cluster.nodeGuard = 'maybe'"),
        ({"relayNamespace": "r" * 60}, "at most 52 characters while cluster.nodeGuard is on"),
        (
            {"protectedNamespaces": ["default", "tailscale-egress-node-guard"]},
            "cluster.protectedNamespaces[1] = 'tailscale-egress-node-guard': is the node guard's own namespace",
        ),
    ],
)
def test_bad_guard_settings_are_named_before_anything_exists(cluster: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"cluster": cluster})
    assert needle in str(err.value)


def test_a_long_relay_namespace_is_fine_without_the_guard() -> None:
    assert parse_config({"cluster": {"relayNamespace": "r" * 60, "nodeGuard": False}}).cluster.node_guard is False
