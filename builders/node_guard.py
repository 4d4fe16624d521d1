"""The node guard: node-level rules for what NetworkPolicy cannot see.

kube-router (k3s' NetworkPolicy controller) accepts ICMP echo-request,
destination-unreachable and time-exceeded from every pod to anywhere before it
evaluates any policy (`KUBE-NWPLCY-COMMON`, the first jump of every pod's
firewall chain), and its `KUBE-ROUTER-INPUT` chain RETURNs traffic to the
node's own addresses on the NodePort range before the pod's policy. Both sit
in the filter table, inserted at the top of INPUT/FORWARD/OUTPUT. The guard's
rules sit in the mangle table's PREROUTING, which every routed or locally
delivered packet passes before the filter table, so no accept of kube-router
can pre-empt them:

- from the pod range, new ICMP to anything outside the cluster's ranges is
  dropped (replies and errors for connections that exist pass: conntrack
  has classified the packet by then, mangle runs after it);
- from the pod range, new TCP/UDP to the node's own addresses (any address
  type LOCAL, whatever interface) on the NodePort range is dropped.

The rules go into the iptables backend the node's kube-router uses (legacy
or nft): the other one may be missing from the node's kernel (nft-only
kernels have no ip_tables), and rules split across backends are invisible to
whoever lists the node's rules with the node's own `iptables`. (Where a kernel
has both, a DROP in either still drops: both register their hooks; the data
path tests show it.) The script detects the backend as Kubernetes'
iptables-wrapper and k3s-root's iptables-detect.sh do (the chains
kube-router and the kubelet create, then which backend holds more rules) and
calls `iptables-legacy`/`iptables-nft` explicitly. The tailscale image
(Alpine 3.22) ships both, with plain `iptables` linked to legacy (tailscale
issue 17854): plain `iptables` is never used.

Everything here is plain data; components/node_guard.py applies it.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from typing import Final

from builders.kube import PART_OF, Manifest, metadata

NODE_GUARD_LABELS: Final = {"app.kubernetes.io/name": "tailscale-egress-node-guard"}
NAMESPACE_SUFFIX: Final = "-node-guard"
# Kubernetes' default --service-node-port-range (k3s keeps it).
NODE_PORT_RANGE: Final = (30000, 32767)
CHECK_INTERVAL_SECONDS: Final = 5
# Pod Security: the guard's namespace is the one place the stack allows
# host networking and NET_ADMIN.
PRIVILEGED_LABELS: Final = {
    f"pod-security.kubernetes.io/{mode}{suffix}": value
    for mode in ("enforce", "warn", "audit")
    for suffix, value in (("", "privileged"), ("-version", "latest"))
}
XTABLES_LOCK: Final = "/run/xtables.lock"

Rule = tuple[int, tuple[str, ...]]  # (IP family, iptables arguments after "-A <chain>")


def guard_namespace(relay_namespace: str) -> str:
    """One guard per stack, named after the stack's relay namespace (unique in
    a cluster), so two stacks in one cluster each have their own."""
    return f"{relay_namespace}{NAMESPACE_SUFFIX}"


def chain_name(namespace: str) -> str:
    """The guard's own chain, per stack: a stack that is destroyed removes its
    chain only, never another stack's. (iptables chain names: <= 28 chars.)"""
    return "TSE-GUARD-" + hashlib.sha256(namespace.encode()).hexdigest()[:8].upper()


def _family(cidr: str) -> int:
    return ipaddress.ip_network(cidr, strict=False).version


def guard_jumps(pod_cidrs: Sequence[str]) -> list[Rule]:
    """The PREROUTING jumps into the guard chain: only traffic from pods."""
    return [(_family(c), ("-s", str(ipaddress.ip_network(c)))) for c in pod_cidrs]


