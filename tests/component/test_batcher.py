"""PointBatcher against a fake InfluxDB write and a real spool (SQLite in tmp_path): when
batches go out, what they contain, that a delivery is acknowledged only once its points are
durable (in InfluxDB or in the spool), that the spool is replayed in order and only deleted
once InfluxDB took it, and that a full spool holds deliveries back instead of dropping any."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from fleet_server import batcher as batcher_module
from fleet_server.batcher import PointBatcher, SpoolDepth
from fleet_server.errors import InfluxUnavailable
from fleet_server.lineproto import Point, encode_points
from fleet_server.spool import Spool
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


def lines(*seqs: int) -> tuple[bytes, int]:
    """The line protocol of ``point(seq)`` for each seq, and how many points that is."""
    return encode_points(point(s) for s in seqs), len(seqs)


def message(journal: Journal, *seqs: int) -> tuple[bytes, int, batcher_module.Ack]:
    """The lines of one delivery, their count and its acknowledgement, named after the points'
    seqs."""
    return *lines(*seqs), journal.ack(",".join(str(s) for s in seqs))


def stored_lines(influx: FakeInflux) -> list[str]:
    return [row for b in influx.stored for row in b.decode().split("\n")]


def assert_each_ack_follows_its_store(journal: Journal) -> None:
    """Every ``ack`` comes after its points were written to InfluxDB or to the spool."""
    stored: set[str] = set()
    for entry in journal.entries:
        if entry.startswith(("write ", "spool ")):
            stored.update(entry.split(" ", 1)[1].split("\n"))
        else:
            seqs = [int(s) for s in entry.removeprefix("ack ").split(",")]
            missing = [s for s in seqs if line(s) not in stored]
            assert not missing, f"{entry} ran before points {missing} were durable"


class JournaledSpool(Spool):
    """The real spool, noting ``spool <body>`` in the journal once an append is durable."""

    def __init__(self, path: Path, max_bytes: int, journal: Journal) -> None:
        super().__init__(path, max_bytes)
        self.journal = journal

    async def append(self, body: bytes, points: int) -> None:
        await super().append(body, points)
        self.journal.entries.append(f"spool {body.decode()}")


class SlowInflux(FakeInflux):
    """InfluxDB that takes ``delay_s`` to answer each write."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.delay_s = 0.0

    async def write(self, body: bytes) -> None:
        await asyncio.sleep(self.delay_s)
        await super().write(body)


@pytest.fixture
def journal() -> Journal:
    return Journal()


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "spool.sqlite3"


@pytest_asyncio.fixture
async def spool(spool_path: Path, journal: Journal) -> AsyncIterator[JournaledSpool]:
    async with JournaledSpool(spool_path, 1_000_000, journal) as spool:
        yield spool


@contextlib.asynccontextmanager
async def running(batcher: PointBatcher) -> AsyncIterator[asyncio.Event]:
    """Run the batcher in a task; on exit stop it and wait for its final flush."""
    stopping = asyncio.Event()
    task = asyncio.create_task(batcher.run(stopping), name="batcher")
    await asyncio.sleep(0)  # running: due batches are handed over from add() at once
    try:
        yield stopping
    finally:
        stopping.set()
        await asyncio.wait_for(task, timeout=5)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 0.001)
    monkeypatch.setattr(batcher_module, "RETRY_MAX_S", 0.004)
    monkeypatch.setattr(batcher_module, "HOLD_RECHECK_S", 0.01)


@pytest.mark.asyncio
async def test_a_full_batch_is_written_at_once_in_order_then_acknowledged(
    journal: Journal, spool: Spool
) -> None:
    influx = FakeInflux(journal)
    batcher = PointBatcher(influx.write, spool, max_points=3, max_delay_s=30.0, logger=log)
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
        assert batcher.counters.batches_spooled == 0
        assert spool.depth == SpoolDepth(0, 0, 0)


