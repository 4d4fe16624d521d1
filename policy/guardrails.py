"""The guardrails: what a preview of this stack must never do, whoever wrote the change.

Each policy is a pure check over the properties the engine hands to a policy
pack (`check_*`, returning one message per violation), wrapped in a
pulumi-policy `ResourceValidationPolicy` or `StackValidationPolicy` at
enforcement level MANDATORY, so a violation fails `pulumi preview` and
`pulumi up`.

The pack is self-contained on purpose: it does not import the program's
builders or constants (its own address ranges, its own idea of a pinned
image). A change that weakens the program's definitions then cannot weaken
the guardrails in the same stroke.

Which namespaces are guarded, decided by a stack-level check over every
resource (labels such as Pod Security's are NOT used to decide: they are what
a weakening change would remove):
- protected: every namespace the stack sets up protection in, that is one it
  creates or labels (Namespace, NamespacePatch) or holds a NetworkPolicy or
  ConfigMap in. The program places nothing else anywhere, so a workload a
  change adds there is checked, and one in an unrelated namespace is not;
- relay: the namespace of any object carrying the relay's label
  (`app.kubernetes.io/name: tailscale-egress-relay`: its Deployment, Service
  and policies, so it is known even while a preview cannot see the Deployment);
- node guard: `<relay namespace>-node-guard`, Pod Security `privileged` for
  the node guard's DaemonSet, which may share the node's network and run as
  root with NET_ADMIN and NET_RAW, and nothing more; any other pod there is
  held to `restricted`.

Values unknown during a preview (the relay's spec waits for the exit node's
address on a new stack) cannot be checked then: resource policies are then
reported by pulumi-policy as advisory "can't run during preview", stack
policies skip that one resource; both run again, with the values known, when
`pulumi up` registers the resource.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from pulumi_policy import (
    EnforcementLevel,
    Policy,
    PolicyPack,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.proxy import UnknownValueError

PACK_NAME: Final = "tailscale-egress-guardrails"
MANDATORY: Final = EnforcementLevel.MANDATORY

RELAY_POD_LABEL: Final = ("app.kubernetes.io/name", "tailscale-egress-relay")
NODE_GUARD_POD_LABEL: Final = ("app.kubernetes.io/name", "tailscale-egress-node-guard")
NODE_GUARD_NAMESPACE_SUFFIX: Final = "-node-guard"
PSA_ENFORCE: Final = "pod-security.kubernetes.io/enforce"
STUN_PORT: Final = 3478

NAMESPACE_TYPES: Final = frozenset({"kubernetes:core/v1:Namespace", "kubernetes:core/v1:NamespacePatch"})
NETWORK_POLICY: Final = "kubernetes:networking.k8s.io/v1:NetworkPolicy"
CONFIG_MAP: Final = "kubernetes:core/v1:ConfigMap"
TAILNET_KEY: Final = "tailscale:index/tailnetKey:TailnetKey"
HCLOUD_FIREWALL: Final = "hcloud:index/firewall:Firewall"
STACK: Final = "pulumi:pulumi:Stack"

# Where each kind keeps its pod spec.
_TEMPLATE: Final = ("spec", "template", "spec")
POD_SPEC_PATHS: Final[dict[str, tuple[str, ...]]] = {
    "kubernetes:core/v1:Pod": ("spec",),
    "kubernetes:core/v1:ReplicationController": _TEMPLATE,
    "kubernetes:apps/v1:Deployment": _TEMPLATE,
    "kubernetes:apps/v1:StatefulSet": _TEMPLATE,
    "kubernetes:apps/v1:DaemonSet": _TEMPLATE,
    "kubernetes:apps/v1:ReplicaSet": _TEMPLATE,
    "kubernetes:batch/v1:Job": _TEMPLATE,
    "kubernetes:batch/v1:CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}

# What the relay must never reach (besides the exceptions in check_relay_egress):
# private, CGNAT (the tailnet's own 100.64/10 and some clouds' metadata),
# link-local (169.254.169.254 and other metadata services), loopback, "this
# network", and their IPv6 counterparts (ULA holds AWS's fd00:ec2::254), with
# the IPv4-mapped block.
FORBIDDEN_RANGES: Final[tuple[tuple[str, str], ...]] = (
    ("0.0.0.0/8", "'this network'"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "CGNAT (tailnet, some clouds' metadata)"),
    ("169.254.0.0/16", "link-local (cloud metadata 169.254.169.254)"),
    ("127.0.0.0/8", "loopback"),
    ("fc00::/7", "private IPv6 (ULA, AWS metadata fd00:ec2::254)"),
    ("fe80::/10", "link-local IPv6"),
    ("::1/128", "loopback IPv6"),
    ("::ffff:0:0/96", "IPv4-mapped IPv6"),
)

# An exact version: MAJOR.MINOR.PATCH, optionally v-prefixed and suffixed
# (1.102.5, v1.102.5, 1.27.3-alpine, 2.4.1_p1).
_EXACT_VERSION = re.compile(r"^v?\d+\.\d+\.\d+([._+-][0-9A-Za-z._+-]+)?$")
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

# Key material by shape: Tailscale keys (auth, API, OAuth client), Headscale
# keys, PEM private keys, and Hetzner API tokens (64 letters and digits in
# mixed case; lower-case hex such as a sha256 digest is not one).
_SECRET_VALUES: Final = (
    re.compile(r"tskey-[a-z]+-[A-Za-z0-9]"),
    re.compile(r"hskey-[a-z]+-[A-Za-z0-9]"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![A-Za-z0-9])(?=[A-Za-z0-9]*[a-z])(?=[A-Za-z0-9]*[A-Z])[A-Za-z0-9]{64}(?![A-Za-z0-9])"),
)
_SECRET_NAMES: Final = re.compile(
    r"auth[-_]?key|api[-_]?key|private[-_]?key|token|password|passwd|secret|credential", re.IGNORECASE
)


class Resource(Protocol):
    """What a check reads of a resource: a pulumi-policy `PolicyResource`
    or `ResourceValidationArgs` has all four."""

    @property
    def resource_type(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def urn(self) -> str: ...
    @property
    def props(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Violation:
    message: str
    urn: str | None = None


# --- reading the properties (Mapping/Sequence: pulumi-policy hands proxies, not dicts) ---


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, Sequence) and not isinstance(value, str) else []


def _at(props: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = props
    for part in path:
        node = _map(node).get(part)
    return node


def _meta(props: Mapping[str, Any]) -> Mapping[str, Any]:
    return _map(props.get("metadata"))


def namespace_of(props: Mapping[str, Any]) -> str:
    """The namespace a namespaced object lands in (the provider's default is `default`)."""
    return str(_meta(props).get("namespace") or "default")


def _label(props: Mapping[str, Any], path: Sequence[str], key: str) -> Any:
    return _map(_at(props, path)).get(key)


def pod_spec(resource_type: str, props: Mapping[str, Any]) -> Mapping[str, Any] | None:
    path = POD_SPEC_PATHS.get(resource_type)
    return None if path is None else _map(_at(props, path))


def _pod_labels(resource_type: str, props: Mapping[str, Any]) -> Mapping[str, Any]:
    path = POD_SPEC_PATHS.get(resource_type)
    if path is None:
        return {}
    template_meta = (*path[:-1], "metadata") if len(path) > 1 else ("metadata",)
    return _map(_at(props, (*template_meta, "labels")))


def _containers(spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in _list(spec.get(field)):
            yield _map(c)


def _what(r: Resource) -> str:
    return f"{r.resource_type.rsplit(':', 1)[-1]} {r.name!r}"


def _known(resources: Sequence[Resource], check: Callable[[Resource], Any]) -> Iterator[tuple[Resource, Any]]:
    """`check(r)` for each resource whose properties it reads are known (see the module doc)."""
    for r in resources:
        try:
            yield r, check(r)
        except UnknownValueError:
            continue


# --- which namespaces are guarded ---


@dataclass(frozen=True)
class Guarded:
    protected: frozenset[str]
    relay: frozenset[str]
    # `<relay namespace>-node-guard`: Pod Security `privileged` for the node
    # guard's DaemonSet (hostNetwork, NET_ADMIN, NET_RAW), and only for it.
    node_guard: frozenset[str]

    @property
    def isolated(self) -> frozenset[str]:
        """The namespaces that enforce `restricted` and keep a default-deny policy."""
        return self.protected | self.relay

    def kind(self, namespace: str) -> str:
        return "relay" if namespace in self.relay else "node guard" if namespace in self.node_guard else "protected"


def _carries(labels: Any, label: tuple[str, str]) -> bool:
    return _map(labels).get(label[0]) == label[1]


def carries_label(resource_type: str, props: Mapping[str, Any], label: tuple[str, str]) -> bool:
    """The object, its pods, or the pods it selects (a Service, a NetworkPolicy) carry `label`."""
    spec = _map(props.get("spec"))
    return any(
        _carries(labels, label)
        for labels in (
            _meta(props).get("labels"),
            _pod_labels(resource_type, props),
            _map(spec.get("podSelector")).get("matchLabels"),
            spec.get("selector") if resource_type == "kubernetes:core/v1:Service" else None,
        )
    )


def guarded_namespaces(resources: Sequence[Resource]) -> Guarded:
    """Every namespace the stack touches; the relay's is the one whose objects
    carry the relay's label (its Service and policies are known even while a
    preview cannot know the relay's Deployment)."""
    touched: set[str] = set()
    relay: set[str] = set()
    for r, ns in _known(resources, _namespace_touched):
        if ns is None:
            continue
        touched.add(ns)
        if r.resource_type not in NAMESPACE_TYPES and carries_label(r.resource_type, r.props, RELAY_POD_LABEL):
            relay.add(ns)
    node_guard = {f"{ns}{NODE_GUARD_NAMESPACE_SUFFIX}" for ns in relay} & touched
    return Guarded(
        protected=frozenset(touched - relay - node_guard), relay=frozenset(relay), node_guard=frozenset(node_guard)
    )


# Where the stack sets up protection: the namespace's labels, its egress policy, its proxy settings.
_PROTECTION_TYPES: Final = NAMESPACE_TYPES | {NETWORK_POLICY, CONFIG_MAP}


def _namespace_touched(r: Resource) -> str | None:
    """The namespace `r` guards: one the stack labels or creates, or holds a
    policy or proxy settings in, or the relay's (any object with its label)."""
    if not r.resource_type.startswith("kubernetes:"):
        return None
    if r.resource_type in NAMESPACE_TYPES:
        return str(_meta(r.props).get("name") or "") or None
    if r.resource_type in _PROTECTION_TYPES or carries_label(r.resource_type, r.props, RELAY_POD_LABEL):
        return namespace_of(r.props)
    return None


def is_relay_workload(resource_type: str, props: Mapping[str, Any]) -> bool:
    return _carries(_pod_labels(resource_type, props), RELAY_POD_LABEL)


# --- 1. pods in guarded namespaces: not privileged, not root, no host namespaces ---


def pod_problems(spec: Mapping[str, Any], *, node_guard: bool = False) -> list[str]:
    """What makes a pod spec privileged, root or host-sharing. The node guard
    may have the node's network, root and NET_ADMIN/NET_RAW, and no more."""
    host = ("hostPID", "hostIPC") if node_guard else ("hostNetwork", "hostPID", "hostIPC")
    allowed_caps = {"NET_BIND_SERVICE", *(("NET_ADMIN", "NET_RAW") if node_guard else ())}
    problems = [f"{field}: true" for field in host if spec.get(field) is True]
    pod_sc = _map(spec.get("securityContext"))
    for c in _containers(spec):
        name = c.get("name", "?")
        sc = _map(c.get("securityContext"))
        if sc.get("privileged") is True:
            problems.append(f"container {name!r} privileged: true")
        if sc.get("allowPrivilegeEscalation") is True:
            problems.append(f"container {name!r} allowPrivilegeEscalation: true")
        added = [str(cap) for cap in _list(_map(sc.get("capabilities")).get("add")) if cap not in allowed_caps]
        if added:
            problems.append(f"container {name!r} adds capabilities {added}")
        if node_guard:
            continue
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if user == 0:
            problems.append(f"container {name!r} runs as root (runAsUser: 0)")
        elif non_root is not True:
            problems.append(f"container {name!r} may run as root (runAsNonRoot is not true)")
    return problems


def check_guarded_pods(resources: Sequence[Resource]) -> list[Violation]:
    guarded = guarded_namespaces(resources)
    found: list[Violation] = []
    for r, spec in _known(resources, lambda r: pod_spec(r.resource_type, r.props)):
        if spec is None:
            continue
        ns = namespace_of(r.props)
        if ns not in guarded.isolated | guarded.node_guard:
            continue
        guard = ns in guarded.node_guard and carries_label(r.resource_type, r.props, NODE_GUARD_POD_LABEL)
        rule = (
            "the node guard may share the node's network, run as root with NET_ADMIN and NET_RAW, and no more"
            if guard
            else "pods there must pass Pod Security `restricted` (non-root, unprivileged, no host namespaces)"
        )
        for problem in pod_problems(spec, node_guard=guard):
            found.append(Violation(f"{_what(r)} in {guarded.kind(ns)} namespace {ns!r}: {problem}; {rule}", r.urn))
    return found


# --- 2. guarded namespaces: `restricted` enforced, default-deny in place ---


def _selects_all_pods(policy_spec: Mapping[str, Any]) -> bool:
    selector = _map(policy_spec.get("podSelector"))
    return not _map(selector.get("matchLabels")) and not _list(selector.get("matchExpressions"))


def _egress_opening(rule: Mapping[str, Any]) -> str | None:
    """Why an egress rule of a protected namespace reaches beyond the cluster's selected pods, or None."""
    peers = _list(rule.get("to"))
    if not peers:
        return "an egress rule without `to` (every destination)"
    for peer in peers:
        peer = _map(peer)
        if "ipBlock" in peer:
            return f"an egress rule to ipBlock {_map(peer['ipBlock']).get('cidr')!r}"
        ns_selector = peer.get("namespaceSelector")
        if (
            ns_selector is not None
            and not _map(ns_selector).get("matchLabels")
            and not _list(_map(ns_selector).get("matchExpressions"))
        ):
            return "an egress rule to every namespace (namespaceSelector: {})"
    return None


def check_namespace_isolation(resources: Sequence[Resource]) -> list[Violation]:
    guarded = guarded_namespaces(resources)
    enforce: dict[str, Any] = {}
    urns: dict[str, str] = {}
    policies: dict[str, list[tuple[Resource, Mapping[str, Any]]]] = {}
    for r, props in _known(resources, lambda r: r.props):
        if r.resource_type in NAMESPACE_TYPES:
            name = str(_meta(props).get("name") or "")
            enforce[name] = _label(props, ("metadata", "labels"), PSA_ENFORCE)
            urns[name] = r.urn
        elif r.resource_type == NETWORK_POLICY:
            policies.setdefault(namespace_of(props), []).append((r, _map(props.get("spec"))))
    found: list[Violation] = []
    for ns in sorted(guarded.isolated):
        kind = guarded.kind(ns)
        if enforce.get(ns) != "restricted":
            how = "it is not created or labelled by the stack" if ns not in enforce else f"enforce={enforce[ns]!r}"
            found.append(
                Violation(
                    f"{kind} namespace {ns!r} does not enforce Pod Security `restricted` ({how}); label it"
                    f" {PSA_ENFORCE}=restricted",
                    urns.get(ns),
                )
            )
        in_ns = policies.get(ns, [])
        deny_egress = [r for r, spec in in_ns if _selects_all_pods(spec) and "Egress" in _list(spec.get("policyTypes"))]
        if kind == "relay":
            deny_egress = [
                r
                for r, spec in in_ns
                if _selects_all_pods(spec)
                and {"Ingress", "Egress"} <= set(_list(spec.get("policyTypes")))
                and not _list(spec.get("ingress"))
                and not _list(spec.get("egress"))
            ]
        if not deny_egress:
            want = (
                "a default-deny policy (all pods, Ingress and Egress, no rules)"
                if kind == "relay"
                else (
                    "its default-deny egress NetworkPolicy (all pods, policyTypes [Egress], only the relay, DNS and"
                    " its own pods)"
                )
            )
            found.append(Violation(f"{kind} namespace {ns!r} lacks {want}", urns.get(ns)))
        if kind == "protected":
            for r, spec in in_ns:
                for rule in _list(spec.get("egress")):
                    opening = _egress_opening(_map(rule))
                    if opening:
                        found.append(
                            Violation(
                                f"{_what(r)} opens protected namespace {ns!r} with {opening}; its pods may reach"
                                " only the relay, cluster DNS and pods of their own namespace",
                                r.urn,
                            )
                        )
    return found


# --- 3. the relay's egress: never private, link-local, CGNAT or metadata ---

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _uncovered(block: Network, excepts: Sequence[Network]) -> list[Network]:
    """The parts of `block` that no `excepts` entry removes (CIDRs nest or are disjoint)."""
    remaining = [block]
    for ex in excepts:
        nxt: list[Network] = []
        for part in remaining:
            if part.version != ex.version or not part.overlaps(ex):
                nxt.append(part)
            elif not part.subnet_of(ex):  # type: ignore[arg-type]
                nxt.extend(part.address_exclude(ex))  # type: ignore[arg-type]
        remaining = nxt
    return remaining


def reached_forbidden(cidr: str, excepts: Sequence[str]) -> list[str]:
    """The forbidden ranges (with why) that an ipBlock of `cidr` minus `excepts` still reaches."""
    net = ipaddress.ip_network(cidr, strict=False)
    exs = [ipaddress.ip_network(e, strict=False) for e in excepts]
    reached = []
    for forbidden, why in FORBIDDEN_RANGES:
        f = ipaddress.ip_network(forbidden)
        if f.version != net.version or not f.overlaps(net):
            continue
        inside = f if f.subnet_of(net) else net  # type: ignore[arg-type]
        left = _uncovered(inside, exs)
        if left:
            reached.append(f"{left[0]} ({why})")
    return reached


def login_server_address(resources: Sequence[Resource]) -> tuple[str, int] | None:
    """The relay's self-hosted login server as (IP, port) when its URL names an IP literal."""
    for r, spec in _known(resources, lambda r: pod_spec(r.resource_type, r.props)):
        if spec is None or not is_relay_workload(r.resource_type, r.props):
            continue
        for c in _containers(spec):
            for env in _list(c.get("env")):
                env = _map(env)
                if env.get("name") != "TS_EXTRA_ARGS":
                    continue
                for arg in str(env.get("value") or "").split():
                    if arg.startswith("--login-server="):
                        url = urlsplit(arg.partition("=")[2])
                        try:
                            ip = ipaddress.ip_address(url.hostname or "")
                        except ValueError:
                            return None
                        return str(ip), url.port or (443 if url.scheme == "https" else 80)
    return None


def _is_login_server_rule(rule: Mapping[str, Any], cidr: str, login: tuple[str, int] | None) -> bool:
    """A rule to the login server's own address, on its port and STUN alone."""
    if login is None:
        return False
    net = ipaddress.ip_network(cidr, strict=False)
    if net.num_addresses != 1 or net.network_address != ipaddress.ip_address(login[0]):
        return False
    ports = [_map(p) for p in _list(rule.get("ports"))]
    allowed = {("TCP", login[1]), ("UDP", STUN_PORT)}
    return bool(ports) and all(
        p.get("endPort") is None and (str(p.get("protocol", "TCP")), p.get("port")) in allowed for p in ports
    )


def _selects_relay(spec: Mapping[str, Any]) -> bool:
    key, value = RELAY_POD_LABEL
    return _map(_map(spec.get("podSelector")).get("matchLabels")).get(key) == value


def check_relay_egress(resources: Sequence[Resource]) -> list[Violation]:
    guarded = guarded_namespaces(resources)
    login = login_server_address(resources)
    found: list[Violation] = []
    for r, spec in _known(
        resources, lambda r: _map(r.props.get("spec")) if r.resource_type == NETWORK_POLICY else None
    ):
        if spec is None or not (namespace_of(r.props) in guarded.relay or _selects_relay(spec)):
            continue
        for i, rule in enumerate(_list(spec.get("egress"))):
            rule = _map(rule)
            peers = _list(rule.get("to"))
            if not peers:
                found.append(Violation(f"{_what(r)} egress[{i}] has no `to`: the relay may reach every address", r.urn))
            for peer in peers:
                block = _map(_map(peer).get("ipBlock"))
                if not block:
                    continue
                cidr = str(block.get("cidr"))
                if _is_login_server_rule(rule, cidr, login):
                    continue
                reached = reached_forbidden(cidr, [str(e) for e in _list(block.get("except"))])
                if reached:
                    found.append(
                        Violation(
                            f"{_what(r)} egress[{i}] ipBlock {cidr} lets the relay reach {', '.join(reached)};"
                            " except these ranges (only a self-hosted login server's own IP may be reached, on its"
                            " port and STUN alone)",
                            r.urn,
                        )
                    )
    return found


# --- 4. every NetworkPolicy names its policyTypes ---


def check_policy_types(props: Mapping[str, Any]) -> list[str]:
    types = _list(_map(props.get("spec")).get("policyTypes"))
    if not types:
        return [
            "spec.policyTypes is missing: Kubernetes then infers it (egress rules also isolate ingress, an"
            " egress-only intent can silently open); list Ingress and/or Egress explicitly"
        ]
    return []


# --- 5. images pinned to an exact version or a digest ---


def image_problem(image: str) -> str | None:
    if _DIGEST.search(image):
        return None
    last = image.rsplit("/", 1)[-1]
    tag = last.partition(":")[2] if ":" in last else ""
    if not tag:
        return f"image {image!r} has no tag (means :latest)"
    if not _EXACT_VERSION.match(tag):
        return f"image {image!r}: tag {tag!r} is not an exact version"
    return None


def check_images(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    spec = pod_spec(resource_type, props)
    if spec is None:
        return []
    return [
        f"{problem}; pin it to an exact version (such as :v1.102.5) or a digest (@sha256:...)"
        for c in _containers(spec)
        if (problem := image_problem(str(c.get("image") or ""))) is not None
    ]


# --- 6. Tailscale auth keys: tagged, pre-authorized, ephemeral; the exit node's single-use ---


_EXIT_KEY_NAME = re.compile(r"exit-node-key$")
_EXIT_KEY_ROLE = re.compile(r"(^|\s)exit node( g\d+)?$")


def is_exit_node_key(name: str, props: Mapping[str, Any]) -> bool:
    """The program names it `<...>-exit-node-key` and describes it as `<stack prefix> exit node`
    (the role ends the description, so a stack named "exit..." does not make every key one)."""
    return bool(_EXIT_KEY_NAME.search(name) or _EXIT_KEY_ROLE.search(str(props.get("description") or "")))


def check_auth_key(name: str, props: Mapping[str, Any]) -> list[str]:
    problems = []
    exit_node = is_exit_node_key(name, props)
    if not _list(props.get("tags")):
        problems.append("has no tags: the device would belong to the key's owner, with their access")
    if props.get("preauthorized") is not True:
        problems.append("is not pre-authorized: the device waits for manual approval")
    if props.get("ephemeral") is not True:
        problems.append("is not ephemeral: a device that goes away stays in the tailnet")
    if exit_node and props.get("reusable") is not False:
        problems.append("is reusable: the exit node's key must be single-use (reusable: false)")
    return problems


# --- 7. no SSH from the whole internet ---


def _wide(cidr: str) -> bool:
    net = ipaddress.ip_network(cidr, strict=False)
    return net.prefixlen < (8 if net.version == 4 else 16)


def _covers_22(rule: Mapping[str, Any]) -> bool:
    if str(rule.get("protocol", "")).lower() != "tcp":
        return False
    port = str(rule.get("port") or "any").strip().lower()
    if port == "any":
        return True
    low, _, high = port.partition("-")
    try:
        return int(low) <= 22 <= int(high or low)
    except ValueError:
        return True  # unreadable: assume the worst


def check_firewall(props: Mapping[str, Any]) -> list[str]:
    problems = []
    for i, rule in enumerate(_list(props.get("rules"))):
        rule = _map(rule)
        if str(rule.get("direction", "in")) != "in" or not _covers_22(rule):
            continue
        wide = [str(c) for c in _list(rule.get("sourceIps")) if _wide(str(c))]
        if wide:
            problems.append(
                f"rules[{i}] opens SSH (TCP {rule.get('port', 'any')}) to {wide}: the whole internet; allow only"
                " your own CIDRs (exitNode.sshAllowedCidrs), or none"
            )
    return problems


# --- 8. no key material in a ConfigMap or a stack output ---


def secret_findings(value: Any, path: str) -> Iterator[str]:
    """Paths (and what was seen) where `value` holds key material or a credential-named key."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if _SECRET_NAMES.search(str(k)) and v not in (None, "", [], {}):
                yield f"{sub} (a credential's name)"
            else:
                yield from secret_findings(v, sub)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        for i, v in enumerate(value):
            yield from secret_findings(v, f"{path}[{i}]")
    elif isinstance(value, str) and any(p.search(value) for p in _SECRET_VALUES):
        yield f"{path} (a value shaped like a key or token)"


def check_config_map(props: Mapping[str, Any]) -> list[str]:
    found = [*secret_findings(props.get("data"), "data"), *secret_findings(props.get("binaryData"), "binaryData")]
    return [f"{f}: ConfigMaps are readable by anyone who can read the namespace; use a Secret" for f in found]


def check_stack_outputs(resources: Sequence[Resource]) -> list[Violation]:
    found: list[Violation] = []
    for r, outputs in _known(resources, lambda r: r.props if r.resource_type == STACK else None):
        if outputs is None:
            continue
        for name in outputs:
            try:
                findings = list(secret_findings({name: outputs[name]}, ""))
            except UnknownValueError:
                continue
            found += [
                Violation(
                    f"stack output {f}: outputs are not where keys go (nothing the stack exports is secret)", r.urn
                )
                for f in findings
            ]
    return found


# --- the policies ---


def _resource_policy(
    name: str, description: str, types: frozenset[str], check: Callable[[ResourceValidationArgs], list[str]]
) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        if args.resource_type in types:
            for problem in check(args):
                report_violation(f"{_what(args)}: {problem}", None)

    return ResourceValidationPolicy(name=name, description=description, validate=validate, enforcement_level=MANDATORY)


def _stack_policy(
    name: str, description: str, check: Callable[[Sequence[Resource]], list[Violation]]
) -> StackValidationPolicy:
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        for v in check(args.resources):
            report_violation(v.message, v.urn)

    return StackValidationPolicy(name=name, description=description, validate=validate, enforcement_level=MANDATORY)


def policies() -> list[Policy]:
    pods = frozenset(POD_SPEC_PATHS)
    return [
        _stack_policy(
            "guarded-pods-restricted",
            "No privileged, root or host-namespace pod in a protected or relay namespace.",
            check_guarded_pods,
        ),
        _stack_policy(
            "guarded-namespaces-isolated",
            "Protected and relay namespaces enforce Pod Security `restricted` and keep their default-deny policy.",
            check_namespace_isolation,
        ),
        _stack_policy(
            "relay-egress-public-only",
            "The relay never reaches private, link-local, CGNAT or metadata addresses"
            " (a self-hosted login server's own IP and port excepted).",
            check_relay_egress,
        ),
        _resource_policy(
            "network-policy-types-explicit",
            "Every NetworkPolicy names its policyTypes.",
            frozenset({NETWORK_POLICY}),
            lambda a: check_policy_types(a.props),
        ),
        _resource_policy(
            "images-pinned",
            "Every container image is pinned to an exact version or a digest.",
            pods,
            lambda a: check_images(a.resource_type, a.props),
        ),
        _resource_policy(
            "auth-keys-locked-down",
            "Tailscale auth keys are tagged, pre-authorized and ephemeral; the exit node's is single-use.",
            frozenset({TAILNET_KEY}),
            lambda a: check_auth_key(a.name, a.props),
        ),
        _resource_policy(
            "no-ssh-from-internet",
            "No Hetzner firewall opens SSH to the whole internet.",
            frozenset({HCLOUD_FIREWALL}),
            lambda a: check_firewall(a.props),
        ),
        _resource_policy(
            "no-secrets-in-configmaps",
            "No key, token or password in a ConfigMap.",
            frozenset({CONFIG_MAP}),
            lambda a: check_config_map(a.props),
        ),
        _stack_policy(
            "no-secrets-in-outputs",
            "No key, token or password in a stack output.",
            check_stack_outputs,
        ),
    ]


def build_pack() -> None:
    """Serve the pack to the engine. Blocks forever: only policy/__main__.py calls it."""
    PolicyPack(name=PACK_NAME, policies=policies(), enforcement_level=MANDATORY)
