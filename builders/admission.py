"""The admission guard: ValidatingAdmissionPolicies (CEL, in the API server,
no webhook to run) that keep the egress of protected namespaces decided by
the stack alone.

NetworkPolicies add up, so one extra policy with an open egress rule (many
Helm charts ship `egress: [{}]`) would restore full egress; and anyone with
edit rights in a namespace could delete the stack's policy. Seven policies,
each with its own binding, all named after the stack (many developer stacks
share a cluster):

- `<prefix>-egress-only-via-relay`: in a protected namespace, a NetworkPolicy
  may allow egress only to the relay's proxy ports, cluster DNS and pods of
  the namespace itself. It holds for everyone, the deployer included (a chart
  installed with the deployer's own credentials is exactly the case); only the
  stack's own policy, written by the deployer, is let through unchecked, so
  that a change of relay namespace or ports is never caught between the old
  guard and the new policy. Its ingress rules may admit only pods of the
  namespace itself and of cluster.ingressFrom.
- `<prefix>-services`: in a protected namespace, no Service with
  `externalIPs` and none of type NodePort or LoadBalancer, for everyone.
- `<prefix>-stack-objects` and `<prefix>-stack-data`: the stack's
  NetworkPolicy and ConfigMap in each protected namespace, and in the relay
  namespace every NetworkPolicy plus the relay's Secret, Deployment and
  Service, are created, changed and deleted by the deployer alone (two
  policies, kinds with a `spec` and kinds with `data`, so that each type-checks
  cleanly against every kind it matches).
- `<prefix>-pod-security-labels`: the Pod Security labels of the protected and
  relay namespaces stay `restricted`, with version `latest` or a release not
  older than POD_SECURITY_VERSION_FLOOR, whether saved through the namespace
  or its `status` and `finalize` subresources; only the deployer changes them
  (so `pulumi destroy` can give an existing namespace its labels back).

- `<prefix>-node-guard-pods` and `<prefix>-node-guard-exec`: in the node
  guard's namespace, the one the stack makes Pod Security `privileged`, pods
  are created by the DaemonSet controller alone and never changed, and nobody
  but the deployer execs, attaches or port-forwards into them (its DaemonSet,
  like every DaemonSet there, is the deployer's through `<prefix>-stack-objects`).

Namespaces are selected by `kubernetes.io/metadata.name`, which the API server
sets from the name and nobody can change or remove: a label of our own would
itself need guarding, and a namespace's UPDATE is matched against its new
labels, so removing such a label would also switch its guard off.

The guard lets through what the cluster itself must do: the garbage
collector taking its finalizer off a stack object that is being deleted
(only when the object's body is unchanged) and the namespace controller
emptying a namespace that is being deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from builders.kube import DNS_NAMESPACE, KUBE_DNS_LABELS, NAMESPACE_NAME_LABEL, Manifest, metadata

API_VERSION: Final = "admissionregistration.k8s.io/v1"
# Pod Security versions older than this are refused as a weakening; `latest`
# (what the stack sets) is always accepted. Kubernetes 1.30 is the oldest
# release with ValidatingAdmissionPolicy GA, so the oldest the guard runs on.
POD_SECURITY_VERSION_FLOOR: Final = 30
POD_SECURITY_MODES: Final = ("enforce", "warn", "audit")
# A namespace's labels are saved through its status and finalize subresources too.
NAMESPACE_RESOURCES: Final = ("namespaces", "namespaces/finalize", "namespaces/status")
# Shown in a render (which contacts no cluster) in place of the deployer.
DEPLOYER_PLACEHOLDER: Final = "<cluster.deployer: the Kubernetes user that runs pulumi up>"


@dataclass(frozen=True)
class StackObject:
    """One object the stack owns, by API group, resource (plural) and name."""

    group: str
    resource: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.group}/{self.resource}/{self.name}"


@dataclass(frozen=True)
class GuardSettings:
    prefix: str  # the stack's name prefix (builders/names.py)
    deployer: str  # the Kubernetes username that deploys the stack
    protected_namespaces: tuple[str, ...]
    relay_namespace: str
    relay_ports: tuple[int, ...]
    # The stack's objects in every protected namespace, and in the relay's.
    protected_objects: tuple[StackObject, ...]
    relay_objects: tuple[StackObject, ...]
    # The stack's own default-deny policy in each protected namespace.
    own_policy_name: str
    proxy_configmap: str
    # The node guard's namespace (Pod Security privileged): its DaemonSet is
    # the deployer's, and its pods the DaemonSet controller's alone.
    guard_namespace: str | None = None
    # Namespaces whose pods may open connections to protected pods (cluster.ingressFrom).
    ingress_from: tuple[str, ...] = ()


def cel_string(text: str) -> str:
    """`text` as a CEL string literal: the deployer's name is written into the
    expressions, and a Kubernetes username may hold any character."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"{text!r}: a lone surrogate cannot be written as CEL")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _cel_list(items: Sequence[str | int]) -> str:
    return "[" + ", ".join(cel_string(i) if isinstance(i, str) else str(i) for i in items) + "]"


