"""AdmissionGuard: ValidatingAdmissionPolicies and their bindings that keep a
protected namespace's egress decided by the stack alone (see
builders/admission.py for what each refuses).

The guard names the identity that deploys the stack: it alone may change
the stack's objects and the namespaces' Pod Security labels. That identity
is asked of the API server with the very kubeconfig and context the
Kubernetes provider uses (`kubectl auth whoami`, a SelfSubjectReview), so it
is the user the provider acts as, whatever the kubeconfig authenticates
with (certificate, token, exec plugin, OIDC); `cluster.deployer` overrides it.
The guard does not depend on the stack's other objects, nor they on it:
the deployer passes it, so any order of creation and deletion works.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi

from builders.admission import (
    DEPLOYER_PLACEHOLDER,
    GuardSettings,
    StackObject,
    admission_guard,
    opening_egress_rules,
    opening_ingress_rules,
)
from builders.kube import Manifest
from builders.network_policies import protected_namespace_policy
from builders.node_guard import guard_namespace
from builders.proxy_env import PROXY_CONFIGMAP
from builders.relay import PROXY_PORTS, RELAY_NAME
from components.egress_relay import AUTH_SECRET_NAME
from components.kube import apply_manifest
from config import ClusterConfig
from preflight import OFFLINE_ENV, PreflightError

KUBECTL_TIMEOUT_SECONDS = 30
# The stack's default-deny policy in each protected namespace, by the name its builder gives it.
OWN_POLICY_NAME: str = protected_namespace_policy("x", "y", PROXY_PORTS)["metadata"]["name"]


FIX = (
    "set the user the stack deploys as: pulumi config set --path cluster.deployer <username>"
    " (or turn the guard off, losing its protection: pulumi config set --path cluster.admissionGuard false)"
)


def _kubectl_command(cluster: ClusterConfig, *args: str) -> list[str]:
    command = ["kubectl", *args, "--context", cluster.context]
    if cluster.kubeconfig:
        command += ["--kubeconfig", str(Path(cluster.kubeconfig).expanduser())]
    return command


def whoami_command(cluster: ClusterConfig) -> list[str]:
    return _kubectl_command(cluster, "auth", "whoami", "--output", "json")


def _kubectl_json(command: list[str], where: str) -> Any:
    """kubectl's JSON answer; PreflightError starting with `where` when there is none."""
    shown = " ".join(command)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=KUBECTL_TIMEOUT_SECONDS, check=False)
    except FileNotFoundError:
        raise PreflightError(
            f"{where} kubectl is not on PATH to ask the API server (`{shown}`, kubectl 1.28 or later):"
            f" install kubectl, or {FIX}"
        ) from None
    except subprocess.TimeoutExpired:
        raise PreflightError(f"{where} `{shown}` did not answer in {KUBECTL_TIMEOUT_SECONDS} s: {FIX}") from None
    if done.returncode != 0:
        why = done.stderr.strip() or done.stdout.strip()
        raise PreflightError(
            f"{where} `{shown}` failed: {why} (the guard needs kubectl 1.28 or later and Kubernetes 1.30 or later):"
            f" {FIX}"
        )
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise PreflightError(f"{where} `{shown}` answered no JSON ({done.stdout.strip()[:200]!r}): {FIX}") from None


def deployer_username(cluster: ClusterConfig) -> str:
    """The Kubernetes username the stack deploys as: `cluster.deployer`, else
    what the API server answers for the provider's kubeconfig and context.

    A render (nothing contacted) without `cluster.deployer` shows a placeholder.
    Raises PreflightError, naming the key and the fix, when it cannot be told.
    """
    if cluster.deployer is not None:
        return cluster.deployer
    if os.environ.get(OFFLINE_ENV) == "1":
        return DEPLOYER_PLACEHOLDER
    command = whoami_command(cluster)
    where = "tailscale-egress:cluster.deployer is not set, and"
    review = _kubectl_json(command, where)
    username = review.get("status", {}).get("userInfo", {}).get("username") if isinstance(review, dict) else None
    if not isinstance(username, str) or not username:
        raise PreflightError(f"{where} `{' '.join(command)}` named no username ({review!r:.200}): {FIX}")
    return username


def opening_policies(cluster: ClusterConfig, policies: Sequence[Manifest]) -> list[str]:
    """One line for each of `policies` in a protected namespace (other than
    the stack's own) whose egress reaches beyond the relay, DNS and the
    namespace itself, or whose ingress admits more than the namespace and
    cluster.ingressFrom, naming its rules."""
    protected = {ns.name for ns in cluster.protected_namespaces}
    found = []
    for policy in policies:
        meta = policy.get("metadata") or {}
        if meta.get("namespace") not in protected or meta.get("name") == OWN_POLICY_NAME:
            continue
        spec = policy.get("spec") or {}
        bad = [("egress", i) for i in opening_egress_rules(policy, cluster.relay_namespace, PROXY_PORTS)]
        bad += [("ingress", i) for i in opening_ingress_rules(policy, cluster.ingress_from)]
        if bad:
            shown = "; ".join(f"{way}[{i}] = {json.dumps(spec[way][i], sort_keys=True)}" for way, i in bad)
            found.append(f"NetworkPolicy {meta['namespace']}/{meta['name']}: {shown}")
    return found


