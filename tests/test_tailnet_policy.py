"""Isolation at the tailnet: the relay's tag may reach the internet through
the exit node, and nothing else. A policy that lets it reach other tailnet
devices (the laptop's own address, servers, the exit node's services) is
refused before anything is created, naming the rule and the fix; the policy
the stack writes routes only via the exit node and carries `tests` that make
Tailscale itself refuse a later edit that opens the tailnet to the relay."""

from __future__ import annotations

import copy
import json
from typing import Any

import pulumi
import pytest

from builders.tailnet_policy import (
    DENIED_PORTS,
    UnsafePolicyError,
    internet_grant,
    merged_policy,
    missing_tests,
    policy_problems,
    policy_tests,
    policy_warnings,
    relay_offences,
    required_policy,
)
from devtools.mockstack import FakeProviders, evaluate
from tests.stacks import dev_config, with_config

EXIT, RELAY = "tag:egress-exit", "tag:egress-relay"
OWNERS = {EXIT: ["autogroup:admin"], RELAY: ["autogroup:admin"]}
ACL = "tailscale:index/acl:Acl"


def stack_policy(**extra: Any) -> dict[str, Any]:
    """What the stack asks for, plus `extra` sections (lists are appended)."""
    policy = copy.deepcopy(required_policy(EXIT, RELAY))
    del policy["autoApprovers"]
    for key, value in extra.items():
        policy[key] = [*policy.get(key, []), *value] if isinstance(value, list) else value
    return policy


# Each opens some tailnet device to the relay: (policy, section, index of the offending rule).
OFFENDING: dict[str, tuple[dict[str, Any], str, int]] = {
    "the default allow-all ACL": (stack_policy(acls=[{"action": "accept", "src": ["*"], "dst": ["*:*"]}]), "acls", 0),
    "the default allow-all grant": (stack_policy(grants=[{"src": ["*"], "dst": ["*"], "ip": ["*"]}]), "grants", 1),
    "relay to the exit node's ssh": (
        stack_policy(acls=[{"action": "accept", "src": [RELAY], "dst": [f"{EXIT}:22"]}]),
        "acls",
        0,
    ),
    "every tagged device to members' devices": (
        stack_policy(grants=[{"src": ["autogroup:tagged"], "dst": ["autogroup:member"], "ip": ["tcp:443"]}]),
        "grants",
        1,
    ),
    "danger-all to a server": (
        stack_policy(grants=[{"src": ["autogroup:danger-all"], "dst": ["tag:server"], "ip": ["*"]}]),
        "grants",
        1,
    ),
    "a group naming the relay tag": (
        stack_policy(
            groups={"group:infra": [RELAY, "alice@example.com"]},
            acls=[{"action": "accept", "src": ["group:infra"], "dst": ["*:*"]}],
        ),
        "acls",
        0,
    ),
    "a hosts alias for the tailnet range": (
        stack_policy(
            hosts={"tailnet": "100.64.0.0/10"},
            acls=[{"action": "accept", "src": ["tailnet"], "dst": ["192.168.1.0/24:*"]}],
        ),
        "acls",
        0,
    ),
    "a tailnet CIDR source": (
        stack_policy(grants=[{"src": ["100.100.0.0/16"], "dst": ["tag:db"], "ip": ["5432"]}]),
        "grants",
        1,
    ),
    "the tailnet IPv6 range": (
        stack_policy(acls=[{"action": "accept", "src": ["fd7a:115c:a1e0::/48"], "dst": ["autogroup:member:*"]}]),
        "acls",
        0,
    ),
    "an ipset with a tailnet address": (
        stack_policy(
            ipsets={"ipset:nodes": ["100.101.102.103", "10.0.0.0/8"]},
            grants=[{"src": ["ipset:nodes"], "dst": ["*"], "ip": ["*"]}],
        ),
        "grants",
        1,
    ),
    "the relay to the internet and a subnet route": (
        stack_policy(grants=[{"src": [RELAY], "dst": ["autogroup:internet", "10.0.0.0/8"], "ip": ["*"]}]),
        "grants",
        1,
    ),
    "the relay to a public CIDR (a subnet router's route)": (
        stack_policy(grants=[{"src": [RELAY], "dst": ["203.0.113.0/24"], "ip": ["*"]}]),
        "grants",
        1,
    ),
    "the legacy users/ports fields": (
        stack_policy(acls=[{"action": "accept", "users": ["*"], "ports": ["tag:server:80"]}]),
        "acls",
        0,
    ),
}


