"""Checks that run after the configuration is valid and before any resource
is created: credentials, the Kubernetes cluster, the tailnet policy, the
exit node's server type in its location. Each failure names the key, the
value and the command that fixes it."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import pulumi
import pulumi_hcloud as hcloud
import pulumi_tailscale as tailscale
import yaml

from builders.kube import POD_SECURITY_LABELS
from builders.tailnet_policy import (
    UnsafePolicyError,
    merged_policy,
    policy_problems,
    policy_warnings,
    preflight_message,
)
from config import ExitNodeConfig, StackConfig

# Set by tools/render.py: nothing is contacted, so nothing is checked but config.
OFFLINE_ENV = "TAILSCALE_EGRESS_OFFLINE"


class PreflightError(pulumi.RunError):
    """Something outside the stack's config must be fixed first."""


RELAY_AUTH_KEY = "tailscale-egress:relayAuthKey"


def supplied_relay_key(has: Callable[[str], bool]) -> bool:
    """True when the stack is given the relay's key (`relayAuthKey`): it then
    deploys the cluster part only, with no Tailscale API and no Hetzner."""
    return has(RELAY_AUTH_KEY)


# Credentials the stack may be given in its stack file. Each must be stored
# encrypted (`pulumi config set --secret`). Pulumi cannot enforce that for an
# optional key: a key declared `secret: true` in Pulumi.yaml is required of every
# stack (and a plain default is refused as "must be encrypted"), so the program
# refuses a plain one itself.
CREDENTIAL_KEYS: Final = (RELAY_AUTH_KEY, "hcloud:token", "tailscale:apiKey", "tailscale:oauthClientSecret")


def plaintext_credentials(has: Callable[[str], bool], is_secret: Callable[[str], bool]) -> list[str]:
    """The credentials set in plain text, each with the command that encrypts it.
    The value itself is never repeated."""
    problems = []
    for key in CREDENTIAL_KEYS:
        if has(key) and not is_secret(key):
            short = key.removeprefix("tailscale-egress:")
            problems.append(
                f"{key} is stored in plain text in the stack file (Pulumi.<stack>.yaml, and every copy or commit"
                f" of it): store it encrypted, which replaces the plain value: pulumi config set --secret {short}"
                " <value>; if the file was ever shared or committed, revoke that credential and use a new one"
            )
    return problems


def config_key_is_secret(key: str) -> bool:
    """Whether the engine handed `key` to the program as a secret (stored encrypted)."""
    return pulumi.runtime.is_config_secret(key) or key in pulumi.runtime.get_config_secret_keys_env()


def stack_shape_problems(
    cfg: StackConfig, has: Callable[[str], bool], is_secret: Callable[[str], bool] = config_key_is_secret
) -> list[str]:
    """Plain-text credentials, and what the supplied relay key rules out;
    checked even when rendering."""
    problems = plaintext_credentials(has, is_secret)
    if not supplied_relay_key(has):
        return problems
    if cfg.exit_node.managed:
        problems.append(
            "tailscale-egress:exitNode.existingTailnetIp = None: required with relayAuthKey (with a key given, the"
            " stack uses no Tailscale API and creates no exit node): set it to your exit node's tailnet IP,"
            " or remove the key (pulumi config rm relayAuthKey) to let the stack build the exit node"
        )
    if cfg.tailnet.manage_policy:
        problems.append(
            "tailscale-egress:tailnet.managePolicy = True: not possible with relayAuthKey (the stack uses no"
            " Tailscale API then); set it to false, or remove relayAuthKey"
        )
    return problems


