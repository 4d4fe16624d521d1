"""Check a deployed stack from inside the cluster, as a security reviewer would.

    python tools/verify.py [STACK] [--kubeconfig F] [--context C] [--namespace NS ...]
                           [--expect-exit-ip IP ...] [--relay-namespace NS] [--image I] ...

`make verify STACK=<name>` runs it after `make up`. It reads the stack's
outputs (`pulumi stack output --json`) and its cluster settings (`pulumi config
--json`, or Pulumi.<stack>.yaml without the CLI); flags give the same values
directly, and with all of them given no Pulumi CLI is needed.

In every protected namespace it starts a short-lived probe pod (Pod Security
`restricted`, the proxy settings from the ConfigMap by `envFrom`, as a
workload would) and runs from it:
  - a request through HTTPS_PROXY and one through ALL_PROXY (socks5h) to an
    IP-echo URL: the address the server saw must be one of the exit node's
    public IPs (the stack's output `exitNodePublicIps`);
  - direct TCP connections to the internet, the host (Rancher Desktop's
    addresses), a LAN address and cloud metadata: none may be established;
  - a lookup of `kubernetes.default.svc.<clusterDomain>` in cluster DNS;
and in the relay's namespace it runs the relay pods' own readiness command
(their exit node online, selected and approved).

It prints a table (namespace, check, PASS/FAIL, detail) and exits 1 if a
check failed, 2 on bad input (before anything is created). Probe pods are
deleted when the run ends, fails or is interrupted (Ctrl-C, SIGTERM), and a
probe left behind by an earlier run that was killed is deleted first; each
probe also ends by itself after --pod-lifetime seconds.

A connection counts as not established when it is refused or times out:
kube-router REJECTs what a NetworkPolicy denies (icmp-port-unreachable, seen
as "refused"), other CNIs drop it (a timeout). A refusal cannot tell a policy
from a port nobody listens on, which is why each address is tried on several
ports; what never passes is a completed TCP handshake.

Probe kinds: `curl` (any image with sh, curl and nslookup or getent, such as
the default) or `probe` (the static Go client of scripts/go/probe, in the test
cluster's local/probe:1); `auto` asks the pod which it has.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builders.kube import RELAY_LABELS
from builders.proxy_env import PROXY_CONFIGMAP
from builders.relay import RUN_AS, SOCKET

ROOT: Final = Path(__file__).resolve().parent.parent
PROJECT: Final = "tailscale-egress"

# curl's official image (github.com/curl/curl-container): Alpine, curl with
# SOCKS5h, busybox nslookup and sh, a few MiB, runs as a non-root user; pinned
# to an exact release so every run probes with the same client.
DEFAULT_IMAGE: Final = "curlimages/curl:8.17.0"
DEFAULT_ECHO_URL: Final = "https://api.ipify.org"
PROBE_NAME: Final = "tailscale-egress-verify"
PROBE_LABELS: Final = {"app.kubernetes.io/name": PROBE_NAME, "app.kubernetes.io/part-of": PROJECT}
PROBE_CONTAINER: Final = "probe"
RELAY_CONTAINER: Final = "tailscale"
METADATA_IP: Final = "169.254.169.254"
# Rancher Desktop's host as its VM sees it (the gateway, and the host-resolver address).
DEFAULT_HOST_IPS: Final = ("192.168.5.2", "192.168.127.254")
DEFAULT_LAN_IPS: Final = ("192.168.1.1",)
DEFAULT_INTERNET_IPS: Final = ("1.1.1.1",)
# Ports tried on each address when none is given: what is most likely to listen there.
DEFAULT_PORTS: Final[Mapping[str, tuple[int, ...]]] = {
    "internet": (443, 80),
    "host": (22, 80, 443, 6443),
    "lan": (22, 80, 443),
    "metadata": (80,),
    # Discovered from the API: the node's SSH, API server and kubelet; the kubernetes Service.
    "node": (22, 6443, 10250),
    "api": (443,),
}
DEFAULT_EXTERNAL_DNS: Final = ("1.1.1.1",)
INSTALL_KUBECTL: Final = (
    "kubectl is not installed (or not on PATH). Rancher Desktop ships it in ~/.rd/bin: add that to PATH;"
    " otherwise install it (https://kubernetes.io/docs/tasks/tools/, e.g. `brew install kubectl`"
    " or `sudo snap install kubectl --classic`), or name it with --kubectl PATH"
)

ProbeKind = Literal["curl", "probe"]


class VerifyError(Exception):
    """Bad input or a missing tool: reported before anything is created."""


@dataclass(frozen=True)
class Target:
    """An address a protected pod must not reach directly, and the ports tried."""

    category: Literal["internet", "host", "lan", "metadata", "node", "api"]
    host: str
    ports: tuple[int, ...]

    @property
    def check(self) -> str:
        return f"no direct {self.category} {self.host}"


@dataclass(frozen=True)
class CheckResult:
    namespace: str
    check: str
    ok: bool
    detail: str
    # What was checked, for callers that filter: relay, pod, proxy, dns, internet, host, lan, metadata.
    category: str = ""


@dataclass(frozen=True)
class Completed:
    """What a command returned (rc 124: it timed out)."""

    rc: int
    stdout: str
    stderr: str


# A runner executes one command (argv, timeout in seconds, stdin) and returns what it did.
Runner = Callable[[Sequence[str], float, str | None], Completed]


@dataclass(frozen=True)
class VerifyConfig:
    namespaces: tuple[str, ...]
    relay_namespace: str
    expected_exit_ips: tuple[str, ...]
    kubeconfig: str | None = None
    context: str | None = None
    image: str = DEFAULT_IMAGE
    probe_kind: Literal["auto", "curl", "probe"] = "auto"
    echo_url: str = DEFAULT_ECHO_URL
    targets: tuple[Target, ...] = field(default_factory=lambda: default_targets())
    cluster_domain: str = "cluster.local"
    # Resolvers a pod must not query directly (UDP 53): DNS is allowed to cluster DNS only.
    external_dns: tuple[str, ...] = DEFAULT_EXTERNAL_DNS
    # Add the nodes' addresses (and NodePorts) and the kubernetes Service, as the API lists them.
    discover: bool = True
    exit_node_tailnet_ip: str | None = None
    connect_timeout: float = 5.0
    pod_timeout: float = 180.0
    pod_lifetime: int = 900
    run_as: int = RUN_AS
    kubectl: str = "kubectl"


def default_targets(
    internet: Sequence[str] = DEFAULT_INTERNET_IPS,
    host: Sequence[str] = DEFAULT_HOST_IPS,
    lan: Sequence[str] = DEFAULT_LAN_IPS,
    metadata: Sequence[str] = (METADATA_IP,),
) -> tuple[Target, ...]:
    """The addresses tried directly; each may be `HOST` (default ports) or `HOST:PORT[,PORT...]`."""
    given = {"internet": internet, "host": host, "lan": lan, "metadata": metadata}
    return tuple(parse_target(category, spec) for category, specs in given.items() for spec in specs)


_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def parse_target(category: str, spec: str) -> Target:
    """`192.168.1.1`, `192.168.1.1:22,80`, `[fd00::1]:443` or a host name."""
    if category not in DEFAULT_PORTS:
        raise VerifyError(f"unknown target category {category!r}")
    host, ports_text = spec, ""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        ports_text = rest.removeprefix(":")
    elif spec.count(":") == 1:
        host, ports_text = spec.split(":")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _NAME.match(host):
            raise VerifyError(
                f"--{category}-ip {spec!r}: not an IP address or host name;"
                " give `ADDRESS` or `ADDRESS:PORT[,PORT...]` (IPv6 in brackets)"
            ) from None
    ports = DEFAULT_PORTS[category]
    if ports_text:
        try:
            ports = tuple(int(p) for p in ports_text.split(","))
        except ValueError:
            ports = ()
        if not ports or not all(0 < p < 65536 for p in ports):
            raise VerifyError(f"--{category}-ip {spec!r}: ports must be numbers from 1 to 65535, e.g. {host}:22,80")
    return Target(category, host, ports)  # type: ignore[arg-type]


# --- the probe pod ------------------------------------------------------------


def probe_pod(namespace: str, name: str, image: str, lifetime: int = 900, run_as: int = RUN_AS) -> dict[str, Any]:
    """A pod a workload could be: Pod Security `restricted`, the stack's proxy
    settings by `envFrom`, no service account token; it ends by itself after
    `lifetime` seconds even if nobody deletes it."""
    security = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": run_as,
        "runAsGroup": run_as,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(PROBE_LABELS)},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Never",
            "activeDeadlineSeconds": lifetime,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": run_as,
                "runAsGroup": run_as,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": PROBE_CONTAINER,
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", str(lifetime)],
                    "envFrom": [{"configMapRef": {"name": PROXY_CONFIGMAP}}],
                    "securityContext": security,
                    "resources": {
                        "requests": {"cpu": "10m", "memory": "16Mi"},
                        "limits": {"cpu": "500m", "memory": "64Mi"},
                    },
                }
            ],
        },
    }


def probe_pod_name() -> str:
    return f"{PROBE_NAME}-{secrets.token_hex(3)}"


# --- the commands run in the probe pod, and what their output means -----------

DETECT_COMMAND: Final = [
    "sh",
    "-c",
    "if command -v probe >/dev/null 2>&1; then echo probe;"
    " elif command -v curl >/dev/null 2>&1; then echo curl; else echo none; fi",
]

PROXY_VARIABLES: Final = {"https": "HTTPS_PROXY", "socks5h": "ALL_PROXY"}


def _seconds(timeout: float) -> str:
    return f"{timeout:g}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def exit_ip_command(kind: ProbeKind, variable: str, url: str, timeout: float) -> list[str]:
    """Fetch `url` through the proxy the pod's `variable` names (the ConfigMap's value)."""
    quoted = shlex.quote(url)
    if kind == "curl":
        # --proxytunnel: CONNECT even for an http:// URL, as for https.
        tunnel = " --proxytunnel" if variable == "HTTPS_PROXY" else ""
        fetch = f'exec curl -sS --fail --max-time {_seconds(timeout)}{tunnel} --proxy "$p" {quoted}'
    else:
        fetch = f'exec probe http {quoted} -proxy "$p" -timeout {_seconds(timeout)}s'
    script = (
        f'p="${{{variable}}}"; '
        f'if [ -z "$p" ]; then echo "{variable} is not set in the pod (ConfigMap {PROXY_CONFIGMAP})" >&2; exit 90; fi; '
        f'echo "via $p" >&2; {fetch}'
    )
    return ["sh", "-c", script]


def connect_command(kind: ProbeKind, host: str, port: int, timeout: float) -> list[str]:
    """One direct TCP connection attempt, bypassing every proxy setting."""
    if kind == "curl":
        url = shlex.quote(f"http://{_url_host(host)}:{port}/")
        script = (
            f"curl --noproxy '*' -sS -o /dev/null --connect-timeout {_seconds(timeout)}"
            f" --max-time {_seconds(timeout + 2)} -w 'connected_in=%{{time_connect}}\\n' {url}; "
            'echo "curl_exit=$?"'
        )
    else:
        script = f"exec probe tcp {shlex.quote(f'{_url_host(host)}:{port}')} -timeout {_seconds(timeout)}s"
    return ["sh", "-c", script]


def dns_command(kind: ProbeKind, name: str, timeout: float) -> list[str]:
    quoted = shlex.quote(name)
    if kind == "curl":
        script = (
            f"if command -v nslookup >/dev/null 2>&1; then exec nslookup {quoted}; else exec getent hosts {quoted}; fi"
        )
    else:
        script = f"exec probe dns {quoted} -timeout {_seconds(timeout)}s"
    return ["sh", "-c", script]


EXTERNAL_NAME: Final = "example.com"


def external_dns_command(kind: ProbeKind, server: str, timeout: float) -> list[str]:
    """A lookup sent straight to `server` (UDP 53), not to cluster DNS."""
    if kind == "curl":
        script = f"exec nslookup {EXTERNAL_NAME} {shlex.quote(server)}"
    else:
        address = shlex.quote(f"{_url_host(server)}:53")
        script = f"exec probe dns {EXTERNAL_NAME} -server {address} -timeout {_seconds(timeout)}s"
    return ["sh", "-c", script]


def judge_external_dns(kind: ProbeKind, result: Completed) -> tuple[bool | None, str]:
    """(True: a DNS reply came back, any reply, NXDOMAIN included; False: none did; None: unclear)."""
    if kind == "probe":
        parsed = _probe_json(result.stdout)
        if parsed is None:
            return None, _did_not_run(result)
        if parsed["ok"]:
            return True, f"answered: {', '.join(parsed.get('addrs') or [])}"
        text = str(parsed.get("error", ""))
    else:
        text = result.stdout + "\n" + result.stderr
        if "Name:" in text or "can't find" in text:
            return True, f"answered: {_one_line(text, 80)}"
    lowered = text.lower()
    if any(k in lowered for k in ("timed out", "timeout", "no servers could be reached", "refused", "unreachable")):
        return False, _short_error(text)
    if "no such host" in lowered or "server misbehaving" in lowered:
        return True, f"answered: {_one_line(text, 80)}"
    return None, f"unclear (rc {result.rc}): {_one_line(text, 120)}"


def _probe_json(out: str) -> dict[str, Any] | None:
    for line in reversed(out.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "ok" in value:
            return value
    return None


def _did_not_run(result: Completed) -> str:
    return f"probe did not run (rc {result.rc}): {_one_line(result.stderr or result.stdout)}"


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


_ADDRESS = re.compile(r"[0-9A-Fa-f:.]+")


def addresses_in(text: str) -> list[str]:
    """Every IP address written in `text` (a bare address, JSON, a DNS answer)."""
    found = []
    for token in _ADDRESS.findall(text):
        with contextlib.suppress(ValueError):
            found.append(str(ipaddress.ip_address(token.strip(".:"))))
    return found


def _matches(seen: str, expected: Sequence[str]) -> bool:
    address = ipaddress.ip_address(seen)
    return any(address in ipaddress.ip_network(e, strict=False) for e in expected)


def judge_exit_ip(kind: ProbeKind, result: Completed, expected: Sequence[str]) -> tuple[bool, str]:
    """PASS only if the echo server saw one of the exit node's addresses."""
    via = next((line[4:] for line in result.stderr.splitlines() if line.startswith("via ")), "")
    if kind == "probe":
        parsed = _probe_json(result.stdout)
        if parsed is None:
            return False, _did_not_run(result)
        body, error = str(parsed.get("body", "")), str(parsed.get("error", ""))
        if not parsed["ok"]:
            return False, f"request failed via {via or '?'}: {_one_line(error)}"
    else:
        if result.rc != 0:
            error = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("via "))
            return False, f"request failed via {via or '?'} (rc {result.rc}): {_one_line(error)}"
        body = result.stdout
    seen = addresses_in(body)
    if not seen:
        return False, f"no IP address in the echo server's answer {_one_line(body, 60)!r} (via {via})"
    match = [s for s in seen if _matches(s, expected)]
    if match:
        return True, f"seen as {match[0]} (an exit node IP) via {via}"
    return False, f"seen as {seen[0]}, not an exit node IP ({', '.join(expected)}) via {via}"


