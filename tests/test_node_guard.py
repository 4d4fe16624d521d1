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
from config import RELAY_IMAGE, ConfigError, parse_config
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


def stub_bin(tmp_path: Path, saves: dict[str, str] | None = None, addresses: dict[str, str] | None = None) -> Path:
    """iptables stand-ins: `<fam>tables-<backend>-save` print `saves[...]`;
    `<fam>tables-<backend>` append their arguments to calls.log and fail only
    for -D (nothing to delete) and -S (print nothing, or `<name>-S-<chain>.out`
    when the test wrote one). `ip -o addr show to <cidr>` prints `addresses[cidr]`."""
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
                'prev=""; for a in "$@"; do case "$a" in -D) exit 1;; esac\n'
                f'  [ "$prev" = -S ] && [ -f {tmp_path}/{name}-S-"$a".out ] && cat {tmp_path}/{name}-S-"$a".out\n'
                "  prev=$a; done\nexit 0\n"
            )
            save.chmod(0o755)
            tool.chmod(0o755)
    for cidr, lines in (addresses or {}).items():
        (tmp_path / ("addr-" + cidr.replace("/", "_").replace(":", "_"))).write_text(lines)
    ip = bin_dir / "ip"
    ip.write_text(
        "#!/bin/sh\n# ip -o addr show to <cidr>: the node's addresses inside it\n"
        f'f={tmp_path}/addr-$(echo "$5" | tr "/:" "__"); [ -f "$f" ] && cat "$f"; exit 0\n'
    )
    ip.chmod(0o755)
    return bin_dir


def run_script(script: str, mode: str, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NODE_GUARD_IP": str(bin_dir / "ip")}
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
# The node as k3s leaves it: the CNI bridge and flannel's overlay hold addresses of the pod range.
NODE_ADDRESSES = {
    "10.42.0.0/16": "5: cni0    inet 10.42.0.1/24 brd 10.42.0.255 scope global cni0\\\n"
    "4: flannel.1    inet 10.42.0.0/32 scope global flannel.1\\\n",
}
NOT_A_REPLY = "-m conntrack ! --ctstate RELATED,ESTABLISHED"


def applied(
    tmp_path: Path, evaluation: Evaluation, backend: str = "nft", addresses: dict[str, str] | None = None
) -> list[str]:
    """The iptables calls the guard makes to install its rules."""
    bin_dir = stub_bin(
        tmp_path, {f"iptables-{backend}-save": KUBE_ROUTER}, NODE_ADDRESSES if addresses is None else addresses
    )
    p = run_script(script_of(evaluation), "apply", bin_dir)
    assert p.returncode == 0, p.stderr
    return calls(tmp_path)


def chain_rules(made: list[str], tool: str, chain: str) -> list[str]:
    prefix = f"{tool} -w 5 -t mangle -A {chain} "
    return [c.removeprefix(prefix) for c in made if c.startswith(prefix)]


def jumps(made: list[str], tool: str, hook: str) -> list[str]:
    prefix = f"{tool} -w 5 -t mangle -I {hook} "
    return [c.removeprefix(prefix) for c in made if c.startswith(prefix)]


def test_rules_go_to_mangle_prerouting_of_the_detected_backend_for_pod_traffic_only(tmp_path: Path) -> None:
    chain = chain_name(GUARD_NS)
    made = applied(tmp_path, dev(), "legacy")
    assert all(c.startswith(("iptables-legacy -w 5 -t mangle ", "ip6tables-legacy -w 5 -t mangle ")) for c in made)
    assert jumps(made, "iptables-legacy", "PREROUTING") == [f"1 -s 10.42.0.0/16 -j {chain}"]


def test_ipv4_rules_drop_new_icmp_leaving_the_cluster_and_pod_traffic_to_node_ports(tmp_path: Path) -> None:
    made = applied(tmp_path, dev())
    local_ports = "-m addrtype --dst-type LOCAL -m multiport --dports 30000:32767"
    assert chain_rules(made, "iptables-nft", chain_name(GUARD_NS)) == [
        # The node's own addresses on the NodePort range, before the cluster
        # ranges: cni0's address is inside the pod range.
        f"-p tcp {local_ports} {NOT_A_REPLY} -j DROP",
        f"-p udp {local_ports} {NOT_A_REPLY} -j DROP",
        "-d 10.42.0.0/16 -j RETURN",
        "-d 10.43.0.0/16 -j RETURN",
        f"-p icmp {NOT_A_REPLY} -j DROP",
    ]


def test_icmp_routed_anywhere_but_a_pod_interface_is_dropped(tmp_path: Path) -> None:
    """Issue 19, point 4: ICMP to an unused pod or service address follows the
    node's default route; after routing, it must leave by the bridge or the overlay."""
    fwd = chain_name(GUARD_NS) + "-FWD"
    made = applied(tmp_path, dev())
    assert jumps(made, "iptables-nft", "FORWARD") == [f"1 -s 10.42.0.0/16 -p icmp -j {fwd}"]
    assert chain_rules(made, "iptables-nft", fwd) == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-o cni0 -j RETURN",
        "-o flannel.1 -j RETURN",
        "-j DROP",
    ]