@pytest.mark.asyncio
async def test_fewer_points_than_a_batch_are_written_after_max_delay(
    journal: Journal, spool: Spool
) -> None:
    influx = FakeInflux(journal)
    batcher = PointBatcher(influx.write, spool, max_points=1000, max_delay_s=0.05, logger=log)
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
        assert_each_ack_follows_its_store(journal)
        assert batcher.counters.batches_written == 1
        assert batcher.counters.points_written == 2

        # A later, separate trickle makes a batch of its own.
        await batcher.add(*message(journal, 3))
        await eventually(lambda: len(journal.acks()) == 3)
        assert influx.stored == [body(1, 2), body(3)]
        assert batcher.counters.batches_written == 2
        assert batcher.counters.points_written == 3


class WindowAck:
    """A delivery's ack that also tells the broker's window (Receive Maximum), as MQTT
    ingest's do; ``window[0]`` counts the deliveries not acknowledged yet."""

    def __init__(self, journal: Journal, name: str, window: list[int], maximum: int) -> None:
        self._record = journal.ack(name)
        self._window = window
        self._maximum = maximum
        window[0] += 1

    def __call__(self) -> None:
        self._record()
        self._window[0] -= 1

    def window(self) -> int:
        return self._maximum


@pytest.mark.asyncio
async def test_a_quarter_of_the_brokers_window_is_a_batch_without_waiting_for_the_timer(
    journal: Journal, spool: Spool
) -> None:
    """Receive Maximum caps unacknowledged deliveries: with fewer points in them than a batch,
    waiting for max_delay_s would let through one window per delay. A quarter of it is a batch
    (three may be on their way, the last quarter keeps arriving)."""
    assert pytest.approx(1 / 4) == batcher_module.WINDOW_DUE
    influx = FakeInflux(journal)
    batcher = PointBatcher(influx.write, spool, max_points=1000, max_delay_s=30.0, logger=log)
    window = [0]
    async with running(batcher):
        for seq in (1, 2):
            await batcher.add(*lines(seq), WindowAck(journal, str(seq), window, maximum=12))
        await asyncio.sleep(0.05)
        assert influx.stored == []  # 2 deliveries of a window of 12: not yet

        await batcher.add(*lines(3), WindowAck(journal, "3", window, maximum=12))  # 3 of 12
        await eventually(lambda: len(journal.acks()) == 3, timeout_s=2.0)
        assert influx.stored == [body(1, 2, 3)]
        assert_each_ack_follows_its_store(journal)
        assert window == [0]

        # A plain callable says nothing of a window: the timer decides, as before.
        await batcher.add(*message(journal, 4))
        await asyncio.sleep(0.05)
        assert influx.stored == [body(1, 2, 3)]


@pytest.mark.asyncio
@pytest.mark.usefixtures("fast_retries")
async def test_while_influx_is_down_batches_are_spooled_and_acknowledged_then_replayed(
    journal: Journal, spool: Spool
) -> None:
    influx = FakeInflux(journal)
    influx.mode = "down"
    batcher = PointBatcher(influx.write, spool, max_points=2, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1))
        await batcher.add(*message(journal, 2))
        await batcher.add(*message(journal, 3, 4))
        await eventually(lambda: len(journal.acks()) == 3)

        # Durable on disk first, acknowledged after; InfluxDB has nothing yet.
        assert journal.entries == [
            f"spool {body(1, 2).decode()}",
            "ack 1",
            "ack 2",
            f"spool {body(3, 4).decode()}",
            "ack 3,4",
        ]
        assert spool.depth == SpoolDepth(2, 4, len(body(1, 2)) + len(body(3, 4)))
        await eventually(lambda: influx.attempts >= 5)
        assert spool.depth.batches == 2, "a batch left the spool that InfluxDB never took"
        assert batcher.counters.points_written == 0

        influx.mode = "up"
        await eventually(lambda: batcher.counters.batches_replayed == 2)

        # Replayed head first, one run of at most max_points per write, each exactly once.
        assert influx.stored == [body(1, 2), body(3, 4)]
        assert batcher.counters.batches_spooled == 2
        assert batcher.counters.points_spooled == 4
        assert batcher.counters.batches_replayed == 2
        assert batcher.counters.points_replayed == 4
        assert batcher.counters.points_written == 4
        assert batcher.counters.write_retries == influx.attempts - 2
        assert spool.depth == SpoolDepth(0, 0, 0)

        # With the spool empty again, the next batch goes straight to InfluxDB.
        await batcher.add(*message(journal, 5, 6))
        await eventually(lambda: len(journal.acks()) == 4)
        assert journal.entries[-2:] == [f"write {body(5, 6).decode()}", "ack 5,6"]
    assert_each_ack_follows_its_store(journal)


