"""A simulated relay / IO board for tests and demos: a pymodbus server, RTU frames over TCP.

The board has the coils, discrete inputs, input registers and pulse registers of a
:class:`~firmware_bridge.modbus.board.BoardConfig` and nothing else (other register addresses
answer with Modbus exception 2). The driver reaches it with the pyserial URL
``socket://127.0.0.1:PORT`` (:attr:`SimulatedBoard.url`), exactly like a serial-to-Ethernet
converter in front of a real board.

Tests set the inputs and readings (``await board.set_door_open(True)``,
``await board.set_supply_voltage(10.8)``), look at every coil write with its time
(:attr:`SimulatedBoard.coil_writes`) and unplug the board (:meth:`SimulatedBoard.stop`; the
board keeps its state and its firmware keeps running) and plug it in again at the same port
(:meth:`SimulatedBoard.start`). Writing the off-time (0.1 s units) to a channel's pulse register
switches it off and, that long later, on again, as the board's firmware does.

Uses pymodbus's public server API of 3.16: ``SimDevice`` / ``SimData`` for the registers,
``server.async_getValues`` / ``async_setValues`` to change them while it runs, and
``trace_pdu`` to see the requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import WriteSingleCoilRequest
from pymodbus.pdu.register_message import WriteSingleRegisterRequest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_bridge.errors import ConfigError
from firmware_bridge.modbus.board import (
    BoardConfig,
    InputMeaning,
    PowerChannel,
    RegisterReading,
    contiguous_spans,
)

# Function codes through which the server's data store is read and written from here.
_COILS, _INPUTS, _HOLDING, _INPUT_REGISTERS = 5, 2, 6, 4


@dataclass(frozen=True, slots=True)
class CoilWrite:
    """A coil the board switched: asked over Modbus, or by its own pulse firmware."""

    at: float
    """Monotonic time."""
    coil: int
    channel: str | None
    level: bool
    power_on: bool | None
    """The channel's power after the write (``None``: not a channel's coil)."""
    source: Literal["modbus", "pulse"]


class SimulatedBoard:
    """A relay / IO board on ``host`` (loopback), built from a board configuration.

    Inputs start inactive, normally-on channels on, readings inside their limits (or 0).
    """

    def __init__(
        self,
        config: BoardConfig,
        *,
        host: str = "127.0.0.1",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.host = host
        self._clock = clock
        self._port = 0
        self._server: ModbusTcpServer | None = None
        self._coils = {c.coil: c.coil_level(c.normally_on) for c in config.channels}
        self._inputs = {i.address: i.level(False) for i in config.inputs}
        self._holding = {
            c.pulse_register: 0 for c in config.channels if c.pulse_register is not None
        }
        self._input_registers: dict[int, int] = {}
        for reading in config.registers:
            self._store_reading(reading, _initial_value(reading))
        self._by_coil = {c.coil: c for c in config.channels}
        self._by_pulse = {
            c.pulse_register: c for c in config.channels if c.pulse_register is not None
        }
        self._writes: list[CoilWrite] = []
        self._pulses: dict[str, asyncio.Task[None]] = {}

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if not self._port:
            raise ConfigError("simulated board: not started yet, no port", reason="not_started")
        return self._port

    @property
    def url(self) -> str:
        """The pyserial URL of the board, for :class:`firmware_bridge.link.Endpoint`."""
        return f"socket://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen (first on a free port, afterwards on the same one again)."""
        if self._server is not None:
            return
        server = ModbusTcpServer(
            self._device(),
            framer=FramerType.RTU,
            address=(self.host, self._port),
            trace_pdu=self._trace_pdu,
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:  # pymodbus: "Could not start listen, please check address."
            raise ConfigError(
                f"simulated board: cannot listen on {self.host}:{self._port}: {exc}",
                reason="listen_failed",
            ) from exc
        self._server = server
        if not self._port:
            # pymodbus has no accessor for the port it bound; its listener is the asyncio
            # server in ``transport`` (a public attribute of every pymodbus transport).
            listener = server.transport
            if not isinstance(listener, asyncio.Server) or not listener.sockets:
                await server.shutdown()  # type: ignore[no-untyped-call]
                self._server = None
                raise ConfigError("simulated board: pymodbus did not say its port", reason="port")
            self._port = int(listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Unplug: close the listener and every connection. State and pulses carry on."""
        server, self._server = self._server, None
        if server is None:
            return
        # The server's data store dies with it; keep what Modbus writes changed.
        unit = self.config.unit
        for address in self._coils:
            (level,) = await server.async_getValues(unit, 1, address, 1)
            self._coils[address] = bool(level)
        for address in self._holding:
            (word,) = await server.async_getValues(unit, 3, address, 1)
            self._holding[address] = int(word)
        await server.shutdown()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        """Stop and end the pulse firmware's timers."""
        await self.stop()
        pulses = list(self._pulses.values())
        for task in pulses:
            task.cancel()
        await asyncio.gather(*pulses, return_exceptions=True)
        self._pulses.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- what tests set and look at ---------------------------------------------------------

    @property
    def coil_writes(self) -> tuple[CoilWrite, ...]:
        return tuple(self._writes)

    def writes_to(self, channel: str) -> tuple[CoilWrite, ...]:
        return tuple(w for w in self._writes if w.channel == channel)

    async def power_on(self, channel: str) -> bool:
        """Whether the channel's power is on now."""
        spec = self.config.channel(channel)
        if self._server is not None:
            (level,) = await self._server.async_getValues(self.config.unit, 1, spec.coil, 1)
            return spec.power_on(bool(level))
        return spec.power_on(self._coils[spec.coil])

    async def set_input(self, name: str, active: bool) -> None:
        spec = self.config.input(name)
        self._inputs[spec.address] = spec.level(active)
        await self._push(_INPUTS, spec.address, [spec.level(active)])

    async def set_reading(self, name: str, value: float) -> None:
        """Set a register reading to ``value`` in its unit (encoded per the register map)."""
        spec = self.config.reading(name)
        words = self._store_reading(spec, value)
        await self._push(_INPUT_REGISTERS, spec.address, list(words))

    async def set_door_open(self, open_: bool) -> None:
        await self.set_input(self._input_meaning(InputMeaning.CABINET_DOOR_OPEN), open_)

    async def set_tilt(self, tilted: bool) -> None:
        await self.set_input(self._input_meaning(InputMeaning.TILTED), tilted)

    async def set_supply_voltage(self, volts: float) -> None:
        await self.set_reading("supply_voltage", volts)

    async def set_cabinet_temperature(self, celsius: float) -> None:
        await self.set_reading("cabinet_temperature", celsius)

    # -- internals --------------------------------------------------------------------------

    def _input_meaning(self, meaning: InputMeaning) -> str:
        for spec in self.config.inputs:
            if spec.meaning is meaning:
                return spec.name
        raise ConfigError(f"simulated board: no input means {meaning}", reason="unknown_input")

    def _store_reading(self, spec: RegisterReading, value: float) -> tuple[int, ...]:
        words = spec.encode(value)
        self._input_registers.update(zip(spec.addresses, words, strict=True))
        return words

    async def _push(self, function: int, address: int, values: list[int] | list[bool]) -> None:
        if self._server is not None:
            await self._server.async_setValues(self.config.unit, function, address, values)

    def _device(self) -> SimDevice:
        # Four separate tables, as on a real board; coils and inputs addressed by bit.
        return SimDevice(
            id=self.config.unit,
            simdata=(
                _bits(self._coils),
                _bits(self._inputs),
                _registers(self._holding),
                _registers(self._input_registers),
            ),
        )

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        # Called by the server for every request it decoded, before it carries it out.
        if sending or pdu.dev_id != self.config.unit:
            return pdu
        if isinstance(pdu, WriteSingleCoilRequest) and pdu.bits:
            self._record(pdu.address, bool(pdu.bits[0]), "modbus")
        elif isinstance(pdu, WriteSingleRegisterRequest) and pdu.address in self._by_pulse:
            tenths = pdu.registers[0] if pdu.registers else 0
            if tenths:
                self._start_pulse(self._by_pulse[pdu.address], tenths)
        return pdu

    def _record(self, coil: int, level: bool, source: Literal["modbus", "pulse"]) -> None:
        channel = self._by_coil.get(coil)
        self._writes.append(
            CoilWrite(
                self._clock(),
                coil,
                channel.name if channel else None,
                level,
                channel.power_on(level) if channel else None,
                source,
            )
        )

    def _start_pulse(self, channel: PowerChannel, tenths: int) -> None:
        # A new pulse while one runs starts over, as a retriggerable timer would.
        running = self._pulses.pop(channel.name, None)
        if running is not None:
            running.cancel()
        self._pulses[channel.name] = asyncio.get_running_loop().create_task(
            self._pulse(channel, tenths), name=f"simulated-board-pulse-{channel.name}"
        )

    async def _pulse(self, channel: PowerChannel, tenths: int) -> None:
        await self._switch(channel, on=False)
        await asyncio.sleep(tenths / 10)
        await self._switch(channel, on=True)

    async def _switch(self, channel: PowerChannel, *, on: bool) -> None:
        level = channel.coil_level(on)
        self._coils[channel.coil] = level
        self._record(channel.coil, level, "pulse")
        await self._push(_COILS, channel.coil, [level])


def _initial_value(reading: RegisterReading) -> float:
    if reading.low is not None and reading.high is not None:
        return (reading.low + reading.high) / 2
    if reading.low is not None:
        return reading.low + abs(reading.scale) * 10
    if reading.high is not None:
        return reading.high - abs(reading.scale) * 10
    return 0.0


def _bits(values: Mapping[int, bool]) -> list[SimData]:
    if not values:
        # pymodbus wants at least one entry per table; one unused bit.
        return [SimData(0, values=[False], datatype=DataType.BITS)]
    first, last = min(values), max(values)
    return [
        SimData(
            first,
            values=[values.get(a, False) for a in range(first, last + 1)],
            datatype=DataType.BITS,
        )
    ]


def _registers(values: Mapping[int, int]) -> list[SimData]:
    if not values:
        return [SimData(0, datatype=DataType.INVALID)]
    return [
        SimData(
            span.address,
            values=[values[a] for a in span.addresses],
            datatype=DataType.REGISTERS,
        )
        for span in contiguous_spans(values, 0x10000)
    ]
