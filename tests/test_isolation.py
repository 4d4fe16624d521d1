"""Who can talk to whom once a stack is applied, as network-config-analyzer
(nca) computes it from the rendered NetworkPolicies over a realistic cluster
(see tests/support/cluster.py). nca is the oracle; tests/support/netpol.py is
a plain second reading of the same policies, cross-checked against nca."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import pytest

from builders.networks import TAILSCALE_CONTROL_PLANE_CIDRS
from devtools.mockstack import Evaluation
from tests.stacks import dev, kube_objects, pinned, pinned_config, public
from tests.support import netpol
from tests.support.cluster import Cluster, cluster_for
from tests.support.nca import Connections, ConnectivityMap, connectivity

STACKS = {"dev": dev, "pinned": pinned, "public": public}

# What the user is promised, spelled out here rather than read from the builders.
PROXY_PORTS = {"TCP": {1080, 3128}}
DNS_PORTS = {"TCP": {53}, "UDP": {53}}
INTERNET = ("1.1.1.1", "8.8.8.8", "203.0.113.5", "2606:4700:4700::1111")
# The laptop, LAN, cluster, metadata and tailnet addresses of DESIGN.md §4 (Kubernetes).
HOST_AND_LAN = (
    "192.168.5.2",  # Rancher Desktop host (Lima)
    "192.168.127.254",  # Rancher Desktop host (WSL)
    "10.0.0.1",
    "10.42.0.7",  # a k3s pod
    "10.43.0.1",  # the k3s API server's service address
    "172.17.0.1",  # docker bridge
    "169.254.169.254",  # cloud metadata
    "100.100.100.100",  # Tailscale's in-tailnet resolver (CGNAT)
    "127.0.0.1",
    "fd00::1",
    "fe80::1",
    "fec0::1",  # deprecated site-local
    "::",  # unspecified
    "::1",
)
NON_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
        "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip


def finite(connections: Connections) -> dict[str, set[int]]:
    return {"*": {-1}} if connections.everything else connections.ports()


@pytest.fixture(scope="module", params=sorted(STACKS))
def stack(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Cluster, ConnectivityMap]]:
    """Each stack's cluster and nca's connectivity map of it (nca runs once per stack)."""
    result = {}
    for name, evaluate in STACKS.items():
        cluster = cluster_for(evaluate())
        policies = kube_objects(evaluate(), "NetworkPolicy")
        result[name] = (
            cluster,
            connectivity(tmp_path_factory.mktemp(f"nca-{name}"), policies, cluster.pods, cluster.namespaces),
        )
    return result


@pytest.fixture(scope="module")
def evaluation(stack: str) -> Evaluation:
    return STACKS[stack]()


@pytest.fixture(scope="module")
def cluster(stack: str, analysed: dict[str, tuple[Cluster, ConnectivityMap]]) -> Cluster:
    return analysed[stack][0]


@pytest.fixture(scope="module")
def nca_map(stack: str, analysed: dict[str, tuple[Cluster, ConnectivityMap]]) -> ConnectivityMap:
    return analysed[stack][1]


@pytest.fixture(scope="module")
def dev_map(analysed: dict[str, tuple[Cluster, ConnectivityMap]]) -> tuple[Cluster, ConnectivityMap]:
    return analysed["dev"]


@pytest.fixture(scope="module")
def public_map(analysed: dict[str, tuple[Cluster, ConnectivityMap]]) -> tuple[Cluster, ConnectivityMap]:
    return analysed["public"]


@pytest.fixture(scope="module")
def pinned_map(analysed: dict[str, tuple[Cluster, ConnectivityMap]]) -> tuple[Cluster, ConnectivityMap]:
    return analysed["pinned"]


class TestWorkloadsInProtectedNamespaces:
    def test_reach_only_the_relay_proxy_ports_dns_and_their_own_namespace(
        self, cluster: Cluster, nca_map: ConnectivityMap
    ) -> None:
        for namespace, pods in cluster.workloads.items():
            for src in pods:
                expected = {cluster.relay_pod: PROXY_PORTS}
                expected |= {dns: DNS_PORTS for dns in cluster.dns_pods}
                expected |= {peer: {"*": {-1}} for peer in pods if peer != src}
                reached = {dst: finite(c) for dst, c in nca_map.pod_destinations(src).items()}
                assert reached == expected, f"{src} in protected namespace {namespace}"

    def test_accept_connections_from_their_own_namespace_only(self, cluster: Cluster, nca_map: ConnectivityMap) -> None:
        # Issue 19, point 8: another namespace's pod, the LAN or the node opening a connection to a
        # protected pod is a two-way channel that never touches the relay.
        for namespace, pods in cluster.workloads.items():
            for dst in pods:
                sources = {src for src, c in nca_map.pod_sources(dst).items() if c}
                assert sources == {p for p in pods if p != dst}, f"{dst} in protected namespace {namespace}"
                assert [str(a) for a, c in nca_map.address_sources(dst) if c] == [], dst

    def test_of_different_protected_namespaces_cannot_reach_each_other(
        self, pinned_map: tuple[Cluster, ConnectivityMap]
    ) -> None:
        cluster, nca_map = pinned_map  # the stack with three protected namespaces
        for namespace, pods in cluster.workloads.items():
            others = [p for ns, ps in cluster.workloads.items() if ns != namespace for p in ps]
            for src in pods:
                assert not any(nca_map.between(src, dst) for dst in others), src

    def test_reach_no_address_outside_the_cluster(self, cluster: Cluster, nca_map: ConnectivityMap) -> None:
        for src in cluster.all_workloads():
            assert nca_map.address_destinations(src) == [], f"{src} reaches addresses directly"

    @pytest.mark.parametrize("address", INTERNET + HOST_AND_LAN)
    def test_cannot_open_any_connection_to(self, address: str, cluster: Cluster, nca_map: ConnectivityMap) -> None:
        for src in cluster.all_workloads():
            assert not nca_map.to_address(src, address), f"{src} reaches {address}"


class TestRelay:
    def test_reaches_no_pod_but_dns(self, cluster: Cluster, nca_map: ConnectivityMap) -> None:
        reached = {dst: finite(c) for dst, c in nca_map.pod_destinations(cluster.relay_pod).items()}
        assert reached == {dns: DNS_PORTS for dns in cluster.dns_pods}

    def test_is_reached_only_by_protected_workloads_on_its_proxy_ports(
        self, cluster: Cluster, nca_map: ConnectivityMap
    ) -> None:
        sources = {src: finite(c) for src, c in nca_map.pod_sources(cluster.relay_pod).items()}
        assert sources == {src: PROXY_PORTS for src in cluster.all_workloads()}
        assert nca_map.address_sources(cluster.relay_pod) == [], "reachable from outside the cluster"

    @pytest.mark.parametrize("src", ["unprotected", "bystander", "system"])
    def test_cannot_be_used_by(self, src: str, cluster: Cluster, nca_map: ConnectivityMap) -> None:
        pods = {
            "unprotected": cluster.unprotected_pods,
            "bystander": [cluster.bystander_pod],
            "system": cluster.other_system_pods,
        }
        for pod in pods[src]:
            assert not nca_map.between(pod, cluster.relay_pod), f"{pod} reaches the relay"


class TestRelayEgressInDevStack:
    """`dev`, the default (Hetzner exit node, Tailscale's control plane) is pinned:
    the exit node's WireGuard port and Tailscale's published control plane ranges."""

    def test_reaches_only_the_control_plane_ranges_and_the_exit_node(
        self, dev_map: tuple[Cluster, ConnectivityMap]
    ) -> None:
        cluster, nca_map = dev_map
        control = {"TCP": {80, 443}, "UDP": {3478}}
        expected = {ipaddress.ip_network(c): control for c in TAILSCALE_CONTROL_PLANE_CIDRS}
        expected |= {ipaddress.ip_network(ip): {"UDP": {41641}} for ip in dev().outputs["exitNodePublicIps"]}
        reached: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, dict[str, set[int]]] = {}
        for addresses, connections in nca_map.address_destinations(cluster.relay_pod):
            within = [n for n in expected if addresses.first in n and addresses.last in n]
            assert within, f"the relay reaches {addresses}, outside the pinned addresses"
            for protocol, numbers in finite(connections).items():
                reached.setdefault(within[0], {}).setdefault(protocol, set()).update(numbers)
        assert reached == expected
        for network, ports in expected.items():
            assert finite(nca_map.to_address(cluster.relay_pod, str(network[0]))) == ports, network

    @pytest.mark.parametrize("address", [*INTERNET, "192.200.1.1", "199.165.136.1", *HOST_AND_LAN])
    def test_reaches_no_other_address(self, address: str, dev_map: tuple[Cluster, ConnectivityMap]) -> None:
        cluster, nca_map = dev_map
        assert not nca_map.to_address(cluster.relay_pod, address)


class TestRelayEgressInPublicStack:
    """`relayEgress: public`, the explicit opt-in: any public address, nothing private."""

    @pytest.mark.parametrize("address", INTERNET)
    def test_reaches_public_address(self, address: str, public_map: tuple[Cluster, ConnectivityMap]) -> None:
        cluster, nca_map = public_map
        assert nca_map.to_address(cluster.relay_pod, address).everything

    @pytest.mark.parametrize("address", HOST_AND_LAN)
    def test_reaches_no_host_lan_or_metadata_address(
        self, address: str, public_map: tuple[Cluster, ConnectivityMap]
    ) -> None:
        cluster, nca_map = public_map
        assert not nca_map.to_address(cluster.relay_pod, address)

    def test_reaches_nothing_in_any_non_public_range(self, public_map: tuple[Cluster, ConnectivityMap]) -> None:
        cluster, nca_map = public_map
        leaks = [
            f"{reached} overlaps {network}"
            for reached, _ in nca_map.address_destinations(cluster.relay_pod)
            for network in NON_PUBLIC
            if reached.overlaps(network)
        ]
        assert leaks == []


class TestRelayEgressInPinnedStack:
    """`pinned` knows the control server and the exit node: the relay reaches those only."""

    def test_reaches_exactly_the_control_server_and_exit_node(
        self, pinned_map: tuple[Cluster, ConnectivityMap]
    ) -> None:
        cluster, nca_map = pinned_map
        config = pinned_config()
        login = urlsplit(config["tailscale-egress:tailnet"]["loginServer"])
        (exit_node,) = config["tailscale-egress:exitNode"]["existingPublicIps"]
        expected = {
            str(login.hostname): {"TCP": {login.port}, "UDP": {3478}},  # control server and its STUN (DERP)
            exit_node: {"UDP": {41641}},  # WireGuard
        }
        reached: dict[str, dict[str, set[int]]] = {}
        for addresses, connections in nca_map.address_destinations(cluster.relay_pod):
            assert addresses.first == addresses.last, f"the relay reaches a whole range {addresses}"
            for protocol, ports in finite(connections).items():
                reached.setdefault(str(addresses.first), {}).setdefault(protocol, set()).update(ports)
        assert reached == expected

    @pytest.mark.parametrize("address", [*INTERNET, "198.51.100.11", "203.0.113.11", *HOST_AND_LAN])
    def test_reaches_no_other_address(self, address: str, pinned_map: tuple[Cluster, ConnectivityMap]) -> None:
        cluster, nca_map = pinned_map
        assert not nca_map.to_address(cluster.relay_pod, address)


class TestOtherPodsOfTheRelayNamespace:
    def test_reach_nothing(self, cluster: Cluster, nca_map: ConnectivityMap) -> None:
        assert nca_map.pod_destinations(cluster.bystander_pod) == {}
        assert nca_map.address_destinations(cluster.bystander_pod) == []

    def test_are_reached_by_nothing(self, cluster: Cluster, nca_map: ConnectivityMap) -> None:
        assert nca_map.pod_sources(cluster.bystander_pod) == {}
        assert nca_map.address_sources(cluster.bystander_pod) == []


PROBES = (
    ("TCP", 53),
    ("UDP", 53),
    ("TCP", 1080),
    ("TCP", 3128),
    ("TCP", 80),
    ("TCP", 8080),
    ("UDP", 3478),
    ("UDP", 41641),
)
ADDRESS_PROBES = ("1.1.1.1", "198.51.100.10", "203.0.113.10", "10.0.0.1", "169.254.169.254", "192.168.5.2", "fe80::1")


def test_plain_evaluator_agrees_with_nca(evaluation: Evaluation, cluster: Cluster, nca_map: ConnectivityMap) -> None:
    policies = kube_objects(evaluation, "NetworkPolicy")
    model = netpol.Model(policies, cluster.pods, cluster.namespaces)
    pods = [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in cluster.pods]
    disagreements = []
    for src in pods:
        for protocol, port in PROBES:
            for dst in pods:
                ours = model.allows(src, dst, protocol, port)
                if src != dst and ours != nca_map.between(src, dst).allows(protocol, port):
                    disagreements.append((src, dst, protocol, port))
            for address in ADDRESS_PROBES:
                ours = model.allows_to_address(src, address, protocol, port)
                if ours != nca_map.to_address(src, address).allows(protocol, port):
                    disagreements.append((src, address, protocol, port))
    assert disagreements == []
