"""The host's resolver the cluster's CoreDNS forwards to (pure, no root)."""

from __future__ import annotations

import struct

from tests.support.host_dns import answer


def query(name: str, qtype: int = 1, qid: int = 0x1234) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def test_a_record_of_a_known_name_is_answered() -> None:
    reply, name, rcode = answer(query("Echo.Example.Test"), {"echo.example.test": "192.0.2.80"})
    qid, flags, _, ancount, _, _ = struct.unpack("!HHHHHH", reply[:12])
    assert (qid, name, rcode, ancount) == (0x1234, "echo.example.test", 0, 1)
    assert flags & 0x8000  # a response
    assert reply[-4:] == bytes([192, 0, 2, 80])


def test_any_other_name_is_nxdomain_without_answers() -> None:
    reply, _, rcode = answer(query("exfil.attacker.test"), {"echo.example.test": "192.0.2.80"})
    assert rcode == 3
    assert struct.unpack("!H", reply[6:8])[0] == 0