@pytest.mark.asyncio
async def test_new_batches_queue_behind_the_spool_so_influx_gets_them_in_order(
    journal: Journal, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 1.0)
    influx = FakeInflux(journal)
    influx.fail_next = 1  # the first write fails; InfluxDB answers from then on
    batcher = PointBatcher(influx.write, spool, max_points=2, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1, 2))
        await eventually(lambda: journal.acks() == ["ack 1,2"])
        assert influx.attempts == 1

        # InfluxDB would take this batch now, but older points wait in the spool: it goes
        # behind them instead of overtaking them.
        await batcher.add(*message(journal, 3, 4))
        await eventually(lambda: len(journal.acks()) == 2)
        assert influx.attempts == 1
        assert spool.depth.batches == 2

        await eventually(lambda: spool.depth.batches == 0, timeout_s=5.0)
    assert influx.stored == [body(1, 2), body(3, 4)]
    assert stored_lines(influx) == [line(s) for s in (1, 2, 3, 4)]
    assert_each_ack_follows_its_store(journal)


@pytest.mark.asyncio
async def test_a_write_slower_than_the_bound_is_abandoned_and_spooled(
    journal: Journal, spool: Spool
) -> None:
    influx = SlowInflux(journal)
    influx.delay_s = 5.0
    batcher = PointBatcher(
        influx.write, spool, max_points=2, max_delay_s=30.0, logger=log, slow_write_s=0.05
    )
    loop = asyncio.get_running_loop()
    async with running(batcher):
        started = loop.time()
        await batcher.add(*message(journal, 1, 2))
        await eventually(lambda: journal.acks() == ["ack 1,2"])
        # Acknowledged from the spool after the bound, not after InfluxDB's five seconds.
        assert loop.time() - started < 1.0
        assert journal.entries == [f"spool {body(1, 2).decode()}", "ack 1,2"]
        assert batcher.counters.slow_writes == 1
        assert batcher.counters.write_retries == 1

        influx.delay_s = 0.0
        await eventually(lambda: batcher.counters.batches_replayed == 1)
    assert influx.stored == [body(1, 2)]
    assert spool.depth.batches == 0


@pytest.mark.asyncio
async def test_retries_back_off_doubling_up_to_the_cap(
    journal: Journal, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 0.01)
    monkeypatch.setattr(batcher_module, "RETRY_MAX_S", 0.04)
    influx = FakeInflux(journal)
    influx.fail_next = 9
    batcher = PointBatcher(influx.write, spool, max_points=1, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1))
        await eventually(lambda: influx.stored == [body(1)], timeout_s=5.0)

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
    assert journal.acks() == ["ack 1"]


