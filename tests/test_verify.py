"""`make verify`: the checks a reviewer runs against a deployed stack.

What runs in the cluster is proven by the cluster suites (the probe pod is
admitted by the real Pod Security admission in tests/engine/test_verify_pod.py;
the end-to-end run against the real cluster is issue 9's). Here:

- the probe pod is one a protected namespace admits (Pod Security
  `restricted`) and gets the stack's proxy settings as a workload does;
- the commands the probe runs, run for real with curl and with the probe
  binary (scripts/go/probe) on loopback: a completed TCP handshake is always
  a FAIL, a refused connection a PASS, and a probe that did not run is never
  a PASS; the exit IP is what the echo server saw through the proxy named by
  the pod's HTTPS_PROXY / ALL_PROXY;
- the table and the exit code;
- our own orchestration, with an injected runner in place of kubectl (a unit
  test of tools/verify.py's control flow, not a claim about kubectl): the
  probe pod is deleted when a check fails, on Ctrl-C and on SIGTERM; a probe
  left by an earlier run is deleted first; bad input stops before anything
  is created.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from builders.proxy_env import PROXY_CONFIGMAP
from tests.support.pod_security import violations
from tools import verify
from tools.verify import CheckResult, Completed, Target, VerifyConfig

CACHE_BIN = Path(os.environ.get("TS_EGRESS_CACHE", Path.home() / ".cache" / "tailscale-egress")) / "bin"
EXIT_SIDE = "127.0.0.2"  # the proxies below dial out from here: "the exit node's address"


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _need(tool: str, install: str) -> str:
    found = shutil.which(tool)
    if found is None:
        _unavailable(f"{tool} is not installed: {install}")
    assert found is not None
    return found


# --- the probe pod ---------------------------------------------------------------


@pytest.mark.parametrize("uid", [65532, 1000])
def test_probe_pod_passes_pod_security_restricted(uid: int) -> None:
    pod = verify.probe_pod("team-a", "tailscale-egress-verify-abc123", verify.DEFAULT_IMAGE, run_as=uid)
    assert violations(pod) == []
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["runAsUser"] == uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_probe_pod_is_configured_like_a_workload_and_ends_by_itself() -> None:
    pod = verify.probe_pod("team-a", "p", "local/probe:1", lifetime=300)
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": PROXY_CONFIGMAP}}]
    assert spec["automountServiceAccountToken"] is False
    assert container["resources"]["limits"] and container["resources"]["requests"]
    # Even a run killed with SIGKILL leaves nothing running for long.
    assert spec["activeDeadlineSeconds"] == 300
    assert spec["restartPolicy"] == "Never"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert pod["metadata"]["labels"] == verify.PROBE_LABELS


def test_default_image_is_pinned_to_an_exact_version() -> None:
    from config import unpinned_image_problem

    assert unpinned_image_problem(verify.DEFAULT_IMAGE) is None


# --- the commands, run for real on loopback ------------------------------------------


def _run(command: Sequence[str], env: dict[str, str] | None = None, timeout: float = 30) -> Completed:
    done = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})}
    )
    return Completed(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def listener() -> Iterator[int]:
    """A port something listens on (and hangs up at once): a direct connection to it completes."""
    port, server = _serve(lambda client: client.close())
    yield port
    server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def path_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PATH with scripts/go/probe on it: the cache's build (make cluster-bins), or
    built here when there is none (standard library only: seconds)."""
    tools = tmp_path_factory.mktemp("bin")
    cached = CACHE_BIN / "probe"
    if os.access(cached, os.X_OK):
        (tools / "probe").symlink_to(cached)
    else:
        go = shutil.which("go", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/local/go/bin")
        if go is None:
            _unavailable("Go 1.26 is needed to build scripts/go/probe (https://go.dev/dl/)")
        assert go is not None
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-trimpath -buildvcs=false", "GOTOOLCHAIN": "local"}
        probe_src = Path(__file__).resolve().parent.parent / "scripts" / "go" / "probe"
        built = subprocess.run(
            [go, "build", "-o", str(tools / "probe"), "."], cwd=probe_src, env=env, capture_output=True, text=True,
            timeout=600, check=False,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr
    return {"PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(params=["curl", "probe"])
def kind(request: pytest.FixtureRequest, path_env: dict[str, str]) -> str:
    if request.param == "curl":
        _need("curl", "apt-get install curl")
    return str(request.param)


def test_a_completed_connection_fails_the_check(kind: str, listener: int, path_env: dict[str, str]) -> None:
    done = _run(verify.connect_command(kind, "127.0.0.1", listener, 3), path_env)  # type: ignore[arg-type]
    connected, detail = verify.judge_connect(kind, done)  # type: ignore[arg-type]
    assert connected is True, detail


def test_a_refused_connection_is_no_connection(kind: str, network: dict[str, str], path_env: dict[str, str]) -> None:
    # The pod's proxy settings are in the environment: the direct check must not use them.
    proxies = {v: network["HTTPS_PROXY"] for v in ("http_proxy", "HTTP_PROXY", "HTTPS_PROXY", "https_proxy")}
    proxies |= {"ALL_PROXY": network["ALL_PROXY"], "all_proxy": network["ALL_PROXY"]}
    command = verify.connect_command(kind, "127.0.0.1", _closed_port(), 3)  # type: ignore[arg-type]
    done = _run(command, {**proxies, **path_env})
    connected, detail = verify.judge_connect(kind, done)  # type: ignore[arg-type]
    assert connected is False
    assert "refused" in detail


def test_a_probe_that_did_not_run_is_never_a_pass(kind: str) -> None:
    # What kubectl exec returns when the pod is gone or the binary is missing.
    for done in (Completed(1, "", "error: pod not found"), Completed(127, "", "sh: curl: not found")):
        connected, detail = verify.judge_connect(kind, done)  # type: ignore[arg-type]
        assert connected is None, detail
        ok, _ = verify.judge_exit_ip(kind, done, ["127.0.0.2"])  # type: ignore[arg-type]
        assert not ok
        ok, _ = verify.judge_dns(kind, done, "kubernetes.default.svc.cluster.local", None)  # type: ignore[arg-type]
        assert not ok


def test_dns_answer_is_read_from_the_lookup(kind: str, path_env: dict[str, str]) -> None:
    if kind == "curl" and shutil.which("nslookup") is None:
        _need("getent", "apt-get install libc-bin")
    done = _run(verify.dns_command(kind, "localhost", 3), path_env)  # type: ignore[arg-type]
    ok, detail = verify.judge_dns(kind, done, "localhost", None)  # type: ignore[arg-type]
    assert ok, detail
    assert "127.0.0.1" in detail or "::1" in detail
    ok, detail = verify.judge_dns(kind, done, "localhost", "10.43.0.1")  # type: ignore[arg-type]
    assert not ok and "10.43.0.1" in detail


# busybox nslookup (the default image's), as it prints an answer and an NXDOMAIN.
NSLOOKUP_ANSWER = (
    "Server:\t\t10.43.0.10\nAddress:\t10.43.0.10:53\n\n"
    "Name:\tkubernetes.default.svc.cluster.local\nAddress: 10.43.0.1\n\n"
)
NSLOOKUP_NXDOMAIN = (
    "Server:\t\t10.43.0.10\nAddress:\t10.43.0.10:53\n\n"
    "** server can't find kubernetes.default.svc.cluster.local: NXDOMAIN\n\n"
)


def test_nslookup_answer_is_read_after_the_servers_address() -> None:
    name = "kubernetes.default.svc.cluster.local"
    # Exit status 1: the AAAA query found nothing; the A answer is what counts.
    ok, detail = verify.judge_dns("curl", Completed(1, NSLOOKUP_ANSWER, ""), name, "10.43.0.1")
    assert ok, detail
    assert "10.43.0.10" not in detail
    # The server's own address in the header is not an answer.
    ok, detail = verify.judge_dns("curl", Completed(1, NSLOOKUP_NXDOMAIN, ""), name, None)
    assert not ok and "NXDOMAIN" in detail


def _question_end(query: bytes) -> int:
    at = 12
    while query[at]:
        at += query[at] + 1
    return at + 5  # the root label, QTYPE and QCLASS


@pytest.fixture
def resolver() -> Iterator[str]:
    """A resolver outside the cluster, on UDP port 53: answers NXDOMAIN to every query
    (any reply means a pod's query got out)."""
    address = "127.0.0.3"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((address, 53))
    except PermissionError:
        _unavailable("binding UDP port 53 needs root")

    def serve() -> None:
        while True:
            try:
                query, peer = sock.recvfrom(512)
            except OSError:
                return
            end = _question_end(query)
            reply = query[:2] + b"\x81\x83" + b"\x00\x01" + b"\x00\x00" * 3 + query[12:end]
            sock.sendto(reply, peer)

    threading.Thread(target=serve, daemon=True).start()
    yield address
    sock.close()


def test_a_reply_from_an_outside_resolver_fails_the_check(resolver: str, path_env: dict[str, str]) -> None:
    done = _run(verify.external_dns_command("probe", resolver, 3), path_env)
    reached, detail = verify.judge_external_dns("probe", done)
    assert reached is True, detail


def test_no_reply_from_an_outside_resolver_is_no_connection(path_env: dict[str, str]) -> None:
    done = _run(verify.external_dns_command("probe", "127.0.0.4", 3), path_env)  # nothing listens there
    reached, detail = verify.judge_external_dns("probe", done)
    assert reached is False, detail


# busybox nslookup sent to a resolver it cannot reach, refused or not, and to one that answers.
@pytest.mark.parametrize(
    ("done", "reached"),
    [
        (Completed(1, ";; connection timed out; no servers could be reached\n\n", ""), False),
        (
            Completed(
                1,
                ";; connection timed out; no servers could be reached\n\n",
                "nslookup: write to '1.1.1.1': Connection refused\n",
            ),
            False,
        ),
        (
            Completed(
                1, "Server:\t\t1.1.1.1\nAddress:\t1.1.1.1:53\n\n** server can't find example.com: NXDOMAIN\n", ""
            ),
            True,
        ),
        (
            Completed(0, "Server:\t\t1.1.1.1\nAddress:\t1.1.1.1:53\n\nName:\texample.com\nAddress: 96.7.128.175\n", ""),
            True,
        ),
        (Completed(127, "", "sh: nslookup: not found\n"), None),
    ],
    ids=["timeout", "refused", "nxdomain", "answer", "not-run"],
)
def test_nslookup_to_an_outside_resolver_is_judged(done: Completed, reached: bool | None) -> None:
    assert verify.judge_external_dns("curl", done)[0] is reached


class _Echo(BaseHTTPRequestHandler):
    """Answers with the address it sees, as api.ipify.org does."""

    def do_GET(self) -> None:
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _pipe(a: socket.socket, b: socket.socket) -> None:
    def one_way(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=one_way, args=(b, a), daemon=True).start()
    one_way(a, b)


def _dial_out(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=5, source_address=(EXIT_SIDE, 0))


def _http_connect_proxy(client: socket.socket) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        head += client.recv(4096)
    line, rest = head.split(b"\r\n", 1)
    method, target, version = line.decode().split(" ", 2)
    if method == "CONNECT":
        host, port = target.rsplit(":", 1)
        upstream = _dial_out(host, int(port))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    else:  # a plain http:// request in absolute form (what Go sends for http:// URLs)
        url = urlsplit(target)
        upstream = _dial_out(url.hostname or "", url.port or 80)
        upstream.sendall(f"{method} {url.path or '/'} {version}\r\n".encode() + rest)
    _pipe(client, upstream)


def _socks5_proxy(client: socket.socket) -> None:
    def read(n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += client.recv(n - len(data))
        return data

    _, methods = read(2)
    read(methods)
    client.sendall(b"\x05\x00")
    _, command, _, kind = read(4)
    assert command == 1
    host = read(read(1)[0]).decode() if kind == 3 else socket.inet_ntoa(read(4))
    (port,) = struct.unpack("!H", read(2))
    upstream = _dial_out(host, port)
    client.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("0.0.0.0") + b"\x00\x00")
    _pipe(client, upstream)


def _serve(handler: Callable[[socket.socket], None]) -> tuple[int, socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def loop() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(client,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return server.getsockname()[1], server


@pytest.fixture
def network() -> Iterator[dict[str, str]]:
    """An echo server, and an HTTP CONNECT and a SOCKS5 proxy that dial out from EXIT_SIDE."""
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    http_port, http_server = _serve(_http_connect_proxy)
    socks_port, socks_server = _serve(_socks5_proxy)
    yield {
        "url": f"http://127.0.0.1:{echo.server_address[1]}/",
        "HTTPS_PROXY": f"http://127.0.0.1:{http_port}",
        "ALL_PROXY": f"socks5h://127.0.0.1:{socks_port}",
    }
    echo.shutdown()
    http_server.close()
    socks_server.close()


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "ALL_PROXY"])
def test_exit_ip_is_what_the_server_saw_through_the_pods_proxy(
    kind: str, variable: str, network: dict[str, str], path_env: dict[str, str]
) -> None:
    env = {"HTTPS_PROXY": network["HTTPS_PROXY"], "ALL_PROXY": network["ALL_PROXY"], **path_env}
    done = _run(verify.exit_ip_command(kind, variable, network["url"], 10), env)  # type: ignore[arg-type]
    ok, detail = verify.judge_exit_ip(kind, done, [EXIT_SIDE])  # type: ignore[arg-type]
    assert ok, detail
    assert network[variable] in detail
    # Any other address is a FAIL (a direct request would be seen as 127.0.0.1).
    ok, detail = verify.judge_exit_ip(kind, done, ["127.0.0.1"])  # type: ignore[arg-type]
    assert not ok and EXIT_SIDE in detail


def test_exit_ip_check_fails_without_the_configmap_setting(network: dict[str, str]) -> None:
    _need("curl", "apt-get install curl")
    env = {"HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": ""}
    done = _run(verify.exit_ip_command("curl", "HTTPS_PROXY", network["url"], 5), env)
    ok, detail = verify.judge_exit_ip("curl", done, ["127.0.0.1", EXIT_SIDE])
    assert not ok and "HTTPS_PROXY is not set" in detail


def test_exit_ip_check_fails_when_the_proxy_is_down(network: dict[str, str]) -> None:
    _need("curl", "apt-get install curl")
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{_closed_port()}"}
    done = _run(verify.exit_ip_command("curl", "HTTPS_PROXY", network["url"], 5), env)
    ok, detail = verify.judge_exit_ip("curl", done, [EXIT_SIDE])
    assert not ok and "request failed" in detail


def test_exit_ip_accepts_an_address_inside_a_given_network() -> None:
    done = Completed(0, "2a01:4f8:c17:1234::1\n", "via http://relay:3128\n")
    assert verify.judge_exit_ip("curl", done, ["2a01:4f8:c17:1234::/64"])[0]
    assert not verify.judge_exit_ip("curl", done, ["2a01:4f8:c17:9999::/64"])[0]


# --- targets and input -------------------------------------------------------------


def test_targets_default_to_the_host_lan_internet_and_metadata() -> None:
    targets = {(t.category, t.host) for t in verify.default_targets()}
    assert ("metadata", "169.254.169.254") in targets
    assert {("host", "192.168.5.2"), ("host", "192.168.127.254")} <= targets
    assert ("lan", "192.168.1.1") in targets and ("internet", "1.1.1.1") in targets


def test_target_ports_can_be_given() -> None:
    assert verify.parse_target("lan", "10.0.0.1:22,8080") == Target("lan", "10.0.0.1", (22, 8080))
    assert verify.parse_target("host", "[fd00::1]:443") == Target("host", "fd00::1", (443,))
    assert verify.parse_target("host", "host.rancher-desktop.internal").ports == verify.DEFAULT_PORTS["host"]
    with pytest.raises(verify.VerifyError, match=r"--lan-ip '10\.0\.0\.1:99999'"):
        verify.parse_target("lan", "10.0.0.1:99999")
    with pytest.raises(verify.VerifyError, match="not an IP address or host name"):
        verify.parse_target("lan", "bad_name!")


def test_relay_namespace_and_domain_come_from_the_proxy_output() -> None:
    assert verify.relay_address("http://relay.egress.svc.corp.local:3128") == ("egress", "corp.local")
    assert verify.relay_address("nonsense") is None


# --- the table and exit code ---------------------------------------------------------


def test_table_lists_every_check_and_the_exit_code_follows_it() -> None:
    results = [
        CheckResult("tailscale-egress", "relay relay-x exit node online", True, "Ready=yes", "relay"),
        CheckResult("default", "no direct metadata 169.254.169.254", False, "tcp 80 REACHABLE", "metadata"),
    ]
    table = verify.format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["NAMESPACE", "CHECK", "RESULT", "DETAIL"]
    assert "PASS" in lines[1] and "FAIL" in lines[2] and "REACHABLE" in lines[2]
    assert lines[-1] == "2 checks, 1 failed"
    assert verify.exit_code(results) == 1
    assert verify.exit_code(results[:1]) == 0
    assert verify.exit_code([]) == 1  # nothing checked is not a pass


# --- our orchestration, with an injected runner (not a kubectl stand-in) -------------


def _verb(argv: Sequence[str]) -> tuple[str, list[str]]:
    """kubectl's verb and what follows it, past --kubeconfig/--context."""
    args = list(argv[1:])
    while args and args[0] in ("--kubeconfig", "--context"):
        args = args[2:]
    return args[0], args[1:]


class Scripted:
    """Answers tools/verify.py's kubectl calls from a script of (argv match -> result),
    and records every call, so that the order of create, exec and delete can be asserted."""

    def __init__(
        self, on_exec: Callable[[list[str]], Completed] | None = None, gets: dict[str, Any] | None = None
    ) -> None:
        self.gets = gets or {}
        self.calls: list[list[str]] = []
        self.on_exec = on_exec or (lambda argv: Completed(0, "", ""))
        self.lock = threading.Lock()

    def __call__(self, argv: Sequence[str], timeout: float, stdin: str | None) -> Completed:
        args = list(argv)
        with self.lock:
            self.calls.append(args)
        verb, rest = _verb(args)
        if verb == "get" and rest[0] == "pods":  # the relay pods
            return Completed(0, json.dumps({"items": []}), "")
        if verb == "get" and rest[0] == "pod":
            running = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
            return Completed(0, json.dumps({"status": running}), "")
        if verb == "get" and rest[0] in self.gets:
            return Completed(0, json.dumps(self.gets[rest[0]]), "")
        if verb == "get":
            return Completed(1, "", "forbidden")
        if verb == "exec":
            return self.on_exec(args)
        return Completed(0, "", "")


def _config(**overrides: Any) -> VerifyConfig:
    values: dict[str, Any] = {
        "namespaces": ("default",),
        "relay_namespace": "tailscale-egress",
        "expected_exit_ips": ("203.0.113.10",),
        "probe_kind": "curl",
        "targets": (Target("metadata", "169.254.169.254", (80,)),),
        "external_dns": (),
        "pod_timeout": 5,
    }
    values.update(overrides)
    return VerifyConfig(**values)


def _probe_name(runner: Scripted) -> str:
    execs = [_verb(c)[1] for c in runner.calls if _verb(c)[0] == "exec"]
    return execs[0][2]  # exec -n NS POD


def _deleted(runner: Scripted, name: str) -> bool:
    return any(_verb(c)[0] == "delete" and name in c for c in runner.calls)


def test_a_failing_check_still_removes_the_probe_pod() -> None:
    runner = Scripted(lambda argv: Completed(0, "connected_in=0.010\ncurl_exit=0\n", ""))
    results = verify.run_verify(_config(), runner, log=lambda _: None)
    metadata = next(r for r in results if r.category == "metadata")
    assert not metadata.ok and "REACHABLE" in metadata.detail
    assert _deleted(runner, _probe_name(runner))
    assert _verb(runner.calls[-1])[0] == "delete"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, verify.Terminated])
def test_an_interrupted_run_removes_the_probe_pod(interrupt: type[BaseException]) -> None:
    def stop(argv: list[str]) -> Completed:
        raise interrupt

    runner = Scripted(stop)
    with pytest.raises(KeyboardInterrupt):
        verify.run_verify(_config(), runner, log=lambda _: None)
    assert _deleted(runner, _probe_name(runner))


def test_sigterm_during_a_check_removes_the_probe_pod_and_exits_130() -> None:
    def terminate(argv: list[str]) -> Completed:
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to the real handler main() installs
        return Completed(0, "connected_in=0.000\ncurl_exit=7\n", "")

    runner = Scripted(terminate)
    argv = ["--namespace", "default", "--expect-exit-ip", "203.0.113.10", "--relay-namespace", "tailscale-egress",
            "--context", "x", "--kubectl", "true", "--probe-kind", "curl", "--pod-timeout", "5"]  # fmt: skip
    previous = signal.getsignal(signal.SIGTERM)
    assert verify.main(argv, runner) == 130
    assert signal.getsignal(signal.SIGTERM) == previous
    assert _deleted(runner, _probe_name(runner))


def test_a_probe_left_by_an_earlier_run_is_removed_first() -> None:
    runner = Scripted(lambda argv: Completed(0, "connected_in=0.000\ncurl_exit=7\n", ""))
    verify.run_verify(_config(namespaces=("default", "team-a")), runner, log=lambda _: None)
    for ns in ("default", "team-a"):
        in_ns = [c for c in runner.calls if ns in c and _verb(c)[0] in ("delete", "create")]
        first = in_ns[0]
        assert _verb(first)[0] == "delete" and "-l" in first, first
        assert "app.kubernetes.io/name=tailscale-egress-verify" in first[first.index("-l") + 1]


def test_the_sweep_reports_only_what_it_deleted() -> None:
    logged: list[str] = []
    runner = Scripted(lambda argv: Completed(0, "connected_in=0.000\ncurl_exit=7\n", ""))
    original = runner.__call__
    sweeps: list[str] = []

    def sweeping(argv: Sequence[str], timeout: float, stdin: str | None) -> Completed:
        if _verb(argv)[0] == "delete" and "-l" in argv:
            sweeps.append(argv[argv.index("-n") + 1])
            return Completed(0, "No resources found\n" if len(sweeps) == 1 else 'pod "old" deleted\n', "")
        return original(argv, timeout, stdin)

    verify.run_verify(_config(namespaces=("a", "b")), sweeping, log=logged.append)
    removed = [line for line in logged if "left by an earlier run" in line]
    assert removed == ['b: removed a probe pod left by an earlier run: pod "old" deleted']


def test_a_refused_probe_pod_is_a_fail_and_nothing_is_left() -> None:
    runner = Scripted()
    original = runner.__call__

    def refusing(argv: Sequence[str], timeout: float, stdin: str | None) -> Completed:
        if _verb(argv)[0] == "create":
            runner.calls.append(list(argv))
            return Completed(1, "", 'pods "x" is forbidden: violates PodSecurity "restricted:latest"')
        return original(argv, timeout, stdin)

    results = verify.run_verify(_config(), refusing, log=lambda _: None)
    pod = next(r for r in results if r.category == "pod")
    assert not pod.ok and "PodSecurity" in pod.detail
    assert not any(_verb(c)[0] == "exec" for c in runner.calls)
    # The leftover sweep, then the pod by name (in case the API server created it after all).
    verbs = [_verb(c)[0] for c in runner.calls]
    assert [v for v in verbs if v in ("delete", "create")] == ["delete", "create", "delete"]


def test_a_check_that_could_not_run_is_a_fail() -> None:
    runner = Scripted(lambda argv: Completed(1, "", "error: unable to upgrade connection: pod not found"))
    results = verify.run_verify(_config(), runner, log=lambda _: None)
    metadata = next(r for r in results if r.category == "metadata")
    assert not metadata.ok and "not checked" in metadata.detail
    assert verify.exit_code(results) == 1


def test_the_nodes_and_the_api_server_are_tried_too() -> None:
    gets = {
        "nodes": {"items": [{"status": {"addresses": [
            {"type": "InternalIP", "address": "192.168.5.15"}, {"type": "Hostname", "address": "lima-rd"}]}}]},
        "services": {"items": [
            {"metadata": {"namespace": "default", "name": "kubernetes"}, "spec": {"clusterIP": "10.43.0.1",
                                                                                  "ports": [{"port": 443}]}},
            {"metadata": {"namespace": "web", "name": "shop"}, "spec": {"ports": [{"port": 80, "nodePort": 30080}]}},
        ]},
    }  # fmt: skip
    runner = Scripted(lambda argv: Completed(0, "connected_in=0.000\ncurl_exit=7\n", ""), gets)
    results = verify.run_verify(_config(), runner, log=lambda _: None)
    checked = {r.check: r for r in results}
    node = checked["no direct node 192.168.5.15"]
    assert node.ok and all(f"{port} refused" in node.detail for port in (22, 6443, 10250, 30080))
    assert checked["no direct api 10.43.0.1"].ok


def test_a_reply_from_an_outside_resolver_is_a_fail_in_the_table() -> None:
    def answer(argv: list[str]) -> Completed:
        if "nslookup example.com 1.1.1.1" in argv[-1]:
            return Completed(
                1, "Server:\t\t1.1.1.1\nAddress:\t1.1.1.1:53\n\n** server can't find example.com: NXDOMAIN\n", ""
            )
        return Completed(0, "connected_in=0.000\ncurl_exit=7\n", "")

    results = verify.run_verify(_config(external_dns=("1.1.1.1",)), Scripted(answer), log=lambda _: None)
    dns = next(r for r in results if r.check == "no direct DNS 1.1.1.1")
    assert not dns.ok and "REACHABLE" in dns.detail


def test_no_relay_pod_is_a_fail() -> None:
    results = verify.run_verify(_config(namespaces=()), Scripted(), log=lambda _: None)
    assert [(r.category, r.ok) for r in results] == [("relay", False)]
    assert "no relay pod" in results[0].detail


def test_bad_input_is_reported_before_anything_is_created(capsys: pytest.CaptureFixture[str]) -> None:
    runner = Scripted()
    argv = ["--namespace", "default", "--context", "x", "--kubectl", "true", "--uid", "0", "--lan-ip", "10.0.0.1:0"]
    code = verify.main(argv, runner)
    assert code == 2
    assert runner.calls == []
    err = capsys.readouterr().err
    # Every problem at once, each with the flag, the value and what would do.
    assert "--expect-exit-ip IP" in err and "--uid 0" in err and "--lan-ip '10.0.0.1:0'" in err
