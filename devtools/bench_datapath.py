"""One benchmark run of the relay data path on the namespace topology.

Needs root and the binaries of scripts/build-datapath-bins.sh (run first).
Uses tests/datapath/topology.py and the relay Deployment rendered by
tools/render.py (or TSE_DATAPATH_MANIFESTS, see topology.Topology.render).

    sudo python devtools/bench_datapath.py [--requests 200] [--keep-logs]

Measures (a) relay netns -> internet directly (no tailscale),
(b) workload -> relay proxies (HTTP CONNECT / SOCKS5) -> exit node -> internet,
(c) a kernel-mode relay (tailscaled TUN with --exit-node in the relay netns),
each as throughput of a 64 MiB HTTPS download and the median/p99 latency of
small HTTPS requests on fresh connections; plus the userspace relay's RSS
(containerboot + tailscaled) under load. Prints each figure and the ratio to (a).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ client
def _connect(target: str, port: int, proxy: str | None) -> socket.socket:
    if not proxy:
        return socket.create_connection((target, port), timeout=15)
    scheme, _, hostport = proxy.partition("://")
    phost, pport = hostport.rsplit(":", 1)
    s = socket.create_connection((phost, int(pport)), timeout=15)
    if scheme == "http":
        s.sendall(f"CONNECT {target}:{port} HTTP/1.1\r\nHost: {target}:{port}\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("proxy closed")
            buf += chunk
        if b" 200" not in buf.split(b"\r\n", 1)[0]:
            raise OSError(f"CONNECT failed: {buf[:80]!r}")
        return s
    # socks5h: remote name resolution
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        raise OSError("socks5 auth negotiation failed")
    name = target.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
    rep = s.recv(4)
    if len(rep) < 2 or rep[1] != 0:
        raise OSError(f"socks5 connect failed: {rep!r}")
    atyp = rep[3]
    s.recv({1: 4, 4: 16}.get(atyp, 0) + 2 if atyp != 3 else s.recv(1)[0] + 2)
    return s


def _get(target: str, path: str, proxy: str | None, cafile: str, sink: bool = False) -> int:
    ctx = ssl.create_default_context(cafile=cafile)
    raw = _connect(target, 443, proxy)
    with ctx.wrap_socket(raw, server_hostname=target) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        n = 0
        while True:
            chunk = s.recv(1 << 18)
            if not chunk:
                break
            n += len(chunk)
        return n


def client_main(a: argparse.Namespace) -> int:
    """Runs inside a namespace; prints one JSON line."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    n = _get(a.target, "/big", a.proxy, a.cafile)
    dt = time.perf_counter() - t0
    out["bytes"] = n
    out["mbit_s"] = n * 8 / dt / 1e6
    lat: list[float] = []
    for _ in range(a.requests):
        t = time.perf_counter()
        _get(a.target, "/ip", a.proxy, a.cafile)
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    out["median_ms"] = statistics.median(lat)
    out["p99_ms"] = lat[min(len(lat) - 1, round(0.99 * len(lat)) - 1)]
    print(json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------ driver
def _rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_client(t: Any, role: str, target: str, proxy: str | None, requests: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--client",
        "--target",
        target,
        "--cafile",
        str(t.ca_cert),
        "--requests",
        str(requests),
    ]
    if proxy:
        cmd += ["--proxy", proxy]
    p = t.run(role, cmd, timeout=600)
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", default="")
    ap.add_argument("--proxy", default=None)
    ap.add_argument("--cafile", default="")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--no-kernel", action="store_true", help="skip (c) kernel-mode relay")
    ap.add_argument("--keep-logs", action="store_true", help="keep the work dir and print it")
    a = ap.parse_args()
    if a.client:
        return client_main(a)

    sys.path.insert(0, str(REPO))
    from tests.datapath.topology import (
        ECHO_NAME,
        EXIT_PUBLIC_IP,
        INTERNET_IP,
        LOGIN_SERVER,
        build_bins,
        missing_prerequisites,
        start_full,
        wait_for,
    )

    missing = missing_prerequisites()
    if missing:
        print("cannot run: " + "; ".join(missing), file=sys.stderr)
        return 2
    bin_dir = build_bins()
    work = Path(tempfile.mkdtemp(prefix="tse-bench-"))
    results: dict[str, dict[str, Any]] = {}
    t = start_full(work, bin_dir)
    try:
        t.wait_relay_ready()
        wait_for(
            "relay carrying traffic",
            lambda: t.curl(f"https://{ECHO_NAME}/ip", proxy=t.http_proxy(), timeout=5).stdout.strip() == EXIT_PUBLIC_IP,
            60,
            1,
        )
        results["a direct relay->internet"] = run_client(t, "relay", INTERNET_IP, None, a.requests)

        relay = t.procs["relay"]
        # containerboot and its children (tailscaled), as the pod's memory counts them
        relay_pids = [relay.pid, *relay.descendants()]
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_kib(relay_pids))
                time.sleep(0.1)

        idle_rss = _rss_kib(relay_pids)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        results["b relay HTTP CONNECT + exit"] = run_client(t, "workload", ECHO_NAME, t.http_proxy(), a.requests)
        results["b relay SOCKS5h + exit"] = run_client(t, "workload", ECHO_NAME, t.socks_proxy(), a.requests)
        stop.set()
        th.join()

        if not a.no_kernel:
            t.procs["relay"].stop()
            d = work / "krelay"
            d.mkdir()
            env = {"TS_NO_LOGS_NO_SUPPORT": "true", "SSL_CERT_FILE": str(t.ca_bundle)}
            t.spawn(
                "relay",
                "kernel-relay",
                [
                    str(t.bin / "tailscaled"),
                    f"--statedir={d}",
                    f"--socket={d / 's.sock'}",
                    "--tun=tse1",
                    "--no-logs-no-support",
                ],
                env={**os.environ, **env},
            )
            wait_for("kernel relay socket", lambda: (d / "s.sock").exists(), 20)
            exit_ip = t.exit_ip()
            t.run(
                "relay",
                [
                    str(t.bin / "tailscale"),
                    f"--socket={d / 's.sock'}",
                    "up",
                    f"--login-server={LOGIN_SERVER}",
                    f"--authkey={t.relay_authkey}",
                    f"--exit-node={exit_ip}",
                    "--hostname=krelay",
                    "--accept-dns=false",
                ],
                timeout=60,
                env=env,
            )
            # In kernel mode the relay netns itself routes via the exit node.
            wait_for(
                "kernel relay via exit",
                lambda: t.curl(f"https://{INTERNET_IP}/ip", role="relay", timeout=5).stdout.strip() == EXIT_PUBLIC_IP,
                60,
                1,
            )
            results["c kernel relay + exit"] = run_client(t, "relay", INTERNET_IP, None, a.requests)
    finally:
        t.close()
        if a.keep_logs:
            print(f"work dir kept: {work}")

    base = results["a direct relay->internet"]
    print(f"{'path':34} {'Mbit/s':>9} {'x(a)':>6} {'median ms':>10} {'x(a)':>6} {'p99 ms':>8} {'x(a)':>6}")
    for name, r in results.items():
        print(
            f"{name:34} {r['mbit_s']:9.1f} {r['mbit_s'] / base['mbit_s']:6.2f} "
            f"{r['median_ms']:10.2f} {r['median_ms'] / base['median_ms']:6.2f} "
            f"{r['p99_ms']:8.2f} {r['p99_ms'] / base['p99_ms']:6.2f}"
        )
    print(
        f"userspace relay RSS (containerboot+tailscaled): idle {idle_rss / 1024:.1f} MiB, "
        f"peak under load {peak[0] / 1024:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
