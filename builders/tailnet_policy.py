"""What the tailnet policy file must allow, and must not, checked before
anything is built.

The relay's proxies send a tailnet address (100.64.0.0/10, fd7a:115c:a1e0::/48,
a MagicDNS name) straight to the peer that owns it, past every NetworkPolicy
(tailscale's net/tsdial). The tailnet policy is then the only thing between a
pod and the laptop's own Tailscale address, every server of the tailnet and
the exit node's services. So the relay's tag may reach `autogroup:internet`,
through the stack's exit node, and nothing else; a policy that gives it more
is refused, naming the rule.

The stack never rewrites a shared tailnet's policy unless asked to
(`tailnet.managePolicy`): by default it only reads the policy and, when
something is missing or too open, stops with the exact fix.

Who a rule's `src` covers (Tailscale's policy syntax reference; Headscale's
hscontrol/policy/v2 resolves them the same way): `*` is every device;
`autogroup:tagged` every tagged device; `autogroup:danger-all` every address;
an IP, CIDR, `hosts` alias or `ipset:` that overlaps the tailnet's ranges
covers whichever device holds that address, the relay included. A tagged
device has no user, so users, `group:`s (lists of users), `autogroup:member`,
`autogroup:admin` and the like do not cover it. `srcPosture` only narrows a
rule; it is not taken into account (a rule is judged as if it applied).
`ssh` rules only say who may log in with Tailscale SSH where the network
already lets them connect; they open no connection themselves and are not
checked. A grant with `app` but no `ip` carries application capabilities
only, no packets.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Policy = dict[str, Any]

INTERNET = "autogroup:internet"
# Where Tailscale (and Headscale, by default) assigns device addresses.
TAILNET_RANGES = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
# Ports the stack's `tests` deny the relay on every device it may not reach.
# A policy test names one destination port at a time (no ranges, no `*`), so
# this is a list: remote shells and desktops, file sharing, mail, DNS, web,
# proxies, databases and caches, container and cluster APIs, and the relay's
# own ports (health 9002, proxies 1080 and 3128). Every port the policy file
# itself names is added to it (`denied_ports`).
DENIED_PORTS = (
    21, 22, 23, 25, 53, 80, 111, 135, 139, 443, 445, 873, 1080, 2049, 2375, 2376, 3000, 3128, 3306, 3389,
    5000, 5432, 5900, 6379, 6443, 8000, 8022, 8080, 8443, 8888, 9000, 9002, 9090, 9200, 10250, 11211, 27017,
)  # fmt: skip
# What the stack asked for before it routed through the exit node only; a
# managed policy drops it in favour of the `via` grant.
_LEGACY_GRANT_KEYS = ("src", "dst", "ip")


def internet_grant(exit_node_tag: str, relay_tag: str) -> Policy:
    """The relay may reach the internet, and only through this stack's exit
    node (`via`): not through another exit node or subnet router of the tailnet."""
    return {"src": [relay_tag], "dst": [INTERNET], "ip": ["*"], "via": [exit_node_tag]}


def _named_ports(spec: str) -> set[int]:
    """The ports one `ports` (ACL) or `ip` (grant) entry names: `22`, `tcp:22`,
    `22,80`, `1000-2000` (both ends), `*` (none)."""
    found: set[int] = set()
    for part in spec.rsplit(":", 1)[-1].split(","):
        for end in part.split("-"):
            if end.strip().isdigit() and 0 < int(end) < 65536:
                found.add(int(end))
    return found


def denied_ports(policy: Mapping[str, Any] | None) -> list[int]:
    """DENIED_PORTS plus every port the policy's rules name (for anyone): what
    a device of this tailnet is known to serve is what the relay must not reach."""
    ports = set(DENIED_PORTS)
    for acl in (policy or {}).get("acls") or []:
        if isinstance(acl, Mapping):
            for dst in acl.get("dst", acl.get("ports")) or []:
                if isinstance(dst, str) and ":" in dst:
                    ports |= _named_ports(dst)
    for grant in (policy or {}).get("grants") or []:
        if isinstance(grant, Mapping):
            for ip in grant.get("ip") or []:
                if isinstance(ip, str):
                    ports |= _named_ports(ip)
    return sorted(ports)


def denied_destinations(exit_node_tag: str, relay_tag: str, policy: Mapping[str, Any] | None) -> list[str]:
    """Members' devices, this stack's exit node, every relay (other stacks'
    relays share the tag) and every other tagged device the policy knows."""
    tags = [t for t in (policy or {}).get("tagOwners") or {} if t not in (exit_node_tag, relay_tag)]
    return ["autogroup:member", exit_node_tag, relay_tag, *sorted(tags)]


def policy_tests(exit_node_tag: str, relay_tag: str, policy: Mapping[str, Any] | None = None) -> list[Policy]:
    """Assertions the control server evaluates on every change of the policy
    file, so that a later hand edit that opens a device of the tailnet to the
    relay is refused by Tailscale (or Headscale) itself. They cannot say
    "every port" (a test names single ports), nor "only the internet": an
    `accept` for the internet is not expressible, `autogroup:internet` is not
    a valid test destination."""
    ports = denied_ports(policy)
    destinations = denied_destinations(exit_node_tag, relay_tag, policy)
    return [{"src": relay_tag, "deny": [f"{dst}:{port}" for dst in destinations for port in ports]}]


def missing_tests(policy: Mapping[str, Any], exit_node_tag: str, relay_tag: str) -> list[str]:
    """The denials the policy's `tests` lack for this stack (a read-only policy
    must carry them too: without them nothing refuses a later edit)."""
    have = {
        d
        for t in policy.get("tests") or []
        if isinstance(t, Mapping) and t.get("src") == relay_tag
        for d in t.get("deny") or []
    }
    (needed,) = policy_tests(exit_node_tag, relay_tag, policy)
    return [d for d in needed["deny"] if d not in have]


def required_policy(exit_node_tag: str, relay_tag: str, current: Mapping[str, Any] | None = None) -> Policy:
    """The entries this stack needs in `current`: tags it may assign, the
    relay's use of the exit node, the tests that keep the relay to that, and
    (where the stack manages the file) exit-route auto-approval."""
    return {
        "tagOwners": {exit_node_tag: ["autogroup:admin"], relay_tag: ["autogroup:admin"]},
        "grants": [internet_grant(exit_node_tag, relay_tag)],
        "tests": policy_tests(exit_node_tag, relay_tag, current),
        "autoApprovers": {"exitNode": [exit_node_tag]},
    }


# ----------------------------------------------------------------- who is covered
def _overlaps_tailnet(entry: str) -> bool:
    try:
        net = ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return False
    return any(net.version == r.version and net.overlaps(r) for r in TAILNET_RANGES)


def _covers_relay(entry: str, policy: Mapping[str, Any], relay_tag: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether the `src` entry `entry` includes the relay's device."""
    if entry in seen:
        return False
    seen = seen | {entry}
    if entry in ("*", relay_tag, "autogroup:tagged", "autogroup:danger-all"):
        return True
    if entry.startswith("group:"):
        # Tailscale does not allow tags in groups; checked in case that changes.
        return any(_covers_relay(m, policy, relay_tag, seen) for m in (policy.get("groups") or {}).get(entry) or [])
    if entry.startswith("ipset:"):
        members = (policy.get("ipsets") or {}).get(entry) or []
        # `remove ...` entries are ignored: they cannot be shown to exclude the relay's address.
        return any(
            _covers_relay(m.removeprefix("add "), policy, relay_tag, seen)
            for m in members
            if " " not in m or m.startswith("add ")
        )
    if entry.startswith("host:"):
        entry = entry.removeprefix("host:")
    hosts = policy.get("hosts") or {}
    if entry in hosts:
        return _overlaps_tailnet(str(hosts[entry]))
    return _overlaps_tailnet(entry)


