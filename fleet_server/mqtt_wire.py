"""MQTT 5.0 for a subscriber, sans-IO: the packets the fleet server sends, as bytes, and a
decoder turning the broker's bytes into packets. No socket, no event loop: the caller owns the
connection (``fleet_server.mqtt_ingest``); tests drive this module byte by byte.

Only what a subscribing client needs is here. It sends CONNECT, SUBSCRIBE, UNSUBSCRIBE, PUBACK,
PINGREQ and DISCONNECT, and accepts from the broker CONNACK, PUBLISH, SUBACK, UNSUBACK,
PINGRESP and DISCONNECT. Any other packet type from a broker is a protocol error for this
client: it never publishes (no PUBACK/PUBREC/PUBCOMP for it to receive), subscribes at QoS 1 at
most (no PUBREL) and uses no enhanced authentication (no AUTH).

Section numbers (``§3.3.2``) refer to the OASIS standard "MQTT Version 5.0" (7 March 2019).

The decoder's hot path is PUBLISH: it is parsed inline, its properties skipped by their length
(this client allows no topic alias, so none of them changes the meaning of a delivery), and
its payload copied once out of the received chunk. A chunk holding hundreds of packets is
walked with an offset, never re-sliced; the unfinished tail of a chunk is kept in a buffer
that is only turned back into ``bytes`` once the packet it holds is complete.

Whatever the broker sends that breaks the standard raises :class:`MqttProtocolError`, naming
the problem; the connection must then be dropped (§4.13: a malformed packet closes it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from fleet_server.errors import MqttProtocolError

#: The largest packet (whole, fixed header included) accepted from the broker. CONNECT tells
#: the broker so (Maximum Packet Size, §3.1.2.11.4), and the broker then drops what is larger
#: instead of sending it; so a larger packet is a broken broker, not a big message.
MAX_PACKET_SIZE: Final = 2 * 1024 * 1024

#: §1.5.5: a Variable Byte Integer has four bytes at most.
_MAX_VARINT: Final = 268_435_455

# Fixed header first bytes (§2.1.2, with the flags §2.1.3 requires).
_CONNECT: Final = 0x10
_SUBSCRIBE: Final = 0x82
_UNSUBSCRIBE: Final = 0xA2
_PUBACK: Final = 0x40
PINGREQ: Final = b"\xc0\x00"
#: §3.14.2.1: reason 0x00 (Normal disconnection) without properties may be left out entirely.
DISCONNECT: Final = b"\xe0\x00"

# Packet types (§2.1.2) the broker may send to this client.
_T_CONNACK: Final = 2
_T_PUBLISH: Final = 3
_T_SUBACK: Final = 9
_T_UNSUBACK: Final = 11
_T_PINGRESP: Final = 13
_T_DISCONNECT: Final = 14
_CONTROL_TYPES: Final = frozenset((_T_CONNACK, _T_SUBACK, _T_UNSUBACK, _T_PINGRESP, _T_DISCONNECT))
_TYPE_NAMES: Final = {
    0: "reserved type 0",
    1: "CONNECT",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    10: "UNSUBSCRIBE",
    12: "PINGREQ",
    15: "AUTH",
}

# Property identifiers (§2.2.2.2) this client reads or sends.
_P_SESSION_EXPIRY: Final = 0x11
_P_SERVER_KEEP_ALIVE: Final = 0x13
_P_REASON_STRING: Final = 0x1F
_P_RECEIVE_MAXIMUM: Final = 0x21
_P_MAXIMUM_PACKET_SIZE: Final = 0x27

# Property value types (§2.2.2.2, the table of identifiers; §1.5 the data representations).
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES: Final = {
    0x01: _BYTE,  # Payload Format Indicator
    0x02: _FOUR,  # Message Expiry Interval
    0x03: _UTF8,  # Content Type
    0x08: _UTF8,  # Response Topic
    0x09: _BINARY,  # Correlation Data
    0x0B: _VARINT,  # Subscription Identifier
    0x11: _FOUR,  # Session Expiry Interval
    0x12: _UTF8,  # Assigned Client Identifier
    0x13: _TWO,  # Server Keep Alive
    0x15: _UTF8,  # Authentication Method
    0x16: _BINARY,  # Authentication Data
    0x17: _BYTE,  # Request Problem Information
    0x18: _FOUR,  # Will Delay Interval
    0x19: _BYTE,  # Request Response Information
    0x1A: _UTF8,  # Response Information
    0x1C: _UTF8,  # Server Reference
    0x1F: _UTF8,  # Reason String
    0x21: _TWO,  # Receive Maximum
    0x22: _TWO,  # Topic Alias Maximum
    0x23: _TWO,  # Topic Alias
    0x24: _BYTE,  # Maximum QoS
    0x25: _BYTE,  # Retain Available
    0x26: _PAIR,  # User Property
    0x27: _FOUR,  # Maximum Packet Size
    0x28: _BYTE,  # Wildcard Subscription Available
    0x29: _BYTE,  # Subscription Identifier Available
    0x2A: _BYTE,  # Shared Subscription Available
}

#: Reason codes (§2.4) by value, for log lines an operator can act on ("0x87 Not authorized").
REASON_NAMES: Final = {
    0x00: "Success",
    0x01: "Granted QoS 1",
    0x02: "Granted QoS 2",
    0x04: "Disconnect with Will Message",
    0x10: "No matching subscribers",
    0x11: "No subscription existed",
    0x18: "Continue authentication",
    0x19: "Re-authenticate",
    0x80: "Unspecified error",
    0x81: "Malformed Packet",
    0x82: "Protocol Error",
    0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8B: "Server shutting down",
    0x8C: "Bad authentication method",
    0x8D: "Keep Alive timeout",
    0x8E: "Session taken over",
    0x8F: "Topic Filter invalid",
    0x90: "Topic Name invalid",
    0x91: "Packet Identifier in use",
    0x92: "Packet Identifier not found",
    0x93: "Receive Maximum exceeded",
    0x94: "Topic Alias invalid",
    0x95: "Packet too large",
    0x96: "Message rate too high",
    0x97: "Quota exceeded",
    0x98: "Administrative action",
    0x99: "Payload format invalid",
    0x9A: "Retain not supported",
    0x9B: "QoS not supported",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported",
    0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time",
    0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported",
}


def reason_name(code: int) -> str:
    """``0x87 Not authorized``: the code as the standard writes it, and its name."""
    return f"0x{code:02X} {REASON_NAMES.get(code, 'unknown reason code')}"


# --- packets from the broker -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnAck:
    """CONNACK (§3.2). ``reason_code`` 0x80 and above: the broker refused the connection."""

    session_present: bool
    reason_code: int
    #: Server Keep Alive (§3.2.2.3.14): when set, the keep-alive the client must use.
    server_keep_alive: int | None = None
    reason_string: str | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH (§3.3): one delivery. ``packet_id`` is 0 for QoS 0."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int
    retain: bool
    dup: bool


@dataclass(frozen=True, slots=True)
class SubAck:
    """SUBACK (§3.9): one reason code per filter, in the order of the SUBSCRIBE."""

    packet_id: int
    reason_codes: tuple[int, ...]
    reason_string: str | None = None


@dataclass(frozen=True, slots=True)
class UnsubAck:
    """UNSUBACK (§3.11): one reason code per filter, in the order of the UNSUBSCRIBE."""

    packet_id: int
    reason_codes: tuple[int, ...]
    reason_string: str | None = None


@dataclass(frozen=True, slots=True)
class PingResp:
    """PINGRESP (§3.13)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """DISCONNECT from the broker (§3.14): it closes the connection next."""

    reason_code: int
    reason_string: str | None = None