def missing_credentials(cfg: StackConfig, has: Callable[[str], bool], env: Mapping[str, str]) -> list[str]:
    """Credentials the stack needs and cannot find, with the command to set each.

    `has("hcloud:token")` tells whether a stack config key is set; providers
    also read their environment variables. With `relayAuthKey` the stack
    needs no other credential: it touches neither Tailscale's API nor Hetzner.
    """
    if supplied_relay_key(has):
        return []
    missing = []
    if cfg.exit_node.managed and not (has("hcloud:token") or env.get("HCLOUD_TOKEN")):
        missing.append(
            "hcloud:token is not set (the Hetzner Cloud API token that creates the exit node):"
            " pulumi config set --secret hcloud:token <token>  (or export HCLOUD_TOKEN)"
        )
    if cfg.tailnet.login_server is not None:
        missing.append(
            f"{RELAY_AUTH_KEY} is not set (with tailnet.loginServer the stack cannot mint keys):"
            " create a reusable, ephemeral, pre-authorized key on your control server, then"
            " pulumi config set --secret relayAuthKey <key>"
        )
        return missing
    api_key = has("tailscale:apiKey") or env.get("TAILSCALE_API_KEY")
    oauth = (has("tailscale:oauthClientId") or env.get("TAILSCALE_OAUTH_CLIENT_ID")) and (
        has("tailscale:oauthClientSecret") or env.get("TAILSCALE_OAUTH_CLIENT_SECRET")
    )
    if not (api_key or oauth):
        missing.append(
            "tailscale:apiKey is not set (nor tailscale:oauthClientId and tailscale:oauthClientSecret):"
            " pulumi config set --secret tailscale:apiKey <tskey-api-...>  (or export TAILSCALE_API_KEY),"
            " or, with your own exit node (exitNode.existingTailnetIp), give the relay's key instead:"
            " pulumi config set --secret relayAuthKey <tskey-auth-...>"
        )
    return missing


def _kubeconfig_paths(cfg: StackConfig, env: Mapping[str, str]) -> list[Path]:
    if cfg.cluster.kubeconfig:
        return [Path(cfg.cluster.kubeconfig).expanduser()]
    if env.get("KUBECONFIG"):
        return [Path(p).expanduser() for p in env["KUBECONFIG"].split(os.pathsep) if p]
    return [Path.home() / ".kube" / "config"]