def check_existing_policies(cluster: ClusterConfig, listed: Sequence[Manifest] | None = None) -> None:
    """Refuse to deploy while a protected namespace already holds a policy
    that opens egress: admission judges only what is written from now on.

    `listed`: every NetworkPolicy of the cluster when the preflight has read
    them already (preflight.read_cluster); else they are asked for here."""
    if os.environ.get(OFFLINE_ENV) == "1":
        return
    if listed is None:
        command = _kubectl_command(cluster, "get", "networkpolicies", "--all-namespaces", "--output", "json")
        answer = _kubectl_json(command, "tailscale-egress:cluster.admissionGuard is on, and")
        listed = answer.get("items") or [] if isinstance(answer, dict) else []
    found = opening_policies(cluster, listed)
    if found:
        raise PreflightError(
            "cannot deploy yet: these NetworkPolicies in protected namespaces allow egress beyond the relay's"
            " proxy ports, cluster DNS and the namespace's own pods, or ingress from beyond the namespace and"
            " cluster.ingressFrom, and would keep doing so (the admission guard refuses such policies from now"
            " on, but cannot judge those written before it):\n  - "
            + "\n  - ".join(found)
            + "\nDelete them (kubectl delete networkpolicy -n <namespace> <name>) or narrow them (for ingress"
            " from another namespace's pods: pulumi config set --path 'cluster.ingressFrom[0]' <namespace>),"
            " then run again"
        )


def default_username() -> str | None:
    """The username kubectl acts as when given no --context or --kubeconfig
    (its current context: what a user's everyday `kubectl` and Helm use);
    None when that cannot be told."""
    try:
        done = subprocess.run(
            # Short: a stopped everyday cluster must not hold up every preview.
            ["kubectl", "auth", "whoami", "--output", "json", "--request-timeout", "5s"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        review = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    username = review.get("status", {}).get("userInfo", {}).get("username") if isinstance(review, dict) else None
    return username if isinstance(username, str) and username else None


def shared_identity_warning(deployer: str, everyday: str | None) -> str | None:
    """The warning for a deployer who is also kubectl's everyday identity
    (issue 19, point 11), else None."""
    if everyday != deployer:
        return None
    return (
        f"tailscale-egress:cluster.deployer: the stack deploys as {deployer!r}, the identity kubectl uses by"
        " default (its current context). The admission guard exempts the deployer from its checks on the"
        " stack's objects and on the protected namespaces' Pod Security labels, so every kubectl and Helm"
        " command you run as yourself is exempt too: a chart that sets pod-security.kubernetes.io/enforce:"
        " privileged on a protected namespace passes. Give the stack an identity of its own: a kubeconfig"
        " context used only by pulumi up (pulumi config set --path cluster.context <that context>; set"
        " cluster.deployer to its user if you set it), and keep your everyday context for kubectl and Helm"
    )


def guard_preflight(cluster: ClusterConfig, policies: Sequence[Manifest] | None = None) -> str:
    """Before anything is created: who deploys the stack (a warning when that
    is also kubectl's everyday identity), and no policy already open in a
    protected namespace (among `policies`, when the preflight has read them).
    Returns the deployer's username."""
    deployer = deployer_username(cluster)
    check_existing_policies(cluster, policies)
    if os.environ.get(OFFLINE_ENV) != "1":
        warning = shared_identity_warning(deployer, default_username())
        if warning:
            pulumi.log.warn(warning)
    return deployer


@dataclass(frozen=True)
class AdmissionGuardArgs:
    prefix: str  # StackNames.prefix: the policies are named after the stack
    deployer: str
    protected_namespaces: Sequence[str]
    relay_namespace: str
    ingress_from: Sequence[str] = ()


def guard_settings(args: AdmissionGuardArgs) -> GuardSettings:
    return GuardSettings(
        prefix=args.prefix,
        deployer=args.deployer,
        protected_namespaces=tuple(args.protected_namespaces),
        relay_namespace=args.relay_namespace,
        relay_ports=tuple(PROXY_PORTS),
        protected_objects=(
            StackObject("networking.k8s.io", "networkpolicies", OWN_POLICY_NAME),
            StackObject("", "configmaps", PROXY_CONFIGMAP),
        ),
        relay_objects=(
            StackObject("", "secrets", AUTH_SECRET_NAME),
            StackObject("apps", "deployments", RELAY_NAME),
            StackObject("", "services", RELAY_NAME),
        ),
        own_policy_name=OWN_POLICY_NAME,
        proxy_configmap=PROXY_CONFIGMAP,
        # Guarded whether or not the stack runs the node guard: a namespace of that name is the stack's.
        guard_namespace=guard_namespace(args.relay_namespace),
        ingress_from=tuple(args.ingress_from),
    )


class AdmissionGuard(pulumi.ComponentResource):
    def __init__(self, name: str, args: AdmissionGuardArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tailscale-egress:admission:AdmissionGuard", name, None, opts)
        policy: pulumi.CustomResource | None = None
        for manifest in admission_guard(guard_settings(args)):
            # Logical names without the stack prefix (the objects' own names carry it).
            part = manifest["metadata"]["name"].removeprefix(f"{args.prefix}-")
            if manifest["kind"] == "ValidatingAdmissionPolicy":
                policy = apply_manifest(f"{name}-{part}", manifest, pulumi.ResourceOptions(parent=self))
            else:
                assert policy is not None
                apply_manifest(
                    f"{name}-{part}-binding", manifest, pulumi.ResourceOptions(parent=self, depends_on=[policy])
                )
        self.register_outputs({})