def policy_names(prefix: str) -> tuple[str, str, str, str, str, str, str]:
    """(egress, stack objects, stack data, pod security labels, node guard
    pods, node guard exec, services): one policy and one binding each."""
    return (
        f"{prefix}-egress-only-via-relay",
        f"{prefix}-stack-objects",
        f"{prefix}-stack-data",
        f"{prefix}-pod-security-labels",
        f"{prefix}-node-guard-pods",
        f"{prefix}-node-guard-exec",
        f"{prefix}-services",
    )


# The stack's objects by the field that holds what they say: the API server
# type-checks each policy against every kind it matches, so kinds with a
# `spec` and kinds with `data` get a policy each.
_SPEC_RESOURCES: Final = {
    "": ("services",),
    "apps": ("daemonsets", "deployments", "deployments/scale"),
    "networking.k8s.io": ("networkpolicies",),
}
_DATA_RESOURCES: Final = {"": ("configmaps", "secrets")}


def _namespaces_named(names: Sequence[str]) -> Manifest:
    return {"matchExpressions": [{"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": sorted(set(names))}]}


def _rule(group: str, resources: Sequence[str], operations: Sequence[str]) -> Manifest:
    return {
        "apiGroups": [group],
        "apiVersions": ["v1"],
        "operations": list(operations),
        "resources": list(resources),
    }


def _policy(name: str, rules: list[Manifest], spec: Manifest) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": metadata(name),
        "spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": rules}, **spec},
    }


def _binding(name: str, match: Manifest) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": metadata(name),
        "spec": {"policyName": name, "validationActions": ["Deny"], "matchResources": match},
    }


# The object's name: `request.name` is empty when a whole collection is
# deleted at once (DELETE .../networkpolicies), and with generateName; the
# objects themselves carry it, each judged on its own.
OBJECT_NAME: Final = "(request.operation == 'DELETE' ? oldObject.metadata.name : object.metadata.name)"


def _not_deployer(deployer: str) -> Manifest:
    return {"name": "not-the-deployer", "expression": f"request.userInfo.username != {cel_string(deployer)}"}


def _matches_exactly(selector: str, labels: str) -> str:
    """CEL: the label selector at `selector` is `matchLabels: <labels>` (a CEL
    map) and nothing else, the form the stack writes."""
    return (
        f"has({selector}.matchLabels)"
        f" && {selector}.matchLabels == {labels}"
        f" && (!has({selector}.matchExpressions) || size({selector}.matchExpressions) == 0)"
    )


def _cel_map(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f"{cel_string(k)}: {cel_string(v)}" for k, v in sorted(labels.items())) + "}"


def _selects_only(selector: str, namespace: str) -> str:
    """CEL: the label selector at `selector` selects exactly the namespace
    named `namespace` (a CEL expression), in the form the stack writes."""
    return _matches_exactly(selector, f"{{{cel_string(NAMESPACE_NAME_LABEL)}: {namespace}}}")