@pytest.mark.parametrize("case", sorted(OFFENDING))
def test_every_rule_that_opens_the_tailnet_to_the_relay_is_named(case: str) -> None:
    policy, section, index = OFFENDING[case]
    rule = policy[section][index]
    (offence,) = relay_offences(policy, RELAY)
    assert (offence.section, offence.index) == (section, index)
    problems = policy_problems(policy, EXIT, RELAY)
    (problem,) = [p for p in problems if p.startswith(f'{section}[{index}] lets "{RELAY}"')]
    # Nothing else, but that the same rule may also let devices reach the relay.
    assert all(p == problem or "lets its src reach" in p for p in problems), problems
    assert json.dumps(rule) in problem, "the rule's text is not in the message"
    assert "Fix:" in problem


def test_a_policy_with_neither_acls_nor_grants_is_allow_all_and_refused() -> None:
    (problem, *_) = [p for p in policy_problems({"tagOwners": OWNERS}, EXIT, RELAY) if "allow-all" in p]
    assert 'neither "acls" nor "grants"' in problem
    # An empty list is not allow-all: it allows nothing (so the internet grant is missing).
    assert relay_offences({"acls": [], "tagOwners": OWNERS}, RELAY) == []


@pytest.mark.parametrize(
    "rule",
    [
        {"grants": [{"src": ["autogroup:member"], "dst": ["autogroup:member"], "ip": ["*"]}]},
        {
            "groups": {"group:ops": ["alice@example.com"]},
            "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:server:*", "autogroup:self:*"]}],
        },
        {"acls": [{"action": "accept", "src": ["alice@example.com", "10.0.0.0/8"], "dst": ["192.168.0.0/16:*"]}]},
        {"acls": [{"action": "accept", "src": [RELAY], "dst": ["autogroup:internet:443"]}]},
        # Application capabilities only: no packets.
        {"grants": [{"src": [RELAY], "dst": ["tag:idp"], "app": {"example.com/cap/login": [{}]}}]},
        # SSH rules open nothing; the network rules above decide.
        {"ssh": [{"action": "accept", "src": ["*"], "dst": ["autogroup:self"], "users": ["root"]}]},
    ],
    ids=["members-to-all", "group-of-users", "users-and-lan", "relay-to-internet-443", "app-only", "ssh"],
)
def test_rules_that_do_not_cover_the_relay_or_give_it_only_the_internet_pass(rule: dict[str, Any]) -> None:
    assert policy_problems(stack_policy(**rule), EXIT, RELAY) == []