@pytest.mark.asyncio
@pytest.mark.usefixtures("fast_retries")
async def test_a_full_spool_holds_deliveries_back_and_add_waits(
    journal: Journal, spool_path: Path
) -> None:
    influx = FakeInflux(journal)
    influx.mode = "down"
    # Room for one batch of two points, and not a point more.
    async with JournaledSpool(spool_path, len(body(1, 2)) + 10, journal) as spool:
        batcher = PointBatcher(influx.write, spool, max_points=3, max_delay_s=0.01, logger=log)
        async with running(batcher):
            await batcher.add(*message(journal, 1, 2))
            await eventually(lambda: journal.acks() == ["ack 1,2"])

            await batcher.add(*message(journal, 3))  # due after max_delay_s, fits nowhere
            await eventually(lambda: batcher.holding)
            # MAX_IN_FLIGHT batches may be on their way (here: held; the first is 3's) and one
            # more fills up in memory, three points each ...
            last = 3 + 3 * batcher_module.MAX_IN_FLIGHT
            for seq in range(4, last + 1):
                await asyncio.wait_for(batcher.add(*message(journal, seq)), timeout=1)
            blocked = asyncio.create_task(batcher.add(*message(journal, last + 1)), name="blocked")
            await asyncio.sleep(0.05)
            # ... and then nothing more is taken in: the broker keeps the rest.
            assert not blocked.done(), "add() took more points in while the spool is full"
            assert journal.acks() == ["ack 1,2"], "a delivery was acknowledged but not stored"
            assert spool.depth.batches == 1

            influx.mode = "up"
            await asyncio.wait_for(blocked, timeout=2)
            await eventually(lambda: len(journal.acks()) == last)
            await eventually(lambda: spool.depth.batches == 0)
            assert not batcher.holding

    # Held batches may reach InfluxDB in any order once it is back (each point has its own
    # timestamp); every point must be there, and the acknowledgements keep their order.
    by_time = sorted(stored_lines(influx), key=lambda row: int(row.rsplit(" ", 1)[1]))
    assert by_time == [line(s) for s in range(1, last + 2)]
    assert journal.acks() == ["ack 1,2"] + [f"ack {s}" for s in range(3, last + 2)]
    assert_each_ack_follows_its_store(journal)
    assert batcher.counters.points_written == last + 1
    assert batcher.counters.points_rejected == 0


@pytest.mark.asyncio
@pytest.mark.usefixtures("fast_retries")
async def test_a_restarted_batcher_replays_the_spool_before_anything_new(
    journal: Journal, spool_path: Path
) -> None:
    influx = FakeInflux(journal)
    influx.mode = "down"
    async with JournaledSpool(spool_path, 1_000_000, journal) as spool:
        batcher = PointBatcher(influx.write, spool, max_points=2, max_delay_s=0.01, logger=log)
        async with running(batcher):
            await batcher.add(*message(journal, 1, 2))
            await batcher.add(*message(journal, 3))
            await eventually(lambda: len(journal.acks()) == 2)
            await eventually(lambda: influx.attempts >= 3)
    # The process is gone; the acknowledged points live on in the file only.
    assert influx.stored == []

    influx.mode = "up"
    async with JournaledSpool(spool_path, 1_000_000, journal) as spool:
        assert spool.depth.batches == 2
        assert spool.depth.points == 3
        batcher = PointBatcher(influx.write, spool, max_points=2, max_delay_s=0.01, logger=log)
        async with running(batcher):
            await batcher.add(*message(journal, 4))
            await eventually(lambda: len(journal.acks()) == 3)
            await eventually(lambda: spool.depth.batches == 0)
            # Counted once the drop returned, a moment after the depth changed: wait for it
            # before stopping, which would cut the replayer off in between.
            await eventually(lambda: batcher.counters.points_replayed >= 3)

    assert stored_lines(influx) == [line(s) for s in (1, 2, 3, 4)]
    assert influx.stored[0] == body(1, 2)