def guard_rules(
    pod_cidrs: Sequence[str], cluster_cidrs: Sequence[str], node_ports: tuple[int, int] = NODE_PORT_RANGE
) -> list[Rule]:
    """The guard chain, per family that has a pod range."""
    not_a_reply = ("-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED")
    ports = f"{node_ports[0]}:{node_ports[1]}"
    rules: list[Rule] = []
    for family in sorted({_family(c) for c in pod_cidrs}):
        # NodePorts first: the node's addresses include ones inside the pod range (cni0).
        for proto in ("tcp", "udp"):
            to_node_port = ("-p", proto, "-m", "addrtype", "--dst-type", "LOCAL", "-m", "multiport", "--dports", ports)
            rules.append((family, (*to_node_port, *not_a_reply, "-j", "DROP")))
        for cidr in cluster_cidrs:
            if _family(cidr) == family:
                rules.append((family, ("-d", str(ipaddress.ip_network(cidr)), "-j", "RETURN")))
        if family == 6:
            # Neighbour discovery and other link-local ICMPv6 never leave the node's link.
            rules += [(6, ("-d", "fe80::/10", "-j", "RETURN")), (6, ("-d", "ff00::/8", "-j", "RETURN"))]
        icmp = "icmp" if family == 4 else "ipv6-icmp"
        rules.append((family, ("-p", icmp, *not_a_reply, "-j", "DROP")))
    return rules


def _lines(rules: Sequence[Rule]) -> str:
    return "\n".join(f"{family} {' '.join(args)}" for family, args in rules)


# POSIX sh (the image's busybox ash). Modes: `run` (default: install, keep in
# place, remove on SIGTERM), `detect` (print the backend), `apply`, `remove`.
_SCRIPT: Final = r"""# tailscale-egress node guard (builders/node_guard.py): drops what
# kube-router accepts before any NetworkPolicy. Removed on SIGTERM.
set -u
set -f
CHAIN='@CHAIN@'
INTERVAL=@INTERVAL@
# "<family> <iptables args>" per line.
JUMPS='@JUMPS@'
RULES='@RULES@'
FAMILIES='@FAMILIES@'
BACKEND=''

log() { echo "node-guard: $*" >&2; }

# Backend detection, as Kubernetes' iptables-wrapper and k3s-root's
# iptables-detect.sh do: first the chains kube-router and the kubelet create
# (in one backend only), then whichever backend holds more rules.
dump() { iptables-"$1"-save 2>/dev/null; ip6tables-"$1"-save 2>/dev/null; }
has_chain() { dump "$1" | grep -Eq "^:($2) "; }
count_rules() { dump "$1" | grep -c '^-A'; }
detect_backend() {
  for chains in 'KUBE-ROUTER-INPUT|KUBE-ROUTER-FORWARD|KUBE-ROUTER-OUTPUT' 'KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY'; do
    in_nft=no; in_legacy=no
    has_chain nft "$chains" && in_nft=yes
    has_chain legacy "$chains" && in_legacy=yes
    if [ "$in_nft" = yes ] && [ "$in_legacy" = no ]; then echo nft; return 0; fi
    if [ "$in_legacy" = yes ] && [ "$in_nft" = no ]; then echo legacy; return 0; fi
  done
  n_legacy=$(count_rules legacy); n_nft=$(count_rules nft)
  if [ "$n_legacy" -gt "$n_nft" ]; then echo legacy; return 0; fi
  if [ "$n_nft" -gt 0 ]; then echo nft; return 0; fi
  return 1
}

ipt() {
  fam=$1; shift
  if [ "$fam" = 6 ]; then ip6tables-"$BACKEND" -w 5 -t mangle "$@"; else iptables-"$BACKEND" -w 5 -t mangle "$@"; fi
}

unjump() {
  while read -r fam args; do
    [ "$fam" = "$1" ] || continue
    while ipt "$fam" -D PREROUTING $args -j "$CHAIN" 2>/dev/null; do :; done
  done <<EOF
$JUMPS
EOF
}

remove() {
  for f in $FAMILIES; do
    unjump "$f"
    ipt "$f" -F "$CHAIN" 2>/dev/null
    ipt "$f" -X "$CHAIN" 2>/dev/null
  done
  log "rules removed ($BACKEND)"
}

apply() {
  for f in $FAMILIES; do
    ipt "$f" -N "$CHAIN" 2>/dev/null
    ipt "$f" -F "$CHAIN" || return 1
    while read -r fam args; do
      [ "$fam" = "$f" ] || continue
      ipt "$fam" -A "$CHAIN" $args || return 1
    done <<EOF
$RULES
EOF
    unjump "$f"
    pos=1
    while read -r fam args; do
      [ "$fam" = "$f" ] || continue
      ipt "$fam" -I PREROUTING "$pos" $args -j "$CHAIN" || return 1
      pos=$((pos + 1))
    done <<EOF
$JUMPS
EOF
  done
  SNAPSHOT=$(snapshot)
  log "rules installed ($BACKEND): mangle PREROUTING -> $CHAIN"
}

# The chain's rules and the top of PREROUTING (where the jumps must stay).
snapshot() {
  for f in $FAMILIES; do
    n=$(printf '%s\n' "$JUMPS" | grep -c "^$f ")
    ipt "$f" -S PREROUTING | sed -n "2,$((n + 1))p"
    ipt "$f" -S "$CHAIN"
  done
}

run() {
  trap 'kill "$sleeper" 2>/dev/null; [ -n "$BACKEND" ] && remove; exit 0' TERM INT
  sleeper=''
  until BACKEND=$(detect_backend); do
    log "no iptables backend holds rules yet (kube-router not running?); retrying"
    sleep "$INTERVAL" & sleeper=$!; wait "$sleeper"
  done
  apply || { log "cannot install the rules in $BACKEND"; remove; exit 1; }
  checks=0
  while :; do
    sleep "$INTERVAL" & sleeper=$!; wait "$sleeper"
    if [ "$(snapshot 2>/dev/null)" != "$SNAPSHOT" ]; then
      log "rules missing, changed or no longer first: installing again"
      apply || { log "cannot install the rules in $BACKEND"; remove; exit 1; }
    fi
    checks=$((checks + 1))
    if [ $((checks % 12)) = 0 ] && now=$(detect_backend) && [ "$now" != "$BACKEND" ]; then
      log "backend changed from $BACKEND to $now"
      remove; BACKEND=$now
      apply || { log "cannot install the rules in $BACKEND"; remove; exit 1; }
    fi
  done
}

case "${1:-run}" in
  detect) detect_backend ;;
  apply) BACKEND=$(detect_backend) && apply ;;
  remove) BACKEND=$(detect_backend) && remove ;;
  run) run ;;
  *) log "unknown mode $1 (run, detect, apply, remove)"; exit 2 ;;
esac
"""