def _ports_within(protocols: Sequence[str], numbers: Sequence[int]) -> str:
    """CEL, for an egress rule `r`: it names ports, each a number (no range, no
    name) in `numbers` on one of `protocols` (absent means TCP)."""
    default_ok = "true" if "TCP" in protocols else "false"
    return (
        "has(r.ports) && size(r.ports) > 0 && r.ports.all(q,"
        " has(q.port) && type(q.port) == int && !has(q.endPort)"
        f" && (has(q.protocol) ? q.protocol in {_cel_list(protocols)} : {default_ok})"
        f" && q.port in {_cel_list(numbers)})"
    )


def egress_allowed_expression(relay_namespace: str, relay_ports: Sequence[int]) -> str:
    """CEL, true when every egress rule of the NetworkPolicy `object` reaches
    nothing but pods of its own namespace, the relay's proxy ports and DNS.

    Every egress rule is judged, whatever `policyTypes` says: a policy that
    leaves `policyTypes` out and has egress rules does govern egress, and a
    rule held inert by `policyTypes: [Ingress]` is refused too, which costs
    nothing and does not depend on how an enforcer reads that field. Refused:
    a rule without `to` (every destination; `egress: [{}]`), any `ipBlock`,
    a namespace selector other than exactly this namespace, the relay's or
    kube-system (`{}` is every namespace), in kube-system any pods but the
    DNS pods by the stack's own selector (k8s-app: kube-dns), and ports
    beyond the relay's proxy ports or DNS's 53.
    """
    relay, dns = cel_string(relay_namespace), cel_string(DNS_NAMESPACE)
    peer_ok = " || ".join(
        [
            "!has(p.namespaceSelector)",
            f"({_selects_only('p.namespaceSelector', 'request.namespace')})",
            f"({_selects_only('p.namespaceSelector', relay)} && {_ports_within(['TCP'], relay_ports)})",
            # The DNS pods by the stack's own selector: other kube-system pods (k3s's service load
            # balancers, metrics-server) are no DNS.
            f"({_selects_only('p.namespaceSelector', dns)} && has(p.podSelector)"
            f" && {_matches_exactly('p.podSelector', _cel_map(KUBE_DNS_LABELS))}"
            f" && {_ports_within(['UDP', 'TCP'], [53])})",
        ]
    )
    return (
        "(has(object.spec.egress) ? object.spec.egress : []).all(r,"
        f" has(r.to) && size(r.to) > 0 && r.to.all(p, !has(p.ipBlock) && ({peer_ok})))"
    )


def ingress_allowed_expression(ingress_from: Sequence[str]) -> str:
    """CEL, true when every ingress rule of the NetworkPolicy `object` admits
    only pods of its own namespace and of `ingress_from` (whatever
    `policyTypes` says, as for egress). Refused: a rule without `from` (every
    source), any `ipBlock` (the LAN, the node, the internet through a
    NodePort), and a namespace selector other than exactly one of those."""
    sources = " || ".join(
        [
            "!has(p.namespaceSelector)",
            f"({_selects_only('p.namespaceSelector', 'request.namespace')})",
            *(f"({_selects_only('p.namespaceSelector', cel_string(ns))})" for ns in sorted(set(ingress_from))),
        ]
    )
    return (
        "(has(object.spec.ingress) ? object.spec.ingress : []).all(r,"
        f" has(r.from) && size(r.from) > 0 && r.from.all(p, !has(p.ipBlock) && ({sources})))"
    )


# The same rule in Python, for the policies that exist before the guard does
# (admission judges only what is written after it). The engine tests hold the
# two to the same verdict on every case they try.


def _py_matches_exactly(selector: Manifest | None, labels: dict[str, str]) -> bool:
    return selector is not None and selector.get("matchLabels") == labels and not selector.get("matchExpressions")


