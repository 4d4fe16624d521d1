"""The relay: the upstream tailscale image's containerboot in userspace mode,
serving SOCKS5 and HTTP CONNECT proxies whose traffic leaves through the exit
node. Runs as non-root with nothing but RuntimeDefault seccomp: it passes Pod
Security `restricted`."""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass
from typing import Final

from builders.kube import RELAY_LABELS, Manifest, metadata

SOCKS5_PORT: Final = 1080
HTTP_PROXY_PORT: Final = 3128
HEALTH_PORT: Final = 9002
PROXY_PORTS: Final = (SOCKS5_PORT, HTTP_PROXY_PORT)
SOCKET: Final = "/tmp/tailscaled.sock"
RELAY_NAME: Final = "relay"
AUTH_SECRET_KEY: Final = "authkey"
# The auth Secret is mounted here, and TS_AUTHKEY names the file ("file:"),
# which `tailscale up` reads: containerboot hands its whole environment to
# tailscaled, so a key in TS_AUTHKEY itself would sit in tailscaled's
# environment for the life of the pod, where anything that can read the
# process's environment finds it.
AUTH_KEY_DIR: Final = "/etc/tailscale-egress/auth"
AUTH_KEY_FILE: Final = f"{AUTH_KEY_DIR}/{AUTH_SECRET_KEY}"
AUTH_VOLUME: Final = "auth"
RUN_AS: Final = 65532  # an unprivileged uid, as distroless images use
BOOT_TIMEOUT_SECONDS: Final = 60
RELAY_CONTAINER: Final = "tailscale"
# Also the Go runtime's memory limit (GOMEMLIMIT): the relay's budget under
# load. At 96Mi the heap sat at that limit under load and the GC ran back to
# back (a cycle every 10-20 ms, more than a quarter of the relay's CPU);
# the heap counts WireGuard's 64 KiB packet buffers whole, so the resident
# peak stays well below it (make bench-cluster: 94 MiB).
RELAY_MEMORY_REQUEST: Final = "128Mi"
# Go (1.25 on) sets GOMAXPROCS from the CPU limit: at 1 CPU the relay's
# WireGuard, netstack and proxy copies take turns on one thread, and the relay
# was pinned at its limit (make bench-cluster).
RELAY_CPU_LIMIT: Final = "2"
# Collect when the heap grows 4x past what is live rather than 1x: a fifth
# less CPU per proxied byte; GOMEMLIMIT still holds the heap near the request.
RELAY_GOGC: Final = "400"


@dataclass(frozen=True)
class RelaySettings:
    namespace: str
    image: str
    replicas: int
    hostname: str
    exit_node_ip: str
    auth_secret_name: str
    login_server: str | None = None


def readiness_script(exit_node_ip: str) -> str:
    """A POSIX sh + awk check, true only while tailscaled is Running and the
    peer at `exit_node_ip` is the selected exit node, is online, and may be an
    exit node (its exit routes are approved), and then only once the exit
    node answers a TSMP ping: a WireGuard session with it works.

    The control plane says "online" seconds before traffic can flow: with the
    relay's egress pinned, DERP is out of reach, magicsock finds the direct
    path and WireGuard does its handshake only when something is sent, and
    the default stack's first request after `up` (make verify's SOCKS5 one,
    whose dial gives up after 5 s) failed in that gap. A TSMP ping travels
    inside WireGuard and is answered by the exit node's tailscaled before
    its packet filter, so it opens the path and the session (directly, or
    through DERP where DERP is reachable) before the Service sends anything.

    It reads `tailscale status --json` (pretty-printed with two-space indents:
    peers at depth 4, their fields at depth 6).
    """
    ip = str(ipaddress.ip_address(exit_node_ip))
    awk = (
        '/^  "BackendState": "Running",/ { running = 1 } '
        '/^    "[^"]+": \\{$/ { exit_node = option = online = ip = 0 } '
        '/^      "ExitNode": true,/ { exit_node = 1 } '
        '/^      "ExitNodeOption": true,/ { option = 1 } '
        '/^      "Online": true,/ { online = 1 } '
        'index($0, "\\"" want "\\"") { ip = 1 } '
        "/^    \\},?$/ { if (exit_node && option && online && ip) ok = 1 } "
        "END { exit !(running && ok) }"
    )
    status = f"tailscale --socket={SOCKET} status --json | awk -v want={shlex.quote(ip)} {shlex.quote(awk)}"
    # One ping, 3 s: within the probe's timeout with the status.
    ping = f"tailscale --socket={SOCKET} ping --tsmp -c 1 --timeout=3s {shlex.quote(ip)} >/dev/null"
    return f"{status} && {ping}"


