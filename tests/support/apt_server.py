"""The VM's "internet" for apt: serves one directory over HTTP (:80, the
Debian mirror's scheme) and HTTPS (:443, pkgs.tailscale.com's), at one
address in a network namespace. Run as a process (stdlib only):

    apt_server.py --addr A --root DIR --cert C --key K --log LOG

DIR may be a symlink the tests repoint (www-1 -> www-2: a newer tailscale
is published). Every request is appended to LOG as "<host> <path> <status>".
"""

from __future__ import annotations

import argparse
import functools
import ssl
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(SimpleHTTPRequestHandler):
    log_path: Path
    # Keep-alive with a Content-Length on every answer, as a real mirror: with
    # HTTP/1.0 the server ends each TLS connection without a close_notify,
    # which apt (OpenSSL 3) reports as "unexpected eof while reading".
    protocol_version = "HTTP/1.1"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        with self.log_path.open("a") as f:
            f.write(f"{self.headers.get('Host', '-')} {self.path} {code}\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--log", required=True, type=Path)
    a = ap.parse_args()
    Handler.log_path = a.log
    handler = functools.partial(Handler, directory=str(a.root))
    plain = ThreadingHTTPServer((a.addr, 80), handler)
    tls = ThreadingHTTPServer((a.addr, 443), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    print("ready", flush=True)
    tls.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