def judge_connect(kind: ProbeKind, result: Completed) -> tuple[bool | None, str]:
    """(True: a TCP connection was established, False: it was not, None: the probe did not run; why)."""
    if kind == "probe":
        parsed = _probe_json(result.stdout)
        if parsed is None:
            return None, _did_not_run(result)
        if parsed["ok"]:
            return True, f"connected ({parsed.get('local', '')} -> {parsed.get('remote', '')})"
        return False, _short_error(str(parsed.get("error", "")))
    connected_in = re.search(r"^connected_in=([0-9.]+)$", result.stdout, re.M)
    curl_exit = re.search(r"^curl_exit=(\d+)$", result.stdout, re.M)
    if connected_in is None or curl_exit is None:
        return None, f"curl did not run (rc {result.rc}): {_one_line(result.stderr or result.stdout)}"
    if float(connected_in.group(1)) > 0:
        return True, f"connected in {float(connected_in.group(1)):.3f} s (curl exit {curl_exit.group(1)})"
    # curl exit 7: the connection was refused (a RST, or kube-router's icmp-port-unreachable)
    # or the address unreachable; 28: no answer before the timeout (a drop).
    code = int(curl_exit.group(1))
    known = {7: "refused or unreachable", 28: "timed out"}
    message = re.sub(r"^curl: \(\d+\) ", "", result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "")
    return False, known.get(code) or _short_error(message) or f"curl exit {code}"