def _relay_entries(srcs: Iterable[str], policy: Mapping[str, Any], relay_tag: str) -> list[str]:
    return [s for s in srcs if isinstance(s, str) and _covers_relay(s, policy, relay_tag)]


def _acl_host(dst: str) -> str:
    """The host part of an ACL destination `host:ports` (IPv6 as `[addr]:port`)."""
    return dst.rsplit(":", 1)[0] if ":" in dst else dst


# ----------------------------------------------------------------- findings
@dataclass(frozen=True)
class Offence:
    """A rule that lets the relay reach more than the internet."""

    section: str  # "acls", "grants", or "" for the whole file
    index: int
    rule: Mapping[str, Any]
    relay_src: Sequence[str]
    beyond: Sequence[str]

    def describe(self, relay_tag: str) -> str:
        if not self.section:
            return (
                'the policy file has neither "acls" nor "grants": Tailscale then allows every device to reach'
                " every other device (the default allow-all policy), so a pod could reach any device of the"
                ' tailnet through the relay. Fix: write explicit rules, e.g. {"grants": [{"src":'
                ' ["autogroup:member"], "dst": ["autogroup:member"], "ip": ["*"]}]} for your own devices, plus'
                " this stack's entries"
            )
        via = " (through " + ", ".join(f'"{s}"' for s in self.relay_src) + ")" if self.relay_src != [relay_tag] else ""
        return (
            f'{self.section}[{self.index}] lets "{relay_tag}"{via} reach '
            + ", ".join(f'"{d}"' for d in self.beyond)
            + ", more than the internet, so a pod could reach those devices through the relay: "
            + json.dumps(self.rule)
            + "."
            + f' Fix: take "{relay_tag}" out of its src (e.g. "autogroup:member" instead of "*"),'
            + f' or narrow its dst to "{INTERNET}", or delete the rule'
        )


