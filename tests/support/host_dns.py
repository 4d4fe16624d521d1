"""The host's DNS resolver for the test cluster (stdlib only).

CoreDNS forwards what is not a cluster name to the node's resolv.conf, which
on Rancher Desktop is a resolver on the host. Here the host is the topology's
router: this answers A queries for the names given with --record
(name=address), NXDOMAIN for every other name, and logs every query it
receives (JSON lines), so that tests can see which names left the cluster.

    python -m tests.support.host_dns --addr 192.168.5.1 --record echo.example.test=192.0.2.80 --log q.jsonl
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path

TYPE_A = 1
CLASS_IN = 1


def parse_question(msg: bytes) -> tuple[str, int, int, int]:
    """(name, qtype, qclass, end offset) of the first question."""
    labels: list[str] = []
    i = 12
    while True:
        n = msg[i]
        i += 1
        if n == 0:
            break
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(msg[i : i + n].decode("ascii", "replace"))
        i += n
    qtype, qclass = struct.unpack("!HH", msg[i : i + 4])
    return ".".join(labels).lower(), qtype, qclass, i + 4


def answer(msg: bytes, records: Mapping[str, str]) -> tuple[bytes, str, int]:
    """The reply to one query: (bytes, name asked, rcode)."""
    (qid, flags) = struct.unpack("!HH", msg[:4])
    name, qtype, qclass, end = parse_question(msg)
    rd = flags & 0x0100
    addr = records.get(name)
    answers = b""
    rcode = 0
    if addr is None:
        rcode = 3  # NXDOMAIN
    elif qtype == TYPE_A and qclass == CLASS_IN:
        rdata = ipaddress.IPv4Address(addr).packed
        answers = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 60, len(rdata)) + rdata
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, 1 if answers else 0, 0, 0)
    return header + msg[12:end] + answers, name, rcode


def serve(addr: str, port: int, records: Mapping[str, str], log: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    print(f"ready: {addr}:{port} {dict(records)}", flush=True)
    with log.open("a") as f:
        while True:
            msg, peer = sock.recvfrom(4096)
            try:
                reply, name, rcode = answer(msg, records)
            except (ValueError, IndexError, struct.error):
                continue
            sock.sendto(reply, peer)
            f.write(json.dumps({"t": time.time(), "peer": peer[0], "name": name, "rcode": rcode}) + "\n")
            f.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--record", action="append", default=[], help="name=IPv4 address")
    ap.add_argument("--log", required=True, type=Path)
    a = ap.parse_args()
    records = dict(r.lower().rstrip(".").split("=", 1) for r in a.record)
    serve(a.addr, a.port, records, a.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