def cluster_server(cfg: StackConfig, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(the API server URL of `cluster.context`, None) or (None, what is wrong)."""
    contexts: dict[str, Any] = {}
    clusters: dict[str, Any] = {}
    paths = _kubeconfig_paths(cfg, env)
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        contexts.update({c["name"]: c.get("context", {}) for c in doc.get("contexts") or [] if "name" in c})
        clusters.update({c["name"]: c.get("cluster", {}) for c in doc.get("clusters") or [] if "name" in c})
    where = ", ".join(str(p) for p in paths)
    context = contexts.get(cfg.cluster.context)
    if context is None:
        known = ", ".join(sorted(contexts)) or "none"
        return None, (
            f"tailscale-egress:cluster.context = {cfg.cluster.context!r}: no such context in {where}"
            f" (contexts there: {known}). Start Rancher Desktop, or pulumi config set --path cluster.context <name>"
        )
    server = clusters.get(context.get("cluster", ""), {}).get("server")
    if not server:
        return None, f"tailscale-egress:cluster.context = {cfg.cluster.context!r}: its cluster has no server in {where}"
    return server, None


def unreachable(server: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the API server succeeds, else why not."""
    parts = urlsplit(server)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except OSError as err:
        return str(err)


@dataclass(frozen=True)
class ClusterListing:
    """What the preflight read from the cluster: each namespace with its
    labels, and every NetworkPolicy when the admission guard's preflight needs
    them (None: not read, that preflight asks for itself)."""

    namespaces: dict[str, dict[str, str]]
    network_policies: list[dict[str, Any]] | None = None


def check_environment(cfg: StackConfig) -> ClusterListing | None:
    """Credentials and the cluster; raises PreflightError listing every problem.

    Returns what it read from the cluster (None when offline), for the
    admission guard's preflight."""
    problems = stack_shape_problems(cfg, config_key_is_set)
    if os.environ.get(OFFLINE_ENV) == "1":
        if problems:
            raise PreflightError("cannot deploy yet:\n  - " + "\n  - ".join(problems))
        return None
    problems += missing_credentials(cfg, config_key_is_set, os.environ)
    server, problem = cluster_server(cfg, os.environ)
    if problem:
        problems.append(problem)
    elif server and (why := unreachable(server)):
        problems.append(
            f"tailscale-egress:cluster.context = {cfg.cluster.context!r}: the API server {server} is not reachable"
            f" ({why}). Start Rancher Desktop (Kubernetes enabled), then run again"
        )
    listing = None
    if not problems:
        listing = read_cluster(cfg)
        problems += protected_namespace_problems(cfg, listing.namespaces)
        ranges = read_ranges(cfg)
        problems += range_problems(cfg.cluster.pod_cidr, cfg.cluster.service_cidr, ranges)
        if ranges.unread:
            pulumi.log.warn(
                "tailscale-egress:cluster.podCidr and serviceCidr are not checked against the cluster:"
                f" its nodes could not be read ({ranges.unread[:200]})"
            )
    if problems:
        raise PreflightError("cannot deploy yet:\n  - " + "\n  - ".join(problems))
    assert listing is not None
    return listing


def read_cluster(cfg: StackConfig) -> ClusterListing:
    """The namespaces and, with the admission guard on, the NetworkPolicies,
    in one kubectl call (each call starts a process: about 0.1 s of every
    `pulumi preview`). When that call fails (say, a user who may list
    namespaces but not NetworkPolicies), the namespaces are read alone and the
    guard's preflight reads the policies itself, so that each failure is
    reported in the words of the check that needs it."""
    if not cfg.cluster.admission_guard:
        return ClusterListing(existing_namespaces(cfg))
    done = _kubectl(cfg, "namespaces,networkpolicies.networking.k8s.io", "--all-namespaces")
    if done.returncode != 0:
        return ClusterListing(existing_namespaces(cfg))
    items = json.loads(done.stdout).get("items", [])
    return ClusterListing(
        _namespace_labels([i for i in items if i.get("kind") == "Namespace"]),
        [i for i in items if i.get("kind") == "NetworkPolicy"],
    )


def _kubectl(cfg: StackConfig, *get: str) -> subprocess.CompletedProcess[str]:
    """`kubectl get <get...> --output json` with the stack's context and kubeconfig."""
    command = ["kubectl", "get", *get, "--output", "json", "--context", cfg.cluster.context]
    if cfg.cluster.kubeconfig:
        command += ["--kubeconfig", str(Path(cfg.cluster.kubeconfig).expanduser())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise PreflightError(
            "kubectl is not on PATH (the preflight reads the protected namespaces' labels with it): install kubectl"
        ) from None
    except subprocess.TimeoutExpired:
        raise PreflightError(f"`{' '.join(command)}` did not answer in 30 s: is the cluster up?") from None
    return done


@dataclass(frozen=True)
class ClusterRanges:
    """The cluster's own address ranges, as far as its API tells them."""

    node_pod_cidrs: dict[str, list[str]]  # each node's spec.podCIDRs (empty: the CNI allocates, not the nodes)
    service_cidrs: dict[str, list[str]]  # each ServiceCIDR's spec.cidrs (Kubernetes 1.33 and later)
    api_service_ip: str | None = None  # the `kubernetes` Service's address, where there is no ServiceCIDR
    unread: str | None = None  # why nothing could be read


def read_ranges(cfg: StackConfig) -> ClusterRanges:
    """The nodes' pod ranges and the service range: the ServiceCIDR objects
    where the API has them, else the API server's own Service address, which
    is the first of its range."""
    done = _kubectl(cfg, "nodes,servicecidrs.networking.k8s.io")
    if done.returncode == 0:
        items = json.loads(done.stdout).get("items", [])
        return ClusterRanges(
            _node_ranges([i for i in items if i.get("kind") == "Node"]),
            {
                i["metadata"]["name"]: list((i.get("spec") or {}).get("cidrs") or [])
                for i in items
                if i.get("kind") == "ServiceCIDR"
            },
        )
    nodes = _kubectl(cfg, "nodes")
    if nodes.returncode != 0:
        return ClusterRanges({}, {}, unread=(nodes.stderr or nodes.stdout).strip())
    service = _kubectl(cfg, "service", "kubernetes", "--namespace", "default")
    ip = json.loads(service.stdout).get("spec", {}).get("clusterIP") if service.returncode == 0 else None
    return ClusterRanges(_node_ranges(json.loads(nodes.stdout).get("items", [])), {}, ip)


def _node_ranges(items: list[dict[str, Any]]) -> dict[str, list[str]]:
    out = {}
    for node in items:
        spec = node.get("spec") or {}
        out[node["metadata"]["name"]] = list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
    return out


def _within(inner: str, outer: str) -> bool:
    a, b = ipaddress.ip_network(inner, strict=False), ipaddress.ip_network(outer, strict=False)
    return a.version == b.version and a.subnet_of(b)  # type: ignore[arg-type]


def range_problems(pod_cidr: str, service_cidr: str, ranges: ClusterRanges) -> list[str]:
    """`cluster.podCidr` and `cluster.serviceCidr` against the cluster's own
    ranges, in the family of each. The node guard and the workloads'
    NO_PROXY know pods and Services by these ranges alone: a pod range that
    misses the nodes' would guard no pod, silently."""
    problems = []
    family = ipaddress.ip_network(pod_cidr, strict=False).version
    outside = {
        node: r
        for node, rs in sorted(ranges.node_pod_cidrs.items())
        for r in rs
        if ipaddress.ip_network(r, strict=False).version == family and not _within(r, pod_cidr)
    }
    if outside:
        theirs = sorted({r for rs in ranges.node_pod_cidrs.values() for r in rs})
        shown = ", ".join(f"node {n} has {r}" for n, r in outside.items())
        problems.append(
            f"tailscale-egress:cluster.podCidr = {pod_cidr!r}: the cluster's pods are not in it ({shown}; every"
            f" node's pod range: {', '.join(theirs)}). The node guard knows pods by this range and would guard"
            " none of them, and the workloads' NO_PROXY would miss them. Set the cluster's pod range (k3s:"
            " --cluster-cidr, 10.42.0.0/16 by default) that"
            " holds every node's: pulumi config set --path cluster.podCidr <cidr>"
        )
    family = ipaddress.ip_network(service_cidr, strict=False).version
    services = {
        name: r
        for name, rs in sorted(ranges.service_cidrs.items())
        for r in rs
        if ipaddress.ip_network(r, strict=False).version == family
    }
    wrong = {name: r for name, r in services.items() if not _within(r, service_cidr)}
    if wrong:
        shown = ", ".join(f"ServiceCIDR {n} has {r}" for n, r in wrong.items())
        problems.append(
            f"tailscale-egress:cluster.serviceCidr = {service_cidr!r}: the cluster's Services are not in it"
            f" ({shown}). Set the cluster's service range: pulumi config set --path cluster.serviceCidr"
            f" {next(iter(wrong.values()))}"
        )
    ip = ipaddress.ip_address(ranges.api_service_ip) if ranges.api_service_ip else None
    # Without ServiceCIDR objects (before Kubernetes 1.33): the first address of the range is the API server's.
    if not services and ip is not None and ip.version == family and ip not in ipaddress.ip_network(service_cidr):
        problems.append(
            f"tailscale-egress:cluster.serviceCidr = {service_cidr!r}: the API server's own Service"
            f" (default/kubernetes) has {ip}, outside it. Set the cluster's service range (the API server's"
            " --service-cluster-ip-range; k3s: --service-cidr, 10.43.0.0/16 by default):"
            " pulumi config set --path cluster.serviceCidr <cidr>"
        )
    return problems


def existing_namespaces(cfg: StackConfig) -> dict[str, dict[str, str]]:
    """Each namespace of the cluster with its labels (`kubectl get namespaces`)."""
    done = _kubectl(cfg, "namespaces")
    if done.returncode != 0:
        raise PreflightError(f"`{' '.join(map(str, done.args))}` failed: {(done.stderr or done.stdout).strip()}")
    return _namespace_labels(json.loads(done.stdout).get("items", []))


def _namespace_labels(items: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {i["metadata"]["name"]: dict(i["metadata"].get("labels") or {}) for i in items}


def protected_namespace_problems(cfg: StackConfig, existing: Mapping[str, Mapping[str, str]]) -> list[str]:
    """What stops the stack from labelling the namespaces it does not create.

    Such a namespace must exist, and any Pod Security label it carries must
    already have the stack's value: the stack would otherwise take the label
    over (server-side apply refuses, as a conflict with its other manager),
    and `pulumi destroy` would then remove it instead of giving it back.
    """
    problems = []
    for i, ns in enumerate(cfg.cluster.protected_namespaces):
        key = f"tailscale-egress:cluster.protectedNamespaces[{i}] = {ns.name!r}"
        if ns.create:
            continue
        if ns.name not in existing:
            problems.append(
                f"{key}: no such namespace in context {cfg.cluster.context!r}; create it"
                f" (kubectl create namespace {ns.name}) or let the stack create it ({{name: {ns.name}, create: true}})"
            )
            continue
        labels = existing[ns.name]
        for label, value in POD_SECURITY_LABELS.items():
            if label in labels and labels[label] != value:
                problems.append(
                    f"{key}: the namespace has {label}={labels[label]} and the stack sets {value}; destroy could not"
                    f" give that label back. Set it first (kubectl label --overwrite namespace {ns.name}"
                    f" {label}={value}) or remove it (kubectl label namespace {ns.name} {label}-), then run again"
                )
    return problems


def config_key_is_set(key: str) -> bool:
    namespace, _, name = key.partition(":")
    return pulumi.Config(namespace).get_secret(name) is not None


def unchecked_by_the_stack(cfg: StackConfig, relay_key_given: bool) -> list[str]:
    """What the stack cannot check or enforce for this configuration, one
    warning each, with what to do instead; printed at every preview and up."""
    warnings = []
    if not cfg.exit_node.managed:
        warnings.append(
            f"tailscale-egress:exitNode.existingTailnetIp = {cfg.exit_node.existing_tailnet_ip!r} (your own exit"
            " node): the stack cannot install the exit node guard there, so nothing stops tailnet traffic (a"
            " relay's proxy request included, whatever the tailnet policy says) from reaching the node's own"
            " services at its tailnet and public addresses. Install the guard on it: make exit-node-guard, then"
            " run install.sh there as root (docs/own-exit-node.md, 'Guard your exit node')"
        )
    if cfg.tailnet.login_server is not None:
        warnings.append(
            f"tailscale-egress:tailnet.loginServer = {cfg.tailnet.login_server!r}: the stack cannot read this"
            " control server's policy, so nothing checks that the relay may reach only the internet via the exit"
            " node: put the entries and the tests of docs/security.md ('The tailnet policy') in it and run"
            " `headscale policy check` after every edit"
        )
    elif relay_key_given:
        warnings.append(
            "tailscale-egress:relayAuthKey is given, so the stack uses no Tailscale API and does not read or check"
            " the tailnet policy: check by hand that the relay's tag may reach only autogroup:internet, via the"
            " exit node, with the tests of docs/security.md ('The tailnet policy')"
        )
    return warnings


def check_tailnet_policy(cfg: StackConfig) -> Mapping[str, Any] | None:
    """Read the tailnet policy file and stop when it lacks what the stack needs.

    Returns the policy (for `managePolicy`); None with a self-hosted control
    server, whose policy Tailscale's API cannot read.
    """
    for warning in unchecked_by_the_stack(cfg, supplied_relay_key(config_key_is_set)):
        pulumi.log.warn(warning)
    if cfg.tailnet.login_server is not None or supplied_relay_key(config_key_is_set):
        return None
    acl = read_through(TAILSCALE_LOOKUP, tailscale.get_acl)
    policy: Mapping[str, Any] = json.loads(acl.json)
    exit_tag, relay_tag = cfg.tailnet.exit_node_tag, cfg.tailnet.relay_tag
    if cfg.tailnet.manage_policy:
        # Merging adds what is missing; a rule that opens the tailnet to the
        # relay must be fixed by hand (its `tests` would fail, too).
        try:
            merged_policy(policy, exit_tag, relay_tag)
        except UnsafePolicyError as err:
            raise PreflightError(str(err)) from None
        return policy
    problems = policy_problems(policy, exit_tag, relay_tag)
    if problems:
        raise PreflightError(preflight_message(problems, exit_tag, relay_tag, policy))
    for warning in policy_warnings(policy, exit_tag, relay_tag):
        pulumi.log.warn(warning)
    return policy


def server_type_problem(server_type: str, location: str, offered: Mapping[str, bool]) -> str | None:
    """Why `server_type` cannot be created in `location`, given where Hetzner
    offers it (location -> available now); None when it can."""
    if offered.get(location):
        return None
    elsewhere = sorted(loc for loc, available in offered.items() if available)
    why = "is not sold" if location not in offered else "is not available at the moment"
    choices = (
        f"it is sold in {', '.join(elsewhere)}: pulumi config set --path exitNode.location {elsewhere[0]}"
        if elsewhere
        else "it is sold nowhere now"
    )
    return (
        f"tailscale-egress:exitNode.serverType = {server_type!r} {why} in exitNode.location = {location!r};"
        f" {choices}, or choose another server type (pulumi config set --path exitNode.serverType <type>;"
        " cpx22 is sold in every location)"
    )


_Read = TypeVar("_Read")


@dataclass(frozen=True)
class ApiLookup:
    """A read the preflight makes through a provider, and what fixes its failure."""

    api: str
    what: str
    endpoint_key: str
    fix: str


HETZNER_LOOKUP: Final = ApiLookup(
    api="Hetzner's API",
    what="the exit node's server type",
    endpoint_key="hcloud:endpoint",
    fix=(
        "hcloud:token must be a Read & Write API token of the Hetzner Cloud project to deploy into (the"
        " project's Security page, API tokens): pulumi config set --secret hcloud:token <token>"
    ),
)
TAILSCALE_LOOKUP: Final = ApiLookup(
    api="Tailscale's API",
    what="the tailnet policy file",
    endpoint_key="tailscale:baseUrl",
    fix=(
        "tailscale:apiKey must be a current API key of the tailnet (or tailscale:oauthClientId and"
        " tailscale:oauthClientSecret an OAuth client with the scopes the README lists, policy_file:read"
        " among them): pulumi config set --secret tailscale:apiKey <tskey-api-...>; and tailscale:tailnet the"
        " tailnet's name, if the key's own tailnet is not meant"
    ),
)


def configured(lookup: ApiLookup) -> str | None:
    """The stack's own endpoint for the API, when it sets one."""
    namespace, _, key = lookup.endpoint_key.partition(":")
    return pulumi.Config(namespace).get(key)


def api_refusal(lookup: ApiLookup, error: str, endpoint: str | None) -> str:
    """Why the preflight could not read what it needs from a cloud's API: the
    provider's own words, which key to fix, and how."""
    # The SDK's wrapping ("invoke of <token> failed: ... ()") says nothing the user needs.
    said = re.sub(r" \(\)$", "", re.sub(r"^invoke of \S+ failed: ", "", error.strip()))
    where = f" (at {lookup.endpoint_key} {endpoint}: check that address too)" if endpoint else ""
    return (
        f"cannot deploy yet:\n  - {lookup.api} did not give {lookup.what}{where}: {said}\n"
        f"    {lookup.fix}. Nothing was created."
    )


def read_through(lookup: ApiLookup, read: Callable[[], _Read]) -> _Read:
    """`read()` through a provider; its failure (a refused credential, no
    answer) as a PreflightError naming the key and the fix."""
    try:
        return read()
    # The SDK raises a plain Exception with the provider's answer.
    except Exception as error:  # noqa: BLE001
        raise PreflightError(api_refusal(lookup, str(error), configured(lookup))) from None


def check_exit_node_offer(exit_node: ExitNodeConfig) -> None:
    """Asks Hetzner, through the hcloud provider (getServerType), whether the
    exit node's server type is offered in its location, before the tailnet
    keys are minted and the firewall is created: otherwise the server's
    create fails half-way through `pulumi up`."""
    if not exit_node.managed:
        return
    offer = read_through(HETZNER_LOOKUP, lambda: hcloud.get_server_type(name=exit_node.server_type))
    offered = {loc.name: bool(loc.available) for loc in offer.locations or []}
    problem = server_type_problem(exit_node.server_type, exit_node.location, offered)
    if problem:
        raise PreflightError(f"cannot deploy yet:\n  - {problem}")
