"""The relay board driver against a simulated board (a pymodbus server, RTU frames over TCP).

The driver reaches the board as ``socket://127.0.0.1:PORT``, the way it reaches a board behind
a serial-to-Ethernet converter; everything between the two is real: link, framing, CRC,
timeouts, reconnects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator

import pytest
import pytest_asyncio

from firmware_bridge.errors import ChannelBusy, ConfigError
from firmware_bridge.health import Health
from firmware_bridge.link import Endpoint
from firmware_bridge.modbus.board import (
    BoardConfig,
    BoardStatus,
    DigitalInput,
    InputMeaning,
    PowerChannel,
    RegisterReading,
    StepKind,
)
from firmware_bridge.modbus.driver import RelayBoard
from firmware_bridge.modbus.simulator import SimulatedBoard
from firmware_bridge.watch import DeviceWatch, Observation

pytestmark = pytest.mark.integration

INTERVAL = 0.25
"""Poll interval of the watches here."""
SLACK = 0.25
"""What one poll may take on a loaded test machine, on top of the interval."""

CONFIG = BoardConfig(
    unit=1,
    channels=(
        PowerChannel("terminal_psu", 0, pulse_register=10, self_powered=True),
        PowerChannel("screen", 1),
        PowerChannel("printer", 2, inverted=True),
        PowerChannel("id_card_reader", 3),
        PowerChannel("document_camera", 4, normally_on=False),
    ),
    inputs=(
        DigitalInput("door_switch", 0, meaning=InputMeaning.CABINET_DOOR_OPEN),
        DigitalInput("tilt_switch", 1, active_low=True, meaning=InputMeaning.TILTED),
    ),
    registers=(
        RegisterReading("supply_voltage", 0, scale=0.01, unit="V", low=11.0, high=13.8),
        RegisterReading(
            "cabinet_temperature", 1, kind="int16", scale=0.1, unit="°C", low=-20, high=45
        ),
    ),
    default_off_s=0.3,
    timeout_s=0.5,
)

Changes = AsyncGenerator[Observation[BoardStatus], None]


@pytest.fixture(autouse=True)
def quiet_pymodbus(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail the test if pymodbus logged a warning or worse: it stays quiet, even when the
    board is unplugged or refuses a request."""
    caplog.set_level(logging.DEBUG, logger="pymodbus")
    yield
    loud = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("pymodbus") and r.levelno >= logging.WARNING
    ]
    assert loud == []


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[SimulatedBoard]:
    async with SimulatedBoard(CONFIG) as board:
        yield board


@pytest_asyncio.fixture
async def board(sim: SimulatedBoard) -> AsyncIterator[RelayBoard]:
    relay = RelayBoard("controller", Endpoint(sim.url), CONFIG)
    yield relay
    await relay.close()


async def next_change(changes: Changes, within_s: float) -> Observation[BoardStatus]:
    async with asyncio.timeout(within_s):
        return await anext(changes)


