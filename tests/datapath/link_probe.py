"""Measurements across a link, run inside a network namespace by
test_wan_link.py (`ip netns exec <ns> python -m tests.datapath.link_probe ...`);
each prints one JSON object.

    connect HOST PORT COUNT         TCP handshakes (accepted, or refused by an RST or a reject): ms and outcome each
    sink PORT SECONDS SKIP          one TCP connection's goodput from SKIP s after its first byte to SECONDS
    send HOST PORT SECONDS          send as fast as TCP allows
    udp-recv PORT COUNT TIMEOUT     datagrams received, and how many overtook their predecessor
    udp-send HOST PORT COUNT GAP_US numbered datagrams, GAP_US apart
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time


def connect(host: str, port: int, count: int) -> dict[str, object]:
    samples, outcomes = [], []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(3)
        t = time.perf_counter()
        try:
            s.connect((host, port))
            outcomes.append("open")
        except ConnectionRefusedError:
            outcomes.append("refused")
        except OSError:
            outcomes.append("timeout")
        samples.append((time.perf_counter() - t) * 1000)
        s.close()
        time.sleep(0.05)
    return {"ms": samples, "outcomes": outcomes}


def sink(port: int, seconds: float, skip: float) -> dict[str, object]:
    listener = socket.create_server(("0.0.0.0", port))
    print(json.dumps({"listening": port}), flush=True)
    conn, _ = listener.accept()
    counted = 0
    start = None
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        now = time.perf_counter()
        if start is None:
            start = now
        if skip <= now - start <= seconds:
            counted += len(data)
    elapsed = min(seconds, time.perf_counter() - (start or 0)) - skip
    return {"mbit_s": counted * 8 / elapsed / 1e6, "seconds": elapsed}


def send(host: str, port: int, seconds: float) -> dict[str, object]:
    s = socket.create_connection((host, port), timeout=10)
    chunk = b"\0" * (1 << 16)
    end = time.perf_counter() + seconds
    sent = 0
    while time.perf_counter() < end:
        s.sendall(chunk)
        sent += len(chunk)
    s.close()
    return {"sent": sent}


def udp_recv(port: int, count: int, timeout: float) -> dict[str, object]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
    print(json.dumps({"listening": port}), flush=True)
    s.settimeout(timeout)
    arrived: dict[int, int] = {}  # sequence number -> arrival position
    try:
        while len(arrived) < count:
            (seq,) = struct.unpack("!I", s.recv(64)[:4])
            arrived.setdefault(seq, len(arrived))
    except TimeoutError:
        pass
    # A datagram that overtook others arrived before its predecessor.
    early = sum(1 for seq, at in arrived.items() if seq - 1 in arrived and arrived[seq - 1] > at)
    return {"received": len(arrived), "early": early}


def udp_send(host: str, port: int, count: int, gap_us: int) -> dict[str, object]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.perf_counter()
    for seq in range(1, count + 1):
        s.sendto(struct.pack("!I", seq) + b"\0" * 60, (host, port))
        while time.perf_counter() < start + seq * gap_us / 1e6:
            pass
    return {"sent": count}


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    match command:
        case "connect":
            result = connect(args[0], int(args[1]), int(args[2]))
        case "sink":
            result = sink(int(args[0]), float(args[1]), float(args[2]))
        case "send":
            result = send(args[0], int(args[1]), float(args[2]))
        case "udp-recv":
            result = udp_recv(int(args[0]), int(args[1]), float(args[2]))
        case "udp-send":
            result = udp_send(args[0], int(args[1]), int(args[2]), int(args[3]))
        case _:
            raise SystemExit(__doc__)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
