"""Points go to InfluxDB in batches: when ``max_points`` are waiting or ``max_delay_s`` after
the first of them, whichever comes first.

The deliveries that produced a batch are acknowledged only after InfluxDB accepted it. While
InfluxDB is unavailable the batch is retried with capped backoff, and once ``max_points`` more
are waiting nothing new is taken in (``add`` waits): the backlog stays in the broker, not in
this process's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fleet_server.errors import InfluxRejected, InfluxUnavailable
from fleet_server.lineproto import Point, encode_points
from fleet_server.stopping import sleep_unless_stopped

Write = Callable[[bytes], Awaitable[None]]
Ack = Callable[[], None]

RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0


@dataclass(slots=True)
class BatchCounters:
    points_written: int = 0
    batches_written: int = 0
    write_retries: int = 0
    points_rejected: int = 0


class PointBatcher:
    def __init__(
        self, write: Write, max_points: int, max_delay_s: float, logger: logging.Logger
    ) -> None:
        self._write = write
        self._max_points = max_points
        self._max_delay_s = max_delay_s
        self._log = logger
        self._points: list[Point] = []
        self._acks: list[Ack] = []
        self._first = asyncio.Event()  # something is waiting
        self._full = asyncio.Event()  # a batch is due now
        self._room = asyncio.Event()  # add() may proceed
        self._room.set()
        self.counters = BatchCounters()

    async def add(self, points: Sequence[Point], ack: Ack) -> None:
        """Queue ``points``; ``ack`` runs once they are stored (or definitively refused)."""
        await self._room.wait()
        self._points.extend(points)
        self._acks.append(ack)
        self._first.set()
        if len(self._points) >= self._max_points:
            self._full.set()
            self._room.clear()

    async def run(self, stopping: asyncio.Event) -> None:
        """Flush batches until ``stopping``, then flush what is left once."""
        while not stopping.is_set():
            if not await _wait_any(self._first, stopping):
                break
            await _wait_any(self._full, stopping, max_wait_s=self._max_delay_s)
            await self._flush(stopping)
        await self._flush(stopping, final=True)

    async def _flush(self, stopping: asyncio.Event, *, final: bool = False) -> None:
        points, acks = self._points, self._acks
        self._points, self._acks = [], []
        self._first.clear()
        self._full.clear()
        if points and not await self._write_with_retry(
            encode_points(points), len(points), stopping
        ):
            # Stopping while InfluxDB is down: leave the deliveries unacknowledged so the
            # broker hands them out again to whichever server process runs next.
            return
        for ack in acks:
            ack()
        if not final:
            self._room.set()

    async def _write_with_retry(self, body: bytes, count: int, stopping: asyncio.Event) -> bool:
        delay = RETRY_MIN_S
        while True:
            try:
                await self._write(body)
            except InfluxRejected as exc:
                # Our encoder only produces valid lines, so this is a schema conflict in the
                # database (a field that changed type). InfluxDB stored the rest of the batch.
                self.counters.points_rejected += count
                self._log.error("InfluxDB refused part of a batch of %d points: %s", count, exc)
                return True
            except InfluxUnavailable as exc:
                self.counters.write_retries += 1
                self._log.warning("InfluxDB unavailable (%s); retrying in %.1f s", exc, delay)
                if stopping.is_set():
                    return False
                await sleep_unless_stopped(stopping, delay)
                delay = min(RETRY_MAX_S, delay * 2)
            else:
                self.counters.points_written += count
                self.counters.batches_written += 1
                return True


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
