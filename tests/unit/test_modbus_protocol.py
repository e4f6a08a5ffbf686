"""Modbus RTU requests byte by byte, and every way a reply can be right or wrong.

Reply frames here get their CRC from a plain bitwise CRC-16/MODBUS written out below, not from
the module under test, so a wrong CRC in the code cannot agree with itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.errors import BridgeError, ConfigError, ProtocolViolation, RequestRefused
from firmware_bridge.modbus import protocol
from firmware_bridge.modbus.protocol import Function, WriteEcho


def reference_crc(data: bytes) -> bytes:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return bytes((crc & 0xFF, crc >> 8))


def framed(hex_text: str) -> bytes:
    body = bytes.fromhex(hex_text)
    return body + reference_crc(body)


# ---------------------------------------------------------------------------------------------
# Requests


@pytest.mark.parametrize(
    ("request_", "wire"),
    [
        (protocol.read_coils(1, 0, 8), "01 01 00 00 00 08 3D CC"),
        (protocol.read_discrete_inputs(1, 0, 8), "01 02 00 00 00 08 79 CC"),
        (protocol.read_holding_registers(1, 0, 10), "01 03 00 00 00 0A C5 CD"),
        (protocol.read_input_registers(1, 0, 1), "01 04 00 00 00 01 31 CA"),
        (protocol.write_coil(1, 0, True), "01 05 00 00 FF 00 8C 3A"),
        (protocol.write_coil(1, 0, False), "01 05 00 00 00 00 CD CA"),
        (protocol.write_register(1, 1, 3), "01 06 00 01 00 03 98 0B"),
        # The examples of the Modbus specification / simplymodbus.ca, unit 17.
        (protocol.read_coils(17, 0x13, 0x25), "11 01 00 13 00 25 0E 84"),
        (protocol.read_holding_registers(17, 0x6B, 3), "11 03 00 6B 00 03 76 87"),
    ],
)
def test_request_frames_are_byte_exact(request_: protocol.Request, wire: str) -> None:
    assert request_.encode() == bytes.fromhex(wire)


@given(st.binary(max_size=64))
def test_crc_is_modbus_crc16(data: bytes) -> None:
    assert protocol.crc16(data) == reference_crc(data)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: protocol.read_coils(0, 0, 1), "unit"),
        (lambda: protocol.read_coils(248, 0, 1), "unit"),
        (lambda: protocol.read_coils(1, -1, 1), "address"),
        (lambda: protocol.read_coils(1, 0x10000, 1), "address"),
        (lambda: protocol.read_coils(1, 0, 0), "count"),
        (lambda: protocol.read_coils(1, 0, 2001), "count"),
        (lambda: protocol.read_input_registers(1, 0, 126), "count"),
        (lambda: protocol.read_input_registers(1, 0xFFFF, 2), "count"),
        (lambda: protocol.write_register(1, 0, 0x10000), "value"),
        (lambda: protocol.write_register(1, 0, -1), "value"),
        (lambda: protocol.write_coil(1, 0x10000, True), "address"),
    ],
)
def test_impossible_requests_name_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        make()


# ---------------------------------------------------------------------------------------------
# Replies that are right


def test_coils_reply_gives_exactly_the_bits_asked_for() -> None:
    receiver = protocol.read_coils(1, 0, 10).receiver()
    # 0xCD = 1100 1101 (coil 0 is the lowest bit), 0x01: coil 8 on, coil 9 off.
    on = receiver.feed(framed("01 01 02 CD 01"))
    assert on == (True, False, True, True, False, False, True, True, True, False)


def test_registers_reply_gives_the_words() -> None:
    receiver = protocol.read_input_registers(1, 0, 2).receiver()
    assert receiver.feed(framed("01 04 04 04 D2 FF FF")) == (1234, 0xFFFF)


def test_write_echo_is_verified() -> None:
    coil = protocol.write_coil(1, 3, True)
    assert coil.receiver().feed(coil.encode()) == WriteEcho(Function.WRITE_SINGLE_COIL, 3, 0xFF00)
    register = protocol.write_register(1, 10, 50)
    assert register.receiver().feed(register.encode()) == WriteEcho(
        Function.WRITE_SINGLE_REGISTER, 10, 50
    )


def test_short_reply_waits_for_the_rest() -> None:
    reply = framed("01 03 04 00 01 00 02")
    receiver = protocol.read_holding_registers(1, 0, 2).receiver()
    for i in range(len(reply) - 1):
        assert receiver.feed(reply[i : i + 1]) is None
    assert receiver.feed(reply[-1:]) == (1, 2)


# ---------------------------------------------------------------------------------------------
# Replies that are wrong


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (1, "illegal function"),
        (2, "illegal data address"),
        (3, "illegal data value"),
        (4, "server device failure"),
        (6, "server device busy"),
        (0x42, "unknown exception"),
    ],
)
def test_exception_reply_is_a_refusal_with_its_name(code: int, name: str) -> None:
    receiver = protocol.read_input_registers(1, 0, 2).receiver()
    with pytest.raises(RequestRefused, match=name) as caught:
        receiver.feed(framed(f"01 84 {code:02X}"))
    assert caught.value.reason == f"modbus_exception_{code}"
    assert "read input registers 0..1" in str(caught.value)


def test_bad_crc() -> None:
    reply = bytearray(framed("01 01 01 05"))
    reply[-1] ^= 0x01
    with pytest.raises(ProtocolViolation) as caught:
        protocol.read_coils(1, 0, 8).receiver().feed(bytes(reply))
    assert caught.value.reason == "bad_crc"


def test_corrupted_data_byte_is_a_bad_crc() -> None:
    reply = bytearray(framed("01 04 02 04 D2"))
    reply[3] ^= 0x10
    with pytest.raises(ProtocolViolation) as caught:
        protocol.read_input_registers(1, 0, 1).receiver().feed(bytes(reply))
    assert caught.value.reason == "bad_crc"


def test_reply_from_another_unit() -> None:
    with pytest.raises(ProtocolViolation, match="unit 2") as caught:
        protocol.read_coils(1, 0, 8).receiver().feed(framed("02 01 01 05"))
    assert caught.value.reason == "wrong_unit"


@pytest.mark.parametrize(
    "reply",
    [
        framed("01 03 02 00 07"),  # holding registers for an input-register read
        framed("01 83 02"),  # the exception of another function
        framed("01 06 00 01 00 03"),  # a write echo
    ],
)
def test_reply_of_another_function(reply: bytes) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        protocol.read_input_registers(1, 0, 1).receiver().feed(reply)
    assert caught.value.reason == "wrong_function"


def test_function_code_that_cannot_be_framed_fails_at_once() -> None:
    # FC 0x2B has no length the receiver could wait for; it must not wait for a timeout.
    with pytest.raises(ProtocolViolation) as caught:
        protocol.read_coils(1, 0, 8).receiver().feed(bytes.fromhex("01 2B"))
    assert caught.value.reason == "wrong_function"


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (protocol.read_coils(1, 0, 8), framed("01 01 02 05 00")),
        (protocol.read_coils(1, 0, 9), framed("01 01 01 05")),
        (protocol.read_input_registers(1, 0, 2), framed("01 04 02 00 07")),
        (protocol.read_input_registers(1, 0, 1), framed("01 04 03 00 07 00")),
    ],
)
def test_byte_count_other_than_asked(request_: protocol.ReadBits, reply: bytes) -> None:
    receiver = request_.receiver()
    with pytest.raises(ProtocolViolation) as caught:
        # Three bytes are enough to know: no waiting for the bytes it announces.
        receiver.feed(reply[:3])
    assert caught.value.reason == "bad_length"


def test_over_long_reply() -> None:
    with pytest.raises(ProtocolViolation) as caught:
        protocol.read_coils(1, 0, 8).receiver().feed(framed("01 01 01 05") + b"\x00")
    assert caught.value.reason == "overlong"


def test_bytes_after_a_complete_reply_are_over_long() -> None:
    receiver = protocol.read_coils(1, 0, 8).receiver()
    assert receiver.feed(framed("01 01 01 05")) is not None
    with pytest.raises(ProtocolViolation) as caught:
        receiver.feed(b"\x00")
    assert caught.value.reason == "overlong"


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (protocol.write_coil(1, 3, True), framed("01 05 00 03 00 00")),  # value
        (protocol.write_coil(1, 3, True), framed("01 05 00 04 FF 00")),  # address
        (protocol.write_register(1, 10, 50), framed("01 06 00 0A 00 33")),
    ],
)
def test_write_echo_that_differs(
    request_: protocol.WriteCoil | protocol.WriteRegister, reply: bytes
) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        request_.receiver().feed(reply)
    assert caught.value.reason == "bad_echo"


# ---------------------------------------------------------------------------------------------
# Properties

REQUESTS: list[protocol.Request] = [
    protocol.read_coils(1, 0, 5),
    protocol.read_discrete_inputs(1, 0, 16),
    protocol.read_holding_registers(1, 10, 1),
    protocol.read_input_registers(1, 0, 4),
    protocol.write_coil(1, 2, False),
    protocol.write_register(1, 10, 30),
]


class _Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def errors_logged() -> Iterator[list[logging.LogRecord]]:
    """Collect records at ERROR or above from every logger (pymodbus logs on its own)."""
    handler = _Collected()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


@given(
    index=st.integers(0, len(REQUESTS) - 1),
    chunks=st.lists(st.binary(min_size=1, max_size=12), max_size=12),
)
def test_any_bytes_give_a_result_none_or_a_bridge_error(index: int, chunks: list[bytes]) -> None:
    receiver = REQUESTS[index].receiver()
    with errors_logged() as logged:
        for chunk in chunks:
            try:
                receiver.feed(chunk)
            except BridgeError:
                break
    assert logged == []


@given(
    index=st.integers(0, len(REQUESTS) - 1),
    prefix=st.binary(min_size=2, max_size=3),
    rest=st.binary(max_size=260),
)
def test_plausible_frames_never_raise_anything_else(index: int, prefix: bytes, rest: bytes) -> None:
    # Start with the right unit and a function code, so the framing paths are all reached.
    receiver = REQUESTS[index].receiver()
    function = prefix[0] % 7 | (prefix[1] & 0x80)
    data = bytes([1, function]) + prefix[2:] + rest
    with suppress(BridgeError):
        receiver.feed(data + reference_crc(data))


@given(st.data())
def test_valid_bits_reply_round_trips_in_any_chunks(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 2000))
    bits = data.draw(st.lists(st.booleans(), min_size=count, max_size=count))
    packed = bytes(
        sum(1 << j for j, bit in enumerate(bits[i : i + 8]) if bit) for i in range(0, count, 8)
    )
    body = bytes([7, 2, len(packed)]) + packed
    reply = body + reference_crc(body)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(reply) - 1), max_size=5)))
    receiver = protocol.read_discrete_inputs(7, 100, count).receiver()
    pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)], strict=True)]
    results = [receiver.feed(piece) for piece in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert results[-1] == tuple(bits)


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125))
def test_valid_registers_reply_round_trips(words: list[int]) -> None:
    body = bytes([3, 4, 2 * len(words)]) + b"".join(w.to_bytes(2, "big") for w in words)
    receiver = protocol.read_input_registers(3, 0, len(words)).receiver()
    assert receiver.feed(body + reference_crc(body)) == tuple(words)