@pytest.mark.asyncio
async def test_a_spooled_batch_stays_until_influx_accepts_it_even_across_a_stop(
    journal: Journal, spool_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 0.001)
    monkeypatch.setattr(batcher_module, "RETRY_MAX_S", 0.002)
    influx = SlowInflux(journal)
    influx.mode = "down"
    async with JournaledSpool(spool_path, 1_000_000, journal) as spool:
        batcher = PointBatcher(influx.write, spool, max_points=2, max_delay_s=0.01, logger=log)
        async with running(batcher):
            await batcher.add(*message(journal, 1, 2))
            await eventually(lambda: influx.attempts >= 4)
            assert spool.depth.batches == 1
            # InfluxDB comes back but answers slowly: stopped while the replay write is on
            # its way, the batch must still be in the spool.
            influx.delay_s = 5.0
            influx.mode = "up"
            await asyncio.sleep(0.05)
        assert influx.stored == []
    async with Spool(spool_path, 1_000_000) as reopened:
        assert reopened.depth.batches == 1
        run = await reopened.head(100)
        assert run is not None
        assert run.body == body(1, 2)


@pytest.mark.asyncio
async def test_a_refused_batch_is_acknowledged_counted_and_not_retried(
    journal: Journal, spool: Spool
) -> None:
    influx = FakeInflux(journal)
    influx.mode = "rejecting"
    batcher = PointBatcher(influx.write, spool, max_points=2, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1, 2))
        await eventually(lambda: journal.acks() == ["ack 1,2"])
        await asyncio.sleep(0.05)
        assert influx.attempts == 1

        assert batcher.counters.points_rejected == 2
        assert batcher.counters.points_written == 0
        assert batcher.counters.batches_written == 0
        assert batcher.counters.write_retries == 0
        assert spool.depth.batches == 0

        # The batcher carries on with the next batch.
        influx.mode = "up"
        await batcher.add(*message(journal, 3, 4))
        await eventually(lambda: len(journal.acks()) == 2)
        assert influx.stored == [body(3, 4)]
        assert batcher.counters.points_written == 2
        assert batcher.counters.points_rejected == 2


@pytest.mark.asyncio
async def test_stopping_while_influx_is_down_spools_what_is_pending(
    journal: Journal, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long backoff: stopping must not wait for it.
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 30.0)
    monkeypatch.setattr(batcher_module, "RETRY_MAX_S", 30.0)
    influx = FakeInflux(journal)
    influx.mode = "down"
    batcher = PointBatcher(influx.write, spool, max_points=10, max_delay_s=0.01, logger=log)
    stopping = asyncio.Event()
    run = asyncio.create_task(batcher.run(stopping), name="batcher")

    await batcher.add(*message(journal, 1))  # written, failed, spooled
    await eventually(lambda: journal.acks() == ["ack 1"])
    await batcher.add(*message(journal, 2))  # still waiting for the next batch

    stopping.set()
    await asyncio.wait_for(run, timeout=2)

    assert journal.entries == [
        f"spool {body(1).decode()}",
        "ack 1",
        f"spool {body(2).decode()}",
        "ack 2",
    ]
    assert influx.stored == []
    assert influx.attempts == 1
    assert spool.depth.batches == 2


@pytest.mark.asyncio
async def test_stopping_with_a_full_spool_leaves_deliveries_unacknowledged(
    journal: Journal, spool_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 30.0)
    monkeypatch.setattr(batcher_module, "RETRY_MAX_S", 30.0)
    monkeypatch.setattr(batcher_module, "HOLD_RECHECK_S", 30.0)
    influx = FakeInflux(journal)
    influx.mode = "down"
    async with JournaledSpool(spool_path, len(body(1)), journal) as spool:
        batcher = PointBatcher(influx.write, spool, max_points=10, max_delay_s=0.01, logger=log)
        stopping = asyncio.Event()
        run = asyncio.create_task(batcher.run(stopping), name="batcher")
        await batcher.add(*message(journal, 1))
        await eventually(lambda: journal.acks() == ["ack 1"])
        await batcher.add(*message(journal, 2))  # held: the spool is full
        await eventually(lambda: batcher.holding)
        await batcher.add(*message(journal, 3))  # waiting for the next batch

        stopping.set()
        await asyncio.wait_for(run, timeout=2)

    # The broker hands 2 and 3 out again to whichever server process runs next.
    assert journal.acks() == ["ack 1"]
    assert influx.stored == []


