"""The ESC/POS driver against the simulated printer over the operating system's real byte
streams — a pty behind a stable symlink (what /dev/serial/by-id gives a USB printer) and
pyserial's socket:// — watched the way the agent watches it: every change of paper, cover or
cutter is seen within one poll interval, a ticket comes out with its Chinese intact, a printer
without paper is not sent tickets, and one that goes silent or is unplugged is reported absent
with a reason and picked up again when it comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from firmware_bridge.errors import RequestRefused
from firmware_bridge.escpos import protocol
from firmware_bridge.escpos.driver import EscPosPrinter
from firmware_bridge.escpos.protocol import PrinterStatus
from firmware_bridge.escpos.simulator import SimulatedPrinter
from firmware_bridge.health import Health
from firmware_bridge.link import Endpoint
from firmware_bridge.watch import DeviceWatch, Observation

pytestmark = pytest.mark.integration

INTERVAL_S = 0.25
TIMEOUT_S = 0.5
# What a poll may take on top of the interval on a loaded machine: four local round trips.
SLACK_S = 0.5
GONE_REASONS = {"port_missing", "connection_refused", "io_error", "disconnected", "closed"}

Changes = AsyncIterator[Observation[PrinterStatus]]


@pytest_asyncio.fixture(params=["pty", "socket"])
async def simulator(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SimulatedPrinter]:
    if request.param == "pty":
        sim = await SimulatedPrinter.on_pty(tmp_path / "usb-POS80_Printer-if00")
    else:
        sim = await SimulatedPrinter.on_socket()
    async with sim:
        yield sim


@pytest_asyncio.fixture
async def printer(simulator: SimulatedPrinter) -> AsyncIterator[EscPosPrinter]:
    driver = EscPosPrinter("receipt-printer", Endpoint(simulator.url), timeout_s=TIMEOUT_S)
    yield driver
    await driver.close()


@pytest_asyncio.fixture
async def changes(printer: EscPosPrinter) -> AsyncIterator[Changes]:
    watch = DeviceWatch(printer, INTERVAL_S)
    iterator = watch.changes()
    try:
        yield iterator
    finally:
        # Closing the generator runs its cleanup, which closes the driver's link.
        if isinstance(iterator, AsyncGenerator):
            await iterator.aclose()


async def next_change(
    changes: Changes, within_s: float = INTERVAL_S + SLACK_S
) -> Observation[PrinterStatus]:
    async with asyncio.timeout(within_s):
        return await anext(changes)


async def wait_for(
    changes: Changes, health: Health, within_s: float = INTERVAL_S + SLACK_S
) -> Observation[PrinterStatus]:
    """The first change to ``health``; others on the way (a different reason) are skipped."""
    async with asyncio.timeout(within_s):
        while True:
            observation = await anext(changes)
            if observation.assessment.health is health:
                return observation


@pytest.mark.asyncio
async def test_status_changes_are_seen_within_one_poll_interval(
    simulator: SimulatedPrinter, changes: Changes
) -> None:
    first = await next_change(changes)
    assert first.assessment.health is Health.OK
    steps: list[tuple[str, Health, tuple[str, ...]]] = [
        ("paper_near_end", Health.DEGRADED, ("paper_near_end",)),
        ("paper_out", Health.FAULTY, ("paper_out",)),
        ("cover_open", Health.FAULTY, ("paper_out", "cover_open")),
        ("cutter_error", Health.FAULTY, ("paper_out", "cover_open", "cutter_error")),
    ]
    for condition, health, reasons in steps:
        setattr(simulator.state, condition, True)
        seen = await next_change(changes)
        assert (seen.assessment.health, seen.assessment.reasons) == (health, reasons), condition
    simulator.state.paper_out = simulator.state.cover_open = simulator.state.cutter_error = False
    seen = await next_change(changes)
    assert (seen.assessment.health, seen.assessment.reasons) == (
        Health.DEGRADED,
        ("paper_near_end",),
    )
    simulator.state.paper_near_end = False
    assert (await next_change(changes)).assessment.health is Health.OK


@pytest.mark.asyncio
async def test_test_ticket_comes_out_with_its_chinese_intact(
    simulator: SimulatedPrinter, printer: EscPosPrinter
) -> None:
    result = await printer.print_test_ticket("城关镇便民服务中心-01", "2025-03-01 09:30")
    assert result.confirmed
    assert result.replaced == 0
    assert result.assessment_after.health is Health.OK
    expected = protocol.self_test_ticket("城关镇便民服务中心-01", "2025-03-01 09:30", "gb18030")
    # The status read after the ticket travels behind it on the same stream, so the printer
    # has processed the whole ticket by the time print_ticket returns.
    assert simulator.tickets == ["\n".join(expected)]
    assert "一网通办 政务服务 自助终端" in simulator.tickets[0]
    assert simulator.core.anomalies == []


@pytest.mark.asyncio
async def test_single_byte_printer_gets_its_code_page(simulator: SimulatedPrinter) -> None:
    driver = EscPosPrinter("p", Endpoint(simulator.url), code_page="cp866", timeout_s=TIMEOUT_S)
    try:
        result = await driver.print_ticket(["Талон № 18", "窗口 3"])
    finally:
        await driver.close()
    assert result.replaced == 2
    assert simulator.tickets == ["Талон № 18\n?? 3"]


@pytest.mark.asyncio
async def test_no_ticket_is_sent_to_a_printer_without_paper(
    simulator: SimulatedPrinter, printer: EscPosPrinter
) -> None:
    simulator.state.paper_out = True
    with pytest.raises(RequestRefused) as caught:
        await printer.print_ticket(["排队号 A018"])
    assert caught.value.reason == "paper_out"
    assert simulator.core.lost_bytes == 0  # refused before sending, not lost in the printer
    simulator.state.paper_out = False
    simulator.state.cover_open = True
    with pytest.raises(RequestRefused) as caught:
        await printer.print_ticket(["排队号 A018"])
    assert caught.value.reason == "cover_open"
    assert simulator.tickets == []


@pytest.mark.asyncio
async def test_paper_running_out_on_the_ticket_is_reported(
    simulator: SimulatedPrinter, printer: EscPosPrinter
) -> None:
    simulator.state.paper_left_tickets = 1
    result = await printer.print_ticket(["排队号 A019"])
    assert not result.confirmed
    assert result.assessment_after.reasons == ("paper_out",)
    assert not result.status_before.paper_out
    assert simulator.tickets == ["排队号 A019"]


@pytest.mark.asyncio
async def test_silent_printer_is_absent_within_the_request_timeout(
    simulator: SimulatedPrinter, printer: EscPosPrinter
) -> None:
    watch = DeviceWatch(printer, INTERVAL_S)
    assert (await watch.poll_once()).assessment.health is Health.OK
    simulator.state.silent = True
    started = time.monotonic()
    observation = await watch.poll_once()
    took = time.monotonic() - started
    assert (observation.assessment.health, observation.assessment.reasons) == (
        Health.ABSENT,
        ("no_answer",),
    )
    assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S
    simulator.state.silent = False
    assert (await watch.poll_once()).assessment.health is Health.OK


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("knob", "value", "reason"),
    [("broken_fixed_bits", True, "bad_fixed_bits"), ("extra_reply_bytes", b"\x12", "overlong")],
)
async def test_garbled_answers_make_the_printer_faulty(
    simulator: SimulatedPrinter,
    printer: EscPosPrinter,
    knob: str,
    value: object,
    reason: str,
) -> None:
    watch = DeviceWatch(printer, INTERVAL_S)
    setattr(simulator.state, knob, value)
    observation = await watch.poll_once()
    assert (observation.assessment.health, observation.assessment.reasons) == (
        Health.FAULTY,
        (reason,),
    )
    setattr(simulator.state, knob, type(value)())
    assert (await watch.poll_once()).assessment.health is Health.OK


@pytest.mark.asyncio
async def test_unplugged_printer_is_absent_and_recovers_when_plugged_back(
    simulator: SimulatedPrinter, printer: EscPosPrinter, changes: Changes
) -> None:
    assert (await next_change(changes)).assessment.health is Health.OK
    opens = printer.connection.opens

    await simulator.unplug()
    gone = await wait_for(changes, Health.ABSENT)
    assert gone.assessment.reasons
    assert set(gone.assessment.reasons) <= GONE_REASONS
    # Once the old link is closed, the reason says what a person would look for.
    expected = "port_missing" if simulator.url.startswith("/") else "connection_refused"
    async with asyncio.timeout(3 * INTERVAL_S + SLACK_S):
        while gone.assessment.reasons != (expected,):
            gone = await next_change(changes)

    simulator.state.paper_near_end = True  # it comes back with a fresh, shorter roll
    await simulator.replug()
    back = await next_change(changes)
    assert (back.assessment.health, back.assessment.reasons) == (
        Health.DEGRADED,
        ("paper_near_end",),
    )
    assert printer.connection.opens > opens  # the same driver object reopened its link
    result = await printer.print_ticket(["恢复后 打印"])
    assert result.confirmed
    assert simulator.tickets == ["恢复后 打印"]
