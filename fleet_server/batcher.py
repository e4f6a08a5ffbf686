"""Points go to InfluxDB in batches, through an on-disk spool whenever InfluxDB cannot take them.

A batch is due when ``max_points`` are waiting or ``max_delay_s`` after the first of them,
whichever comes first, or at once when it holds a quarter of the broker's window of
deliveries (a delivery's ack tells the window: ``window()``, see `fleet_server.mqtt_ingest`).
MQTT's Receive Maximum caps the unacknowledged deliveries; when they hold fewer than
``max_points`` points, waiting for the timer would stall ingest (one window per
``max_delay_s``), and waiting until the window is full would stop the broker while the batch is
written.

Up to ``MAX_IN_FLIGHT`` (three) batches are on their way at once, and the last quarter of the
window keeps arriving and is decoded meanwhile. A write to InfluxDB takes about the same time
for 10 points as for 2,000 (here ~20 ms, mostly its write-ahead log), so batches are not cut
smaller than a quarter of the window to keep three going. InfluxDB works on concurrent writes
on all its cores (two concurrent writes went about 1.5 times as fast as one), and three on
their way drained a backlog 14 % faster than two: 5,718 against 5,026 messages/s, the median
of three paired runs of ``bench/bench_ingest_throughput.py --max-processes 1``, each run with
three ahead of its pair by 14 to 21 % (four is untried). A batch is handed over from ``add``
itself, the moment it is due: deliveries that arrived in one read are handled one after
another without a pause, and its write should be on its way meanwhile. Acknowledgements
still go out in the order the deliveries came (MQTT 5.0 §4.6): a batch is acknowledged only
after every earlier batch was, and if an earlier one could not be made durable (stopping with
nowhere to put it) no later one is acknowledged either.

The deliveries that produced a batch are acknowledged once it is *durable*: written to
InfluxDB, or appended to the spool (a file; see `fleet_server.spool`). So an outage of
InfluxDB costs disk, not memory, and not the broker's queue either: the agents' backlogs keep
draining into the server while InfluxDB is away, and a crash loses nothing that was
acknowledged.

Why a spool, and why this shape:

- A batch goes to InfluxDB directly only while the spool is empty. Once one batch was spooled
  (InfluxDB unavailable, or a write slower than ``slow_write_s``), every later batch goes to
  the spool's tail as well, and the replayer writes the spool head first; a batch is appended
  only after the batch before it was settled, so the spool holds them in the order they were
  taken in. The one exception: a batch written directly while the one before it was still on
  its way, which then failed and was spooled, reaches InfluxDB before it. Order does not
  change what InfluxDB holds (each point has its own timestamp and series), and a slow
  InfluxDB never holds up ingest.
- A spooled run is deleted only after InfluxDB accepted it. A write that was abandoned as slow
  may still have landed; replaying it is harmless, because every point carries the agent's
  timestamp and the terminal's tags, so InfluxDB overwrites it with itself.
- The spool has a size cap. When it is full (or the disk fails) the batch is held, nothing is
  acknowledged, and once ``max_points`` more are waiting ``add`` waits: the backlog stays in
  the broker, exactly the behaviour before the spool existed. Nothing is ever dropped. Held
  batches are each tried again on their own, so once InfluxDB is back a later batch may be
  written before an earlier one that waits for its next try; acknowledgements keep their
  order all the same.
- Memory is bounded: the batch being filled holds at most ``max_points`` plus one delivery,
  ``MAX_IN_FLIGHT`` more such batches may be on their way to InfluxDB or the spool, and the
  replayer reads at most ``max_points`` (plus one spooled batch) at a time.

Only one replayer and one appender touch a spool, so a spool belongs to one server process;
several processes each have their own (see ``[influx] spool_path``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from fleet_server.errors import InfluxRejected, InfluxUnavailable, StoreError
from fleet_server.stopping import sleep_unless_stopped

Write = Callable[[bytes], Awaitable[None]]
Ack = Callable[[], None]

RETRY_MIN_S = 0.5
#: One writer per server process, not thousands: it may retry often. While InfluxDB is away
#: nothing waits on the retry but the dashboards, which are stale by up to this much after it
#: is back.
RETRY_MAX_S = 10.0
#: How long a batch that cannot be stored anywhere (spool full) waits before it is tried again
#: when nothing else happens meanwhile.
HOLD_RECHECK_S = 1.0
#: Batches being stored (written to InfluxDB, or spooled) at once.
MAX_IN_FLIGHT = 3
#: A batch is due once it holds this share of the broker's window: with ``MAX_IN_FLIGHT``
#: batches on their way, the rest of the window can still arrive meanwhile.
WINDOW_DUE = 1 / (MAX_IN_FLIGHT + 1)


class SpoolError(StoreError):
    """The spool's file could not be read or written (disk full, I/O error, locked)."""


