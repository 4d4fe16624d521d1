"""Issue 19, point 10: `cluster.podCidr` and `cluster.serviceCidr` checked
against the cluster before anything is created. The node guard knows pods and
Services by these ranges alone: a wrong pod range guards no pod, silently.
(Read from a real cluster: tests/cluster/test_isolation_review.py.)"""

from __future__ import annotations

import pytest

from preflight import ClusterRanges, range_problems

K3S = ClusterRanges({"node-a": ["10.42.0.0/24"], "node-b": ["10.42.1.0/24"]}, {"kubernetes": ["10.43.0.0/16"]})


def test_k3s_defaults_match_a_k3s_cluster() -> None:
    assert range_problems("10.42.0.0/16", "10.43.0.0/16", K3S) == []


def test_a_pod_range_that_misses_a_node_is_refused_with_the_key_the_values_and_the_fix() -> None:
    (problem,) = range_problems("10.42.0.0/24", "10.43.0.0/16", K3S)
    assert problem.startswith("tailscale-egress:cluster.podCidr = '10.42.0.0/24': the cluster's pods are not in it")
    assert "node node-b has 10.42.1.0/24" in problem
    assert "every node's pod range: 10.42.0.0/24, 10.42.1.0/24" in problem
    assert "pulumi config set --path cluster.podCidr <cidr>" in problem


def test_a_service_range_other_than_the_clusters_is_refused_with_its_value() -> None:
    (problem,) = range_problems("10.42.0.0/16", "10.96.0.0/12", K3S)
    assert problem.startswith("tailscale-egress:cluster.serviceCidr = '10.96.0.0/12':")
    assert "ServiceCIDR kubernetes has 10.43.0.0/16" in problem
    assert problem.endswith("pulumi config set --path cluster.serviceCidr 10.43.0.0/16")


@pytest.mark.parametrize(("ip", "refused"), [("10.43.0.1", False), ("10.96.0.1", True)])
def test_without_servicecidr_objects_the_api_servers_own_service_tells_the_range(ip: str, refused: bool) -> None:
    problems = range_problems("10.42.0.0/16", "10.43.0.0/16", ClusterRanges({}, {}, api_service_ip=ip))
    assert bool(problems) is refused
    if refused:
        assert f"the API server's own Service (default/kubernetes) has {ip}, outside it" in problems[0]


def test_a_dual_stack_cluster_is_checked_in_the_family_configured() -> None:
    dual = ClusterRanges(
        {"node-a": ["10.42.0.0/24", "fd00:10:42::/64"]}, {"kubernetes": ["10.43.0.0/16", "fd00:10:43::/112"]}
    )
    assert range_problems("10.42.0.0/16", "10.43.0.0/16", dual) == []
    assert range_problems("fd00:10:42::/56", "fd00:10:43::/108", dual) == []


def test_nodes_without_a_pod_range_leave_nothing_to_check() -> None:
    # A CNI that allocates addresses itself (Calico's IPAM) sets no spec.podCIDR.
    assert range_problems("10.99.0.0/16", "10.43.0.0/16", ClusterRanges({"node-a": []}, {})) == []