def relay_environment(s: RelaySettings) -> list[Manifest]:
    """containerboot's settings (TS_* variables), in the order a reader expects."""
    up_args = [f"--exit-node={s.exit_node_ip}", "--exit-node-allow-lan-access=false"]
    if s.login_server:
        up_args.append(f"--login-server={s.login_server}")
    plain = {
        "TS_USERSPACE": "true",
        # In-memory state: the node is ephemeral, logs out on shutdown, and the
        # pod needs no Kubernetes API access.
        "TS_KUBE_SECRET": "",
        "TS_HOSTNAME": s.hostname,
        # On the pod's address only, not on loopback: tailscaled (netstack) hands a
        # connection to its own tailnet address to 127.0.0.1:<port>, so a proxy
        # request for the relay's own tailnet address would reach its listeners.
        "TS_SOCKS5_SERVER": f"[$(POD_IP)]:{SOCKS5_PORT}",
        "TS_OUTBOUND_HTTP_PROXY_LISTEN": f"[$(POD_IP)]:{HTTP_PROXY_PORT}",
        "TS_EXTRA_ARGS": " ".join(up_args),
        "TS_ACCEPT_DNS": "false",
        # TS_AUTH_ONCE=true would skip `tailscale up`, and so --exit-node, on restarts.
        "TS_AUTH_ONCE": "false",
        "TS_ENABLE_HEALTH_CHECK": "true",
        # As the Tailscale operator sets it (containerboot brackets an IPv6 POD_IP).
        "TS_LOCAL_ADDR_PORT": f"$(POD_IP):{HEALTH_PORT}",
        "TS_SOCKET": SOCKET,
        "TS_BOOT_TIMEOUT": f"{BOOT_TIMEOUT_SECONDS}s",
        "TS_NO_LOGS_NO_SUPPORT": "true",
        "GOGC": RELAY_GOGC,
    }
    auth = {"name": "TS_AUTHKEY", "value": f"file:{AUTH_KEY_FILE}"}
    # The Go runtime collects garbage harder as its memory nears this (bytes,
    # from the container's memory request), so the relay's peak stays near the
    # request under load; the limit above it is headroom, not a target.
    memory_limit = {
        "name": "GOMEMLIMIT",
        "valueFrom": {"resourceFieldRef": {"containerName": RELAY_CONTAINER, "resource": "requests.memory"}},
    }
    # First: the kubelet expands $(POD_IP) only from variables defined before it.
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    return [pod_ip, auth, memory_limit, *({"name": k, "value": v} for k, v in plain.items())]


def relay_container(s: RelaySettings) -> Manifest:
    health = {"httpGet": {"path": "/healthz", "port": HEALTH_PORT}}
    return {
        "name": RELAY_CONTAINER,
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "env": relay_environment(s),
        "ports": [
            {"name": "socks5", "containerPort": SOCKS5_PORT, "protocol": "TCP"},
            {"name": "http-proxy", "containerPort": HTTP_PROXY_PORT, "protocol": "TCP"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "resources": {
            "requests": {"cpu": "50m", "memory": RELAY_MEMORY_REQUEST},
            "limits": {"cpu": RELAY_CPU_LIMIT, "memory": "256Mi"},
        },
        # Up (has a tailnet IP) within the boot timeout, or restarted.
        "startupProbe": {**health, "periodSeconds": 2, "failureThreshold": BOOT_TIMEOUT_SECONDS // 2 + 15},
        # Alive while tailscaled is up; an exit node that restarts is no
        # reason to restart the relay (traffic resumes by itself).
        "livenessProbe": {**health, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
        # Ready (receives Service traffic) only while its exit node is online,
        # selected and approved.
        "readinessProbe": {
            "exec": {"command": ["/bin/sh", "-c", readiness_script(s.exit_node_ip)]},
            "periodSeconds": 5,
            "timeoutSeconds": 4,
            "failureThreshold": 1,
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": AUTH_VOLUME, "mountPath": AUTH_KEY_DIR, "readOnly": True},
        ],
    }


def relay_volumes(s: RelaySettings) -> list[Manifest]:
    """The volumes `relay_container` mounts: its /tmp, and the auth Secret,
    readable by the relay's group (the pod's fsGroup) only."""
    secret = {
        "secretName": s.auth_secret_name,
        "items": [{"key": AUTH_SECRET_KEY, "path": AUTH_SECRET_KEY}],
        "defaultMode": 0o440,
    }
    return [
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        {"name": AUTH_VOLUME, "secret": secret},
    ]


def relay_deployment(s: RelaySettings) -> Manifest:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(RELAY_NAME, s.namespace, RELAY_LABELS),
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": RELAY_LABELS},
            # A new relay takes over only once it is Ready (its exit node online).
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": {**metadata(RELAY_NAME, labels=RELAY_LABELS)["labels"]}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "fsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # Lets tailscaled log out (remove its ephemeral node) on SIGTERM.
                    "terminationGracePeriodSeconds": 30,
                    "containers": [relay_container(s)],
                    "volumes": relay_volumes(s),
                },
            },
        },
    }


def relay_service(namespace: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(RELAY_NAME, namespace, RELAY_LABELS),
        "spec": {
            "type": "ClusterIP",
            "selector": RELAY_LABELS,
            "ports": [
                {"name": "socks5", "port": SOCKS5_PORT, "targetPort": "socks5", "protocol": "TCP"},
                {"name": "http-proxy", "port": HTTP_PROXY_PORT, "targetPort": "http-proxy", "protocol": "TCP"},
            ],
        },
    }


def relay_host(namespace: str, cluster_domain: str) -> str:
    return f"{RELAY_NAME}.{namespace}.svc.{cluster_domain}"