@dataclass(slots=True)
class SpoolDepth:
    """What the spool holds: batches, their points, and the bytes of their line protocol."""

    batches: int = 0
    points: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class SpooledRun:
    """The oldest batches of the spool, joined into one write body.

    ``last_id`` is the id of the newest batch in the run: dropping the run deletes every
    batch up to and including it.
    """

    last_id: int
    batches: int
    points: int
    body: bytes


class SpoolStore(Protocol):
    """A durable FIFO of write bodies (`fleet_server.spool.Spool`); raises `SpoolError`."""

    @property
    def depth(self) -> SpoolDepth: ...

    def has_room(self, size: int) -> bool:
        """True if a body of ``size`` bytes fits under the cap."""
        ...

    async def append(self, body: bytes, points: int) -> None:
        """Add a batch at the tail; durable when this returns."""
        ...

    async def head(self, max_points: int) -> SpooledRun | None:
        """The oldest batches, at least one and as many more as fit in ``max_points``."""
        ...

    async def drop(self, run: SpooledRun) -> None:
        """Delete the batches of ``run`` (after InfluxDB accepted it)."""
        ...


@dataclass(slots=True)
class BatchCounters:
    points_written: int = 0
    batches_written: int = 0
    #: Writes that failed as unavailable or were abandoned as slow (each is retried later).
    write_retries: int = 0
    slow_writes: int = 0
    points_rejected: int = 0
    batches_spooled: int = 0
    points_spooled: int = 0
    batches_replayed: int = 0
    points_replayed: int = 0
    spool_errors: int = 0


