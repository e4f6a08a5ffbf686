"""The peripheral monitor with its edges faked or simulated: USB hotplug in memory, the bridge's
device watches either scripted or the real drivers against the simulated printer on a pty.

What staff and the fleet notice: the first report says what the kiosk has, a paper-out arrives
once with its plain words after the debounce, a cable wiggle says nothing, and a kiosk where
USB cannot be watched keeps running and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from edge_agent.peripheral_monitor import PeripheralMonitor
from edge_agent.peripherals import PeripheralBook, PeripheralChange
from edge_agent.udev_pyudev import PyudevUsb
from edge_agent.usb import SimulatedUsb, UsbUnavailable
from firmware_bridge import kiosk
from firmware_bridge.errors import ConfigError
from firmware_bridge.health import OK, Assessment
from firmware_bridge.kiosk import KioskDevices
from firmware_bridge.profiles import Profile, load_profile
from firmware_bridge.simulation import SimulatedKiosk
from firmware_bridge.watch import Observation
from fleet_protocol.codec import decode, encode
from fleet_protocol.messages import Peripherals

DEBOUNCE_MS = 800
TICK_MS = 20


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Delivered:
    """Every call of ``on_changes``, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[PeripheralChange], Peripherals, float]] = []
        self._arrived = asyncio.Event()

    async def __call__(self, changes: list[PeripheralChange], snapshot: Peripherals) -> None:
        # What the agent will do with it: encode for the outbox.
        assert decode(Peripherals, encode(snapshot)) == snapshot
        self.calls.append((changes, snapshot, time.monotonic()))
        self._arrived.set()

    async def wait_for(
        self,
        test: Callable[[list[PeripheralChange]], bool],
        *,
        after: int = 0,
        within_s: float = 5.0,
    ) -> tuple[list[PeripheralChange], Peripherals, float]:
        """The first call from index ``after`` on whose changes pass ``test``."""
        seen = after
        async with asyncio.timeout(within_s):
            while True:
                for call in self.calls[seen:]:
                    if test(call[0]):
                        return call
                seen = len(self.calls)
                self._arrived.clear()
                await self._arrived.wait()

    def changes_since(self, index: int) -> list[PeripheralChange]:
        return [c for changes, _, _ in self.calls[index:] for c in changes]


class ScriptedDevices:
    """The bridge's device watches, scripted: :meth:`report` sends one assessment to the sink."""

    def __init__(self, profile: Profile, first: dict[str, Assessment]) -> None:
        self.profile = profile
        self._queue: asyncio.Queue[tuple[str, Assessment]] = asyncio.Queue()
        for pid, assessment in first.items():
            self.report(pid, assessment)

    def report(self, peripheral_id: str, assessment: Assessment) -> None:
        self._queue.put_nowait((peripheral_id, assessment))

    async def run(self, sink: kiosk.Sink) -> None:
        while True:
            pid, assessment = await self._queue.get()
            observation: Observation[kiosk.Status] = Observation(
                pid, assessment, None, time.monotonic()
            )
            await sink(kiosk.PeripheralChange(self.profile.peripheral(pid), observation))


class FailingDevices:
    async def run(self, sink: kiosk.Sink) -> None:
        raise ConfigError("receipt-printer: code_page: 'ebcdic' is not a code page")


@contextlib.asynccontextmanager
async def running(monitor: PeripheralMonitor) -> AsyncIterator[None]:
    stopping = asyncio.Event()
    task = asyncio.create_task(monitor.run(stopping), name="test-monitor")
    try:
        yield
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)


@pytest.fixture
def profile() -> Profile:
    return load_profile("comprehensive")


def _book(profile: Profile) -> PeripheralBook:
    return PeripheralBook(profile, debounce_ms=DEBOUNCE_MS, now_ms=wall_ms)


def _bridge_ok(profile: Profile) -> dict[str, Assessment]:
    return {p.id: OK for p in profile.peripherals if p.protocol != "none"}


@pytest.mark.asyncio
async def test_first_report_waits_for_every_peripheral_and_says_what_is_there(
    profile: Profile,
) -> None:
    usb = SimulatedUsb(profile)
    usb.unplug_peripheral("fingerprint-reader")
    delivered = Delivered()
    book = _book(profile)
    devices = ScriptedDevices(profile, {})
    monitor = PeripheralMonitor(
        profile, book, devices=devices, usb=usb, on_changes=delivered, tick_ms=TICK_MS
    )
    async with running(monitor):
        await asyncio.sleep(0.2)
        # The printer and the board have not reported: nothing is published yet.
        assert delivered.calls == []
        for pid, assessment in _bridge_ok(profile).items():
            devices.report(pid, assessment)
        changes, snapshot, _ = await delivered.wait_for(lambda changes: True)
    assert {c.peripheral_id for c in changes} == {p.id for p in profile.peripherals}
    assert all(c.initial for c in changes)
    states = {s.id: (s.state, s.reason) for s in snapshot.peripherals}
    assert states["receipt-printer"] == ("ok", "")
    assert states["id-card-reader"] == ("ok", "")
    assert states["fingerprint-reader"] == (
        "absent",
        "未检测到指纹仪：请检查 USB 线是否插好，或重新上电 [usb_missing]",
    )
    assert set(snapshot.changed) == {p.id for p in profile.peripherals}