Packet = ConnAck | Publish | SubAck | UnsubAck | PingResp | Disconnect

_PINGRESP: Final = PingResp()


# --- encoders ------------------------------------------------------------------------------

_PUBACK_STRUCT: Final = struct.Struct(">BBH")


@dataclass(frozen=True, slots=True)
class Will:
    """A last will (§3.1.2.5): published by the broker when the session ends uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def encode_connect(
    client_id: str,
    *,
    clean_start: bool,
    keepalive_s: int,
    session_expiry_s: int,
    receive_maximum: int | None,
    maximum_packet_size: int | None = MAX_PACKET_SIZE,
    will: Will | None = None,
) -> bytes:
    """CONNECT (§3.1) without user name or password, with an optional last will (no will
    properties).

    The properties: Session Expiry Interval (§3.1.2.11.2; omitted when 0, its default),
    Receive Maximum (§3.1.2.11.3; how many QoS 1 deliveries may wait for our PUBACK) and
    Maximum Packet Size (§3.1.2.11.4; what the decoder accepts), each omitted when None."""
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError(f"keep-alive {keepalive_s} s is out of range 0..65535")
    if receive_maximum is not None and not 1 <= receive_maximum <= 0xFFFF:
        raise ValueError(f"receive maximum {receive_maximum} is out of range 1..65535")
    properties = bytearray()
    if session_expiry_s:
        properties += struct.pack(">BI", _P_SESSION_EXPIRY, session_expiry_s)
    if receive_maximum is not None:
        properties += struct.pack(">BH", _P_RECEIVE_MAXIMUM, receive_maximum)
    if maximum_packet_size is not None:
        properties += struct.pack(">BI", _P_MAXIMUM_PACKET_SIZE, maximum_packet_size)
    # §3.1.2.1-3.1.2.10: protocol name "MQTT", version 5, connect flags (Clean Start, bit 1;
    # the will's flag, QoS and retain, bits 2-5), keep-alive in seconds; then the properties
    # and the payload (the client id, then the will: no properties, its topic and payload).
    flags = 0x02 if clean_start else 0x00
    payload = encode_utf8(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += b"\x00" + encode_utf8(will.topic) + encode_binary(will.payload)
    body = (
        b"\x00\x04MQTT\x05"
        + bytes((flags,))
        + keepalive_s.to_bytes(2, "big")
        + encode_varint(len(properties))
        + properties
        + payload
    )
    return bytes((_CONNECT,)) + encode_varint(len(body)) + body


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (§3.8): ``filters`` as (topic filter, maximum QoS). The other subscription
    options (No Local, Retain As Published, Retain Handling, §3.8.3.1) stay 0: retained
    messages are sent at subscribe, as this client wants them."""
    if not filters:
        raise ValueError("SUBSCRIBE needs at least one topic filter (§3.8.3)")
    payload = bytearray()
    for topic_filter, qos in filters:
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS {qos} for {topic_filter!r} is not 0, 1 or 2")
        payload += encode_utf8(topic_filter)
        payload.append(qos)
    body = _packet_id(packet_id) + b"\x00" + payload  # no properties
    return bytes((_SUBSCRIBE,)) + encode_varint(len(body)) + body