def _py_selects_only(selector: Manifest, namespace: str) -> bool:
    return _py_matches_exactly(selector, {NAMESPACE_NAME_LABEL: namespace})


def _py_ports_within(rule: Manifest, protocols: Sequence[str], numbers: Sequence[int]) -> bool:
    ports = rule.get("ports") or []
    return bool(ports) and all(
        type(q.get("port")) is int
        and "endPort" not in q
        and q.get("protocol", "TCP") in protocols
        and q["port"] in numbers
        for q in ports
    )


def opening_egress_rules(policy: Manifest, relay_namespace: str, relay_ports: Sequence[int]) -> list[int]:
    """Indexes of the egress rules of `policy` that reach beyond its own
    namespace, the relay's proxy ports and DNS (see egress_allowed_expression)."""
    own = policy["metadata"].get("namespace", "")

    def peer_ok(rule: Manifest, peer: Manifest) -> bool:
        if "ipBlock" in peer:
            return False
        selector = peer.get("namespaceSelector")
        if selector is None:
            return True
        return (
            _py_selects_only(selector, own)
            or (_py_selects_only(selector, relay_namespace) and _py_ports_within(rule, ["TCP"], relay_ports))
            or (
                _py_selects_only(selector, DNS_NAMESPACE)
                and _py_matches_exactly(peer.get("podSelector"), KUBE_DNS_LABELS)
                and _py_ports_within(rule, ["UDP", "TCP"], [53])
            )
        )

    rules = (policy.get("spec") or {}).get("egress") or []
    return [i for i, r in enumerate(rules) if not (r.get("to") and all(peer_ok(r, p) for p in r["to"]))]


def opening_ingress_rules(policy: Manifest, ingress_from: Sequence[str]) -> list[int]:
    """Indexes of the ingress rules of `policy` that admit sources beyond its
    own namespace and `ingress_from` (see ingress_allowed_expression)."""
    own = policy["metadata"].get("namespace", "")

    def source_ok(peer: Manifest) -> bool:
        selector = peer.get("namespaceSelector")
        return "ipBlock" not in peer and (
            selector is None or any(_py_selects_only(selector, ns) for ns in (own, *ingress_from))
        )

    rules = (policy.get("spec") or {}).get("ingress") or []
    return [i for i, r in enumerate(rules) if not (r.get("from") and all(source_ok(p) for p in r["from"]))]


def egress_policy(s: GuardSettings) -> Manifest:
    name = policy_names(s.prefix)[0]
    ports = ", ".join(map(str, s.relay_ports))
    message = (
        f"in a namespace protected by tailscale-egress stack {s.prefix}, a NetworkPolicy may allow egress only"
        f" to the relay (namespace {s.relay_namespace}, TCP {ports}), cluster DNS (pods k8s-app=kube-dns of"
        f" {DNS_NAMESPACE}, port 53)"
        " and pods of this namespace: an egress rule with no `to`, an ipBlock, another namespace or other ports"
        " would open a way around the relay. Reach the internet through the proxy instead"
        f" (envFrom: configMapRef {s.proxy_configmap})"
    )
    sources = ", ".join(s.ingress_from) or "none"
    ingress_message = (
        f"in a namespace protected by tailscale-egress stack {s.prefix}, a NetworkPolicy may allow ingress only"
        f" from pods of this namespace and of the namespaces in cluster.ingressFrom ({sources}): an ingress rule"
        " with no `from`, an ipBlock or another namespace would open a two-way channel that never touches the"
        " relay. Add the namespace to cluster.ingressFrom and run pulumi up if its pods must connect here"
    )
    return _policy(
        name,
        [_rule("networking.k8s.io", ["networkpolicies"], ["CREATE", "UPDATE"])],
        {
            "matchConditions": [
                {
                    # The stack's own policy, written by the deployer: see the module's docstring.
                    "name": "not-the-stacks-own-policy",
                    "expression": f"!(request.userInfo.username == {cel_string(s.deployer)}"
                    f" && object.metadata.name == {cel_string(s.own_policy_name)})",
                },
                {
                    # The garbage collector removing a finalizer from a policy being deleted.
                    "name": "not-a-finalizer-update",
                    "expression": "!(request.operation == 'UPDATE' && has(oldObject.metadata.deletionTimestamp)"
                    " && object.spec == oldObject.spec)",
                },
            ],
            "validations": [
                {
                    "expression": egress_allowed_expression(s.relay_namespace, s.relay_ports),
                    "message": message,
                    "messageExpression": f"'NetworkPolicy ' + request.namespace + '/' + object.metadata.name + ': ' + "
                    f"{cel_string(message)}",
                    "reason": "Forbidden",
                },
                {
                    "expression": ingress_allowed_expression(s.ingress_from),
                    "message": ingress_message,
                    "messageExpression": f"'NetworkPolicy ' + request.namespace + '/' + object.metadata.name + ': ' + "
                    f"{cel_string(ingress_message)}",
                    "reason": "Forbidden",
                },
            ],
        },
    )