def test_on_a_single_stack_cluster_all_ipv6_from_pod_interfaces_but_neighbour_discovery_is_dropped(
    tmp_path: Path,
) -> None:
    """Issue 19, point 1: a pod's fe80:: address is in no policy's view."""
    link = chain_name(GUARD_NS) + "-LINK"
    made = applied(tmp_path, dev())
    assert jumps(made, "ip6tables-nft", "PREROUTING") == [f"1 -i cni0 -j {link}", f"2 -i flannel.1 -j {link}"]
    assert chain_rules(made, "ip6tables-nft", link) == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",  # replies to what the node opened
        "-p ipv6-icmp --icmpv6-type neighbour-solicitation -j RETURN",
        "-p ipv6-icmp --icmpv6-type neighbour-advertisement -j RETURN",
        "-d fe80::/10 -j DROP",
        "-d ff00::/8 -j DROP",
        "-j DROP",
    ]
    assert jumps(made, "ip6tables-nft", "FORWARD") == []


def test_before_the_node_has_a_pod_interface_nothing_is_jumped_by_interface(tmp_path: Path) -> None:
    made = applied(tmp_path, dev(), addresses={})
    assert jumps(made, "ip6tables-nft", "PREROUTING") == []
    assert chain_rules(made, "iptables-nft", chain_name(GUARD_NS) + "-FWD") == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-j DROP",
    ]


def test_ipv6_pod_ranges_get_the_same_rules_from_ip6tables(tmp_path: Path) -> None:
    config = with_config(dev_config(), "cluster", podCidr="fd00:10:42::/56", serviceCidr="fd00:10:43::/112")
    chain = chain_name(GUARD_NS)
    addresses = {"fd00:10:42::/56": "5: cni0    inet6 fd00:10:42::1/64 scope global \\\n"}
    made = applied(tmp_path, evaluate(config, "dev6"), addresses=addresses)
    assert chain_rules(made, "ip6tables-nft", chain)[2:] == [
        "-d fd00:10:42::/56 -j RETURN",
        "-d fd00:10:43::/112 -j RETURN",
        "-d fe80::/10 -j RETURN",  # neighbour discovery stays on the link
        "-d ff00::/8 -j RETURN",
        f"-p ipv6-icmp {NOT_A_REPLY} -j DROP",
    ]
    assert jumps(made, "ip6tables-nft", "PREROUTING") == [
        f"1 -s fd00:10:42::/56 -j {chain}",
        f"2 -i cni0 -j {chain}-LINK",
    ]
    # The pods' own range passes the link chain (kube-router's policies see it); link-local does not.
    assert chain_rules(made, "ip6tables-nft", f"{chain}-LINK")[3:] == [
        "-d fe80::/10 -j DROP",
        "-d ff00::/8 -j DROP",
        "-s fd00:10:42::/56 -j RETURN",
        "-j DROP",
    ]
    assert jumps(made, "ip6tables-nft", "FORWARD") == [f"1 -s fd00:10:42::/56 -p ipv6-icmp -j {chain}-FWD"]
    assert not [c for c in made if c.startswith("iptables-")]


def test_jumps_of_an_earlier_guard_version_are_removed(tmp_path: Path) -> None:
    chain = chain_name(GUARD_NS)
    bin_dir = stub_bin(tmp_path, {"iptables-nft-save": KUBE_ROUTER}, NODE_ADDRESSES)
    (tmp_path / "iptables-nft-S-PREROUTING.out").write_text(
        f"-P PREROUTING ACCEPT\n-A PREROUTING -s 10.99.0.0/16 -j {chain}\n-A PREROUTING -j KUBE-OTHER\n"
    )
    assert run_script(script_of(dev()), "apply", bin_dir).returncode == 0
    deleted = [c for c in calls(tmp_path) if " -D " in c]
    assert f"iptables-nft -w 5 -t mangle -D PREROUTING -s 10.99.0.0/16 -j {chain}" in deleted
    assert not [c for c in deleted if "KUBE-OTHER" in c]


def test_two_stacks_in_one_cluster_keep_their_own_guard_and_chain() -> None:
    other = evaluate(with_config(dev_config(), "cluster", relayNamespace="egress-b"), "other")
    ours, theirs = guard(dev())["metadata"]["namespace"], guard(other)["metadata"]["namespace"]
    assert (ours, theirs) == (GUARD_NS, "egress-b-node-guard")
    assert f"CHAINS='{chain_name(GUARD_NS)} " in script_of(dev())
    assert f"CHAINS='{chain_name(theirs)} " in script_of(other)
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
    assert container["image"] == RELAY_IMAGE  # the relay's pinned image: no other image to pull
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
