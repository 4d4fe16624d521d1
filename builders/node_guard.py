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
  type LOCAL, whatever interface) on the NodePort range is dropped;
- IPv6 entering from a pod interface (one holding an address of a pod range:
  the CNI bridge `cni0`, the overlay) is dropped unless it is neighbour
  discovery or comes from the cluster's own IPv6 pod range (dual-stack) to a
  non-link-local, non-multicast address. Policies, kube-router's included,
  know pods by their cluster addresses only; every pod also has an `fe80::`
  address on the bridge, through which, on a single-stack cluster (Rancher
  Desktop's default), it reached other namespaces' pods, the relay and the
  node's own services past every policy (issue 19). Bridged pod-to-pod frames
  reach ip6tables through br_netfilter (`bridge-nf-call-ip6tables`, on by
  default); the guard logs when it is off;
- after routing (mangle FORWARD), new ICMP from the pod range must leave by a
  pod interface: ICMP to an unused pod or service address otherwise follows
  the node's default route out of the node.

The pod interfaces are found on the node (`ip -o addr show to <pod range>`)
at every check, so that a bridge made after the guard started (the CNI makes
it with the node's first pod) is guarded within CHECK_INTERVAL_SECONDS.

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
# (IP family, chain, arguments): a rule of one of the guard's chains, or a jump
# from PREROUTING or FORWARD (inserted at the top, in order).
Line = tuple[int, str, tuple[str, ...]]
# In a line's arguments: the line stands once for each pod interface found on the node.
POD_INTERFACE: Final = "@IF@"
LINK_SUFFIX: Final = "-LINK"
FORWARD_SUFFIX: Final = "-FWD"
# Neighbour discovery is all the IPv6 a pod needs on a single-stack cluster's
# link (and what a dual-stack pod needs to find its gateway); the kernel
# answers it, no service does.
NEIGHBOUR_DISCOVERY: Final = ("neighbour-solicitation", "neighbour-advertisement")


def guard_namespace(relay_namespace: str) -> str:
    """One guard per stack, named after the stack's relay namespace (unique in
    a cluster), so two stacks in one cluster each have their own."""
    return f"{relay_namespace}{NAMESPACE_SUFFIX}"


def chain_name(namespace: str) -> str:
    """The guard's own chain, per stack: a stack that is destroyed removes its
    chains only, never another stack's. (iptables chain names: <= 28 chars;
    the link and forward chains add a suffix of at most 5.)"""
    return "TSE-GUARD-" + hashlib.sha256(namespace.encode()).hexdigest()[:8].upper()


def chain_names(chain: str) -> tuple[str, str, str]:
    """(pod ranges, pod links, routed ICMP): the guard's three chains."""
    return chain, chain + LINK_SUFFIX, chain + FORWARD_SUFFIX


def _family(cidr: str) -> int:
    return ipaddress.ip_network(cidr, strict=False).version


def _net(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr, strict=False))


def guard_jumps(pod_cidrs: Sequence[str]) -> list[Rule]:
    """The PREROUTING jumps into the guard chain: only traffic from pods."""
    return [(_family(c), ("-s", _net(c))) for c in pod_cidrs]


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
                rules.append((family, ("-d", _net(cidr), "-j", "RETURN")))
        if family == 6:
            # Neighbour discovery and other link-local ICMPv6 never leave the node's link.
            rules += [(6, ("-d", "fe80::/10", "-j", "RETURN")), (6, ("-d", "ff00::/8", "-j", "RETURN"))]
        icmp = "icmp" if family == 4 else "ipv6-icmp"
        rules.append((family, ("-p", icmp, *not_a_reply, "-j", "DROP")))
    return rules


def link_rules(pod_cidrs: Sequence[str]) -> list[tuple[str, ...]]:
    """The IPv6 chain for what enters from a pod interface: replies, neighbour
    discovery and, on a dual-stack cluster, the pods' own IPv6 addresses
    (kube-router's policies see those) to anything but link-local and
    multicast addresses; nothing else. No policy sees a pod's `fe80::` address."""
    # Replies to what the node itself opened (a pod cannot open anything through here).
    rules: list[tuple[str, ...]] = [("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN")]
    rules += [("-p", "ipv6-icmp", "--icmpv6-type", kind, "-j", "RETURN") for kind in NEIGHBOUR_DISCOVERY]
    # Even from a pod's cluster address: policies know a peer by its cluster address, never by fe80::.
    rules += [("-d", "fe80::/10", "-j", "DROP"), ("-d", "ff00::/8", "-j", "DROP")]
    rules += [("-s", _net(c), "-j", "RETURN") for c in pod_cidrs if _family(c) == 6]
    rules.append(("-j", "DROP"))
    return rules


def forward_rules() -> list[tuple[str, ...]]:
    """The chain for ICMP from pods after routing: a reply, or out by a pod interface."""
    return [
        ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"),
        ("-o", POD_INTERFACE, "-j", "RETURN"),
        ("-j", "DROP"),
    ]


def guard_lines(
    chain: str,
    pod_cidrs: Sequence[str],
    cluster_cidrs: Sequence[str],
    node_ports: tuple[int, int] = NODE_PORT_RANGE,
) -> list[Line]:
    """Every rule the guard keeps: its chains' first, then the jumps into them."""
    main, link, forward = chain_names(chain)
    families = sorted({_family(c) for c in pod_cidrs})
    lines: list[Line] = [(f, main, args) for f, args in guard_rules(pod_cidrs, cluster_cidrs, node_ports)]
    lines += [(6, link, args) for args in link_rules(pod_cidrs)]
    lines += [(f, forward, args) for f in families for args in forward_rules()]
    lines += [(f, "PREROUTING", (*args, "-j", main)) for f, args in guard_jumps(pod_cidrs)]
    lines.append((6, "PREROUTING", ("-i", POD_INTERFACE, "-j", link)))
    for c in pod_cidrs:
        icmp = "icmp" if _family(c) == 4 else "ipv6-icmp"
        lines.append((_family(c), "FORWARD", ("-s", _net(c), "-p", icmp, "-j", forward)))
    return lines


def _lines(lines: Sequence[Line]) -> str:
    return "\n".join(f"{family} {chain} {' '.join(args)}" for family, chain, args in lines)


# POSIX sh (the image's busybox ash). Modes: `run` (default: install, keep in
# place, remove on SIGTERM), `detect` (print the backend), `interfaces` (print
# the pod interfaces), `apply`, `remove`.
_SCRIPT: Final = r"""# tailscale-egress node guard (builders/node_guard.py): drops what
# kube-router accepts before any NetworkPolicy, and pod IPv6 that no policy
# sees. Removed on SIGTERM.
set -u
set -f
CHAINS='@CHAINS@'
INTERVAL=@INTERVAL@
POD_CIDRS='@POD_CIDRS@'
# "<family> <chain> <iptables args>" per line: a rule of one of CHAINS, or a
# jump from PREROUTING/FORWARD. @IF@: the line once per pod interface.
RULES='@RULES@'
FAMILIES='@FAMILIES@'
# A stand-in for `ip` in the unit tests (a static busybox runs its own applet before PATH's).
IP=${NODE_GUARD_IP:-ip}
BACKEND=''
DESIRED=''
SNAPSHOT=''

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

# A kernel without IPv6 has no IPv6 to guard (nor ip6tables to guard it with).
families() {
  for f in $FAMILIES; do
    if [ "$f" = 6 ] && [ ! -e /proc/net/if_inet6 ]; then continue; fi
    echo "$f"
  done
}

# The node's interfaces holding an address of a pod range: the CNI bridge, the overlay.
pod_interfaces() {
  for c in $POD_CIDRS; do "$IP" -o addr show to "$c" 2>/dev/null; done | while read -r _ name _; do
    echo "$name"
  done | sort -u
}

# RULES for this node: @IF@ lines once per pod interface, the families it has.
expand() {
  ifs=$(pod_interfaces); fams=" $(families | tr '\n' ' ')"
  while read -r fam chain args; do
    case "$fams" in *" $fam "*) ;; *) continue ;; esac
    case "$args" in
      *@IF@*) for i in $ifs; do echo "$fam $chain ${args%%@IF@*}$i${args#*@IF@}"; done ;;
      *) echo "$fam $chain $args" ;;
    esac
  done <<EOF
$RULES
EOF
}

ipt() {
  fam=$1; shift
  if [ "$fam" = 6 ]; then ip6tables-"$BACKEND" -w 5 -t mangle "$@"; else iptables-"$BACKEND" -w 5 -t mangle "$@"; fi
}

# Every jump into the guard's chains, whichever version of the guard made it.
unjump() {
  pattern="-j ($(echo $CHAINS | tr ' ' '|'))\$"
  for hook in PREROUTING FORWARD; do
    found=$(ipt "$1" -S "$hook" 2>/dev/null | grep -E -- "$pattern")
    while read -r line; do
      [ -n "$line" ] && ipt "$1" -D ${line#-A }
    done <<EOF
$found
EOF
  done
}

remove() {
  for f in $(families); do
    unjump "$f"
    for c in $CHAINS; do
      ipt "$f" -F "$c" 2>/dev/null
      ipt "$f" -X "$c" 2>/dev/null
    done
  done
  log "rules removed ($BACKEND)"
}

apply() {
  DESIRED=$(expand)
  for f in $(families); do
    for c in $CHAINS; do
      ipt "$f" -N "$c" 2>/dev/null
      ipt "$f" -F "$c" || return 1
    done
    unjump "$f"
    pre=1; fwd=1
    while read -r fam chain args; do
      [ "$fam" = "$f" ] || continue
      case "$chain" in
        PREROUTING) ipt "$f" -I PREROUTING "$pre" $args || return 1; pre=$((pre + 1)) ;;
        FORWARD) ipt "$f" -I FORWARD "$fwd" $args || return 1; fwd=$((fwd + 1)) ;;
        *) ipt "$f" -A "$chain" $args || return 1 ;;
      esac
    done <<EOF
$DESIRED
EOF
  done
  SNAPSHOT=$(snapshot)
  if [ -e /proc/net/if_inet6 ] && [ "$(cat /proc/sys/net/bridge/bridge-nf-call-ip6tables 2>/dev/null)" = 0 ]; then
    log "net.bridge.bridge-nf-call-ip6tables is 0: IPv6 between pods of one bridge passes no ip6tables"
  fi
  log "rules installed ($BACKEND): mangle PREROUTING and FORWARD -> $CHAINS; pod interfaces:" $(pod_interfaces)
}

# The chains' rules and the top of PREROUTING and FORWARD (where the jumps must stay).
snapshot() {
  for f in $(families); do
    for hook in PREROUTING FORWARD; do
      n=$(printf '%s\n' "$DESIRED" | grep -c "^$f $hook ")
      if [ "$n" -gt 0 ]; then ipt "$f" -S "$hook" | sed -n "2,$((n + 1))p"; fi
    done
    for c in $CHAINS; do ipt "$f" -S "$c"; done
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
    if [ "$(expand)" != "$DESIRED" ]; then
      log "pod interfaces changed: installing again"
      apply || { log "cannot install the rules in $BACKEND"; remove; exit 1; }
    elif [ "$(snapshot 2>/dev/null)" != "$SNAPSHOT" ]; then
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
  interfaces) pod_interfaces ;;
  apply) BACKEND=$(detect_backend) && apply ;;
  remove) BACKEND=$(detect_backend) && remove ;;
  run) run ;;
  *) log "unknown mode $1 (run, detect, interfaces, apply, remove)"; exit 2 ;;
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
    lines = guard_lines(chain, pod_cidrs, cluster_cidrs, node_ports)
    values = {
        "@CHAINS@": " ".join(chain_names(chain)),
        "@INTERVAL@": str(interval),
        "@POD_CIDRS@": " ".join(_net(c) for c in pod_cidrs),
        "@RULES@": _lines(lines),
        "@FAMILIES@": " ".join(str(f) for f in sorted({f for f, _, _ in lines})),
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
