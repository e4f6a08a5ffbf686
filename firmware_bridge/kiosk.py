"""All the devices of one kiosk, from its profile: one driver and one watch per device the
bridge talks to, power-cycles addressed by peripheral, and every change delivered to one sink.

This is the surface the agent uses; it knows nothing of MQTT. Peripherals with protocol
``none`` (USB devices seen only through udev) have no driver here: the agent matches them on
hotplug with :meth:`Profile.match_usb`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from firmware_bridge.errors import ConfigError
from firmware_bridge.escpos.driver import EscPosPrinter, PrintResult
from firmware_bridge.escpos.protocol import PrinterStatus
from firmware_bridge.modbus.board import BoardStatus, PowerCycleReport
from firmware_bridge.modbus.driver import RelayBoard
from firmware_bridge.nut.driver import NutUps
from firmware_bridge.nut.protocol import UpsStatus
from firmware_bridge.profiles import DeviceProtocol, Peripheral, Profile
from firmware_bridge.watch import Device, DeviceWatch, Observation

Status = PrinterStatus | BoardStatus | UpsStatus


@dataclass(frozen=True, slots=True)
class PeripheralChange:
    """A change seen on one peripheral of the kiosk."""

    peripheral: Peripheral
    observation: Observation[Status]


Sink = Callable[[PeripheralChange], Awaitable[None]]


class KioskDevices:
    """The drivers and watches of one kiosk's profile."""

    def __init__(self, profile: Profile, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.profile = profile
        self._printers: dict[str, EscPosPrinter] = {}
        self._boards: dict[str, RelayBoard] = {}
        self._ups: dict[str, NutUps] = {}
        self._watches: dict[
            str, DeviceWatch[PrinterStatus] | DeviceWatch[BoardStatus] | DeviceWatch[UpsStatus]
        ] = {}
        for p in profile.peripherals:
            if p.protocol is DeviceProtocol.NONE:
                continue
            endpoint = p.endpoint
            assert endpoint is not None  # the profile requires a url for every protocol
            if p.protocol is DeviceProtocol.ESCPOS:
                assert p.code_page is not None
                printer = EscPosPrinter(
                    p.id, endpoint, code_page=p.code_page, timeout_s=p.timeout_s
                )
                self._printers[p.id] = printer
                self._watches[p.id] = DeviceWatch(printer, p.poll_s, clock=clock)
            elif p.protocol is DeviceProtocol.MODBUS_RTU:
                assert p.board is not None
                board = RelayBoard(p.id, endpoint, p.board)
                self._boards[p.id] = board
                self._watches[p.id] = DeviceWatch(board, p.poll_s, clock=clock)
            else:
                assert p.ups_name is not None
                ups = NutUps(p.id, endpoint, p.ups_name, timeout_s=p.timeout_s)
                self._ups[p.id] = ups
                self._watches[p.id] = DeviceWatch(ups, p.poll_s, clock=clock)

    @property
    def watched(self) -> tuple[Peripheral, ...]:
        """The peripherals this object polls, in profile order."""
        return tuple(p for p in self.profile.peripherals if p.id in self._watches)

    def watch(
        self, peripheral_id: str
    ) -> DeviceWatch[PrinterStatus] | DeviceWatch[BoardStatus] | DeviceWatch[UpsStatus]:
        try:
            return self._watches[peripheral_id]
        except KeyError:
            raise ConfigError(
                f"peripheral: {peripheral_id!r} is not a device the bridge talks to",
                reason="unknown_peripheral",
            ) from None

    def printer(self, peripheral_id: str | None = None) -> EscPosPrinter:
        """A printer by id, or the only/first receipt printer."""
        if peripheral_id is None:
            if not self._printers:
                raise ConfigError("this kiosk has no ESC/POS printer", reason="no_printer")
            return next(iter(self._printers.values()))
        try:
            return self._printers[peripheral_id]
        except KeyError:
            raise ConfigError(
                f"peripheral: {peripheral_id!r} is not an ESC/POS printer of this kiosk",
                reason="unknown_peripheral",
            ) from None

    @property
    def board(self) -> RelayBoard | None:
        return next(iter(self._boards.values()), None)

    @property
    def ups(self) -> NutUps | None:
        return next(iter(self._ups.values()), None)

    def power_channel_of(self, peripheral_id: str) -> str:
        """The board channel that powers a peripheral (its id may also be a channel's name)."""
        board = self.board
        if board is None:
            raise ConfigError("this kiosk has no controller board", reason="no_board")
        channels = {c.name for c in board.config.channels}
        if peripheral_id in channels:
            return peripheral_id
        try:
            peripheral = self.profile.peripheral(peripheral_id)
        except KeyError:
            raise ConfigError(
                f"peripheral: {peripheral_id!r} is neither a peripheral nor a power channel",
                reason="unknown_peripheral",
            ) from None
        if peripheral.power_channel is None:
            raise ConfigError(
                f"peripheral: {peripheral_id!r} has no power channel on the board",
                reason="no_power_channel",
            )
        return peripheral.power_channel

    async def power_cycle(self, peripheral_id: str, off_s: float | None = None) -> PowerCycleReport:
        """Power-cycle the channel of a peripheral (or a channel by name)."""
        channel = self.power_channel_of(peripheral_id)
        board = self.board
        assert board is not None  # power_channel_of checked it
        return await board.power_cycle(channel, off_s)

    async def print_test_ticket(
        self, terminal_name: str, now_text: str, peripheral_id: str | None = None
    ) -> PrintResult:
        return await self.printer(peripheral_id).print_test_ticket(terminal_name, now_text)

    async def poll_all(self) -> dict[str, Observation[Status]]:
        """Poll every device once, concurrently; the observation of each by peripheral id."""
        tasks: dict[str, asyncio.Task[Observation[Status]]] = {}
        async with asyncio.TaskGroup() as group:
            for pid, watch in self._watches.items():
                tasks[pid] = group.create_task(_poll(watch), name=f"poll {pid}")
        return {p.id: tasks[p.id].result() for p in self.watched}

    async def run(self, sink: Sink) -> None:
        """Watch every device until cancelled; each change goes to ``sink`` in order per device."""
        async with asyncio.TaskGroup() as group:
            for pid, watch in self._watches.items():
                peripheral = self.profile.peripheral(pid)
                group.create_task(_forward(peripheral, watch, sink), name=f"watch {pid}")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        drivers: list[Device[PrinterStatus] | Device[BoardStatus] | Device[UpsStatus]] = [
            *self._printers.values(),
            *self._boards.values(),
            *self._ups.values(),
        ]
        for driver in drivers:
            await driver.close()


async def _poll(
    watch: DeviceWatch[PrinterStatus] | DeviceWatch[BoardStatus] | DeviceWatch[UpsStatus],
) -> Observation[Status]:
    return await watch.poll_once()


async def _forward(
    peripheral: Peripheral,
    watch: DeviceWatch[PrinterStatus] | DeviceWatch[BoardStatus] | DeviceWatch[UpsStatus],
    sink: Sink,
) -> None:
    async with contextlib.aclosing(watch.changes()) as changes:
        async for observation in changes:
            await sink(PeripheralChange(peripheral, observation))