def _unchanged(field: str) -> str:
    new, old = f"object.{field}", f"oldObject.{field}"
    return f"(has({new}) ? has({old}) && {new} == {old} : !has({old}))"


def stack_objects_policy(s: GuardSettings, *, data: bool = False) -> Manifest:
    """The stack's objects with a `spec` (NetworkPolicies, the relay's
    Deployment and Service), or with `data` (ConfigMap, Secret)."""
    name = policy_names(s.prefix)[2 if data else 1]
    resources = _DATA_RESOURCES if data else _SPEC_RESOURCES
    ours = {r.split("/")[0] for rs in resources.values() for r in rs}
    relay_keys = [o.key for o in s.relay_objects if o.resource in ours]
    protected_keys = [o.key for o in s.protected_objects if o.resource in ours]
    key = f"request.resource.group + '/' + request.resource.resource + '/' + {OBJECT_NAME}"
    relay_ns = cel_string(s.relay_namespace)
    # In the relay namespace every NetworkPolicy is the stack's: a new one could open the relay's egress.
    any_policy = "" if data else "request.resource.resource == 'networkpolicies' || "
    # In the node guard's (privileged) namespace every DaemonSet is: its pods would run there.
    guard = ""
    if s.guard_namespace is not None and not data:
        guard = f"request.namespace == {cel_string(s.guard_namespace)} ? request.resource.resource == 'daemonsets' : "
    is_stack_object = (
        f"({guard}request.namespace == {relay_ns}"
        f" ? ({any_policy}{key} in {_cel_list(relay_keys)})"
        f" : {key} in {_cel_list(protected_keys)})"
    )
    # A namespace being deleted is emptied by the namespace controller.
    namespace_going = "request.operation == 'DELETE' && has(namespaceObject.metadata.deletionTimestamp)"
    # The garbage collector takes `foregroundDeletion` off an object that the
    # deployer deletes; the body must stay as it is.
    finalizer_update = "request.operation == 'UPDATE' && has(oldObject.metadata.deletionTimestamp) && " + _unchanged(
        "data" if data else "spec"
    )
    message = (
        f"belongs to tailscale-egress stack {s.prefix}: only {s.deployer!r}, the identity that deploys the stack,"
        " may create, change or delete it (in the relay namespace, any NetworkPolicy; in the node guard's, any"
        " DaemonSet). Change the stack's"
        " configuration and run pulumi up instead"
    )
    # deployments/scale too: `kubectl scale` changes the relay without touching `deployments`.
    rules = [_rule(group, rs, ["CREATE", "UPDATE", "DELETE"]) for group, rs in resources.items()]
    return _policy(
        name,
        rules,
        {
            "matchConditions": [_not_deployer(s.deployer)],
            "validations": [
                {
                    "expression": f"!{is_stack_object} || ({namespace_going}) || ({finalizer_update})",
                    "message": message,
                    "messageExpression": f"request.kind.kind + ' ' + request.namespace + '/' + {OBJECT_NAME} + ' ' + "
                    f"{cel_string(message)}",
                    "reason": "Forbidden",
                }
            ],
        },
    )


