"""Modbus RTU for the relay / IO board, sans-IO: requests to bytes, reply bytes to typed results.

A request is a small frozen record (:class:`ReadBits`, :class:`ReadRegisters`,
:class:`WriteCoil`, :class:`WriteRegister`); ``encode()`` gives the RTU frame (unit id, PDU,
CRC) and ``receiver()`` a fresh :class:`Reply` that is fed the answer's bytes until it returns
the decoded result (it satisfies :class:`firmware_bridge.link.Receiver`).

pymodbus builds the request frames (its PDU classes and ``FramerRTU.buildFrame``) and computes
the CRC. The reply is framed here, not by ``FramerRTU.decode``: that one hunts for a frame
through garbage and its behaviour changed between releases (3.9 waits for more bytes on a bad
CRC, 3.16 drops them). A master knows which one answer it waits for, so it can tell *bad CRC*,
*wrong unit*, *wrong function*, *bad length* and *over-long* apart and say so, instead of
waiting for a timeout. The PDUs of the six functions used are a few fixed layouts; decoding
them here keeps pymodbus's decoder (which logs and raises its own errors) out of the path of
bad device bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteSingleRegisterRequest,
)

from firmware_bridge.errors import ConfigError, ProtocolViolation, RequestRefused

T_co = TypeVar("T_co", covariant=True)

MAX_BITS = 2000
"""Most coils / discrete inputs one read may ask for (Modbus application protocol, 6.1)."""
MAX_REGISTERS = 125
"""Most registers one read may ask for."""
MAX_ADU = 256
"""Longest RTU frame: unit id, 253 bytes of PDU, CRC."""
_EXCEPTION_BIT = 0x80
_COIL_ON = 0xFF00
_COIL_OFF = 0x0000


class Function(enum.IntEnum):
    """The Modbus functions the board driver uses."""

    READ_COILS = 1
    READ_DISCRETE_INPUTS = 2
    READ_HOLDING_REGISTERS = 3
    READ_INPUT_REGISTERS = 4
    WRITE_SINGLE_COIL = 5
    WRITE_SINGLE_REGISTER = 6

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


EXCEPTION_NAMES = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge",
    0x06: "server device busy",
    0x07: "negative acknowledge",
    0x08: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}
"""Exception codes of the Modbus application protocol (section 7) by their standard names."""


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, "unknown exception")


def crc16(data: bytes) -> bytes:
    """The Modbus RTU CRC of ``data`` as it goes on the wire (low byte first)."""
    return FramerRTU.compute_CRC(data).to_bytes(2, "big")


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class WriteEcho:
    """A write the board confirmed by echoing it: the address and the 16-bit value written."""

    function: Function
    address: int
    value: int


@dataclass(frozen=True, slots=True)
class ReadBits:
    """Read ``count`` coils (FC1) or discrete inputs (FC2) from ``address`` on."""

    unit: int
    function: Literal[Function.READ_COILS, Function.READ_DISCRETE_INPUTS]
    address: int
    count: int

    def __post_init__(self) -> None:
        _check_unit(self.unit)
        _check_span(self.address, self.count, MAX_BITS)

    def describe(self) -> str:
        return f"unit {self.unit}: {self.function.label} {_span_text(self.address, self.count)}"

    def encode(self) -> bytes:
        cls = (
            ReadCoilsRequest if self.function is Function.READ_COILS else ReadDiscreteInputsRequest
        )
        return _frame(cls(dev_id=self.unit, address=self.address, count=self.count))

    def receiver(self) -> BitsReply:
        return BitsReply(self)


@dataclass(frozen=True, slots=True)
class ReadRegisters:
    """Read ``count`` holding (FC3) or input (FC4) registers from ``address`` on."""

    unit: int
    function: Literal[Function.READ_HOLDING_REGISTERS, Function.READ_INPUT_REGISTERS]
    address: int
    count: int

    def __post_init__(self) -> None:
        _check_unit(self.unit)
        _check_span(self.address, self.count, MAX_REGISTERS)

    def describe(self) -> str:
        return f"unit {self.unit}: {self.function.label} {_span_text(self.address, self.count)}"

    def encode(self) -> bytes:
        cls = (
            ReadHoldingRegistersRequest
            if self.function is Function.READ_HOLDING_REGISTERS
            else ReadInputRegistersRequest
        )
        return _frame(cls(dev_id=self.unit, address=self.address, count=self.count))

    def receiver(self) -> RegistersReply:
        return RegistersReply(self)


@dataclass(frozen=True, slots=True)
class WriteCoil:
    """Switch one coil (FC5)."""

    unit: int
    address: int
    on: bool

    function = Function.WRITE_SINGLE_COIL

    def __post_init__(self) -> None:
        _check_unit(self.unit)
        _check_span(self.address, 1, 1)

    def describe(self) -> str:
        return f"unit {self.unit}: write coil {self.address} {'on' if self.on else 'off'}"

    @property
    def value(self) -> int:
        return _COIL_ON if self.on else _COIL_OFF

    def encode(self) -> bytes:
        return _frame(
            WriteSingleCoilRequest(dev_id=self.unit, address=self.address, bits=[self.on])
        )

    def receiver(self) -> EchoReply:
        return EchoReply(self, self.address, self.value)


@dataclass(frozen=True, slots=True)
class WriteRegister:
    """Write one holding register (FC6)."""

    unit: int
    address: int
    value: int

    function = Function.WRITE_SINGLE_REGISTER

    def __post_init__(self) -> None:
        _check_unit(self.unit)
        _check_span(self.address, 1, 1)
        if isinstance(self.value, bool) or not 0 <= self.value <= 0xFFFF:
            raise ConfigError(f"value: {self.value!r} is not a register value 0..65535")

    def describe(self) -> str:
        return f"unit {self.unit}: write register {self.address} = {self.value}"

    def encode(self) -> bytes:
        return _frame(
            WriteSingleRegisterRequest(
                dev_id=self.unit, address=self.address, registers=[self.value]
            )
        )

    def receiver(self) -> EchoReply:
        return EchoReply(self, self.address, self.value)


def read_coils(unit: int, address: int, count: int) -> ReadBits:
    return ReadBits(unit, Function.READ_COILS, address, count)


def read_discrete_inputs(unit: int, address: int, count: int) -> ReadBits:
    return ReadBits(unit, Function.READ_DISCRETE_INPUTS, address, count)


def read_holding_registers(unit: int, address: int, count: int) -> ReadRegisters:
    return ReadRegisters(unit, Function.READ_HOLDING_REGISTERS, address, count)


def read_input_registers(unit: int, address: int, count: int) -> ReadRegisters:
    return ReadRegisters(unit, Function.READ_INPUT_REGISTERS, address, count)


def write_coil(unit: int, address: int, on: bool) -> WriteCoil:
    return WriteCoil(unit, address, on)


def write_register(unit: int, address: int, value: int) -> WriteRegister:
    return WriteRegister(unit, address, value)


Request = ReadBits | ReadRegisters | WriteCoil | WriteRegister


class ModbusRequest(Protocol[T_co]):
    """Any request above: its frame, and a fresh receiver for its reply of type ``T_co``."""

    def encode(self) -> bytes: ...

    def receiver(self) -> Reply[T_co]: ...


def _check_unit(unit: int) -> None:
    # 0 is broadcast (no reply ever comes), 248..255 are reserved.
    if isinstance(unit, bool) or not isinstance(unit, int) or not 1 <= unit <= 247:
        raise ConfigError(f"unit: {unit!r} is not a Modbus unit id 1..247")


def _check_span(address: int, count: int, most: int) -> None:
    if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address <= 0xFFFF:
        raise ConfigError(f"address: {address!r} is not in 0..65535")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= most:
        raise ConfigError(f"count: {count!r} is not in 1..{most}")
    if address + count > 0x10000:
        raise ConfigError(f"count: {count} from address {address} runs past 65535")


def _span_text(address: int, count: int) -> str:
    return str(address) if count == 1 else f"{address}..{address + count - 1}"


def _frame(pdu: ModbusPDU) -> bytes:
    try:
        return FramerRTU(DecodePDU(False)).buildFrame(pdu)
    except (ModbusException, ValueError, struct.error) as exc:
        # Arguments are checked above; this is pymodbus disagreeing with that check.
        raise ConfigError(f"cannot encode {pdu.__class__.__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Replies


class Reply(Generic[T_co]):
    """The reply to one request; ``feed`` returns the result once the whole frame is there.

    Checks, in order: CRC, unit id, function code, nothing after the frame, Modbus exception,
    then the payload (the echo of a write). A read reply announcing another byte count than the
    one asked for is refused as soon as that count arrives. A receiver is good for one reply;
    bytes fed after it returned are over-long.
    """

    def __init__(self, request: Request) -> None:
        self._request = request
        self._unit = request.unit
        self._function = int(request.function)
        self._buffer = bytearray()
        self._done = False

    def feed(self, data: bytes) -> T_co | None:
        if self._done:
            raise self._violation(f"{len(data)} bytes after the complete reply", "overlong")
        self._buffer += data
        length = self._frame_length()
        if length is None or len(self._buffer) < length:
            return None
        frame = bytes(self._buffer[:length])
        if not FramerRTU.check_CRC(frame[:-2], int.from_bytes(frame[-2:], "big")):
            raise self._violation(
                f"bad CRC {frame[-2:].hex()} (computed {crc16(frame[:-2]).hex()})", "bad_crc"
            )
        if frame[0] != self._unit:
            raise self._violation(f"reply from unit {frame[0]}", "wrong_unit")
        function = frame[1]
        if function not in (self._function, self._function | _EXCEPTION_BIT):
            raise self._violation(f"reply with function code {function}", "wrong_function")
        if len(self._buffer) > length:
            raise self._violation(
                f"{len(self._buffer) - length} bytes after a {length}-byte reply", "overlong"
            )
        self._done = True
        if function & _EXCEPTION_BIT:
            code = frame[2]
            raise RequestRefused(
                f"{self._request.describe()}: refused with Modbus exception {code} "
                f"({exception_name(code)})",
                reason=f"modbus_exception_{code}",
            )
        return self._decode(frame[2:-2])

    def _frame_length(self) -> int | None:
        """Length of the frame in the buffer, or None while that is not known yet."""
        if len(self._buffer) < 2:
            return None
        function = self._buffer[1]
        if function & _EXCEPTION_BIT:
            return 5  # unit, function | 0x80, exception code, CRC
        if function in (1, 2, 3, 4):
            if len(self._buffer) < 3:
                return None
            byte_count = self._buffer[2]
            if function == self._function:
                self._check_byte_count(byte_count)
            return 3 + byte_count + 2
        if function in (5, 6, 15, 16):
            return 8
        # A function whose frame length is unknown cannot be framed; it is not our answer.
        raise self._violation(f"reply with function code {function}", "wrong_function")

    def _check_byte_count(self, byte_count: int) -> None:
        """Raise for a byte count this request cannot have (read replies only)."""

    def _decode(self, payload: bytes) -> T_co:
        raise NotImplementedError

    def _violation(self, what: str, reason: str) -> ProtocolViolation:
        return ProtocolViolation(f"{self._request.describe()}: {what}", reason=reason)


class BitsReply(Reply[tuple[bool, ...]]):
    """Reply to FC1/FC2: ``count`` bits, first address first."""

    def __init__(self, request: ReadBits) -> None:
        super().__init__(request)
        self._count = request.count
        self._byte_count = (request.count + 7) // 8

    def _check_byte_count(self, byte_count: int) -> None:
        # A byte count other than the one asked for is wrong whatever the CRC says; waiting
        # for the bytes it announces could only end in a timeout.
        if byte_count != self._byte_count:
            raise self._violation(
                f"byte count {byte_count} for {self._count} bits (expected {self._byte_count})",
                "bad_length",
            )

    def _decode(self, payload: bytes) -> tuple[bool, ...]:
        data = payload[1:]
        return tuple(bool(data[i // 8] >> (i % 8) & 1) for i in range(self._count))


class RegistersReply(Reply[tuple[int, ...]]):
    """Reply to FC3/FC4: ``count`` 16-bit registers."""

    def __init__(self, request: ReadRegisters) -> None:
        super().__init__(request)
        self._count = request.count

    def _check_byte_count(self, byte_count: int) -> None:
        if byte_count != 2 * self._count:
            raise self._violation(
                f"byte count {byte_count} for {self._count} registers (expected {2 * self._count})",
                "bad_length",
            )

    def _decode(self, payload: bytes) -> tuple[int, ...]:
        return struct.unpack(f">{self._count}H", payload[1:])


class EchoReply(Reply[WriteEcho]):
    """Reply to FC5/FC6: the request's address and value, echoed."""

    def __init__(self, request: WriteCoil | WriteRegister, address: int, value: int) -> None:
        super().__init__(request)
        self._address = address
        self._value = value

    def _decode(self, payload: bytes) -> WriteEcho:
        address, value = struct.unpack(">HH", payload)
        if (address, value) != (self._address, self._value):
            raise self._violation(
                f"echo {address}={value:#06x}, wrote {self._address}={self._value:#06x}",
                "bad_echo",
            )
        return WriteEcho(Function(self._function), address, value)