def encode_unsubscribe(packet_id: int, filters: list[str]) -> bytes:
    """UNSUBSCRIBE (§3.10)."""
    if not filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter (§3.10.3)")
    body = _packet_id(packet_id) + b"\x00" + b"".join(encode_utf8(f) for f in filters)
    return bytes((_UNSUBSCRIBE,)) + encode_varint(len(body)) + body


def encode_puback(packet_id: int) -> bytes:
    """PUBACK (§3.4) with reason 0x00 (Success): §3.4.2.1 lets the reason code and the
    properties be left out then, so it is 4 bytes."""
    return _PUBACK_STRUCT.pack(_PUBACK, 2, packet_id)


def _packet_id(packet_id: int) -> bytes:
    # §2.2.1: a packet identifier is a non-zero two byte integer.
    if not 1 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} is out of range 1..65535")
    return packet_id.to_bytes(2, "big")


def encode_utf8(text: str) -> bytes:
    """A UTF-8 Encoded String (§1.5.4): two byte length, then the bytes."""
    return encode_binary(text.encode())


def encode_binary(data: bytes) -> bytes:
    """Binary Data (§1.5.6): two byte length, then the bytes."""
    if len(data) > 0xFFFF:
        raise ValueError(f"{len(data)} bytes do not fit an MQTT string or binary field")
    return len(data).to_bytes(2, "big") + data


def encode_varint(value: int) -> bytes:
    """A Variable Byte Integer (§1.5.5): 7 bits per byte, least significant first."""
    if not 0 <= value <= _MAX_VARINT:
        raise ValueError(f"{value} does not fit a Variable Byte Integer")
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


# --- decoder -------------------------------------------------------------------------------