def pod_security_policy(s: GuardSettings) -> Manifest:
    name = policy_names(s.prefix)[3]
    labels = "variables.labels"
    level = " && ".join(
        f"'pod-security.kubernetes.io/{m}' in {labels} && {labels}['pod-security.kubernetes.io/{m}'] == 'restricted'"
        for m in POD_SECURITY_MODES
    )

    def version_ok(mode: str) -> str:
        v = f"{labels}['pod-security.kubernetes.io/{mode}-version']"
        return (
            f"(!('pod-security.kubernetes.io/{mode}-version' in {labels}) || {v} == 'latest'"
            f" || ({v}.matches('^v1\\\\.[0-9]{{1,4}}$') && int({v}.substring(3)) >= {POD_SECURITY_VERSION_FLOOR}))"
        )

    message = (
        f"is protected by tailscale-egress stack {s.prefix}: its labels pod-security.kubernetes.io/enforce, warn"
        f" and audit must stay restricted, their -version labels latest or v1.{POD_SECURITY_VERSION_FLOOR} or"
        f" later; only {s.deployer!r}, the identity that deploys the stack, may change them"
        " (pulumi destroy gives the labels back)"
    )
    return _policy(
        name,
        [_rule("", NAMESPACE_RESOURCES, ["UPDATE"])],
        {
            "matchConditions": [_not_deployer(s.deployer)],
            "variables": [
                {"name": "labels", "expression": "has(object.metadata.labels) ? object.metadata.labels : {}"}
            ],
            "validations": [
                {
                    "expression": f"{level} && " + " && ".join(version_ok(m) for m in POD_SECURITY_MODES),
                    "message": message,
                    "messageExpression": f"'Namespace ' + request.name + ' ' + {cel_string(message)}",
                    "reason": "Forbidden",
                }
            ],
        },
    )


# The identities the DaemonSet controller creates pods as: its own service
# account (--use-service-account-credentials, as k3s runs it), or the
# controller manager's.
DAEMONSET_CONTROLLERS: Final = (
    "system:serviceaccount:kube-system:daemon-set-controller",
    "system:kube-controller-manager",
)


def node_guard_pods_policy(s: GuardSettings) -> Manifest:
    """In the node guard's namespace, pods come from its DaemonSet alone and
    keep the spec they were made with: the namespace allows host networking
    and NET_ADMIN (a pod's image can be changed in place; an ephemeral
    container is a spec change too)."""
    name = policy_names(s.prefix)[4]
    message = (
        f"is the node guard's namespace of tailscale-egress stack {s.prefix} (Pod Security privileged): its pods"
        " are created by the guard's DaemonSet alone and never changed; change the stack and run pulumi up"
    )
    return _policy(
        name,
        [_rule("", ["pods"], ["CREATE", "UPDATE"]), _rule("", ["pods/ephemeralcontainers"], ["UPDATE"])],
        {
            "matchConditions": [_not_deployer(s.deployer)],
            "validations": [
                {
                    "expression": f"request.operation == 'CREATE'"
                    f" ? request.userInfo.username in {_cel_list(DAEMONSET_CONTROLLERS)}"
                    " : object.spec == oldObject.spec",
                    "message": message,
                    "messageExpression": f"'Pod ' + request.namespace + '/' + object.metadata.name + ': namespace ' + "
                    f"{cel_string(message)}",
                    "reason": "Forbidden",
                }
            ],
        },
    )


