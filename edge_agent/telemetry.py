"""System telemetry: readings become numbered, timestamped samples, grouped into batches.

Pure logic; where readings come from is a :class:`SystemSource` (psutil on a kiosk, a
simulation in ``fleet-sim``), and the clock is injected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fleet_protocol.codec import encode
from fleet_protocol.errors import PayloadTooLarge
from fleet_protocol.messages import SystemSample, Telemetry


@dataclass(frozen=True, slots=True)
class SystemReading:
    cpu_percent: float
    memory_percent: float
    memory_available: int
    disk_percent: float
    disk_free: int
    uptime_s: float
    net_bytes_sent: int
    net_bytes_recv: int
    load_1m: float | None = None
    temperatures: dict[str, float] = field(default_factory=dict)
    on_ac: bool | None = None
    battery_percent: float | None = None


class SystemSource(Protocol):
    async def read(self) -> SystemReading: ...


class MonotonicStamp:
    """Sample numbering and timestamps that never go backwards, even if the wall clock does."""

    def __init__(self, wall_ms: Callable[[], int]) -> None:
        self._wall_ms = wall_ms
        self._seq = 0
        self._last_ts = 0

    def next(self) -> tuple[int, int]:
        self._seq += 1
        self._last_ts = max(self._last_ts, self._wall_ms())
        return self._seq, self._last_ts


def to_sample(reading: SystemReading, seq: int, ts: int) -> SystemSample:
    return SystemSample(
        seq=seq,
        ts=ts,
        cpu_percent=min(100.0, max(0.0, reading.cpu_percent)),
        memory_percent=reading.memory_percent,
        memory_available=reading.memory_available,
        disk_percent=reading.disk_percent,
        disk_free=reading.disk_free,
        uptime_s=max(0.0, reading.uptime_s),
        net_bytes_sent=reading.net_bytes_sent,
        net_bytes_recv=reading.net_bytes_recv,
        load_1m=reading.load_1m,
        temperatures={k[:64]: v for k, v in reading.temperatures.items() if k},
        on_ac=reading.on_ac,
        battery_percent=reading.battery_percent,
    )


def encode_batches(batch: Telemetry) -> list[bytes]:
    """Encode ``batch``, halving it until every part fits the payload limit."""
    try:
        return [encode(batch)]
    except PayloadTooLarge:
        if len(batch.samples) == 1:
            raise  # one sample over the limit is a bug in the collector, not a batching matter
        half = len(batch.samples) // 2
        first = Telemetry(samples=batch.samples[:half], historical=batch.historical)
        rest = Telemetry(samples=batch.samples[half:], historical=batch.historical)
        return encode_batches(first) + encode_batches(rest)


class BatchBuilder:
    """Groups samples into a batch: full at ``size`` samples or ``max_age_ms`` after the first."""

    def __init__(self, size: int, max_age_ms: int) -> None:
        self._size = size
        self._max_age_ms = max_age_ms
        self._samples: list[SystemSample] = []
        self._opened_ms = 0

    def add(self, sample: SystemSample, now_ms: int) -> Telemetry | None:
        if not self._samples:
            self._opened_ms = now_ms
        self._samples.append(sample)
        return self.due(now_ms)

    def due(self, now_ms: int) -> Telemetry | None:
        if not self._samples:
            return None
        if len(self._samples) >= self._size or now_ms - self._opened_ms >= self._max_age_ms:
            return self.take()
        return None

    def take(self) -> Telemetry | None:
        if not self._samples:
            return None
        batch = Telemetry(samples=self._samples)
        self._samples = []
        return batch