@pytest.mark.asyncio
async def test_stopping_writes_and_acknowledges_what_is_pending(
    journal: Journal, spool: Spool
) -> None:
    influx = FakeInflux(journal)
    batcher = PointBatcher(influx.write, spool, max_points=100, max_delay_s=0.2, logger=log)
    stopping = asyncio.Event()
    run = asyncio.create_task(batcher.run(stopping), name="batcher")
    await batcher.add(*message(journal, 1, 2))
    await asyncio.sleep(0)
    stopping.set()
    await asyncio.wait_for(run, timeout=2)

    assert influx.stored == [body(1, 2)]
    assert journal.entries == [f"write {body(1, 2).decode()}", "ack 1,2"]


class GatedInflux(FakeInflux):
    """InfluxDB whose writes each wait for the test to answer them: ``answer(i)`` lets write
    ``i`` (0-based, in the order they were sent) through, ``refuse(i)`` makes it fail as
    unavailable. ``concurrent`` counts writes on their way; ``peak`` is its maximum."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.gates: list[asyncio.Future[bool]] = []
        self.concurrent = 0
        self.peak = 0

    async def write(self, body: bytes) -> None:
        gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        self.concurrent += 1
        self.peak = max(self.peak, self.concurrent)
        try:
            if not await gate:
                self.attempt_times.append(asyncio.get_running_loop().time())
                raise InfluxUnavailable("connection reset")
        finally:
            self.concurrent -= 1
        await super().write(body)

    def answer(self, index: int, *, ok: bool = True) -> None:
        self.gates[index].set_result(ok)


@pytest.mark.asyncio
async def test_max_in_flight_batches_are_written_at_once_and_never_more(
    journal: Journal, spool: Spool
) -> None:
    most = batcher_module.MAX_IN_FLIGHT
    influx = GatedInflux(journal)
    batcher = PointBatcher(influx.write, spool, max_points=2, max_delay_s=30.0, logger=log)
    async with running(batcher):
        for n in range(most):
            await batcher.add(*message(journal, 2 * n + 1, 2 * n + 2))
        await eventually(lambda: influx.concurrent == most)
        await batcher.add(*message(journal, 2 * most + 1, 2 * most + 2))  # due, waits for a place
        await asyncio.sleep(0.05)
        assert len(influx.gates) == most
        assert journal.acks() == []

        influx.answer(0)
        await eventually(lambda: len(influx.gates) == most + 1)  # it goes once one is done
        assert journal.acks() == ["ack 1,2"]
        for gate in range(1, most + 1):
            influx.answer(gate)
        await eventually(lambda: len(journal.acks()) == most + 1)
    assert influx.peak == most
    assert journal.acks() == [f"ack {2 * n + 1},{2 * n + 2}" for n in range(most + 1)]
    assert_each_ack_follows_its_store(journal)


@pytest.mark.asyncio
async def test_a_later_batch_written_first_is_acknowledged_after_the_earlier_one(
    journal: Journal, spool: Spool
) -> None:
    """PUBACKs go out in the order the deliveries came (MQTT 5.0 §4.6), whichever write
    InfluxDB answers first."""
    influx = GatedInflux(journal)
    batcher = PointBatcher(influx.write, spool, max_points=2, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1, 2))
        await batcher.add(*message(journal, 3, 4))
        await eventually(lambda: influx.concurrent == 2)
        influx.answer(1)  # the second batch is stored first ...
        await eventually(lambda: influx.stored == [body(3, 4)])
        await asyncio.sleep(0.05)
        assert journal.acks() == []  # ... but waits for the first to be acknowledged
        influx.answer(0)
        await eventually(lambda: len(journal.acks()) == 2)
    assert journal.acks() == ["ack 1,2", "ack 3,4"]
    assert_each_ack_follows_its_store(journal)


@pytest.mark.asyncio
async def test_batches_failing_out_of_order_are_spooled_in_the_order_they_came(
    journal: Journal, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 30.0)  # no replay during the test
    influx = GatedInflux(journal)
    batcher = PointBatcher(influx.write, spool, max_points=2, max_delay_s=30.0, logger=log)
    async with running(batcher):
        await batcher.add(*message(journal, 1, 2))
        await batcher.add(*message(journal, 3, 4))
        await eventually(lambda: influx.concurrent == 2)
        influx.answer(1, ok=False)  # the later one fails first: it must not overtake
        await asyncio.sleep(0.05)
        assert spool.depth.batches == 0
        influx.answer(0, ok=False)
        await eventually(lambda: len(journal.acks()) == 2)
        assert spool.depth.batches == 2
        run = await spool.head(max_points=2)
        assert run is not None
        assert run.body == body(1, 2)
    assert journal.entries == [
        f"spool {body(1, 2).decode()}",
        "ack 1,2",
        f"spool {body(3, 4).decode()}",
        "ack 3,4",
    ]


@pytest.mark.asyncio
async def test_stopping_acknowledges_nothing_after_a_batch_that_could_not_be_stored(
    journal: Journal, spool_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later batch that InfluxDB took is still not acknowledged when an earlier one could
    not be stored anywhere: the broker hands both out again (writing the later one twice is
    harmless, the points overwrite themselves)."""
    monkeypatch.setattr(batcher_module, "RETRY_MIN_S", 30.0)
    monkeypatch.setattr(batcher_module, "HOLD_RECHECK_S", 30.0)
    influx = GatedInflux(journal)
    async with JournaledSpool(spool_path, 1, journal) as spool:  # room for nothing
        # Writes that are never answered count as failed after 0.2 s.
        batcher = PointBatcher(
            influx.write, spool, max_points=2, max_delay_s=30.0, logger=log, slow_write_s=0.2
        )
        stopping = asyncio.Event()
        run = asyncio.create_task(batcher.run(stopping), name="batcher")
        await batcher.add(*message(journal, 1, 2))
        await batcher.add(*message(journal, 3, 4))
        await eventually(lambda: influx.concurrent == 2)
        influx.answer(0, ok=False)  # nowhere to go: held
        await eventually(lambda: batcher.holding)
        influx.answer(1)
        await eventually(lambda: influx.stored == [body(3, 4)])
        stopping.set()
        await asyncio.wait_for(run, timeout=2)
    assert journal.acks() == []