class Decoder:
    """Turns the broker's byte stream into packets, whatever the chunking.

    ``feed(chunk)`` returns the packets the chunk completes, in order; an incomplete packet at
    the end waits for the next chunk. After :class:`MqttProtocolError` the stream is lost (the
    decoder cannot know where the next packet starts): drop the connection and this decoder.
    """

    __slots__ = ("_max", "_need", "_tail")

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        self._max = max_packet_size
        #: The start of a packet not complete yet, from the chunks before.
        self._tail = bytearray()
        #: How long the tail must grow before parsing it can make progress.
        self._need = 0

    def feed(self, chunk: bytes) -> list[Packet]:
        tail = self._tail
        if tail:
            tail += chunk
            if len(tail) < self._need:
                return []  # a large packet arriving piecewise: no re-parsing per piece
            chunk = bytes(tail)
            tail.clear()
        packets: list[Packet] = []
        done = self._parse(chunk, packets)
        if done < len(chunk):
            tail += memoryview(chunk)[done:]
        return packets

    def _parse(self, data: bytes, out: list[Packet]) -> int:
        """Append the complete packets of ``data`` to ``out``; return where the first
        incomplete one starts (``len(data)`` when there is none) and set ``_need``."""
        end = len(data)
        pos = 0
        append = out.append
        limit = self._max
        try:
            while True:
                # Fixed header (§2.1.1): type and flags, then the Remaining Length (§2.1.4).
                if end - pos < 2:
                    self._need = 2
                    return pos
                first = data[pos]
                length = data[pos + 1]
                start = pos + 2
                if length & 0x80:
                    length, start = _remaining_length(data, pos + 1, end)
                    if length < 0:
                        self._need = start - pos
                        return pos
                stop = start + length
                if stop - pos > limit:
                    raise MqttProtocolError(
                        f"packet of {stop - pos} bytes is larger than the {limit} bytes this "
                        "client accepts (Maximum Packet Size, §3.1.2.11.4)"
                    )
                if stop > end:
                    self._need = stop - pos
                    return pos
                if first >> 4 == _T_PUBLISH:
                    append(_publish(first, data, start, stop))
                else:
                    append(_control(first, data[start:stop]))
                pos = stop
        except IndexError:
            raise MqttProtocolError("packet fields run past the end of the packet") from None
        except UnicodeDecodeError as exc:
            raise MqttProtocolError(f"string is not valid UTF-8 (§1.5.4): {exc}") from None


def _remaining_length(data: bytes, at: int, end: int) -> tuple[int, int]:
    """The Remaining Length (§1.5.5, §2.1.4) at ``at`` and the position after it; when
    ``data`` ends before it does, -1 and the position one past the end."""
    value = 0
    shift = 0
    while True:
        if at >= end:
            return -1, at + 1
        digit = data[at]
        at += 1
        value |= (digit & 0x7F) << shift
        if not digit & 0x80:
            return value, at
        shift += 7
        if shift > 21:
            raise MqttProtocolError("Remaining Length longer than 4 bytes (§1.5.5): malformed")


def _publish(first: int, data: bytes, start: int, stop: int) -> Publish:
    """PUBLISH (§3.3) in ``data[start:stop]``: topic, packet id (QoS > 0), properties (skipped
    by their length), payload. Reads past ``stop`` are caught by the final bound check."""
    qos = (first >> 1) & 3
    at = start + 2 + ((data[start] << 8) | data[start + 1])
    topic = data[start + 2 : at].decode()
    if qos:
        if qos == 3:
            raise MqttProtocolError("PUBLISH with QoS 3 (§3.3.1.2)")
        packet_id = (data[at] << 8) | data[at + 1]
        at += 2
        if not packet_id:
            raise MqttProtocolError("PUBLISH with packet identifier 0 (§2.2.1)")
    else:
        packet_id = 0
    skip = data[at]
    if skip & 0x80:
        skip, at = _read_varint(data, at, stop)
        at += skip
    else:
        at += 1 + skip
    if at > stop:
        raise MqttProtocolError("PUBLISH fields run past its Remaining Length")
    if not topic or "\x00" in topic:
        # Empty is only valid with a Topic Alias (§3.3.2.3.4), which this client does not
        # allow (no Topic Alias Maximum in CONNECT); U+0000 is never valid (§1.5.4).
        raise MqttProtocolError(f"PUBLISH with invalid topic name {topic!r}")
    return Publish(topic, data[at:stop], qos, packet_id, bool(first & 1), bool(first & 8))