def node_guard_exec_policy(s: GuardSettings) -> Manifest:
    """No exec, attach or port-forward into the node guard's pods: they run
    in the node's network with NET_ADMIN."""
    name = policy_names(s.prefix)[5]
    message = (
        f"the node guard's pods (tailscale-egress stack {s.prefix}) run in the node's network with NET_ADMIN:"
        f" no exec, attach or port-forward, but for {s.deployer!r}, the identity that deploys the stack"
    )
    return _policy(
        name,
        [_rule("", ["pods/attach", "pods/exec", "pods/portforward"], ["CONNECT"])],
        {
            "matchConditions": [_not_deployer(s.deployer)],
            "validations": [{"expression": "false", "message": message, "reason": "Forbidden"}],
        },
    )


# Service types that bring no connection from outside the cluster.
CLUSTER_ONLY_SERVICE_TYPES: Final = ("ClusterIP", "ExternalName")


def services_policy(s: GuardSettings) -> Manifest:
    """Services in a protected namespace: no `externalIPs` (kube-proxy would
    take those addresses over for every pod and the node: set to the exit
    node's public address or the control plane's, it cuts every stack's way
    out), and no NodePort or LoadBalancer (connections from the LAN reach the
    pods through the node, whose address every NetworkPolicy enforcer lets
    in). It holds for everyone, the deployer included."""
    name = policy_names(s.prefix)[6]
    external_ips = (
        f"in a namespace protected by tailscale-egress stack {s.prefix}, a Service may not set externalIPs: the"
        " cluster would route those addresses to this Service for every pod and the node, the exit node's or the"
        " control plane's included"
    )
    types = ", ".join(CLUSTER_ONLY_SERVICE_TYPES)
    exposed = (
        f"in a namespace protected by tailscale-egress stack {s.prefix}, a Service must be of type {types}:"
        " NodePort and LoadBalancer bring connections from outside the cluster to its pods past their ingress"
        " isolation. Expose the workload from a namespace the stack does not protect, or reach it with"
        " kubectl port-forward"
    )

    def check(expression: str, message: str) -> Manifest:
        return {
            "expression": expression,
            "message": message,
            "messageExpression": f"'Service ' + request.namespace + '/' + object.metadata.name + ': ' + "
            f"{cel_string(message)}",
            "reason": "Forbidden",
        }

    return _policy(
        name,
        [_rule("", ["services"], ["CREATE", "UPDATE"])],
        {
            "validations": [
                check("!has(object.spec.externalIPs) || size(object.spec.externalIPs) == 0", external_ips),
                check(
                    f"!has(object.spec.type) || object.spec.type in {_cel_list(CLUSTER_ONLY_SERVICE_TYPES)}", exposed
                ),
            ],
        },
    )


def admission_guard(s: GuardSettings) -> list[Manifest]:
    """The policies, each followed by its binding."""
    egress_name, objects_name, data_name, labels_name, pods_name, exec_name, services_name = policy_names(s.prefix)
    all_namespaces = [*s.protected_namespaces, s.relay_namespace]
    guarded = [*all_namespaces, *([s.guard_namespace] if s.guard_namespace else [])]
    node_guard = []
    if s.guard_namespace is not None:
        only_there = {"namespaceSelector": _namespaces_named([s.guard_namespace])}
        node_guard = [
            node_guard_pods_policy(s),
            _binding(pods_name, only_there),
            node_guard_exec_policy(s),
            _binding(exec_name, only_there),
        ]
    return [
        egress_policy(s),
        _binding(egress_name, {"namespaceSelector": _namespaces_named(s.protected_namespaces)}),
        services_policy(s),
        _binding(services_name, {"namespaceSelector": _namespaces_named(s.protected_namespaces)}),
        stack_objects_policy(s),
        _binding(objects_name, {"namespaceSelector": _namespaces_named(guarded)}),
        stack_objects_policy(s, data=True),
        _binding(data_name, {"namespaceSelector": _namespaces_named(all_namespaces)}),
        pod_security_policy(s),
        _binding(
            labels_name,
            {
                "resourceRules": [
                    {**_rule("", NAMESPACE_RESOURCES, ["UPDATE"]), "resourceNames": sorted(set(all_namespaces))}
                ]
            },
        ),
        *node_guard,
    ]
