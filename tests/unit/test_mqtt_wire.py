"""The MQTT 5 codec of the server's subscriber, byte by byte: every packet we send against bytes
built from the standard (property blocks against paho's encoder), every packet the broker
sends decoded in any chunking, and every malformed input refused with a message naming it."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_server.errors import FleetServerError, MqttProtocolError
from fleet_server.mqtt_wire import (
    DISCONNECT,
    MAX_PACKET_SIZE,
    PINGREQ,
    ConnAck,
    Decoder,
    Disconnect,
    Packet,
    PingResp,
    Publish,
    SubAck,
    UnsubAck,
    encode_connect,
    encode_puback,
    encode_subscribe,
    encode_unsubscribe,
    reason_name,
)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def paho_properties(kind: int, **values: object) -> bytes:
    props = Properties(kind)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    return packed


def publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 1,
    packet_id: int = 1,
    retain: bool = False,
    dup: bool = False,
    properties: bytes = b"\x00",
) -> bytes:
    first = 0x30 | (dup << 3) | (qos << 1) | retain
    pid = packet_id.to_bytes(2, "big") if qos else b""
    return packet(first, utf8(topic) + pid + properties + payload)


def decode_all(data: bytes) -> list[Packet]:
    return Decoder().feed(data)


# --- encoders ------------------------------------------------------------------------------


def test_connect_is_the_standards_bytes_with_pahos_property_block() -> None:
    props = paho_properties(
        PacketTypes.CONNECT,
        SessionExpiryInterval=86400,
        ReceiveMaximum=200,
        MaximumPacketSize=MAX_PACKET_SIZE,
    )
    body = b"\x00\x04MQTT\x05" + b"\x00" + (30).to_bytes(2, "big") + props + utf8("fleet-server-1")
    assert encode_connect(
        "fleet-server-1",
        clean_start=False,
        keepalive_s=30,
        session_expiry_s=86400,
        receive_maximum=200,
    ) == packet(0x10, body)


def test_connect_with_clean_start_and_no_session_expiry_leaves_the_default_out() -> None:
    data = encode_connect(
        "c", clean_start=True, keepalive_s=5, session_expiry_s=0, receive_maximum=1
    )
    props = paho_properties(
        PacketTypes.CONNECT, ReceiveMaximum=1, MaximumPacketSize=MAX_PACKET_SIZE
    )
    assert data == packet(0x10, b"\x00\x04MQTT\x05\x02\x00\x05" + props + utf8("c"))


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"keepalive_s": 70000}, "keep-alive"),
        ({"receive_maximum": 0}, "receive maximum"),
    ],
)
def test_connect_refuses_values_mqtt_cannot_carry(kwargs: dict[str, int], problem: str) -> None:
    values = {"keepalive_s": 30, "session_expiry_s": 0, "receive_maximum": 10} | kwargs
    with pytest.raises(ValueError, match=problem):
        encode_connect(
            "c",
            clean_start=False,
            keepalive_s=values["keepalive_s"],
            session_expiry_s=values["session_expiry_s"],
            receive_maximum=values["receive_maximum"],
        )


def test_subscribe_carries_each_filter_with_its_qos() -> None:
    filters = [("kiosk/v1/+/state", 1), ("$share/fleet/kiosk/v1/+/telemetry", 0)]
    body = (
        b"\x00\x07"  # packet id
        + b"\x00"  # no properties
        + utf8("kiosk/v1/+/state")
        + b"\x01"
        + utf8("$share/fleet/kiosk/v1/+/telemetry")
        + b"\x00"
    )
    assert encode_subscribe(7, filters) == packet(0x82, body)


def test_unsubscribe_carries_the_filters() -> None:
    body = b"\x01\x00\x00" + utf8("a/b") + utf8("$share/g/c/#")
    assert encode_unsubscribe(256, ["a/b", "$share/g/c/#"]) == packet(0xA2, body)


def test_puback_is_the_short_four_byte_form() -> None:
    assert encode_puback(1) == b"\x40\x02\x00\x01"
    assert encode_puback(0xFFFF) == b"\x40\x02\xff\xff"


def test_pingreq_and_disconnect_are_their_fixed_two_bytes() -> None:
    assert PINGREQ == b"\xc0\x00"
    assert DISCONNECT == b"\xe0\x00"


@pytest.mark.parametrize("packet_id", [0, 65536])
def test_packet_ids_out_of_range_are_refused(packet_id: int) -> None:
    with pytest.raises(ValueError, match="packet identifier"):
        encode_subscribe(packet_id, [("a", 1)])
    with pytest.raises(ValueError, match="packet identifier"):
        encode_unsubscribe(packet_id, ["a"])


def test_subscribe_refuses_no_filters_and_bad_qos() -> None:
    with pytest.raises(ValueError, match="at least one"):
        encode_subscribe(1, [])
    with pytest.raises(ValueError, match="QoS 3"):
        encode_subscribe(1, [("a", 3)])
    with pytest.raises(ValueError, match="at least one"):
        encode_unsubscribe(1, [])


def test_a_long_remaining_length_is_a_multi_byte_varint() -> None:
    topic_filter = "t" * 200
    data = encode_unsubscribe(1, [topic_filter])
    assert data[1:3] == varint(2 + 1 + 2 + 200) == b"\xcd\x01"


# --- decoder: what the broker sends -------------------------------------------------------

CONNACK_PROPS = paho_properties(
    PacketTypes.CONNACK,
    ServerKeepAlive=20,
    ReasonString="welcome",
    ReceiveMaximum=100,
    MaximumPacketSize=1 << 20,
    TopicAliasMaximum=10,
    AssignedClientIdentifier="x",
    UserProperty=[("k", "v")],
    SharedSubscriptionAvailable=1,
)
PUBLISH_PROPS = paho_properties(
    PacketTypes.PUBLISH,
    PayloadFormatIndicator=1,
    MessageExpiryInterval=60,
    ContentType="application/json",
    ResponseTopic="kiosk/v1/t/cmd-result",
    CorrelationData=b"\x00\x01",
    UserProperty=[("a", "b"), ("c", "d")],
    SubscriptionIdentifier=[300],
)

STREAM: list[tuple[bytes, Packet]] = [
    (
        packet(0x20, b"\x01\x00" + CONNACK_PROPS),
        ConnAck(session_present=True, reason_code=0, server_keep_alive=20, reason_string="welcome"),
    ),
    (
        publish("kiosk/v1/t-1/telemetry", b'{"seq":1}', packet_id=1, properties=PUBLISH_PROPS),
        Publish("kiosk/v1/t-1/telemetry", b'{"seq":1}', 1, 1, False, False),
    ),
    (
        publish("kiosk/v1/t-1/state", b"x" * 1400, packet_id=65535, retain=True, dup=True),
        Publish("kiosk/v1/t-1/state", b"x" * 1400, 1, 65535, True, True),
    ),
    (
        publish("kiosk/v1/終端/events", b"", qos=0),
        Publish("kiosk/v1/終端/events", b"", 0, 0, False, False),
    ),
    (packet(0x90, b"\x00\x02\x00\x01\x01\x87"), SubAck(2, (1, 1, 0x87))),
    (
        packet(
            0xB0,
            b"\x00\x03" + paho_properties(PacketTypes.UNSUBACK, ReasonString="ok") + b"\x00\x11",
        ),
        UnsubAck(3, (0, 0x11), "ok"),
    ),
    (b"\xd0\x00", PingResp()),
    (b"\xe0\x00", Disconnect(0)),
    (b"\xe0\x01\x8b", Disconnect(0x8B)),
    (
        packet(0xE0, b"\x8e" + paho_properties(PacketTypes.DISCONNECT, ReasonString="taken")),
        Disconnect(0x8E, "taken"),
    ),
]
STREAM_BYTES = b"".join(data for data, _ in STREAM)
STREAM_PACKETS = [p for _, p in STREAM]


@pytest.mark.parametrize(("data", "expected"), STREAM)
def test_each_packet_decodes_on_its_own(data: bytes, expected: Packet) -> None:
    assert decode_all(data) == [expected]


def test_connack_without_properties_of_interest() -> None:
    assert decode_all(b"\x20\x03\x00\x87\x00") == [ConnAck(False, 0x87)]


def test_a_stream_fed_byte_by_byte_gives_the_same_packets() -> None:
    decoder = Decoder()
    packets: list[Packet] = []
    for byte in STREAM_BYTES:
        packets += decoder.feed(bytes((byte,)))
    assert packets == STREAM_PACKETS


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM_BYTES)), max_size=30))
def test_a_stream_in_any_chunking_gives_the_same_packets(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM_BYTES)]
    decoder = Decoder()
    packets: list[Packet] = []
    for start, stop in itertools.pairwise(bounds):
        packets += decoder.feed(STREAM_BYTES[start:stop])
    assert packets == STREAM_PACKETS


def test_hundreds_of_publishes_in_one_chunk_come_out_in_order() -> None:
    data = b"".join(publish("a/b", str(i).encode(), packet_id=i + 1) for i in range(500))
    split = random.Random(1).randrange(len(data))
    decoder = Decoder()
    packets = decoder.feed(data[:split]) + decoder.feed(data[split:])
    assert [p.packet_id for p in packets if isinstance(p, Publish)] == list(range(1, 501))
    assert [p.payload for p in packets if isinstance(p, Publish)][-1] == b"499"


def test_a_large_packet_in_small_pieces_is_parsed_once_complete() -> None:
    big = publish("a/b", b"z" * 300_000)
    decoder = Decoder()
    pieces = [big[i : i + 1000] for i in range(0, len(big), 1000)]
    assert all(decoder.feed(piece) == [] for piece in pieces[:-1])
    assert decoder.feed(pieces[-1]) == [Publish("a/b", b"z" * 300_000, 1, 1, False, False)]


# --- decoder: malformed input -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "Remaining Length longer than 4 bytes"),
        (b"\x00\x00", "reserved type 0"),
        (b"\xf0\x00", "AUTH"),
        (b"\x40\x02\x00\x01", "PUBACK"),
        (b"\x62\x02\x00\x01", "PUBREL"),
        (packet(0x32, utf8("a") + b"\x00\x01\x00" + b"x" * MAX_PACKET_SIZE), "larger than"),
        (packet(0x30, b"\x00\x02\xff\xfe\x00"), "not valid UTF-8"),
        (packet(0x30, b"\x00\x02a\x00\x00"), "invalid topic name"),
        (packet(0x32, b"\x00\x00\x00\x01\x00"), "invalid topic name"),
        (packet(0x36, utf8("a") + b"\x00\x01\x00"), "QoS 3"),
        (packet(0x32, utf8("a") + b"\x00\x00\x00"), "packet identifier 0"),
        (packet(0x32, utf8("a") + b"\x00\x01\x05"), "run past"),
        (packet(0x32, b"\x00\x09a"), "run past"),
        (b"\xd0\x01\x00", "PINGRESP with a Remaining Length"),
        (b"\xd1\x00", "reserved flags"),
        (b"\x20\x03\x02\x00\x00", "CONNACK with reserved flags"),
        (b"\x20\x05\x00\x00\x02\x7f\x00", "unknown property identifier 0x7f"),
        (b"\x20\x04\x00\x00\x05\x13", "properties run past"),
        (b"\x20\x05\x00\x00\x02\x13\x00", "property 0x13 runs past"),
        (b"\x20\x01\x00", "run past the end of the packet"),
        (b"\x90\x03\x00\x01\x00", "without reason codes"),
    ],
)
def test_malformed_input_is_refused_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(MqttProtocolError, match=problem):
        decode_all(data)


def test_the_size_limit_is_known_from_the_header_alone() -> None:
    header = b"\x32" + varint(MAX_PACKET_SIZE)
    with pytest.raises(MqttProtocolError, match="larger than"):
        Decoder().feed(header)
    with pytest.raises(MqttProtocolError, match="larger than"):
        Decoder(max_packet_size=100).feed(publish("a", b"x" * 100))


def test_protocol_errors_belong_to_the_servers_exception_tree() -> None:
    assert issubclass(MqttProtocolError, FleetServerError)


def test_reason_codes_are_named_for_operators() -> None:
    assert reason_name(0x87) == "0x87 Not authorized"
    assert reason_name(0x8E) == "0x8E Session taken over"
    assert reason_name(0x7A) == "0x7A unknown reason code"
