"""Points go to InfluxDB in batches, through an on-disk spool whenever InfluxDB cannot take them.

A batch is due when ``max_points`` are waiting or ``max_delay_s`` after the first of them,
whichever comes first, or at once when half the broker's window is waiting for acknowledgement
(a delivery's ack says so: ``window_used()``, see `fleet_server.mqtt_ingest`). MQTT's Receive
Maximum caps the unacknowledged deliveries; when they hold fewer than ``max_points`` points,
waiting for the timer would stall ingest (one window per ``max_delay_s``), and waiting until
the window is full would stop the broker while the batch is written. Storing at half lets the
other half arrive meanwhile: the next batch is whatever came during the last write.

The deliveries that produced a batch are acknowledged once it is *durable*: written to
InfluxDB, or appended to the spool (a file; see `fleet_server.spool`). So an outage of
InfluxDB costs disk, not memory, and not the broker's queue either: the agents' backlogs keep
draining into the server while InfluxDB is away, and a crash loses nothing that was
acknowledged.

Why a spool, and why this shape:

- A batch goes to InfluxDB directly only while the spool is empty. Once one batch was spooled
  (InfluxDB unavailable, or a write slower than ``slow_write_s``), every later batch goes to
  the spool's tail as well, and the replayer writes the spool head first. Points therefore
  reach InfluxDB in the order they were taken in, and a slow InfluxDB never holds up ingest.
- A spooled run is deleted only after InfluxDB accepted it. A write that was abandoned as slow
  may still have landed; replaying it is harmless, because every point carries the agent's
  timestamp and the terminal's tags, so InfluxDB overwrites it with itself.
- The spool has a size cap. When it is full (or the disk fails) the batch is held, nothing is
  acknowledged, and once ``max_points`` more are waiting ``add`` waits: the backlog stays in
  the broker, exactly the behaviour before the spool existed. Nothing is ever dropped.
- Memory is bounded: the batch being filled holds at most ``max_points`` plus one delivery, one
  more such batch may be on its way to InfluxDB or the spool, and the replayer reads at most
  ``max_points`` (plus one spooled batch) at a time.

Only one replayer and one appender touch a spool, so a spool belongs to one server process;
several processes each have their own (see ``[influx] spool_path``).
"""

from __future__ import annotations

import asyncio
import logging
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
#: A batch is due once this share of the broker's window waits for acknowledgement.
WINDOW_DUE = 0.5


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
        #: True while a batch can go nowhere (spool full or failing): deliveries are held.
        self.holding = False

    async def add(self, lines: bytes, points: int, ack: Ack) -> None:
        """Queue ``lines``, line protocol of ``points`` points (newline-separated, none at the
        end); ``ack`` runs once they are durable (or definitively refused)."""
        await self._room.wait()
        self._bodies.append(lines)
        self._points += points
        self._acks.append(ack)
        self._first.set()
        if self._points >= self._max_points:
            self._full.set()
            self._room.clear()
        elif _window_used(ack) >= WINDOW_DUE:
            self._full.set()  # due now, but add() may go on while it is being stored

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
            replay = tg.create_task(self._replay(stopping), name="spool-replay")
            await self._take(stopping)
            # A replay write still on its way is cut off rather than waited for: the run
            # stays in the spool, and writing it again next time is harmless.
            replay.cancel()

    async def _take(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            if not await _wait_any(self._first, stopping):
                break
            await _wait_any(self._full, stopping, max_wait_s=self._max_delay_s)
            await self._flush(stopping)
        await self._flush(stopping, final=True)

    async def _flush(self, stopping: asyncio.Event, *, final: bool = False) -> None:
        bodies, points, acks = self._bodies, self._points, self._acks
        self._bodies, self._points, self._acks = [], 0, []
        self._first.clear()
        self._full.clear()
        if bodies and not await self._store(b"\n".join(bodies), points, stopping):
            # Stopping with nowhere to put the batch: leave the deliveries unacknowledged so
            # the broker hands them out again to whichever server process runs next.
            return
        for ack in acks:
            ack()
        if not final:
            self._room.set()

    async def _store(self, body: bytes, count: int, stopping: asyncio.Event) -> bool:
        """Make the batch durable: InfluxDB while the spool is empty, else the spool's tail.

        While neither can take it, hold it (retrying) until ``stopping``; False then.
        """
        told_full = False
        try:
            while True:
                self._progress.clear()
                direct = not self._spool.depth.batches and self._may_try_influx()
                if direct and await self._write_bounded(body, count):
                    return True
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
                self.holding = True
                wait_s = max(HOLD_RECHECK_S, self._retry_at - _now())
                await _wait_any(self._progress, stopping, max_wait_s=wait_s)
        finally:
            self.holding = False

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


def _window_used(ack: Ack) -> float:
    """The share of the broker's window (Receive Maximum) waiting for acknowledgement, as the
    delivery's ``ack`` tells it; 0 for an ack that does not (any callable is an ack)."""
    window_used = getattr(ack, "window_used", None)
    return 0.0 if window_used is None else float(window_used())


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