def guard_script(
    chain: str,
    pod_cidrs: Sequence[str],
    cluster_cidrs: Sequence[str],
    node_ports: tuple[int, int] = NODE_PORT_RANGE,
    interval: int = CHECK_INTERVAL_SECONDS,
) -> str:
    """The shell script the guard container runs (`sh -c <script> node-guard [mode]`)."""
    jumps = guard_jumps(pod_cidrs)
    values = {
        "@CHAIN@": chain,
        "@INTERVAL@": str(interval),
        "@JUMPS@": _lines(jumps),
        "@RULES@": _lines(guard_rules(pod_cidrs, cluster_cidrs, node_ports)),
        "@FAMILIES@": " ".join(str(f) for f in sorted({f for f, _ in jumps})),
    }
    script = _SCRIPT
    for key, value in values.items():
        script = script.replace(key, value)
    return script


def node_guard_namespace(name: str) -> Manifest:
    """The guard's own namespace: Pod Security `privileged`, here and nowhere else."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata(name, labels=PRIVILEGED_LABELS)}


def node_guard_daemonset(namespace: str, image: str, script: str) -> Manifest:
    """One guard pod on every node, in the node's network namespace, with
    NET_ADMIN and NET_RAW only (iptables needs both), no API access."""
    labels = {**NODE_GUARD_LABELS}
    pod_labels = {**PART_OF, **labels}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata("node-guard", namespace, labels),
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "hostNetwork": True,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    # Every node, whatever its taints: a node without the guard is a node with the bypasses.
                    "tolerations": [{"operator": "Exists"}],
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "guard",
                            "image": image,
                            "command": ["/bin/sh", "-c", script, "node-guard"],
                            "resources": {
                                "requests": {"cpu": "5m", "memory": "16Mi"},
                                "limits": {"cpu": "100m", "memory": "64Mi"},
                            },
                            "securityContext": {
                                # Root in the container with two capabilities, not privileged.
                                "runAsUser": 0,
                                "runAsNonRoot": False,
                                "privileged": False,
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
                            },
                            # iptables-legacy serialises with the node's other iptables users through this lock.
                            "volumeMounts": [{"name": "xtables-lock", "mountPath": XTABLES_LOCK}],
                        }
                    ],
                    "volumes": [{"name": "xtables-lock", "hostPath": {"path": XTABLES_LOCK, "type": "FileOrCreate"}}],
                },
            },
        },
    }
