"""PointBatcher against a fake InfluxDB write: when batches go out, what they contain, and that
a delivery is acknowledged only once its points are stored (or definitively refused)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator

import pytest

from fleet_server import batcher as batcher_module
from fleet_server.batcher import PointBatcher
from fleet_server.lineproto import Point
from tests.component.fakes import FakeInflux, Journal, eventually

TS0 = 1_732_190_400_000
log = logging.getLogger("test.batcher")


def point(seq: int) -> Point:
    return Point("system", {"terminal": "kiosk-001"}, {"seq": seq}, TS0 + seq)


def line(seq: int) -> str:
    """What InfluxDB should receive for ``point(seq)``, spelled out by hand."""
    return f"system,terminal=kiosk-001 seq={seq}i {TS0 + seq}"


def body(*seqs: int) -> bytes:
    return "\n".join(line(s) for s in seqs).encode()


def message(journal: Journal, *seqs: int) -> tuple[list[Point], batcher_module.Ack]:
    """The points of one delivery and its acknowledgement, named after the points' seqs."""
    return [point(s) for s in seqs], journal.ack(",".join(str(s) for s in seqs))


def assert_each_ack_follows_its_write(journal: Journal) -> None:
    stored: set[str] = set()
    for entry in journal.entries:
        if entry.startswith("write "):
            stored.update(entry.removeprefix("write ").split("\n"))
        else:
            seqs = [int(s) for s in entry.removeprefix("ack ").split(",")]
            missing = [s for s in seqs if line(s) not in stored]
            assert not missing, f"{entry} ran before points {missing} were stored"


@contextlib.asynccontextmanager
async def running(batcher: PointBatcher) -> AsyncIterator[asyncio.Event]:
    """Run the batcher in a task; on exit stop it and wait for its final flush."""
    stopping = asyncio.Event()
    task = asyncio.create_task(batcher.run(stopping), name="batcher")
    try:
        yield stopping
    finally:
        stopping.set()
        await asyncio.wait_for(task, timeout=5)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 0.001)
    monkeypatch.setattr(batcher_module, "RETRY_MAX_S", 0.004)


@pytest.mark.asyncio
async def test_a_full_batch_is_written_at_once_in_order_then_acknowledged() -> None:
    journal = Journal()
    influx = FakeInflux(journal)
    batcher = PointBatcher(influx.write, max_points=3, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1, 2))
        await batcher.add(*message(journal, 3))
        # Far sooner than max_delay_s: reaching max_points is what sends the batch.
        await eventually(lambda: len(journal.acks()) == 2, timeout_s=2.0)

        assert influx.stored == [body(1, 2, 3)]
        assert journal.entries == [f"write {body(1, 2, 3).decode()}", "ack 1,2", "ack 3"]
        assert batcher.counters.points_written == 3
        assert batcher.counters.batches_written == 1
        assert batcher.counters.write_retries == 0
        assert batcher.counters.points_rejected == 0


@pytest.mark.asyncio
async def test_fewer_points_than_a_batch_are_written_after_max_delay() -> None:
    journal = Journal()
    influx = FakeInflux(journal)
    batcher = PointBatcher(influx.write, max_points=1000, max_delay_s=0.05, logger=log)
    loop = asyncio.get_running_loop()
    async with running(batcher):
        added_at = loop.time()
        await batcher.add(*message(journal, 1))
        await batcher.add(*message(journal, 2))
        await asyncio.sleep(0.01)
        assert influx.stored == []
        assert journal.acks() == []

        await eventually(lambda: len(journal.acks()) == 2)

        assert influx.attempt_times[0] - added_at >= 0.045
        assert influx.stored == [body(1, 2)]
        assert journal.acks() == ["ack 1", "ack 2"]
        assert_each_ack_follows_its_write(journal)
        assert batcher.counters.batches_written == 1
        assert batcher.counters.points_written == 2

        # A later, separate trickle makes a batch of its own.
        await batcher.add(*message(journal, 3))
        await eventually(lambda: len(journal.acks()) == 3)
        assert influx.stored == [body(1, 2), body(3)]
        assert batcher.counters.batches_written == 2
        assert batcher.counters.points_written == 3


@pytest.mark.asyncio
@pytest.mark.usefixtures("fast_retries")
async def test_while_influx_is_down_the_batch_is_retried_and_nothing_is_acknowledged() -> None:
    journal = Journal()
    influx = FakeInflux(journal)
    influx.mode = "down"
    batcher = PointBatcher(influx.write, max_points=2, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1))
        await batcher.add(*message(journal, 2))
        await eventually(lambda: influx.attempts >= 5)
        assert journal.entries == []
        assert batcher.counters.points_written == 0
        assert batcher.counters.batches_written == 0

        influx.mode = "up"
        await eventually(lambda: len(journal.acks()) == 2)

        # The same batch, once, when InfluxDB is back; acknowledged only then.
        assert influx.stored == [body(1, 2)]
        assert journal.entries == [f"write {body(1, 2).decode()}", "ack 1", "ack 2"]
        assert batcher.counters.write_retries == influx.attempts - 1
        assert batcher.counters.batches_written == 1
        assert batcher.counters.points_written == 2
        assert batcher.counters.points_rejected == 0


