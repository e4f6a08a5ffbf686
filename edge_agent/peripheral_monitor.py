"""Watching every peripheral: the bridge's drivers and USB hotplug, into one debounced book.

Tasks (named, owned by one TaskGroup, ended through ``stopping``):
- ``<name>:bridge``  :meth:`KioskDevices.run`, each assessment into :meth:`PeripheralBook.observe`;
  a driver that fails outright (a ``BridgeError`` out of the watches) leaves its peripherals
  ``unwatched`` and is started again a minute later;
- ``<name>:usb``     the USB source's devices present, then its hotplug events;
- ``<name>:tick``    :meth:`PeripheralBook.tick`, which commits what held past the debounce;
- ``<name>:deliver`` hands each batch of committed changes with the new snapshot to
  ``on_changes``, one call at a time and in order.

The first delivery waits until every peripheral has been observed once (or ``startup_ms`` has
passed), so the first retained snapshot says what the kiosk has instead of "not checked yet";
it is made even when nothing changed. No MQTT here: the agent turns ``on_changes`` into
outbox entries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from edge_agent.peripheral_words import UNWATCHED, USB_MISSING, USB_UNPLUGGED
from edge_agent.peripherals import (
    HEALTH_STATES,
    PeripheralBook,
    PeripheralChange,
    PeripheralError,
    Source,
    bridge_driven,
    usb_only,
)
from edge_agent.status_model import PeripheralState
from edge_agent.stopping import sleep_unless_stopped
from edge_agent.usb import UsbPresence, UsbSighting, UsbSource, UsbUnavailable
from firmware_bridge import kiosk
from firmware_bridge.errors import BridgeError
from firmware_bridge.profiles import Profile
from fleet_protocol.messages import Peripherals

ChangeSink = Callable[[list[PeripheralChange], Peripherals], Awaitable[None]]


class DeviceSource(Protocol):
    """What the monitor needs of :class:`~firmware_bridge.kiosk.KioskDevices`."""

    async def run(self, sink: kiosk.Sink) -> None: ...


#: How long a failed bridge waits before its drivers are built into watches again.
BRIDGE_RETRY_S: Final = 60.0


class PeripheralMonitor:
    def __init__(
        self,
        profile: Profile,
        book: PeripheralBook,
        *,
        devices: DeviceSource | None,
        usb: UsbSource | None,
        on_changes: ChangeSink,
        tick_ms: int = 500,
        startup_ms: int = 10_000,
        name: str = "peripherals",
        logger: logging.Logger | None = None,
    ) -> None:
        if tick_ms <= 0:
            raise PeripheralError(f"tick_ms: {tick_ms} must be above zero")
        if profile != book.profile:
            raise PeripheralError(f"the book keeps profile {book.profile.id}, not {profile.id}")
        self.profile = profile
        self.book = book
        self.name = name
        #: Why USB is not watched (None while it is).
        self.usb_problem: str | None = None
        #: Why the bridge's drivers are not running (None while they are).
        self.bridge_problem: str | None = None
        self._devices = devices
        self._usb = usb
        self._on_changes = on_changes
        self._tick_s = tick_ms / 1000
        self._startup_s = startup_ms / 1000
        self._log = logger or logging.getLogger(f"kiosk-agent.{name}")
        self._pending: list[PeripheralChange] = []
        self._wake = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        """Watch until ``stopping`` is set; deliver what was committed until then."""
        async with asyncio.TaskGroup() as tg:
            workers = [
                tg.create_task(self._watch_usb(), name=f"{self.name}:usb"),
                tg.create_task(self._tick(stopping), name=f"{self.name}:tick"),
            ]
            if self._devices is not None:
                bridge = self._watch_bridge(self._devices, stopping)
                workers.append(tg.create_task(bridge, name=f"{self.name}:bridge"))
            else:
                self._bridge_unwatched("no device drivers are running")
            delivery = tg.create_task(self._deliver(stopping), name=f"{self.name}:deliver")
            await stopping.wait()
            for worker in workers:
                worker.cancel()
            self._wake.set()
            await delivery

    # --- sources --------------------------------------------------------------------------

    def _observe(
        self,
        peripheral_id: str,
        state: PeripheralState,
        reasons: tuple[str, ...] = (),
        detail: str = "",
        *,
        source: Source,
    ) -> None:
        changes = self.book.observe(peripheral_id, state, reasons, detail, source=source)
        self._queue(changes)

    async def _from_bridge(self, change: kiosk.PeripheralChange) -> None:
        assessment = change.observation.assessment
        self._observe(
            change.peripheral.id,
            HEALTH_STATES[assessment.health],
            assessment.reasons,
            assessment.detail,
            source="bridge",
        )

    async def _watch_bridge(self, devices: DeviceSource, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            failure: BridgeError | None = None
            try:
                await devices.run(self._from_bridge)
            except* BridgeError as group:
                first = group.exceptions[0]
                assert isinstance(first, BridgeError)
                failure = first
            if failure is None:
                return
            self._log.error(
                "peripheral drivers stopped: %s; again in %g s", failure, BRIDGE_RETRY_S
            )
            self._bridge_unwatched(str(failure))
            await sleep_unless_stopped(stopping, BRIDGE_RETRY_S)
            if not stopping.is_set():
                self.bridge_problem = None

    def _bridge_unwatched(self, why: str) -> None:
        self.bridge_problem = why
        for p in self.profile.peripherals:
            if bridge_driven(p):
                self._observe(p.id, "degraded", (UNWATCHED,), why, source="bridge")

    async def _watch_usb(self) -> None:
        if self._usb is None:
            self._usb_unwatched("no USB source")
            return
        presence = UsbPresence(self.profile)
        try:
            for event in await self._usb.present():
                presence.apply(event)
            for p in self.profile.peripherals:
                if usb_only(p):
                    if presence.present(p.id):
                        self._observe(p.id, "ok", source="usb")
                    else:
                        self._observe(p.id, "absent", (USB_MISSING,), source="usb")
            async for event in self._usb.events():
                sighting = presence.apply(event)
                if sighting is not None:
                    self._sighted(sighting)
        except UsbUnavailable as exc:
            self._log.warning("USB peripherals are not watched: %s", exc)
            self._usb_unwatched(str(exc))

    def _sighted(self, sighting: UsbSighting) -> None:
        p = sighting.peripheral
        self._log.info("USB %s: %s", "plugged in" if sighting.present else "unplugged", p.id)
        if sighting.present:
            self._observe(p.id, "ok", source="usb")
        else:
            self._observe(p.id, "absent", (USB_UNPLUGGED,), source="usb")

    def _usb_unwatched(self, why: str) -> None:
        self.usb_problem = why
        for p in self.profile.peripherals:
            if usb_only(p):
                self._observe(p.id, "degraded", (UNWATCHED,), why, source="usb")

    async def _tick(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self._queue(self.book.tick())
            await sleep_unless_stopped(stopping, self._tick_s)

    # --- delivery -------------------------------------------------------------------------

    def _queue(self, changes: list[PeripheralChange]) -> None:
        for change in changes:
            self._log.info(
                "%s: %s -> %s (%s)",
                change.peripheral_id,
                change.old or "start",
                change.new,
                ", ".join(change.reasons) or "-",
            )
        if changes:
            self._pending.extend(changes)
            self._wake.set()

    async def _deliver(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_s
        while not (self.book.settled or stopping.is_set() or loop.time() >= deadline):
            await self._woken(deadline - loop.time())
        first = True
        while True:
            changes, self._pending = self._pending, []
            if changes or first:
                first = False
                snapshot = self.book.snapshot(
                    self.book.now_ms(), [c.peripheral_id for c in changes]
                )
                await self._on_changes(changes, snapshot)
                continue  # more may have come in meanwhile
            if stopping.is_set():
                return
            await self._woken(None)

    async def _woken(self, timeout_s: float | None) -> None:
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: see stopping.py
                await self._wake.wait()
        except TimeoutError:
            return
        self._wake.clear()