async def until(condition: Callable[[], bool], within_s: float = 2.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# Watching


@pytest.mark.asyncio
async def test_door_tilt_and_voltage_drop_are_seen_within_one_poll_interval(
    sim: SimulatedBoard, board: RelayBoard
) -> None:
    changes = DeviceWatch(board, INTERVAL).changes()
    try:
        first = await next_change(changes, SLACK)
        assert first.assessment.health is Health.OK
        assert first.status is not None
        assert first.status.power["screen"]
        assert first.status.reading("supply_voltage").unit == "V"

        await sim.set_door_open(True)
        seen = await next_change(changes, INTERVAL + SLACK)
        assert (seen.assessment.health, seen.assessment.reasons) == (
            Health.DEGRADED,
            ("cabinet_door_open",),
        )

        await sim.set_door_open(False)
        await sim.set_tilt(True)
        seen = await next_change(changes, INTERVAL + SLACK)
        assert (seen.assessment.health, seen.assessment.reasons) == (Health.FAULTY, ("tilted",))

        await sim.set_tilt(False)
        await sim.set_supply_voltage(10.6)
        seen = await next_change(changes, INTERVAL + SLACK)
        assert (seen.assessment.health, seen.assessment.reasons) == (
            Health.DEGRADED,
            ("supply_voltage_low",),
        )
        assert seen.status is not None
        assert seen.status.reading("supply_voltage").value == 10.6

        await sim.set_supply_voltage(12.0)
        await sim.set_cabinet_temperature(-5.5)
        seen = await next_change(changes, INTERVAL + SLACK)
        assert seen.assessment.health is Health.OK
        assert seen.status is not None
        assert seen.status.reading("cabinet_temperature").value == -5.5
    finally:
        await changes.aclose()


@pytest.mark.asyncio
async def test_unplugged_board_is_absent_and_the_same_driver_recovers(
    sim: SimulatedBoard, board: RelayBoard
) -> None:
    changes = DeviceWatch(board, INTERVAL).changes()
    try:
        assert (await next_change(changes, SLACK)).assessment.health is Health.OK

        await sim.stop()
        gone = await next_change(changes, INTERVAL + SLACK)
        assert gone.assessment.health is Health.ABSENT
        assert gone.status is None
        assert gone.assessment.reasons[0] in {"disconnected", "io_error", "connection_refused"}

        await sim.start()
        back = await next_change(changes, INTERVAL + SLACK)
        assert back.assessment.health is Health.OK
        assert back.status is not None
        assert back.status.power["screen"]
    finally:
        await changes.aclose()


@pytest.mark.asyncio
async def test_register_the_board_does_not_have_is_faulty_with_the_exception(
    sim: SimulatedBoard,
) -> None:
    wrong = dataclasses.replace(
        CONFIG, registers=(*CONFIG.registers, RegisterReading("humidity", 40, unit="%"))
    )
    relay = RelayBoard("controller", Endpoint(sim.url), wrong)
    try:
        seen = await DeviceWatch(relay, INTERVAL).poll_once()
    finally:
        await relay.close()
    assert (seen.assessment.health, seen.assessment.reasons) == (
        Health.FAULTY,
        ("modbus_exception_2",),
    )
    assert "illegal data address" in seen.assessment.detail
    assert "read input registers 40" in seen.assessment.detail


# ---------------------------------------------------------------------------------------------
# Switching


@pytest.mark.asyncio
async def test_power_cycle_switches_the_coil_off_and_back_on(
    sim: SimulatedBoard, board: RelayBoard
) -> None:
    report = await board.power_cycle("printer", 0.3)

    assert report.outcome == "done"
    assert report.failed_step is None
    assert [s.kind for s in report.steps] == [
        StepKind.SWITCH_OFF,
        StepKind.CONFIRM_OFF,
        StepKind.WAIT_OFF,
        StepKind.SWITCH_ON,
        StepKind.CONFIRM_ON,
    ]
    assert all(s.ok for s in report.steps)
    assert report.step(StepKind.WAIT_OFF).duration_s >= 0.3
    assert report.duration_s >= 0.3
    # The printer's relay is inverted: power off is coil on.
    writes = sim.writes_to("printer")
    assert [(w.level, w.power_on, w.source) for w in writes] == [
        (True, False, "modbus"),
        (False, True, "modbus"),
    ]
    assert writes[1].at - writes[0].at >= 0.3
    assert await sim.power_on("printer")
    assert board.switching == frozenset()


@pytest.mark.asyncio
async def test_second_power_cycle_of_a_channel_is_refused_another_channel_runs(
    sim: SimulatedBoard, board: RelayBoard
) -> None:
    screen = asyncio.create_task(board.power_cycle("screen", 0.6))
    await until(lambda: bool(sim.writes_to("screen")))

    started = time.monotonic()
    with pytest.raises(ChannelBusy):
        await board.power_cycle("screen", 0.1)
    # Refused at once: queued behind the first it would have waited out most of its 0.6 s
    # off-time. The margin is for a loaded machine, not for the refusal.
    assert time.monotonic() - started < 0.4

    # While the screen is off on purpose, a poll shows it off but does not call that a fault.
    status = await board.poll()
    assert not status.power["screen"]
    assert status.switching == ("screen",)
    assert board.assess(status).health is Health.OK

    printer = await board.power_cycle("printer", 0.1)
    assert printer.outcome == "done"
    assert not screen.done()  # the printer's cycle ran while the screen's was still running

    report = await screen
    assert report.outcome == "done"
    assert [w.power_on for w in sim.writes_to("screen")] == [False, True]
    assert [w.power_on for w in sim.writes_to("printer")] == [False, True]
    assert await sim.power_on("screen")


@pytest.mark.asyncio
async def test_pulse_channel_is_cycled_by_the_board_itself(
    sim: SimulatedBoard, board: RelayBoard
) -> None:
    report = await board.power_cycle("terminal_psu", 0.4)

    assert report.outcome == "done"
    assert [s.kind for s in report.steps] == [
        StepKind.WRITE_PULSE,
        StepKind.AWAIT_OFF,
        StepKind.AWAIT_ON,
    ]
    assert report.duration_s >= 0.35
    writes = sim.writes_to("terminal_psu")
    # No Modbus coil write: the board's firmware switched it, off and then on.
    assert [(w.power_on, w.source) for w in writes] == [(False, "pulse"), (True, "pulse")]
    assert writes[1].at - writes[0].at >= 0.35
    assert await sim.power_on("terminal_psu")

    with pytest.raises(ConfigError) as caught:
        await board.set_channel("terminal_psu", False)
    assert caught.value.reason == "self_powered"
    assert len(sim.writes_to("terminal_psu")) == 2


@pytest.mark.asyncio
async def test_failed_power_cycle_switches_the_channel_back_on(sim: SimulatedBoard) -> None:
    async def unplugged_while_off(seconds: float) -> None:
        # The cable is pulled during the off-time and plugged in again before it ends.
        await sim.stop()
        await asyncio.sleep(seconds)
        await sim.start()

    relay = RelayBoard("controller", Endpoint(sim.url), CONFIG, sleep=unplugged_while_off)
    try:
        report = await relay.power_cycle("screen", 0.2)
    finally:
        await relay.close()

    assert report.outcome == "failed"
    assert report.failed_step is StepKind.SWITCH_ON
    assert report.reason in {"disconnected", "io_error"}
    assert report.steps[-1].kind is StepKind.RESTORE_ON
    assert report.restored is True
    assert [w.power_on for w in sim.writes_to("screen")] == [False, True]
    assert await sim.power_on("screen")


@pytest.mark.asyncio
async def test_cancelled_power_cycle_does_not_leave_the_channel_off(
    sim: SimulatedBoard, board: RelayBoard
) -> None:
    cycle = asyncio.create_task(board.power_cycle("id_card_reader", 30.0))
    await until(lambda: bool(sim.writes_to("id_card_reader")))
    assert not await sim.power_on("id_card_reader")

    cycle.cancel()  # the agent is stopping in the middle of the off-time
    with pytest.raises(asyncio.CancelledError):
        await cycle
    assert [w.power_on for w in sim.writes_to("id_card_reader")] == [False, True]
    assert await sim.power_on("id_card_reader")
    assert board.switching == frozenset()


@pytest.mark.asyncio
async def test_set_channel_switches_and_the_next_poll_shows_it(
    sim: SimulatedBoard, board: RelayBoard
) -> None:
    watch = DeviceWatch(board, INTERVAL)
    await board.set_channel("screen", False)
    assert not await sim.power_on("screen")
    seen = await watch.poll_once()
    assert (seen.assessment.health, seen.assessment.reasons) == (Health.DEGRADED, ("screen_off",))

    await board.set_channel("document_camera", True)
    await board.set_channel("screen", True)
    seen = await watch.poll_once()
    assert seen.assessment.health is Health.OK
    assert seen.status is not None
    assert seen.status.power["document_camera"]

    with pytest.raises(ConfigError) as caught:
        await board.power_cycle("coffee_machine")
    assert caught.value.reason == "unknown_channel"