def _short_error(message: str) -> str:
    lowered = message.lower()
    for needle, short in (
        ("refused", "refused"),
        ("timed out", "timed out"),
        ("timeout", "timed out"),
        ("no route", "no route"),
        ("unreachable", "unreachable"),
    ):
        if needle in lowered:
            return short
    return _one_line(message, 60)


def judge_dns(kind: ProbeKind, result: Completed, name: str, service_ip: str | None) -> tuple[bool, str]:
    if kind == "probe":
        parsed = _probe_json(result.stdout)
        if parsed is None:
            return False, _did_not_run(result)
        if not parsed["ok"]:
            return False, f"{name}: {_one_line(str(parsed.get('error', '')))}"
        answers = [str(a) for a in parsed.get("addrs") or []]
    elif "Server:" in result.stdout:
        # busybox nslookup: the server's own address first, the answers after "Name:"; its
        # exit status also counts the AAAA query, which a cluster with no IPv6 leaves empty.
        text = result.stdout
        answers = addresses_in(text[text.index("Name:") :]) if "Name:" in text else []
    else:  # getent hosts
        answers = addresses_in(result.stdout) if result.rc == 0 else []
    if not answers:
        return False, f"{name}: no answer (rc {result.rc}): {_one_line(result.stdout + ' ' + result.stderr, 120)}"
    if service_ip is not None and service_ip not in answers:
        return False, f"{name} -> {', '.join(answers)}, but the Service's ClusterIP is {service_ip}"
    return True, f"{name} -> {', '.join(answers)}"