def _control(first: int, body: bytes) -> Packet:
    """Every packet but PUBLISH, ``body`` being what follows its fixed header: rare, so parsed
    for clarity rather than speed."""
    kind = first >> 4
    if kind not in _CONTROL_TYPES:
        name = _TYPE_NAMES.get(kind, f"type {kind}")
        raise MqttProtocolError(f"unexpected packet {name} from the broker (§2.1.2)")
    if first & 0x0F:
        raise MqttProtocolError(
            f"packet type {kind} with reserved flags {first & 0x0F:#x} (§2.1.3)"
        )
    if kind == _T_CONNACK:
        # §3.2.2: acknowledge flags (only bit 0, Session Present), reason code, properties.
        flags, reason = body[0], body[1]
        if flags & 0xFE:
            raise MqttProtocolError(f"CONNACK with reserved flags {flags:#x} (§3.2.2.1)")
        props, _ = _properties(body, 2)
        keep_alive = props.get(_P_SERVER_KEEP_ALIVE)
        return ConnAck(
            bool(flags), reason, keep_alive if isinstance(keep_alive, int) else None, _text(props)
        )
    if kind in (_T_SUBACK, _T_UNSUBACK):
        # §3.9.2 / §3.11.2: packet id, properties; the payload is one reason code per filter.
        packet_id = (body[0] << 8) | body[1]
        props, at = _properties(body, 2)
        codes = tuple(body[at:])
        if not codes:
            raise MqttProtocolError("SUBACK or UNSUBACK without reason codes (§3.9.3, §3.11.3)")
        if kind == _T_SUBACK:
            return SubAck(packet_id, codes, _text(props))
        return UnsubAck(packet_id, codes, _text(props))
    if kind == _T_PINGRESP:
        if body:
            raise MqttProtocolError("PINGRESP with a Remaining Length (§3.13.1)")
        return _PINGRESP
    if kind == _T_DISCONNECT:
        # §3.14.2.1: without a reason code it is 0x00; without properties there are none.
        if not body:
            return Disconnect(0)
        props, _ = _properties(body, 1) if len(body) > 1 else ({}, 1)
        return Disconnect(body[0], _text(props))
    raise AssertionError(f"packet type {kind} is in _CONTROL_TYPES but not handled")


def _text(props: dict[int, int | str]) -> str | None:
    value = props.get(_P_REASON_STRING)
    return value if isinstance(value, str) else None


def _read_varint(data: bytes, at: int, stop: int) -> tuple[int, int]:
    """A Variable Byte Integer (§1.5.5) at ``at``; returns it and the position after it."""
    value = 0
    shift = 0
    while True:
        if at >= stop:
            raise MqttProtocolError("Variable Byte Integer runs past the end of the packet")
        digit = data[at]
        at += 1
        value |= (digit & 0x7F) << shift
        if not digit & 0x80:
            return value, at
        shift += 7
        if shift > 21:
            raise MqttProtocolError("Variable Byte Integer longer than 4 bytes (§1.5.5)")


def _properties(body: bytes, at: int) -> tuple[dict[int, int | str], int]:
    """The properties (§2.2.2) at ``at``: integer and string values by identifier, and the
    position after them. Binary values and User Properties are checked for their length and
    skipped: nothing here needs them."""
    length, at = _read_varint(body, at, len(body))
    end = at + length
    if end > len(body):
        raise MqttProtocolError("properties run past the end of the packet (§2.2.2.1)")
    found: dict[int, int | str] = {}
    while at < end:
        ident = body[at]
        kind = _PROPERTY_TYPES.get(ident)
        at += 1
        if kind is None:
            raise MqttProtocolError(f"unknown property identifier {ident:#04x} (§2.2.2.2)")
        if kind == _BYTE:
            found[ident] = body[at]
            at += 1
        elif kind == _TWO:
            found[ident] = int.from_bytes(body[at : at + 2], "big")
            at += 2
        elif kind == _FOUR:
            found[ident] = int.from_bytes(body[at : at + 4], "big")
            at += 4
        elif kind == _VARINT:
            found[ident], at = _read_varint(body, at, end)
        else:
            # Strings, binary data and string pairs are two byte length prefixed (§1.5.4,
            # §1.5.6, §1.5.7); a pair is two strings.
            after = at + 2 + int.from_bytes(body[at : at + 2], "big")
            if kind == _PAIR:
                after += 2 + int.from_bytes(body[after : after + 2], "big")
            elif kind == _UTF8:
                found[ident] = body[at + 2 : after].decode()
            at = after
        if at > end:
            raise MqttProtocolError(f"property {ident:#04x} runs past the properties (§2.2.2)")
    return found, end
