"""What a DDS participant announces to the others: its RTPS participant announcements (SPDP), read off the wire.

Written from the RTPS 2.x specification (OMG formal/2019-04-03, sections 8.3 and 9.4-9.6): a message is "RTPS",
version, vendor and a 12-byte GUID prefix, then submessages; a DATA submessage from the SPDP writer (entity id
0x000100c2) carries the participant's parameter list, in which PID_DEFAULT_UNICAST_LOCATOR (0x0031) and
PID_METATRAFFIC_UNICAST_LOCATOR (0x0032) are the addresses other participants use to reach it. Fast DDS (vendor
0x010f) puts the low 16 bits of its process id in GUID prefix bytes 4-5: that is how an announcement is tied to a
process.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Announcement", "parse", "spdp_port", "listen"]

SPDP_WRITER = bytes.fromhex("000100c2")
PID_SENTINEL, PID_DEFAULT_UNICAST_LOCATOR, PID_METATRAFFIC_UNICAST_LOCATOR = 0x0001, 0x0031, 0x0032
LOCATOR_KIND_UDPV4 = 1
DATA = 0x15


@dataclass(frozen=True)
class Announcement:
    """One participant's announcement: GUID prefix, Fast DDS process id (16 bits, None for other vendors) and its
    UDPv4 unicast addresses (default and metatraffic)."""

    guid_prefix: str
    pid16: int | None
    addresses: frozenset[str]


def spdp_port(domain_id: int) -> int:
    """The SPDP multicast port of a domain (RTPS 9.6.1.1: PB 7400 + DG 250 * domain + d0 0)."""
    return 7400 + 250 * domain_id


def _locators(payload: bytes) -> set[str]:
    """UDPv4 unicast addresses in a serialized parameter list (encapsulation PL_CDR_BE 0x0002 or PL_CDR_LE 0x0003)."""
    little = payload[:2] in (b"\x00\x03", b"\x00\x01")
    end = "<" if little else ">"
    found, i = set(), 4
    while i + 4 <= len(payload):
        pid, length = struct.unpack(end + "HH", payload[i:i + 4])
        value = payload[i + 4:i + 4 + length]
        i += 4 + length
        if pid == PID_SENTINEL:
            break
        if pid in (PID_DEFAULT_UNICAST_LOCATOR, PID_METATRAFFIC_UNICAST_LOCATOR) and len(value) >= 24:
            kind, _port = struct.unpack(end + "iI", value[:8])
            if kind == LOCATOR_KIND_UDPV4:
                found.add(str(ipaddress.IPv4Address(value[20:24])))
    return found


def parse(message: bytes) -> Announcement | None:
    """The participant announcement in an RTPS message, None if it holds none."""
    if len(message) < 20 or message[:4] != b"RTPS":
        return None
    vendor, prefix, i = message[6:8], message[8:20], 20
    while i + 4 <= len(message):
        kind, flags = message[i], message[i + 1]
        length = struct.unpack("<H" if flags & 1 else ">H", message[i + 2:i + 4])[0]
        body = message[i + 4:i + 4 + length] if length else message[i + 4:]
        if kind == DATA and len(body) >= 20 and body[8:12] == SPDP_WRITER:
            end = "<" if flags & 1 else ">"
            start = 4 + struct.unpack(end + "H", body[2:4])[0]  # octetsToInlineQos counts from the reader id
            while flags & 0x02 and start + 4 <= len(body):  # inline QoS: a parameter list to skip
                pid, plen = struct.unpack(end + "HH", body[start:start + 4])
                start += 4 + plen
                if pid == PID_SENTINEL:
                    break
            pid16 = struct.unpack("<H", prefix[4:6])[0] if vendor == b"\x01\x0f" else None
            return Announcement(prefix.hex(), pid16, frozenset(_locators(body[start:])))
        if not length:
            break
        i += 4 + length
    return None


def listen(domain_id: int, interface: str, until: Callable[[Announcement], bool], timeout: float) -> list[Announcement]:
    """Announcements received on the domain's SPDP multicast group through ``interface`` (an IPv4 address) until
    one satisfies ``until`` or ``timeout`` seconds pass."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", spdp_port(domain_id)))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton("239.255.0.1") + socket.inet_aton(interface))
    sock.settimeout(0.2)
    seen: list[Announcement] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                message, _ = sock.recvfrom(65536)
            except socket.timeout:
                continue
            announcement = parse(message)
            if announcement is not None and announcement not in seen:
                seen.append(announcement)
                if until(announcement):
                    break
    finally:
        sock.close()
    return seen