# Issue 19, point 2: a device that may reach the relay is in its netmap, and its
# peer API (open to every peer whatever the policy says) is then one proxy
# request away from every protected pod.
@pytest.mark.parametrize(
    ("rule", "through"),
    [
        ({"grants": [{"src": ["autogroup:member"], "dst": ["*"], "ip": ["*"]}]}, "*"),
        ({"acls": [{"action": "accept", "src": ["group:ops"], "dst": ["*:*"]}]}, "*"),
        ({"acls": [{"action": "accept", "src": ["alice@example.com"], "dst": [f"{RELAY}:22"]}]}, RELAY),
        (
            {"grants": [{"src": ["autogroup:member"], "dst": ["autogroup:tagged"], "ip": ["tcp:443"]}]},
            "autogroup:tagged",
        ),
        ({"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["100.64.0.0/10:*"]}]}, "100.64.0.0/10"),
        (
            {"hosts": {"relays": "100.64.0.0/10"}, "grants": [{"src": ["tag:ci"], "dst": ["relays"], "ip": ["*"]}]},
            "relays",
        ),
    ],
    ids=["members-to-all", "group-to-all-acl", "a-user-to-the-relay", "members-to-tagged", "tailnet-range", "host"],
)
def test_every_rule_that_lets_devices_reach_the_relay_is_named(rule: dict[str, Any], through: str) -> None:
    policy = stack_policy(**rule)
    (problem,) = policy_problems(policy, EXIT, RELAY)
    section = "grants" if "grants" in rule else "acls"
    index = policy[section].index(rule[section][0])
    assert problem.startswith(f'{section}[{index}] lets its src reach "{RELAY}" (through "{through}")'), problem
    assert "peer APIs" in problem and "Fix:" in problem
    with pytest.raises(UnsafePolicyError, match="lets its src reach"):
        merged_policy(policy, EXIT, RELAY)


def test_the_policy_the_stack_asks_for_passes_without_warning() -> None:
    policy = stack_policy()
    assert policy["grants"] == [{"src": [RELAY], "dst": ["autogroup:internet"], "ip": ["*"], "via": [EXIT]}]
    assert policy_problems(policy, EXIT, RELAY) == []
    assert policy_warnings(policy, EXIT, RELAY) == []


def test_an_internet_grant_without_via_is_accepted_with_a_warning() -> None:
    policy = {
        "tagOwners": OWNERS,
        "grants": [{"src": [RELAY], "dst": ["autogroup:internet"], "ip": ["*"]}],
        "tests": policy_tests(EXIT, RELAY),
    }
    assert policy_problems(policy, EXIT, RELAY) == []
    (warning,) = policy_warnings(policy, EXIT, RELAY)
    assert "any exit node" in warning and json.dumps(internet_grant(EXIT, RELAY)) in warning


def test_a_grant_via_another_router_does_not_count_as_the_way_out() -> None:
    policy = {
        "tagOwners": OWNERS,
        "grants": [{"src": [RELAY], "dst": ["autogroup:internet"], "ip": ["*"], "via": ["tag:home"]}],
        "tests": policy_tests(EXIT, RELAY),
    }
    (problem,) = policy_problems(policy, EXIT, RELAY)
    assert f'no grant lets "{RELAY}" reach "autogroup:internet" via "{EXIT}"' in problem


# --------------------------------------------------------------- the tests that guard later edits
def test_a_read_only_policy_without_the_tests_is_refused_naming_them() -> None:
    # Without its tests nothing refuses an edit made after `pulumi up`.
    policy = stack_policy()
    del policy["tests"]
    (problem,) = policy_problems(policy, EXIT, RELAY)
    assert f'tests has no "deny" for "{RELAY}"' in problem and "autogroup:member:22" in problem


def test_the_tests_deny_every_device_the_policy_knows_on_every_port_it_names() -> None:
    policy = stack_policy(
        tagOwners={**OWNERS, "tag:server": ["group:ops"]},
        grants=[{"src": ["autogroup:member"], "dst": ["tag:server"], "ip": ["tcp:47123"]}],
        acls=[{"action": "accept", "src": ["group:ops"], "dst": ["tag:server:5000-5010,6000"]}],
    )
    (test,) = policy_tests(EXIT, RELAY, policy)
    assert test["src"] == RELAY
    for dst in ("autogroup:member", EXIT, RELAY, "tag:server"):
        for port in (22, 443, 3128, 8022, 9002, 47123, 5000, 5010, 6000):
            assert f"{dst}:{port}" in test["deny"], (dst, port)
    # The policy's tests were written before tag:server and port 47123 existed: the preflight says so.
    missing = missing_tests(policy, EXIT, RELAY)
    assert "tag:server:22" in missing and "autogroup:member:47123" in missing
    assert "autogroup:member:22" not in missing


def test_merging_replaces_the_stacks_earlier_tests_instead_of_adding_beside_them() -> None:
    earlier = {"src": RELAY, "deny": ["autogroup:member:22", f"{EXIT}:22"]}
    current = {"tagOwners": OWNERS, "grants": [internet_grant(EXIT, RELAY)], "tests": [earlier]}
    merged = merged_policy(current, EXIT, RELAY)
    assert merged["tests"] == policy_tests(EXIT, RELAY, current)
    assert missing_tests(merged, EXIT, RELAY) == []


# --------------------------------------------------------------- through the stack
def refused(config: dict[str, Any], policy: dict[str, Any]) -> str:
    result = evaluate(config, "bad", fakes=FakeProviders(policy=policy))
    assert isinstance(result.error, pulumi.RunError), repr(result.error)
    assert result.resources == [], [r.name for r in result.resources]
    return str(result.error)


@pytest.mark.parametrize("managed", [False, True], ids=["read-only", "managePolicy"])
def test_the_stack_refuses_an_open_policy_before_anything_is_created(managed: bool) -> None:
    config = with_config(dev_config(), "tailnet", managePolicy=True) if managed else dev_config()
    policy, section, index = OFFENDING["the default allow-all ACL"]
    message = refused(config, policy)
    assert f'{section}[{index}] lets "{RELAY}"' in message
    assert json.dumps(policy[section][index]) in message


@pytest.mark.parametrize("managed", [False, True], ids=["read-only", "managePolicy"])
def test_the_stack_refuses_the_default_allow_all_policy_file(managed: bool) -> None:
    config = with_config(dev_config(), "tailnet", managePolicy=True) if managed else dev_config()
    assert 'neither "acls" nor "grants"' in refused(config, {"tagOwners": OWNERS})


def test_the_refusal_prints_the_grant_via_the_exit_node() -> None:
    message = refused(dev_config(), OFFENDING["relay to the exit node's ssh"][0])
    assert '"via": [\n        "tag:egress-exit"\n      ]' in message
    assert '"tests"' in message


def test_the_refusal_prints_tests_for_the_users_own_devices_and_ports() -> None:
    # The tests to paste cover what this tailnet has: its own tags and the ports its rules name.
    policy = stack_policy(
        tagOwners={**OWNERS, "tag:nas": ["group:ops"]},
        grants=[{"src": ["autogroup:member"], "dst": ["tag:nas"], "ip": ["tcp:47123"]}],
    )
    del policy["tests"]
    message = refused(dev_config(), policy)
    assert '"tag:nas:47123"' in message and '"autogroup:member:47123"' in message


# --------------------------------------------------------------- the managed policy
def test_the_managed_policy_routes_via_the_exit_node_and_carries_the_tests() -> None:
    existing = {
        "tagOwners": {"tag:server": ["group:ops"]},
        "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:server:*"]}],
    }
    config = with_config(dev_config(), "tailnet", managePolicy=True)
    evaluation = evaluate(config, "managed", fakes=FakeProviders(policy=existing))
    assert evaluation.error is None, evaluation.error
    (acl,) = evaluation.of_type(ACL)
    policy = json.loads(acl.plain()["acl"])
    assert policy["acls"] == existing["acls"]
    assert internet_grant(EXIT, RELAY) in policy["grants"]
    assert all(g.get("via") == [EXIT] for g in policy["grants"] if RELAY in g["src"])
    (test,) = [t for t in policy["tests"] if t["src"] == RELAY]
    for port in DENIED_PORTS:
        assert f"autogroup:member:{port}" in test["deny"]
        assert f"{EXIT}:{port}" in test["deny"]
    assert policy_problems(policy, EXIT, RELAY) == []


def test_merging_replaces_the_stacks_earlier_grant_without_via_and_keeps_the_users_tests() -> None:
    users_test = {"src": "alice@example.com", "accept": ["tag:server:22"]}
    current = {
        "tagOwners": OWNERS,
        "grants": [{"src": [RELAY], "dst": ["autogroup:internet"], "ip": ["*"]}],
        "tests": [users_test],
    }
    merged = merged_policy(current, EXIT, RELAY)
    assert merged["grants"] == [internet_grant(EXIT, RELAY)]
    assert merged["tests"][0] == users_test and len(merged["tests"]) == 2
    assert merged_policy(merged, EXIT, RELAY) == merged


@pytest.mark.parametrize("case", sorted(OFFENDING))
def test_merging_refuses_a_policy_whose_tests_would_fail(case: str) -> None:
    policy, section, index = OFFENDING[case]
    with pytest.raises(UnsafePolicyError, match=rf"{section}\[{index}\]"):
        merged_policy(policy, EXIT, RELAY)
