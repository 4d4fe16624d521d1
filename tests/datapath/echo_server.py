"""HTTP/HTTPS echo server for the data-path tests (Python stdlib only).

Run inside a network namespace. Every accepted connection is appended to a
JSON-lines log (peer address, port, local port) so tests can prove which
addresses reached this server, and how often.

Paths:
  /ip          -> the client address this server sees (text/plain)
  /big         -> BIG_SIZE deterministic bytes (see big_payload_sha256)
  anything else -> "ok"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 1 << 16
BIG_SIZE = 64 << 20


def _chunk(i: int) -> bytes:
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return seed * (CHUNK // len(seed))


def big_payload_sha256(size: int = BIG_SIZE) -> str:
    h = hashlib.sha256()
    for i in range(size // CHUNK):
        h.update(_chunk(i))
    return h.hexdigest()


class _Log:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def write(self, rec: dict[str, object]) -> None:
        with self.lock, self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    conn_log: _Log
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        self.conn_log.write({"peer": addr[0], "peer_port": addr[1], "port": self.server_address[1]})
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        if self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(BIG_SIZE))
            self.end_headers()
            for i in range(BIG_SIZE // CHUNK):
                self.wfile.write(_chunk(i))
            return
        body = (self.client_address[0] if self.path == "/ip" else "ok").encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--https-port", type=int, default=443)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--log", required=True)
    a = p.parse_args(argv)
    log = _Log(Path(a.log))
    servers: list[_Server] = []
    http = _Server((a.addr, a.http_port), _Handler)
    http.conn_log = log
    servers.append(http)
    if a.cert and a.key:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.cert, a.key)
        https = _Server((a.addr, a.https_port), _Handler)
        https.conn_log = log
        https.tls = ctx
        servers.append(https)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