def relay_offences(policy: Mapping[str, Any], relay_tag: str) -> list[Offence]:
    """Every rule through which the relay's tag reaches beyond `autogroup:internet`."""
    acls, grants = policy.get("acls"), policy.get("grants")
    if acls is None and grants is None:
        return [Offence("", 0, {}, [], ["*"])]
    found: list[Offence] = []
    for i, acl in enumerate(acls or []):
        if not isinstance(acl, Mapping) or acl.get("action", "accept") != "accept":
            continue
        srcs = _relay_entries(acl.get("src", acl.get("users")) or [], policy, relay_tag)
        beyond = [d for d in acl.get("dst", acl.get("ports")) or [] if _acl_host(str(d)) != INTERNET]
        if srcs and beyond:
            found.append(Offence("acls", i, acl, srcs, beyond))
    for i, grant in enumerate(grants or []):
        if not isinstance(grant, Mapping) or not grant.get("ip"):
            continue  # app capabilities only: no network access
        srcs = _relay_entries(grant.get("src") or [], policy, relay_tag)
        beyond = [d for d in grant.get("dst") or [] if d != INTERNET]
        if srcs and beyond:
            found.append(Offence("grants", i, grant, srcs, beyond))
    return found


def rules_reaching_the_relay(policy: Mapping[str, Any], relay_tag: str) -> list[str]:
    """Every rule that lets devices open connections to the relay. The relay
    serves nothing to the tailnet, and a device that may reach it is in its
    netmap: that device's peer API, which tailscaled opens to every peer of
    its netmap whatever the policy says, is then one proxy request away from
    every protected pod."""
    found = []
    rules = [("acls", i, r, r.get("dst", r.get("ports")) or []) for i, r in enumerate(policy.get("acls") or [])]
    rules += [("grants", i, g, g.get("dst") or []) for i, g in enumerate(policy.get("grants") or [])]
    for section, i, rule, dsts in rules:
        if not isinstance(rule, Mapping) or (section == "acls" and rule.get("action", "accept") != "accept"):
            continue
        if section == "grants" and not rule.get("ip"):
            continue  # app capabilities only: no network access
        hosts = [_acl_host(str(d)) if section == "acls" else str(d) for d in dsts]
        reaching = [h for h in hosts if h != INTERNET and _covers_relay(h, policy, relay_tag)]
        if reaching:
            found.append(
                f'{section}[{i}] lets its src reach "{relay_tag}" (through '
                + ", ".join(f'"{h}"' for h in reaching)
                + "): those devices enter the relay's netmap, and their peer APIs, which Tailscale opens to"
                " every peer whatever the policy says, come within reach of every protected pod through the"
                f" relay's proxies: {json.dumps(rule)}. Fix: narrow its dst to what those devices need (e.g."
                ' "autogroup:member" or "autogroup:self" instead of "*"); nothing needs to reach the relay'
            )
    return found


def _relay_may_use_exit_node(policy: Mapping[str, Any], exit_node_tag: str, relay_tag: str) -> bool:
    for grant in policy.get("grants") or []:
        if not isinstance(grant, Mapping):
            continue
        srcs, dsts, ips = grant.get("src") or [], grant.get("dst") or [], grant.get("ip") or []
        via = grant.get("via")
        # A grant `via` other routers does not let the relay use this stack's exit node.
        through_ours = not via or exit_node_tag in via
        if (
            _relay_entries(srcs, policy, relay_tag)
            and (INTERNET in dsts or "*" in dsts)
            and "*" in ips
            and through_ours
        ):
            return True
    for acl in policy.get("acls") or []:
        if not isinstance(acl, Mapping):
            continue
        srcs, dsts = acl.get("src", acl.get("users")) or [], acl.get("dst", acl.get("ports")) or []
        to_internet = f"{INTERNET}:*" in dsts or "*:*" in dsts
        if acl.get("action") == "accept" and _relay_entries(srcs, policy, relay_tag) and to_internet:
            return True
    return False