@pytest.mark.asyncio
async def test_deliveries_on_their_way_do_not_make_the_next_batch_due(
    journal: Journal, spool: Spool
) -> None:
    """A write takes about as long for one delivery as for a hundred: the next batch waits for
    its own quarter of the window, not for the window to look full."""
    influx = GatedInflux(journal)
    batcher = PointBatcher(influx.write, spool, max_points=1000, max_delay_s=30.0, logger=log)
    window = [0]
    async with running(batcher):
        for seq in range(1, 10):
            await batcher.add(*lines(seq), WindowAck(journal, str(seq), window, maximum=12))
        await eventually(lambda: len(influx.gates) == 3)
        for seq in (10, 11):  # 11 of 12 unacknowledged, but only 2 in this batch
            await batcher.add(*lines(seq), WindowAck(journal, str(seq), window, maximum=12))
        await asyncio.sleep(0.05)
        assert len(influx.gates) == 3
        for gate in range(3):
            influx.answer(gate)
        await eventually(lambda: len(journal.acks()) == 9)
        await batcher.add(*lines(12), WindowAck(journal, "12", window, maximum=12))
        await eventually(lambda: len(influx.gates) == 4)
        influx.answer(3)
        await eventually(lambda: len(journal.acks()) == 12)
    assert influx.stored == [body(1, 2, 3), body(4, 5, 6), body(7, 8, 9), body(10, 11, 12)]
    assert window == [0]
