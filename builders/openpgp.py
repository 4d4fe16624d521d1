"""The one OpenPGP fact the exit node's document needs: the fingerprint of an
ASCII-armored public key, so the key shipped in the document is checked
against the pinned fingerprint when the document is rendered, not trusted
because of where its text came from.

A version 4 fingerprint is the SHA-1 of 0x99, the two-byte length of the
primary key packet's body, and that body (RFC 4880, section 12.2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

_BEGIN = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
_END = "-----END PGP PUBLIC KEY BLOCK-----"
_PUBLIC_KEY_PACKET = 6


class NotAPublicKeyError(ValueError):
    pass


def _crc24(data: bytes) -> int:
    # RFC 4880, section 6.1.
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def dearmor(armored: str) -> bytes:
    """The binary key block of an armored one, its CRC-24 checksum verified."""
    lines = [line.strip() for line in armored.strip().splitlines()]
    if not lines or lines[0] != _BEGIN or _END not in lines:
        raise NotAPublicKeyError(f"not an armored public key block (expected {_BEGIN!r} ... {_END!r})")
    body = lines[1 : lines.index(_END)]
    # Armor headers ("Comment: ...") end at the first blank line.
    if "" in body:
        body = body[body.index("") + 1 :]
    checksum = [line for line in body if line.startswith("=")]
    data_lines = [line for line in body if line and not line.startswith("=")]
    try:
        data = base64.b64decode("".join(data_lines), validate=True)
    except binascii.Error as error:
        raise NotAPublicKeyError(f"the armored key is not valid base64: {error}") from error
    if checksum and int.from_bytes(base64.b64decode(checksum[0][1:]), "big") != _crc24(data):
        raise NotAPublicKeyError("the armored key's CRC-24 checksum does not match its data")
    return data


def _first_packet(data: bytes) -> tuple[int, bytes]:
    """(tag, body) of the first packet, in the old or the new packet format."""
    if not data or not data[0] & 0x80:
        raise NotAPublicKeyError("the key block does not start with an OpenPGP packet")
    header = data[0]
    if header & 0x40:  # new format
        tag, first = header & 0x3F, data[1]
        if first < 192:
            length, start = first, 2
        elif first < 224:
            length, start = ((first - 192) << 8) + data[2] + 192, 3
        elif first == 255:
            length, start = int.from_bytes(data[2:6], "big"), 6
        else:
            raise NotAPublicKeyError("a partial-length public key packet")
    else:  # old format
        tag, length_type = (header >> 2) & 0x0F, header & 0x03
        if length_type == 3:
            raise NotAPublicKeyError("an indeterminate-length public key packet")
        size = 1 << length_type
        length, start = int.from_bytes(data[1 : 1 + size], "big"), 1 + size
    return tag, data[start : start + length]


def fingerprint(armored: str) -> str:
    """The primary key's v4 fingerprint, 40 upper-case hex digits."""
    tag, body = _first_packet(dearmor(armored))
    if tag != _PUBLIC_KEY_PACKET or not body or body[0] != 4:
        raise NotAPublicKeyError(f"the first packet is not a version 4 public key (tag {tag})")
    return hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body, usedforsecurity=False).hexdigest().upper()
