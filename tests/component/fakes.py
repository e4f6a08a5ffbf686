"""Fakes for the edges of the fleet server: InfluxDB's write call, the point sink, the broker's
acknowledgement. Each records what happened in a form a test can assert on directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fleet_server.batcher import Ack
from fleet_server.errors import InfluxRejected, InfluxUnavailable
from fleet_server.lineproto import FieldValue, Point


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
    """A point sink that keeps what it is given, read back into points, and never
    acknowledges on its own."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[Point], Ack]] = []

    async def add(self, lines: bytes, points: int, ack: Ack) -> None:
        parsed = [parse_line(line) for line in lines.decode().split("\n")]
        assert len(parsed) == points, f"{points} points announced, {len(parsed)} lines given"
        self.batches.append((parsed, ack))

    @property
    def points(self) -> list[Point]:
        return [p for points, _ in self.batches for p in points]


def parse_line(line: str) -> Point:
    """One line of line protocol read back (what InfluxDB would store), for lines whose names
    and tag values hold no backslash of their own (test data)."""
    head, fields_text, ts = _split(line, " ")
    measurement, *tag_texts = _split(head, ",")
    tags = dict(_unescape_pair(t) for t in tag_texts)
    fields: dict[str, FieldValue] = {}
    for text in _split(fields_text, ","):
        key, raw = _split(text, "=", maxsplit=1)
        fields[_unescape(key)] = _value(raw)
    return Point(_unescape(measurement), tags, fields, int(ts))


def _split(text: str, sep: str, maxsplit: int = -1) -> list[str]:
    """``text`` split at ``sep`` where it is neither escaped nor inside a quoted string."""
    parts: list[str] = []
    start, i, quoted = 0, 0, False
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == sep and not quoted and (maxsplit < 0 or len(parts) < maxsplit):
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape(text: str) -> str:
    return text.replace("\\,", ",").replace("\\=", "=").replace("\\ ", " ")


def _unescape_pair(text: str) -> tuple[str, str]:
    key, value = _split(text, "=", maxsplit=1)
    return _unescape(key), _unescape(value)


def _value(raw: str) -> FieldValue:
    if raw.startswith('"'):
        return raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if raw in ("true", "false"):
        return raw == "true"
    if raw.endswith("i"):
        return int(raw[:-1])
    return float(raw)


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
