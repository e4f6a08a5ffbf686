"""A whole simulated kiosk from its profile: every device the bridge talks to, simulated.

The ESC/POS printers run on ptys behind stable links (``<workdir>/dev/<peripheral id>``, like
udev's ``/dev/serial/by-id`` names), the controller board is a pymodbus server speaking RTU on
a loopback socket, and a UPS is a real ``upsd`` with ``dummy-ups``. :attr:`profile` is the
kiosk's profile with each of those devices pointed at its simulator, so drivers built from it
(:class:`~firmware_bridge.kiosk.KioskDevices`) talk to the simulators with the same code and
the same serial settings as on a real kiosk. Tests, the demo and the fleet simulator use it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from firmware_bridge.errors import ConfigError
from firmware_bridge.escpos.simulator import SimulatedPrinter
from firmware_bridge.modbus.simulator import SimulatedBoard
from firmware_bridge.nut.upsd import SimulatedUps, UpsDaemon
from firmware_bridge.profiles import DeviceProtocol, Peripheral, Profile

T = TypeVar("T")


class SimulatedKiosk:
    """Simulators for every talked-to device of ``profile``; an async context manager."""

    def __init__(self, profile: Profile, workdir: Path) -> None:
        self.source_profile = profile
        self.workdir = workdir
        self.printers: dict[str, SimulatedPrinter] = {}
        self.boards: dict[str, SimulatedBoard] = {}
        self.ups_daemons: dict[str, UpsDaemon] = {}
        self._urls: dict[str, str] = {}

    async def start(self) -> None:
        try:
            for p in self.source_profile.peripherals:
                await self._start(p)
        except BaseException:
            await self.aclose()
            raise

    async def _start(self, p: Peripheral) -> None:
        if p.protocol is DeviceProtocol.ESCPOS:
            (self.workdir / "dev").mkdir(parents=True, exist_ok=True)
            printer = await SimulatedPrinter.on_pty(self.workdir / "dev" / p.id)
            self.printers[p.id] = printer
            self._urls[p.id] = printer.url
        elif p.protocol is DeviceProtocol.MODBUS_RTU:
            assert p.board is not None
            board = SimulatedBoard(p.board)
            await board.start()
            self.boards[p.id] = board
            self._urls[p.id] = board.url
        elif p.protocol is DeviceProtocol.NUT:
            assert p.ups_name is not None
            daemon = UpsDaemon(self.workdir / "nut" / p.id, (p.ups_name,))
            self.ups_daemons[p.id] = daemon
            await asyncio.to_thread(daemon.open)
            self._urls[p.id] = daemon.url

    @property
    def profile(self) -> Profile:
        """The kiosk's profile with every simulated device's URL pointing at its simulator."""
        peripherals = tuple(
            dataclasses.replace(p, endpoint=dataclasses.replace(p.endpoint, url=self._urls[p.id]))
            if p.id in self._urls and p.endpoint is not None
            else p
            for p in self.source_profile.peripherals
        )
        return dataclasses.replace(self.source_profile, peripherals=peripherals)

    @property
    def overrides(self) -> list[dict[str, object]]:
        """The same as :attr:`profile`, as overrides for a profile file (``url`` per device)."""
        return [{"id": pid, "url": url} for pid, url in self._urls.items()]

    def printer(self, peripheral_id: str | None = None) -> SimulatedPrinter:
        return _one(self.printers, peripheral_id, "printer")

    def board(self, peripheral_id: str | None = None) -> SimulatedBoard:
        return _one(self.boards, peripheral_id, "controller board")

    def ups(self, peripheral_id: str | None = None) -> SimulatedUps:
        daemon = _one(self.ups_daemons, peripheral_id, "UPS")
        return daemon.simulated_ups()

    async def aclose(self) -> None:
        for printer in self.printers.values():
            await printer.close()
        for board in self.boards.values():
            await board.aclose()
        for daemon in self.ups_daemons.values():
            await asyncio.to_thread(daemon.close)

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


def _one(devices: dict[str, T], peripheral_id: str | None, kind: str) -> T:
    if peripheral_id is None:
        if not devices:
            raise ConfigError(f"this simulated kiosk has no {kind}", reason="not_simulated")
        return next(iter(devices.values()))
    try:
        return devices[peripheral_id]
    except KeyError:
        raise ConfigError(
            f"peripheral: {peripheral_id!r} is not a simulated {kind}", reason="not_simulated"
        ) from None
