"""Telemetry: readings become numbered, timestamped samples, grouped into batches.

Pure logic; where readings come from is a :class:`SystemSource` (psutil on a kiosk, a
simulation in ``fleet-sim``), and the clock is injected. Three kinds of sample travel in one
batch: the PC itself (:func:`to_sample`), its network (:func:`to_network_sample`) and its
power (:func:`to_power_sample`). Readings are whatever a source measured; the ``to_*``
functions clamp or drop what the wire contract would refuse, so one odd sensor value never
costs the whole batch at the server.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from firmware_bridge.modbus.board import BoardStatus, InputMeaning
from firmware_bridge.nut.protocol import UpsStatus
from fleet_protocol.codec import encode
from fleet_protocol.errors import PayloadTooLarge
from fleet_protocol.messages import (
    MAX_INTERFACES,
    InterfaceKind,
    InterfaceSample,
    NetworkSample,
    PowerSample,
    Sample,
    SystemSample,
    Telemetry,
)

#: Largest counter the wire carries (int64), and the bound of its floats (always finite).
_MAX_COUNT: Final = 2**63 - 1
_MAX_FLOAT: Final = 1e15
_MAX_MILLIS: Final = 2**53
_LABEL: Final = 64
_SHORT_TEXT: Final = 200
#: Names of the controller board's readings, as the device profiles call them.
SUPPLY_VOLTAGE: Final = "supply_voltage"
CABINET_TEMPERATURE: Final = "cabinet_temperature"


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
    #: When the machine booted (wall clock, ms).
    boot_ms: int | None = None
    #: Filled in by the agent from :mod:`edge_agent.boots` and :mod:`edge_agent.clock`.
    reboot_count: int | None = None
    clock_offset_ms: float | None = None


@dataclass(frozen=True, slots=True)
class InterfaceReading:
    name: str
    kind: InterfaceKind
    up: bool
    bytes_sent: int = 0
    bytes_recv: int = 0
    #: Receive plus transmit errors since boot; None where the system does not count them.
    errors: int | None = None
    #: IP addresses, for the status page only (not sent).
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkReading:
    """The interfaces as the system reports them, plus what the agent measured of its link.

    The system source fills ``interfaces``; the agent adds the broker round trip and the DNS
    check with :func:`dataclasses.replace`.
    """

    interfaces: tuple[InterfaceReading, ...] = ()
    broker_rtt_ms: float | None = None
    dns_ok: bool | None = None
    dns_ms: float | None = None


@dataclass(frozen=True, slots=True)
class PowerReading:
    on_ac: bool | None = None
    battery_percent: float | None = None
    #: NUT status words, e.g. "OL CHRG".
    ups_status: str | None = None
    ups_on_battery: bool | None = None
    ups_charge_percent: float | None = None
    ups_runtime_s: float | None = None
    supply_voltage: float | None = None
    cabinet_door_open: bool | None = None
    cabinet_temperature: float | None = None


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
        # +1: a sample never shares its predecessor's timestamp, even while the wall clock
        # catches up after being set back (InfluxDB keeps one point per series and time).
        self._last_ts = max(self._last_ts + 1, self._wall_ms())
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
        boot_ms=_millis(reading.boot_ms),
        reboot_count=_count_or_none(reading.reboot_count),
        clock_offset_ms=_bounded(reading.clock_offset_ms),
    )


_KIND_ORDER: Final[dict[InterfaceKind, int]] = {
    "ethernet": 0,
    "wifi": 1,
    "cellular": 2,
    "other": 3,
}


def to_network_sample(reading: NetworkReading, seq: int, ts: int) -> NetworkSample:
    """The sample of ``reading``: at most 32 interfaces, the real links (ethernet, Wi-Fi,
    cellular) before the others, each name once."""
    interfaces: list[InterfaceSample] = []
    seen: set[str] = set()
    ordered = sorted(reading.interfaces, key=lambda i: _KIND_ORDER[i.kind])
    for iface in ordered:
        name = iface.name[:_LABEL]
        if not name or name in seen:
            continue
        seen.add(name)
        interfaces.append(
            InterfaceSample(
                name=name,
                kind=iface.kind,
                up=iface.up,
                bytes_sent=_count(iface.bytes_sent),
                bytes_recv=_count(iface.bytes_recv),
                errors=_count_or_none(iface.errors),
            )
        )
        if len(interfaces) == MAX_INTERFACES:
            break
    return NetworkSample(
        seq=seq,
        ts=ts,
        interfaces=interfaces,
        broker_rtt_ms=_duration(reading.broker_rtt_ms),
        dns_ok=reading.dns_ok,
        dns_ms=_duration(reading.dns_ms),
    )


def to_power_sample(reading: PowerReading, seq: int, ts: int) -> PowerSample:
    status = (reading.ups_status or "").strip()[:_SHORT_TEXT] or None
    return PowerSample(
        seq=seq,
        ts=ts,
        on_ac=reading.on_ac,
        battery_percent=_percent(reading.battery_percent),
        ups_status=status,
        ups_on_battery=reading.ups_on_battery,
        ups_charge_percent=_percent(reading.ups_charge_percent),
        ups_runtime_s=_duration(reading.ups_runtime_s),
        supply_voltage=_bounded(reading.supply_voltage),
        cabinet_door_open=reading.cabinet_door_open,
        cabinet_temperature=_bounded(reading.cabinet_temperature),
    )


def power_reading(
    ups: UpsStatus | None,
    board: BoardStatus | None,
    *,
    on_ac: bool | None = None,
    battery_percent: float | None = None,
) -> PowerReading:
    """What the UPS (through NUT) and the controller board say about power.

    ``on_ac`` and ``battery_percent`` are the PC's own battery (psutil), if it has one. The
    board's supply voltage and cabinet temperature are the readings the device profiles name
    ``supply_voltage`` and ``cabinet_temperature``; the door is open when any input meaning
    ``cabinet_door_open`` is active. Whatever a kiosk does not have stays None.
    """
    reading = PowerReading(on_ac=on_ac, battery_percent=battery_percent)
    if ups is not None:
        reading = dataclasses.replace(
            reading,
            ups_status=" ".join(ups.flags) or None,
            ups_on_battery=ups.on_battery if ups.power_known else None,
            ups_charge_percent=ups.battery_charge,
            ups_runtime_s=ups.runtime_s,
        )
    if board is not None:
        values = {r.name: r.value for r in board.readings}
        doors = [i.active for i in board.inputs if i.meaning is InputMeaning.CABINET_DOOR_OPEN]
        reading = dataclasses.replace(
            reading,
            supply_voltage=values.get(SUPPLY_VOLTAGE),
            cabinet_door_open=any(doors) if doors else None,
            cabinet_temperature=values.get(CABINET_TEMPERATURE),
        )
    return reading


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _percent(value: float | None) -> float | None:
    finite = _finite(value)
    return None if finite is None else min(100.0, max(0.0, float(finite)))


def _duration(value: float | None) -> float | None:
    finite = _finite(value)
    return None if finite is None else min(_MAX_FLOAT, max(0.0, float(finite)))


def _bounded(value: float | None) -> float | None:
    """A physical value or clock offset; one beyond any real reading is a broken sensor."""
    finite = _finite(value)
    return None if finite is None or abs(finite) > _MAX_FLOAT else float(finite)


def _count(value: int) -> int:
    return min(_MAX_COUNT, max(0, value))


def _count_or_none(value: int | None) -> int | None:
    return None if value is None else _count(value)


def _millis(value: int | None) -> int | None:
    return value if value is not None and 0 <= value <= _MAX_MILLIS else None


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
    """Groups samples of any kind into a batch: full at ``size`` samples or ``max_age_ms`` after
    the first."""

    def __init__(self, size: int, max_age_ms: int) -> None:
        self._size = size
        self._max_age_ms = max_age_ms
        self._samples: list[Sample] = []
        self._opened_ms = 0

    def add(self, sample: Sample, now_ms: int) -> Telemetry | None:
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
