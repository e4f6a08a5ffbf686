"""Fakes for the edges of the fleet server: InfluxDB's write call, the point sink, the broker's
acknowledgement. Each records what happened in a form a test can assert on directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from fleet_server.batcher import Ack
from fleet_server.errors import InfluxRejected, InfluxUnavailable
from fleet_server.lineproto import Point


class Journal:
    """One ordered record of writes and acknowledgements, to check which came first."""

    def __init__(self) -> None:
        self.entries: list[str] = []

    def ack(self, name: str) -> Ack:
        """An acknowledgement that records itself as ``ack <name>``."""

        def ack() -> None:
            self.entries.append(f"ack {name}")

        return ack

    def acks(self) -> list[str]:
        return [e for e in self.entries if e.startswith("ack ")]


class FakeInflux:
    """InfluxDB's write endpoint: up, down (InfluxUnavailable) or refusing (InfluxRejected).

    A stored body is recorded in ``stored`` and in the journal as ``write <body>``.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.mode: str = "up"  # "up" | "down" | "rejecting"
        self.fail_next = 0  # this many attempts fail as unavailable, whatever the mode
        self.stored: list[bytes] = []
        self.attempt_times: list[float] = []

    @property
    def attempts(self) -> int:
        return len(self.attempt_times)

    async def write(self, body: bytes) -> None:
        self.attempt_times.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0)  # a real write yields to the loop
        if self.fail_next > 0:
            self.fail_next -= 1
            raise InfluxUnavailable("connection refused")
        if self.mode == "down":
            raise InfluxUnavailable("503 Service Unavailable")
        if self.mode == "rejecting":
            raise InfluxRejected('400: field type conflict: input field "seq" is type integer')
        self.stored.append(body)
        self.journal.entries.append(f"write {body.decode()}")


class RecordingSink:
    """A point sink that keeps what it is given and never acknowledges on its own."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[Point], Ack]] = []

    async def add(self, points: Sequence[Point], ack: Ack) -> None:
        self.batches.append((list(points), ack))

    @property
    def points(self) -> list[Point]:
        return [p for points, _ in self.batches for p in points]


class AckCounter:
    """A delivery's acknowledgement (PUBACK) that counts how often it was sent."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def eventually(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Wait until ``condition()`` holds; fail the test if it does not within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"condition not met within {timeout_s} s") from None
