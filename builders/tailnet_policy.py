"""What the tailnet policy file must allow, checked before anything is built.

The stack never rewrites a shared tailnet's policy unless asked to
(`tailnet.managePolicy`): by default it only reads the policy and, when
something is missing, stops with the exact snippet to add.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

Policy = dict[str, Any]


def required_policy(exit_node_tag: str, relay_tag: str) -> Policy:
    """The entries this stack needs: tags it may assign, the relay's use of
    exit nodes, and (where the stack manages the file) exit-route auto-approval."""
    return {
        "tagOwners": {exit_node_tag: ["autogroup:admin"], relay_tag: ["autogroup:admin"]},
        "grants": [{"src": [relay_tag], "dst": ["autogroup:internet"], "ip": ["*"]}],
        "autoApprovers": {"exitNode": [exit_node_tag]},
    }


def _relay_may_use_internet(policy: Mapping[str, Any], relay_tag: str) -> bool:
    for grant in policy.get("grants", []) or []:
        srcs, dsts, ips = grant.get("src", []), grant.get("dst", []), grant.get("ip", [])
        if (relay_tag in srcs or "*" in srcs) and ("autogroup:internet" in dsts or "*" in dsts) and "*" in ips:
            return True
    for acl in policy.get("acls", []) or []:
        srcs, dsts = acl.get("src", []), acl.get("dst", [])
        to_internet = "autogroup:internet:*" in dsts or "*:*" in dsts
        if acl.get("action") == "accept" and (relay_tag in srcs or "*" in srcs) and to_internet:
            return True
    return False


def policy_problems(policy: Mapping[str, Any], exit_node_tag: str, relay_tag: str) -> list[str]:
    """What `policy` lacks for this stack; [] when it has everything."""
    problems = []
    owners = policy.get("tagOwners", {}) or {}
    for tag in (exit_node_tag, relay_tag):
        if tag not in owners:
            problems.append(f'tagOwners has no "{tag}": auth keys with that tag cannot be created')
    if not _relay_may_use_internet(policy, relay_tag):
        problems.append(
            f'no grant lets "{relay_tag}" reach "autogroup:internet": the relay could not use the exit node'
        )
    return problems


def preflight_message(problems: list[str], exit_node_tag: str, relay_tag: str) -> str:
    snippet = required_policy(exit_node_tag, relay_tag)
    del snippet["autoApprovers"]  # approval is done through the API by default
    return (
        "the tailnet policy file does not allow this stack yet:\n  - "
        + "\n  - ".join(problems)
        + "\nAdd these entries to the policy file (admin console, Access controls), then run `pulumi up` again:\n"
        + json.dumps(snippet, indent=2)
        + "\nOr let this stack manage the whole policy file: pulumi config set --path tailnet.managePolicy true"
    )


def merged_policy(current: Mapping[str, Any], exit_node_tag: str, relay_tag: str) -> Policy:
    """`current` with this stack's entries added (idempotent, nothing removed)."""
    merged: Policy = copy.deepcopy(dict(current))
    needed = required_policy(exit_node_tag, relay_tag)
    owners = merged.setdefault("tagOwners", {})
    for tag, tag_owners in needed["tagOwners"].items():
        owners.setdefault(tag, tag_owners)
    grants = merged.setdefault("grants", [])
    for grant in needed["grants"]:
        if grant not in grants:
            grants.append(grant)
    approvers = merged.setdefault("autoApprovers", {}).setdefault("exitNode", [])
    if exit_node_tag not in approvers:
        approvers.append(exit_node_tag)
    return merged