@pytest.mark.asyncio
async def test_retries_back_off_doubling_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 0.01)
    monkeypatch.setattr(batcher_module, "RETRY_MAX_S", 0.04)
    journal = Journal()
    influx = FakeInflux(journal)
    influx.fail_next = 9
    batcher = PointBatcher(influx.write, max_points=1, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1))
        await eventually(lambda: journal.acks() == ["ack 1"], timeout_s=5.0)

    times = influx.attempt_times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 9
    tolerance = 0.003  # the loop clock's resolution, not the batcher's
    for gap, least in zip(
        gaps, [0.01, 0.02, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04], strict=True
    ):
        assert gap >= least - tolerance
    # Uncapped doubling would wait 0.01 * (2**9 - 1) = 5.11 s in all; the cap keeps it at 0.31 s.
    assert times[-1] - times[0] < 2.0
    assert batcher.counters.write_retries == 9
    assert influx.stored == [body(1)]


@pytest.mark.asyncio
@pytest.mark.usefixtures("fast_retries")
async def test_add_waits_while_a_full_batch_cannot_be_written() -> None:
    journal = Journal()
    influx = FakeInflux(journal)
    influx.mode = "down"
    batcher = PointBatcher(influx.write, max_points=2, max_delay_s=0.05, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1, 2))
        await eventually(lambda: influx.attempts >= 2)

        blocked = asyncio.create_task(batcher.add(*message(journal, 3)), name="blocked-add")
        await asyncio.sleep(0.05)
        assert not blocked.done(), "add() took more points in while InfluxDB is down"

        influx.mode = "up"
        await asyncio.wait_for(blocked, timeout=2)
        # The waiting delivery is not lost: it is written after the stuck batch.
        await eventually(lambda: len(journal.acks()) == 2)

    assert influx.stored == [body(1, 2), body(3)]
    assert journal.acks() == ["ack 1,2", "ack 3"]
    assert_each_ack_follows_its_write(journal)
    assert batcher.counters.points_written == 3


@pytest.mark.asyncio
@pytest.mark.usefixtures("fast_retries")
async def test_at_most_max_points_are_taken_in_during_an_outage() -> None:
    journal = Journal()
    influx = FakeInflux(journal)
    influx.mode = "down"
    batcher = PointBatcher(influx.write, max_points=3, max_delay_s=0.01, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1))  # goes out after max_delay_s, and fails
        await eventually(lambda: influx.attempts >= 2)

        for seq in (2, 3, 4):
            await asyncio.wait_for(batcher.add(*message(journal, seq)), timeout=1)
        blocked = asyncio.create_task(batcher.add(*message(journal, 5)), name="blocked-add")
        await asyncio.sleep(0.05)
        assert not blocked.done(), "more than max_points pending while InfluxDB is down"
        assert journal.entries == []

        influx.mode = "up"
        await asyncio.wait_for(blocked, timeout=2)
        await eventually(lambda: len(journal.acks()) == 5)

    stored_lines = [row for b in influx.stored for row in b.decode().split("\n")]
    assert stored_lines == [line(s) for s in (1, 2, 3, 4, 5)]
    assert influx.stored[0] == body(1)
    assert sorted(journal.acks()) == ["ack 1", "ack 2", "ack 3", "ack 4", "ack 5"]
    assert_each_ack_follows_its_write(journal)
    assert batcher.counters.points_written == 5
    assert batcher.counters.batches_written == len(influx.stored)


@pytest.mark.asyncio
async def test_a_refused_batch_is_acknowledged_counted_and_not_retried() -> None:
    journal = Journal()
    influx = FakeInflux(journal)
    influx.mode = "rejecting"
    batcher = PointBatcher(influx.write, max_points=2, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1, 2))
        await eventually(lambda: journal.acks() == ["ack 1,2"])
        await asyncio.sleep(0.05)
        assert influx.attempts == 1

        assert batcher.counters.points_rejected == 2
        assert batcher.counters.points_written == 0
        assert batcher.counters.batches_written == 0
        assert batcher.counters.write_retries == 0

        # The batcher carries on with the next batch.
        influx.mode = "up"
        await batcher.add(*message(journal, 3, 4))
        await eventually(lambda: len(journal.acks()) == 2)
        assert influx.stored == [body(3, 4)]
        assert batcher.counters.points_written == 2
        assert batcher.counters.points_rejected == 2


@pytest.mark.asyncio
async def test_stopping_while_influx_is_down_leaves_deliveries_unacknowledged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long backoff: stopping must not wait for it.
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 30.0)
    monkeypatch.setattr(batcher_module, "RETRY_MAX_S", 30.0)
    journal = Journal()
    influx = FakeInflux(journal)
    influx.mode = "down"
    batcher = PointBatcher(influx.write, max_points=10, max_delay_s=0.01, logger=log)
    stopping = asyncio.Event()
    run = asyncio.create_task(batcher.run(stopping), name="batcher")

    await batcher.add(*message(journal, 1))  # in the batch being retried
    await eventually(lambda: influx.attempts >= 1)
    await batcher.add(*message(journal, 2))  # still waiting for the next batch

    stopping.set()
    await asyncio.wait_for(run, timeout=2)

    assert journal.entries == []
    assert influx.stored == []
    assert batcher.counters.points_written == 0
    assert batcher.counters.batches_written == 0


@pytest.mark.asyncio
async def test_stopping_writes_and_acknowledges_what_is_pending() -> None:
    journal = Journal()
    influx = FakeInflux(journal)
    batcher = PointBatcher(influx.write, max_points=100, max_delay_s=0.2, logger=log)
    stopping = asyncio.Event()
    run = asyncio.create_task(batcher.run(stopping), name="batcher")
    await batcher.add(*message(journal, 1, 2))
    await asyncio.sleep(0)
    stopping.set()
    await asyncio.wait_for(run, timeout=2)

    assert influx.stored == [body(1, 2)]
    assert journal.entries == [f"write {body(1, 2).decode()}", "ack 1,2"]