# --- the table ----------------------------------------------------------------


def format_table(results: Sequence[CheckResult]) -> str:
    header = ("NAMESPACE", "CHECK", "RESULT", "DETAIL")
    rows = [(r.namespace, r.check, "PASS" if r.ok else "FAIL", r.detail) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]).rstrip()
        for row in [header, *rows]
    ]
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results)} checks, {failed} failed" if failed else f"{len(results)} checks, all passed")
    return "\n".join(lines)


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 only when there were checks and all passed."""
    return 0 if results and all(r.ok for r in results) else 1


# --- kubectl --------------------------------------------------------------------


def subprocess_runner(args: Sequence[str], timeout: float, stdin: str | None = None) -> Completed:
    """Runs a command in its own session: a Ctrl-C reaches this process only,
    which then decides what to stop (and still deletes its probe pods)."""
    try:
        done = subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        return Completed(124, out, f"timed out after {timeout:g} s")
    return Completed(done.returncode, done.stdout, done.stderr)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Cleanup that a second Ctrl-C or SIGTERM does not cut short (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Kubectl:
    def __init__(self, config: VerifyConfig, runner: Runner) -> None:
        self.base = [config.kubectl]
        if config.kubeconfig:
            self.base += ["--kubeconfig", config.kubeconfig]
        if config.context:
            self.base += ["--context", config.context]
        self.runner = runner

    def run(self, *args: str, timeout: float = 30.0, stdin: str | None = None) -> Completed:
        return self.runner([*self.base, *args], timeout, stdin)

    def json(self, *args: str) -> tuple[Any, str]:
        """(the decoded -o json answer, or None; the error)."""
        done = self.run(*args, "-o", "json")
        if done.rc != 0:
            return None, _one_line(done.stderr or done.stdout)
        try:
            return json.loads(done.stdout), ""
        except json.JSONDecodeError:
            return None, f"not JSON: {_one_line(done.stdout, 60)}"

    def exec(self, namespace: str, pod: str, container: str, command: Sequence[str], timeout: float) -> Completed:
        return self.run("exec", "-n", namespace, pod, "-c", container, "--", *command, timeout=timeout)


# --- the checks -------------------------------------------------------------------

Log = Callable[[str], None]


def _stderr_log(message: str) -> None:
    print(f"verify: {message}", file=sys.stderr, flush=True)


def relay_checks(kube: Kubectl, config: VerifyConfig) -> list[CheckResult]:
    """Each relay pod is Ready and its own readiness command (the one the
    kubelet runs: exit node online, selected, approved) succeeds now."""
    ns = config.relay_namespace
    selector = ",".join(f"{k}={v}" for k, v in RELAY_LABELS.items())
    pods, error = kube.json("get", "pods", "-n", ns, "-l", selector)
    if pods is None:
        return [CheckResult(ns, "relay exit node online", False, f"cannot list the relay pods: {error}", "relay")]
    items = [p for p in pods.get("items", []) if not p["metadata"].get("deletionTimestamp")]
    if not items:
        return [CheckResult(ns, "relay exit node online", False, f"no relay pod ({selector}) in {ns}", "relay")]
    return [_relay_pod_check(kube, config, pod) for pod in items]


def _relay_pod_check(kube: Kubectl, config: VerifyConfig, pod: Mapping[str, Any]) -> CheckResult:
    ns, name = config.relay_namespace, pod["metadata"]["name"]
    check = f"relay {name} exit node online"
    conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    ready = conditions.get("Ready") == "True"
    container = next((c for c in pod["spec"]["containers"] if c["name"] == RELAY_CONTAINER), None)
    if container is None:
        return CheckResult(ns, check, False, f"no container {RELAY_CONTAINER!r} in the pod", "relay")
    command = ((container.get("readinessProbe") or {}).get("exec") or {}).get("command")
    if not command:
        return CheckResult(
            ns, check, False, "the relay has no readiness command (an older stack? run make up)", "relay"
        )
    probe = kube.exec(ns, name, RELAY_CONTAINER, command, timeout=20)
    summary = _exit_node_summary(kube, ns, name, container)
    parts = [f"Ready={'yes' if ready else 'no'}", "readiness check " + ("passes" if probe.rc == 0 else "fails")]
    if probe.rc not in (0, 1):
        parts[-1] += f" (rc {probe.rc}: {_one_line(probe.stderr or probe.stdout, 80)})"
    if summary:
        parts.append(summary)
    return CheckResult(ns, check, ready and probe.rc == 0, "; ".join(parts), "relay")


def _exit_node_summary(kube: Kubectl, ns: str, pod: str, container: Mapping[str, Any]) -> str:
    """Which exit node the relay uses and whether it is online, from `tailscale status --json`."""
    socket = next((e.get("value") for e in container.get("env", []) if e.get("name") == "TS_SOCKET"), None) or SOCKET
    done = kube.exec(ns, pod, RELAY_CONTAINER, ["tailscale", f"--socket={socket}", "status", "--json"], timeout=20)
    try:
        status = json.loads(done.stdout)
    except json.JSONDecodeError:
        return ""
    exit_peer = next((p for p in (status.get("Peer") or {}).values() if p.get("ExitNode")), None)
    if exit_peer is None:
        return f"backend {status.get('BackendState')}, no exit node selected"
    ips = ", ".join(exit_peer.get("TailscaleIPs") or [])
    state = "online" if exit_peer.get("Online") else "OFFLINE"
    return f"exit node {exit_peer.get('HostName', '?')} ({ips}) {state}"


def _wait_running(kube: Kubectl, ns: str, name: str, timeout: float) -> str | None:
    """None once the pod runs and is ready; otherwise why not."""
    deadline = time.monotonic() + timeout
    last = "not scheduled yet"
    failures = 0
    while time.monotonic() < deadline:
        pod, error = kube.json("get", "pod", name, "-n", ns)
        if pod is None:
            last = error
            failures += 1
            if failures >= 10:  # the API server or the kubeconfig is gone, not a slow pod
                return f"cannot read the pod: {error}"
        else:
            failures = 0
            status = pod.get("status", {})
            phase = status.get("phase", "")
            states = [s.get("state", {}) for s in status.get("containerStatuses", [])]
            waiting = next((s["waiting"] for s in states if "waiting" in s), None)
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
            if phase == "Running" and ready:
                return None
            if phase in ("Failed", "Succeeded"):
                return f"pod ended ({phase}): {status.get('reason', '')} {status.get('message', '')}".strip()
            if waiting is not None:
                reason, message = waiting.get("reason", ""), waiting.get("message", "")
                last = f"{reason}: {_one_line(message, 120)}" if message else reason
                if reason == "CreateContainerConfigError" and PROXY_CONFIGMAP in message:
                    return f"ConfigMap {PROXY_CONFIGMAP} is missing: is {ns} a protected namespace of this stack?"
                if reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerError"):
                    return last
            else:
                last = f"phase {phase or 'Pending'}"
        time.sleep(1.0)
    return f"not running after {timeout:g} s ({last})"


# Short grace (the probe only sleeps), and gone before we report it gone.
_DELETE_FLAGS: Final = ("--ignore-not-found", "--grace-period=1", "--wait=true", "--timeout=60s")


def _cleanup_leftovers(kube: Kubectl, ns: str, log: Log) -> None:
    selector = ",".join(f"{k}={v}" for k, v in PROBE_LABELS.items())
    done = kube.run("delete", "pod", "-n", ns, "-l", selector, *_DELETE_FLAGS, timeout=75)
    deleted = [line for line in done.stdout.splitlines() if line.rstrip().endswith("deleted")]
    if done.rc == 0 and deleted:
        log(f"{ns}: removed a probe pod left by an earlier run: {_one_line(' '.join(deleted))}")


def _delete_probe(kube: Kubectl, ns: str, name: str, log: Log) -> None:
    with _shielded():
        done = kube.run("delete", "pod", name, "-n", ns, *_DELETE_FLAGS, timeout=75)
    if done.rc != 0:
        log(f"{ns}: could not delete probe pod {name} (it ends by itself): {_one_line(done.stderr)}")


def namespace_checks(kube: Kubectl, config: VerifyConfig, ns: str, log: Log = _stderr_log) -> list[CheckResult]:
    """Every check from a fresh probe pod in `ns`; the pod is deleted whatever happens."""
    _cleanup_leftovers(kube, ns, log)
    name = probe_pod_name()
    manifest = probe_pod(ns, name, config.image, config.pod_lifetime, config.run_as)
    try:
        log(f"{ns}: starting probe pod {name} ({config.image})")
        created = kube.run("create", "-f", "-", stdin=json.dumps(manifest))
        if created.rc != 0:
            return [CheckResult(ns, "probe pod running", False, f"refused: {_one_line(created.stderr)}", "pod")]
        why = _wait_running(kube, ns, name, config.pod_timeout)
        if why is not None:
            return [CheckResult(ns, "probe pod running", False, why, "pod")]
        kind = _probe_kind(kube, config, ns, name)
        if kind is None:
            detail = f"image {config.image} has neither `probe` nor `curl` (give --image)"
            return [CheckResult(ns, "probe pod running", False, detail, "pod")]
        return _checks_in_pod(kube, config, ns, name, kind)
    finally:
        _delete_probe(kube, ns, name, log)


def _probe_kind(kube: Kubectl, config: VerifyConfig, ns: str, name: str) -> ProbeKind | None:
    if config.probe_kind != "auto":
        return config.probe_kind
    answer = kube.exec(ns, name, PROBE_CONTAINER, DETECT_COMMAND, timeout=20).stdout.strip()
    return answer if answer in ("curl", "probe") else None  # type: ignore[return-value]


def _checks_in_pod(kube: Kubectl, config: VerifyConfig, ns: str, pod: str, kind: ProbeKind) -> list[CheckResult]:
    timeout = config.connect_timeout
    exec_timeout = timeout + 20  # kubectl exec's own start-up, on a loaded node

    def exit_ip(scheme: str) -> CheckResult:
        variable = PROXY_VARIABLES[scheme]
        done = kube.exec(
            ns,
            pod,
            PROBE_CONTAINER,
            exit_ip_command(kind, variable, config.echo_url, timeout * 3),
            timeout=timeout * 3 + 20,
        )
        ok, detail = judge_exit_ip(kind, done, config.expected_exit_ips)
        label = "exit IP via HTTPS_PROXY" if scheme == "https" else "exit IP via ALL_PROXY (socks5h)"
        return CheckResult(ns, label, ok, detail, "proxy")

    def dns() -> CheckResult:
        name = f"kubernetes.default.svc.{config.cluster_domain}"
        service, _ = kube.json("get", "service", "kubernetes", "-n", "default")
        service_ip = service.get("spec", {}).get("clusterIP") if isinstance(service, dict) else None
        done = kube.exec(ns, pod, PROBE_CONTAINER, dns_command(kind, name, timeout), timeout=exec_timeout)
        ok, detail = judge_dns(kind, done, name, service_ip)
        return CheckResult(ns, "cluster DNS", ok, detail, "dns")

    def unreachable(target: Target) -> CheckResult:
        outcomes = []
        ok = True
        for port in target.ports:
            command = connect_command(kind, target.host, port, timeout)
            connected, why = judge_connect(kind, kube.exec(ns, pod, PROBE_CONTAINER, command, timeout=exec_timeout))
            if connected is None:
                ok, why = False, f"not checked: {why}"
            elif connected:
                ok, why = False, f"REACHABLE: {why}"
            outcomes.append(f"{port} {why}")
        return CheckResult(ns, target.check, ok, "tcp " + ", ".join(outcomes), target.category)

    def no_external_dns(server: str) -> CheckResult:
        command = external_dns_command(kind, server, timeout)
        reached, why = judge_external_dns(kind, kube.exec(ns, pod, PROBE_CONTAINER, command, timeout=exec_timeout))
        ok = reached is False
        if reached is None:
            why = f"not checked: {why}"
        elif reached:
            why = f"REACHABLE: {why}"
        return CheckResult(ns, f"no direct DNS {server}", ok, f"udp 53 {why}", "internet")

    jobs: list[Callable[[], CheckResult]] = [lambda: exit_ip("https"), lambda: exit_ip("socks5h"), dns]
    jobs += [functools.partial(unreachable, t) for t in config.targets]
    jobs += [functools.partial(no_external_dns, server) for server in config.external_dns]
    pool = ThreadPoolExecutor(max_workers=4)
    try:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]
    finally:
        # On Ctrl-C, do not wait for the running execs: deleting the pod ends them.
        pool.shutdown(wait=False, cancel_futures=True)


def discovered_targets(kube: Kubectl, log: Log = _stderr_log) -> tuple[Target, ...]:
    """The nodes' addresses, with their SSH, API server, kubelet and (up to three)
    NodePorts, and the kubernetes Service: none may be reached from a protected pod."""
    targets: list[Target] = []
    services, _ = kube.json("get", "services", "--all-namespaces")
    node_ports = sorted(
        {
            int(port["nodePort"])
            for svc in (services or {}).get("items", [])
            for port in svc.get("spec", {}).get("ports") or []
            if port.get("nodePort")
        }
    )[:3]
    nodes, error = kube.json("get", "nodes")
    if nodes is None:
        log(f"cannot list the nodes ({error}): their addresses are not checked")
    for node in (nodes or {}).get("items", []):
        for address in node.get("status", {}).get("addresses", []):
            if address.get("type") in ("InternalIP", "ExternalIP"):
                targets.append(Target("node", address["address"], (*DEFAULT_PORTS["node"], *node_ports)))
    for svc in (services or {}).get("items", []):
        meta = svc.get("metadata", {})
        if (meta.get("namespace"), meta.get("name")) == ("default", "kubernetes"):
            ip = svc.get("spec", {}).get("clusterIP")
            if ip:
                targets.append(Target("api", ip, DEFAULT_PORTS["api"]))
    return tuple(dict.fromkeys(targets))


def run_verify(config: VerifyConfig, runner: Runner = subprocess_runner, log: Log = _stderr_log) -> list[CheckResult]:
    """Every check against the cluster; probe pods are removed before it returns or raises."""
    kube = Kubectl(config, runner)
    results = relay_checks(kube, config)
    if config.discover:
        found = discovered_targets(kube, log)
        known = {(t.category, t.host) for t in config.targets}
        config = replace(config, targets=config.targets + tuple(t for t in found if (t.category, t.host) not in known))
    for ns in config.namespaces:
        results += namespace_checks(kube, config, ns, log)
    return results


# --- the stack's outputs and config -------------------------------------------------


def _pulumi(args: Sequence[str], runner: Runner) -> Any:
    if shutil.which("pulumi") is None:
        raise VerifyError(
            "the Pulumi CLI is not installed (https://www.pulumi.com/docs/install/); without it give"
            " --namespace, --expect-exit-ip, --relay-namespace and --context (and --kubeconfig) directly"
        )
    done = runner(["pulumi", *args], 120, None)
    if done.rc != 0:
        raise VerifyError(f"`pulumi {' '.join(args)}` failed: {_one_line(done.stderr or done.stdout, 300)}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise VerifyError(f"`pulumi {' '.join(args)}` did not print JSON: {_one_line(done.stdout, 120)}") from None


def stack_outputs(stack: str, runner: Runner = subprocess_runner) -> dict[str, Any]:
    outputs = _pulumi(["stack", "output", "--json", "--stack", stack, "--cwd", str(ROOT)], runner)
    if not isinstance(outputs, dict):
        raise VerifyError(f"stack {stack}: unexpected outputs {outputs!r}")
    if not outputs:
        raise VerifyError(f"stack {stack} has no outputs: deploy it first (make up STACK={stack})")
    return outputs


def stack_cluster_settings(stack: str, runner: Runner = subprocess_runner) -> dict[str, Any]:
    """The stack's `tailscale-egress:cluster` object: from `pulumi config`, or
    from Pulumi.<stack>.yaml when the CLI is not installed."""
    key = f"{PROJECT}:cluster"
    if shutil.which("pulumi") is not None:
        config = _pulumi(["config", "--json", "--stack", stack, "--cwd", str(ROOT)], runner)
        entry = config.get(key) if isinstance(config, dict) else None
        if not entry:
            return {}
        value = entry.get("objectValue", entry.get("value"))
        if isinstance(value, str):
            value = json.loads(value)
        return value if isinstance(value, dict) else {}
    from devtools.mockstack import StackFileError, stack_file_config

    path = ROOT / f"Pulumi.{stack}.yaml"
    if not path.is_file():
        return {}
    try:
        value = stack_file_config(path).get(key) or {}
    except StackFileError as err:
        raise VerifyError(str(err)) from None
    return value if isinstance(value, dict) else {}


def relay_address(proxy_url: str) -> tuple[str, str] | None:
    """(relay namespace, cluster domain) from `http://relay.<ns>.svc.<domain>:3128`."""
    host = urlsplit(proxy_url).hostname or ""
    parts = host.split(".")
    if len(parts) >= 4 and parts[2] == "svc":
        return parts[1], ".".join(parts[3:])
    return None


def _find_kubectl(given: str | None) -> str:
    if given:
        if shutil.which(given) is None:
            raise VerifyError(f"--kubectl {given!r}: not an executable. {INSTALL_KUBECTL}")
        return given
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path.home() / ".rd" / "bin"))
    if found is None:
        raise VerifyError(INSTALL_KUBECTL)
    return found


def config_from_args(args: argparse.Namespace, runner: Runner = subprocess_runner) -> VerifyConfig:
    """Flags first; what they leave out from the stack's outputs and config."""
    namespaces = tuple(args.namespace or ())
    exit_ips = tuple(args.expect_exit_ip or ())
    relay_ns, domain = args.relay_namespace, args.cluster_domain
    exit_tailnet_ip = None
    if args.stack and not (namespaces and exit_ips and relay_ns):
        outputs = stack_outputs(args.stack, runner)
        namespaces = namespaces or tuple(outputs.get("protectedNamespaces") or ())
        exit_ips = exit_ips or tuple(outputs.get("exitNodePublicIps") or ())
        address = relay_address(str(outputs.get("relayHttpProxy", "")))
        if address is not None:
            relay_ns = relay_ns or address[0]
            domain = domain or address[1]
        exit_tailnet_ip = outputs.get("exitNodeTailnetIp")
    kubeconfig, context = args.kubeconfig, args.context
    if args.stack and context is None:
        cluster = stack_cluster_settings(args.stack, runner)
        context = cluster.get("context") or "rancher-desktop"
        kubeconfig = kubeconfig or cluster.get("kubeconfig")
        relay_ns = relay_ns or cluster.get("relayNamespace")
        domain = domain or cluster.get("clusterDomain")
    problems = []
    if not namespaces:
        problems.append(
            "no protected namespace: give --namespace NS (or a STACK whose output protectedNamespaces has one)"
        )
    if not exit_ips:
        problems.append(
            "no exit node IP to compare with: give --expect-exit-ip IP (the stack's output exitNodePublicIps"
            " is empty; with your own exit node set exitNode.existingPublicIps)"
        )
    for ip in exit_ips:
        try:
            ipaddress.ip_network(ip, strict=False)
        except ValueError:
            problems.append(f"--expect-exit-ip {ip!r}: not an IP address or network (e.g. 203.0.113.10)")
    if args.uid <= 0:
        problems.append(f"--uid {args.uid}: must be a non-root uid (1 or more; default {RUN_AS})")
    for server in args.external_dns or ():
        try:
            ipaddress.ip_address(server)
        except ValueError:
            problems.append(f"--external-dns {server!r}: not an IP address (e.g. 8.8.8.8)")
    echo = urlsplit(args.echo_url)
    if echo.scheme not in ("http", "https") or not echo.hostname:
        problems.append(f"--echo-url {args.echo_url!r}: must be an http:// or https:// URL (e.g. {DEFAULT_ECHO_URL})")
    targets: tuple[Target, ...] = ()
    given = {"internet": args.internet_ip or DEFAULT_INTERNET_IPS, "host": args.host_ip or DEFAULT_HOST_IPS}
    given |= {"lan": args.lan_ip or DEFAULT_LAN_IPS, "metadata": (METADATA_IP,)}
    for category, specs in given.items():
        for spec in specs:
            try:
                targets += (parse_target(category, spec),)
            except VerifyError as err:
                problems.append(str(err))
    if problems:
        raise VerifyError("\n  ".join(["cannot verify:", *problems]))
    return VerifyConfig(
        namespaces=namespaces,
        relay_namespace=relay_ns or "tailscale-egress",
        expected_exit_ips=exit_ips,
        kubeconfig=os.path.expanduser(kubeconfig) if kubeconfig else None,
        context=context,
        image=args.image,
        probe_kind=args.probe_kind,
        echo_url=args.echo_url,
        targets=targets,
        cluster_domain=domain or "cluster.local",
        external_dns=tuple(args.external_dns or DEFAULT_EXTERNAL_DNS),
        discover=not args.no_discover,
        exit_node_tailnet_ip=exit_tailnet_ip,
        connect_timeout=args.timeout,
        pod_timeout=args.pod_timeout,
        pod_lifetime=args.pod_lifetime,
        run_as=args.uid,
        kubectl=_find_kubectl(args.kubectl),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/verify.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("stack", nargs="?", help="the Pulumi stack to read outputs and config from")
    p.add_argument("--kubeconfig", help="default: the stack's cluster.kubeconfig, then $KUBECONFIG or ~/.kube/config")
    p.add_argument("--context", help="default: the stack's cluster.context (rancher-desktop)")
    p.add_argument("--namespace", action="append", help="a protected namespace (repeat; default: the stack's)")
    p.add_argument("--relay-namespace", help="default: from the stack (tailscale-egress)")
    p.add_argument("--cluster-domain", help="default: from the stack (cluster.local)")
    p.add_argument("--expect-exit-ip", action="append", help="an exit node public IP (repeat; default: the stack's)")
    p.add_argument("--echo-url", default=DEFAULT_ECHO_URL, help="answers with the caller's IP (default: %(default)s)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="probe image (default: %(default)s)")
    p.add_argument("--probe-kind", choices=("auto", "curl", "probe"), default="auto", help="default: %(default)s")
    p.add_argument("--uid", type=int, default=RUN_AS, help="non-root uid of the probe (default: %(default)s)")
    p.add_argument("--internet-ip", action="append", help="direct internet address[:ports] (default: 1.1.1.1)")
    p.add_argument("--host-ip", action="append", help="host address[:ports] (default: 192.168.5.2, 192.168.127.254)")
    p.add_argument("--lan-ip", action="append", help="LAN address[:ports] (default: 192.168.1.1)")
    p.add_argument("--external-dns", action="append", help="a resolver not to reach on UDP 53 (default: 1.1.1.1)")
    p.add_argument("--no-discover", action="store_true", help="do not add the nodes' and API server's addresses")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per connection attempt (default: %(default)s)")
    p.add_argument("--pod-timeout", type=float, default=180.0, help="seconds for a probe pod to run (default: 180)")
    p.add_argument("--pod-lifetime", type=int, default=900, help="a probe pod ends by itself after this (default: 900)")
    p.add_argument("--kubectl", help="the kubectl to run (default: kubectl on PATH, then ~/.rd/bin/kubectl)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: probe pods are deleted on the way out."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner) -> int:
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args, runner)
    except VerifyError as err:
        print(f"verify: {err}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        results = run_verify(config, runner)
    except KeyboardInterrupt as interrupted:
        what = "terminated" if isinstance(interrupted, Terminated) else "interrupted"
        print(f"verify: {what}; probe pods removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(format_table(results))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