@pytest.mark.asyncio
async def test_a_usb_cable_wiggle_says_nothing_and_a_real_unplug_says_it_once(
    profile: Profile,
) -> None:
    usb = SimulatedUsb(profile)
    delivered = Delivered()
    monitor = PeripheralMonitor(
        profile,
        _book(profile),
        devices=ScriptedDevices(profile, _bridge_ok(profile)),
        usb=usb,
        on_changes=delivered,
        tick_ms=TICK_MS,
    )
    async with running(monitor):
        await delivered.wait_for(lambda changes: True)
        start = len(delivered.calls)
        usb.unplug_peripheral("id-card-reader")
        await asyncio.sleep(DEBOUNCE_MS / 1000 / 4)
        usb.plug_peripheral("id-card-reader")
        await asyncio.sleep(DEBOUNCE_MS / 1000 * 2)
        assert delivered.changes_since(start) == []

        usb.unplug_peripheral("id-card-reader")
        unplugged_at = time.monotonic()
        _, snapshot, at = await delivered.wait_for(bool, after=start)
        assert at - unplugged_at >= DEBOUNCE_MS / 1000
        await asyncio.sleep(DEBOUNCE_MS / 1000 * 2)
    assert [(c.peripheral_id, c.old, c.new, c.reasons) for c in delivered.changes_since(start)] == [
        ("id-card-reader", "ok", "absent", ("usb_unplugged",))
    ]
    assert snapshot.changed == ["id-card-reader"]
    view = next(v for v in monitor.book.views() if v.id == "id-card-reader")
    assert view.problem is not None
    assert view.problem.zh == "身份证阅读器的 USB 连接已断开"


@pytest.mark.asyncio
async def test_without_usb_watching_the_usb_devices_are_reported_unwatched(
    profile: Profile,
) -> None:
    delivered = Delivered()
    monitor = PeripheralMonitor(
        profile,
        _book(profile),
        devices=ScriptedDevices(profile, _bridge_ok(profile)),
        usb=SimulatedUsb(profile, unavailable="no USB bus at /sys/bus/usb"),
        on_changes=delivered,
        tick_ms=TICK_MS,
    )
    async with running(monitor):
        _, snapshot, _ = await delivered.wait_for(lambda changes: True)
    states = {s.id: (s.state, s.reason) for s in snapshot.peripherals}
    assert states["id-card-reader"][0] == "degraded"
    assert states["id-card-reader"][1].startswith("无法检测身份证阅读器的状态")
    assert states["receipt-printer"] == ("ok", "")
    assert monitor.usb_problem == "no USB bus at /sys/bus/usb"


@pytest.mark.asyncio
async def test_a_failing_bridge_leaves_the_rest_running(profile: Profile) -> None:
    delivered = Delivered()
    monitor = PeripheralMonitor(
        profile,
        _book(profile),
        devices=FailingDevices(),
        usb=SimulatedUsb(profile),
        on_changes=delivered,
        tick_ms=TICK_MS,
    )
    async with running(monitor):
        _, snapshot, _ = await delivered.wait_for(lambda changes: True)
    states = {s.id: s.state for s in snapshot.peripherals}
    assert states["receipt-printer"] == "degraded"
    assert states["controller-board"] == "degraded"
    assert states["id-card-reader"] == "ok"
    assert monitor.bridge_problem is not None
    assert "ebcdic" in monitor.bridge_problem


@pytest.mark.asyncio
async def test_pyudev_fails_soft_where_there_is_no_usb_bus(tmp_path: Path) -> None:
    usb = PyudevUsb(usb_bus=tmp_path / "no-usb-here")
    with pytest.raises(UsbUnavailable, match="no USB bus"):
        await usb.present()


# --- the real drivers against the simulated printer and board --------------------------------

POLL_S = 0.1


@pytest_asyncio.fixture
async def simulated(tmp_path: Path) -> AsyncIterator[SimulatedKiosk]:
    fast = [
        {"id": "receipt-printer", "poll_s": POLL_S},
        {"id": "controller-board", "poll_s": POLL_S},
    ]
    async with SimulatedKiosk(load_profile("comprehensive", fast), tmp_path / "sim") as kiosk_:
        yield kiosk_


@pytest.mark.asyncio
async def test_a_simulated_printer_running_out_of_paper_is_reported_once_in_plain_words(
    simulated: SimulatedKiosk,
) -> None:
    profile = simulated.profile
    delivered = Delivered()
    book = _book(profile)
    async with KioskDevices(profile) as devices:
        monitor = PeripheralMonitor(
            profile,
            book,
            devices=devices,
            usb=SimulatedUsb(profile),
            on_changes=delivered,
            tick_ms=TICK_MS,
        )
        async with running(monitor):
            _, first, _ = await delivered.wait_for(lambda changes: True)
            assert {s.id: s.state for s in first.peripherals}["receipt-printer"] == "ok"
            start = len(delivered.calls)
            simulated.printer().state.paper_out = True
            ran_out = time.monotonic()
            changes, snapshot, at = await delivered.wait_for(bool, after=start)
            assert at - ran_out >= DEBOUNCE_MS / 1000
            await asyncio.sleep(DEBOUNCE_MS / 1000 + 5 * POLL_S)
            later = delivered.changes_since(start)
    assert [(c.peripheral_id, c.old, c.new, c.reasons) for c in later] == [
        ("receipt-printer", "ok", "faulty", ("paper_out",))
    ]
    status = {s.id: s for s in snapshot.peripherals}["receipt-printer"]
    assert status.reason == "打印机缺纸：请更换纸卷 [paper_out]"
    view = next(v for v in book.views() if v.id == "receipt-printer")
    assert view.state == "faulty"
    assert view.problem is not None
    assert view.problem.zh == "打印机缺纸"
    assert view.action is not None
    assert view.action.en == "Load a new paper roll"
    event = book.event(changes[0], seq=1, ts_ms=wall_ms())
    assert (event.kind, event.severity) == ("peripheral.fault", "error")
    assert event.message == "凭条打印机：打印机缺纸。请更换纸卷。"