class PointBatcher:
    def __init__(
        self,
        write: Write,
        spool: SpoolStore,
        max_points: int,
        max_delay_s: float,
        logger: logging.Logger,
        *,
        slow_write_s: float = 5.0,
    ) -> None:
        self._write = write
        self._spool = spool
        self._max_points = max_points
        self._max_delay_s = max_delay_s
        self._slow_write_s = slow_write_s
        self._log = logger
        self._bodies: list[bytes] = []  # line protocol, a body per delivery
        self._points = 0
        self._acks: list[Ack] = []
        self._first = asyncio.Event()  # something is waiting
        self._full = asyncio.Event()  # a batch is due now
        self._room = asyncio.Event()  # add() may proceed
        self._room.set()
        self._spooled = asyncio.Event()  # the spool may hold something: the replayer looks
        self._progress = asyncio.Event()  # the replayer freed room in the spool
        self._backoff_s = RETRY_MIN_S
        self._retry_at = 0.0  # loop time before which InfluxDB is not tried again
        self.counters = BatchCounters()
        self._holding = 0  # batches that can go nowhere right now
        #: Batches handed over and not settled yet, oldest first (each settles after the one
        #: before it, so they leave in this order too).
        self._batches: deque[asyncio.Task[bool]] = deque()
        self._tasks: asyncio.TaskGroup | None = None  # run()'s, while it runs
        self._stopping: asyncio.Event | None = None
        self._first_at = 0.0  # loop time the first delivery of the batch being filled came

    @property
    def holding(self) -> bool:
        """True while a batch can go nowhere (spool full or failing): deliveries are held."""
        return self._holding > 0

    async def add(self, lines: bytes, points: int, ack: Ack) -> None:
        """Queue ``lines``, line protocol of ``points`` points (newline-separated, none at the
        end); ``ack`` runs once they are durable (or definitively refused)."""
        await self._room.wait()
        self._bodies.append(lines)
        self._points += points
        self._acks.append(ack)
        if not self._first.is_set():
            self._first.set()
            self._first_at = _now()
        full = self._points >= self._max_points
        if full or len(self._acks) >= _window_share(ack):
            if self._may_hand_over():
                self._hand_over()
                await asyncio.sleep(0)  # lets the write go out before the next delivery
            else:
                self._full.set()
                if full:
                    self._room.clear()

    async def run(self, stopping: asyncio.Event) -> None:
        """Flush batches and replay the spool until ``stopping``; then flush what is left once.

        What is still spooled at the end stays there for the next run.
        """
        if self._spool.depth.batches:
            self._log.info(
                "spool holds %d batches (%d points) from before; replaying them first",
                self._spool.depth.batches,
                self._spool.depth.points,
            )
        async with asyncio.TaskGroup() as tg:
            self._tasks, self._stopping = tg, stopping
            replay = tg.create_task(self._replay(stopping), name="spool-replay")
            await self._take(stopping)
            # A replay write still on its way is cut off rather than waited for: the run
            # stays in the spool, and writing it again next time is harmless.
            replay.cancel()
        self._tasks = None

    def _may_hand_over(self) -> bool:
        return (
            self._tasks is not None
            and self._stopping is not None
            and not self._stopping.is_set()
            and self._on_their_way() < MAX_IN_FLIGHT
        )

    def _on_their_way(self) -> int:
        """Batches handed over and not settled yet (settled ones leave the queue here)."""
        while self._batches and self._batches[0].done():
            self._batches.popleft()
        return len(self._batches)

    async def _take(self, stopping: asyncio.Event) -> None:
        """Hand over batches that fell due by the timer, or while no place was free."""
        while True:
            # add() may hand a batch over (and clear the events) between an event waking us
            # and us running: what counts is the state now, not which event woke us.
            await _wait_any(self._first, stopping)
            if stopping.is_set():
                break
            if not self._bodies:
                continue
            wait_s = self._first_at + self._max_delay_s - _now()
            await _wait_any(self._full, stopping, max_wait_s=max(0.0, wait_s))
            if not self._bodies or not (
                self._full.is_set()
                or stopping.is_set()
                or _now() >= self._first_at + self._max_delay_s
            ):
                continue
            while self._on_their_way() >= MAX_IN_FLIGHT:
                # Batches settle in order (each waits for the one before), so the oldest is
                # the next to free a place.
                await asyncio.wait([self._batches[0]])
            if self._bodies:
                self._hand_over()
        self._hand_over()
        while self._on_their_way():
            await asyncio.wait([self._batches[0]])

    def _hand_over(self) -> None:
        """Start storing the batch filled so far, behind every batch handed over before."""
        if self._tasks is None or self._stopping is None:
            raise RuntimeError("the batcher is not running")
        bodies, points, acks = self._bodies, self._points, self._acks
        self._bodies, self._points, self._acks = [], 0, []
        self._first.clear()
        self._full.clear()
        before = self._batches[-1] if self._batches else None
        task = self._tasks.create_task(
            self._settle(bodies, points, acks, before, self._stopping), name="batch-store"
        )
        self._batches.append(task)
        if not self._stopping.is_set():
            self._room.set()

    async def _settle(
        self,
        bodies: list[bytes],
        points: int,
        acks: list[Ack],
        before: asyncio.Task[bool] | None,
        stopping: asyncio.Event,
    ) -> bool:
        """Make one batch durable, then acknowledge its deliveries once every earlier batch's
        were; True if they were acknowledged."""
        durable = not bodies or await self._store(b"\n".join(bodies), points, stopping, before)
        if before is not None and not await before:
            # Stopping with nowhere to put an earlier batch: acknowledging this one would
            # break the order, so the broker hands all of them out again.
            return False
        if not durable:
            # Stopping with nowhere to put the batch: leave the deliveries unacknowledged so
            # the broker hands them out again to whichever server process runs next.
            return False
        for ack in acks:
            ack()
        return True

    async def _store(
        self,
        body: bytes,
        count: int,
        stopping: asyncio.Event,
        before: asyncio.Task[bool] | None,
    ) -> bool:
        """Make the batch durable: InfluxDB while the spool is empty, else the spool's tail,
        behind every earlier batch (``before`` is settled first).

        While neither can take it, hold it (retrying) until ``stopping``; False then.
        """
        told_full = False
        held = False
        try:
            while True:
                self._progress.clear()
                direct = not self._spool.depth.batches and self._may_try_influx()
                if direct and await self._write_bounded(body, count):
                    return True
                if before is not None and not before.done():
                    await asyncio.wait([before])
                    continue  # the spool may have changed meanwhile
                if self._spool.has_room(len(body)):
                    if await self._append(body, count):
                        return True
                elif not told_full:
                    told_full = True
                    self._log.error(
                        "spool full (%d batches, %d bytes): holding deliveries until InfluxDB "
                        "takes the backlog",
                        self._spool.depth.batches,
                        self._spool.depth.bytes,
                    )
                if stopping.is_set():
                    return False
                if not held:
                    held = True
                    self._holding += 1
                wait_s = max(HOLD_RECHECK_S, self._retry_at - _now())
                await _wait_any(self._progress, stopping, max_wait_s=wait_s)
        finally:
            if held:
                self._holding -= 1

    async def _append(self, body: bytes, count: int) -> bool:
        try:
            await self._spool.append(body, count)
        except SpoolError as exc:
            self.counters.spool_errors += 1
            self._log.error("cannot spool a batch of %d points: %s", count, exc)
            return False
        self.counters.batches_spooled += 1
        self.counters.points_spooled += count
        self._spooled.set()
        return True

    async def _write_bounded(self, body: bytes, count: int) -> bool:
        """One direct write, abandoned when slower than ``slow_write_s``; True if done with."""
        try:
            async with asyncio.timeout(self._slow_write_s):
                return await self._write_once(body, count)
        except TimeoutError:
            self.counters.slow_writes += 1
            self._failed(f"a write took longer than {self._slow_write_s:g} s")
            return False

    async def _write_once(self, body: bytes, count: int) -> bool:
        """True if InfluxDB stored the body or refused it for good; False to try again."""
        try:
            await self._write(body)
        except InfluxRejected as exc:
            # Our encoder only produces valid lines, so this is a schema conflict in the
            # database (a field that changed type). InfluxDB stored the rest of the batch.
            self.counters.points_rejected += count
            self._log.error("InfluxDB refused part of a batch of %d points: %s", count, exc)
        except InfluxUnavailable as exc:
            self._failed(str(exc))
            return False
        else:
            self.counters.points_written += count
            self.counters.batches_written += 1
        self._backoff_s = RETRY_MIN_S
        self._retry_at = 0.0
        return True

    def _failed(self, why: str) -> None:
        self.counters.write_retries += 1
        self._retry_at = _now() + self._backoff_s
        self._log.warning(
            "InfluxDB unavailable (%s); spooling, next try in %.1f s", why, self._backoff_s
        )
        self._backoff_s = min(RETRY_MAX_S, self._backoff_s * 2)

    def _may_try_influx(self) -> bool:
        return _now() >= self._retry_at

    async def _replay(self, stopping: asyncio.Event) -> None:
        """Write the spool to InfluxDB head first, deleting each run once it was accepted."""
        while not stopping.is_set():
            if not self._spool.depth.batches:
                self._spooled.clear()
                if not await _wait_any(self._spooled, stopping):
                    return
                continue
            await sleep_unless_stopped(stopping, self._retry_at - _now())
            if stopping.is_set():
                return
            try:
                run = await self._spool.head(self._max_points)
                if run is None:
                    continue
                # No slow-write bound here: nothing waits on the replay but the backlog itself.
                if not await self._write_once(run.body, run.points):
                    continue
                await self._spool.drop(run)
            except SpoolError as exc:
                self.counters.spool_errors += 1
                self._log.error("cannot replay the spool: %s", exc)
                await sleep_unless_stopped(stopping, RETRY_MAX_S)
                continue
            self.counters.batches_replayed += run.batches
            self.counters.points_replayed += run.points
            self._progress.set()
            if not self._spool.depth.batches:
                self._log.info("spool replayed completely; writing to InfluxDB directly again")


def _now() -> float:
    return asyncio.get_running_loop().time()


def _window_share(ack: Ack) -> float:
    """How many deliveries make a batch due: ``WINDOW_DUE`` of the broker's window (Receive
    Maximum), as the delivery's ``ack`` tells it; never, for an ack that does not (any
    callable is an ack)."""
    window = getattr(ack, "window", None)
    return math.inf if window is None else max(1, int(window() * WINDOW_DUE))


async def _wait_any(
    event: asyncio.Event, stopping: asyncio.Event, max_wait_s: float | None = None
) -> bool:
    """Wait for ``event`` or ``stopping`` (or ``max_wait_s``); True if ``event`` is set."""
    if event.is_set() or stopping.is_set():
        return event.is_set()
    waits = {
        asyncio.create_task(event.wait(), name="batcher-wait"),
        asyncio.create_task(stopping.wait(), name="batcher-stop"),
    }
    try:
        await asyncio.wait(waits, timeout=max_wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    return event.is_set()