def policy_problems(policy: Mapping[str, Any], exit_node_tag: str, relay_tag: str) -> list[str]:
    """What `policy` lacks for this stack, and every rule that gives the relay
    more than the internet; [] when it is right."""
    problems = []
    owners = policy.get("tagOwners", {}) or {}
    for tag in (exit_node_tag, relay_tag):
        if tag not in owners:
            problems.append(f'tagOwners has no "{tag}": auth keys with that tag cannot be created')
    if not _relay_may_use_exit_node(policy, exit_node_tag, relay_tag):
        problems.append(
            f'no grant lets "{relay_tag}" reach "{INTERNET}" via "{exit_node_tag}":'
            " the relay could not use the exit node"
        )
    problems += [o.describe(relay_tag) for o in relay_offences(policy, relay_tag)]
    problems += rules_reaching_the_relay(policy, relay_tag)
    missing = missing_tests(policy, exit_node_tag, relay_tag)
    if missing:
        problems.append(
            f'tests has no "deny" for "{relay_tag}" to {len(missing)} destinations (e.g. {json.dumps(missing[:3])}):'
            " without them Tailscale accepts a later edit of the policy that opens a device to the relay;"
            ' add the "tests" entry below'
        )
    return problems


def policy_warnings(policy: Mapping[str, Any], exit_node_tag: str, relay_tag: str) -> list[str]:
    """Acceptable but looser than the stack asks: the relay may use other exit nodes."""
    if any(
        isinstance(g, Mapping)
        and exit_node_tag in (g.get("via") or [])
        and _relay_entries(g.get("src") or [], policy, relay_tag)
        for g in policy.get("grants") or []
    ):
        return []
    return [
        f'the relay\'s way to "{INTERNET}" is not limited to "{exit_node_tag}" (no grant with "via"): it may use'
        f" any exit node of the tailnet. Prefer the grant {json.dumps(internet_grant(exit_node_tag, relay_tag))}"
    ]


def preflight_message(
    problems: list[str], exit_node_tag: str, relay_tag: str, current: Mapping[str, Any] | None = None
) -> str:
    snippet = required_policy(exit_node_tag, relay_tag, current)
    del snippet["autoApprovers"]  # approval is done through the API by default
    return (
        "the tailnet policy file does not allow this stack yet:\n  - "
        + "\n  - ".join(problems)
        + "\nThe relay's tag must reach the internet through the exit node, and nothing else."
        + " Add these entries to the policy file (admin console, Access controls), then run `pulumi up` again:\n"
        + json.dumps(snippet, indent=2)
        + "\nOr let this stack manage the whole policy file: pulumi config set --path tailnet.managePolicy true"
        + " (it refuses a policy with rules like the ones above, too)"
    )


class UnsafePolicyError(ValueError):
    """The current policy gives the relay more than the internet: merging our
    entries into it would write a file whose `tests` fail."""


def merged_policy(current: Mapping[str, Any], exit_node_tag: str, relay_tag: str) -> Policy:
    """`current` with this stack's entries added (idempotent; only the
    stack's own earlier grant without `via` is replaced).

    Raises UnsafePolicyError when a rule of `current` lets the relay reach more
    than the internet (Tailscale would reject the file for its `tests`, and
    the rule is a way around the isolation either way), or lets devices reach
    the relay (their peer APIs would be within its reach).
    """
    unsafe = [o.describe(relay_tag) for o in relay_offences(current, relay_tag)]
    unsafe += rules_reaching_the_relay(current, relay_tag)
    if unsafe:
        raise UnsafePolicyError(
            "refusing to manage the tailnet policy file: "
            + "; ".join(unsafe)
            + "\nFix the policy file by hand (admin console, Access controls), then run `pulumi up` again."
        )
    merged: Policy = copy.deepcopy(dict(current))
    needed = required_policy(exit_node_tag, relay_tag, current)
    owners = merged.setdefault("tagOwners", {})
    for tag, tag_owners in needed["tagOwners"].items():
        owners.setdefault(tag, tag_owners)
    legacy = {k: v for k, v in internet_grant(exit_node_tag, relay_tag).items() if k in _LEGACY_GRANT_KEYS}
    grants = [g for g in merged.get("grants") or [] if g != legacy]
    for grant in needed["grants"]:
        if grant not in grants:
            grants.append(grant)
    merged["grants"] = grants
    # The stack's own earlier tests (only "src" and "deny" for the relay) make way for today's.
    tests = [t for t in merged.get("tests") or [] if not (t.get("src") == relay_tag and set(t) == {"src", "deny"})]
    merged["tests"] = tests
    for test in needed["tests"]:
        if test not in tests:
            tests.append(test)
    approvers = merged.setdefault("autoApprovers", {}).setdefault("exitNode", [])
    if exit_node_tag not in approvers:
        approvers.append(exit_node_tag)
    return merged
