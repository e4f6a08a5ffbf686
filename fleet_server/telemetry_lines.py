"""Telemetry samples as InfluxDB points: which measurements, tags and fields (sans-IO).

- system: one ``system`` point, and one ``temperature`` point per sensor (tag ``sensor``).
- network: one ``network`` point per interface (tags ``iface`` and ``kind``) and, when the
  agent measured its link, one ``link`` point (broker round trip, DNS).
- power: one ``power`` point.

Every point is at the sample's own timestamp, carries the terminal's placement tags
(``terminal``, ``site``, ``town``, ``district``), and has ``seq`` and ``historical`` among its
fields; optional values the agent did not send are left out, never stored as a default.

The field tables below are the one description of that mapping, read two ways:

- `sample_points` makes `Point` records, each checked in full by `fleet_server.lineproto`.
  It is the readable model, and what tests and benchmarks count points with.
- `TerminalLines` writes the same lines straight from a *decoded* sample: ingest's hot path.
  The measurement and field names are fixed and checked once, at import; tag values (the
  terminal's placement, interface and sensor names) are checked once per distinct series and
  kept. Values are formatted by their type in the message schema, without a check each: the
  codec already refused what line protocol cannot carry (JSON has no NaN or infinity, and
  msgspec refuses a number out of float range), and every integer field is bounded to int64
  by the schema, which is verified here at import. Text values (the UPS status) take the
  general path. The unit tests hold the two readings to the same bytes, and to the same
  refusals, for generated messages. At ingest rates (a hundred thousand points a second) a
  `Point` per point cost about 10 µs of checks and copies that this path does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, Final

import msgspec

from fleet_protocol.messages import (
    InterfaceSample,
    NetworkSample,
    PowerSample,
    Sample,
    SystemSample,
)
from fleet_server.lineproto import (
    MAX_KEY_BYTES,
    FieldValue,
    LineProtocolError,
    Point,
    field_prefix,
    field_text,
    series_key,
    timestamp,
)

#: Fields every system sample has, then those it may have (same names as the sample's).
SYSTEM_FIELDS: Final = (
    "cpu_percent",
    "memory_percent",
    "memory_available",
    "disk_percent",
    "disk_free",
    "uptime_s",
    "net_bytes_sent",
    "net_bytes_recv",
    "seq",
    "load_1m",
    "on_ac",
    "battery_percent",
    "boot_ms",
    "reboot_count",
    "clock_offset_ms",
)
#: Per interface of a network sample (``seq`` is the sample's).
INTERFACE_FIELDS: Final = ("bytes_sent", "bytes_recv", "up", "errors")
#: The network sample's link measurements; a ``link`` point only if one of them is there.
LINK_FIELDS: Final = ("broker_rtt_ms", "dns_ok", "dns_ms")
POWER_FIELDS: Final = (
    "seq",
    "on_ac",
    "battery_percent",
    "ups_status",
    "ups_on_battery",
    "ups_charge_percent",
    "ups_runtime_s",
    "supply_voltage",
    "cabinet_door_open",
    "cabinet_temperature",
)
TEMPERATURE_FIELD: Final = "celsius"
#: Per-series caches of one terminal are bounded: interface and sensor names come from the
#: kiosk, and a broken one could invent new ones forever.
MAX_SERIES_PER_TERMINAL: Final = 256

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

#: How a value of a field is written: ``prefix + write(value) + suffix``.
_Field = tuple[str, Callable[[Any], str], str]
_BOOL_TEXT: Final = {True: "true", False: "false"}


class _Table:
    """The fields ``keys`` of ``struct`` as written for ``measurement``, each by its type in
    the schema. The leading fields the schema requires that are numbers are written by one
    format string (one call, not one per field); the others one by one, when present. Keep
    the required numbers first in a table for speed: the order is the order written."""

    __slots__ = ("_head", "_head_values", "_rest", "_rest_values")

    def __init__(self, measurement: str, struct: type[msgspec.Struct], keys: Sequence[str]) -> None:
        info = msgspec.inspect.type_info(struct)
        fields = {f.name: f for f in info.fields}  # type: ignore[attr-defined]
        head: list[str] = []
        rest: list[_Field] = []
        for key in keys:
            field = fields[key]
            prefix = field_prefix(key, measurement)
            write, suffix = _writer(field.type, f"{struct.__name__}.{key}", key, measurement)
            if field.required and write in _NUMBERS and not rest:
                head.append(prefix + ("{!r}" if write is float.__repr__ else "{}i"))
            else:
                rest.append((prefix, write, suffix))
        self._head = ",".join(head)
        self._head_values = _getter(keys[: len(head)])
        self._rest = tuple(rest)
        self._rest_values = _getter(keys[len(head) :])

    def encode(self, source: object) -> str:
        """``key=value,...`` of the fields of ``source`` that are there, in table order."""
        parts = [
            prefix + write(value) + suffix
            for (prefix, write, suffix), value in zip(
                self._rest, self._rest_values(source), strict=True
            )
            if value is not None
        ]
        if self._head:
            parts.insert(0, self._head.format(*self._head_values(source)))
        return ",".join(parts)


_NUMBERS: Final = (float.__repr__, int.__repr__)


def _writer(kind: Any, name: str, key: str, measurement: str) -> tuple[Callable[[Any], str], str]:
    if isinstance(kind, msgspec.inspect.UnionType):
        [kind] = [t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType)]
    if isinstance(kind, msgspec.inspect.FloatType):
        return float.__repr__, ""
    if isinstance(kind, msgspec.inspect.BoolType):
        return _BOOL_TEXT.__getitem__, ""
    if isinstance(kind, msgspec.inspect.IntType):
        if kind.ge is None or kind.le is None or kind.ge < _INT64_MIN or kind.le > _INT64_MAX:
            raise TypeError(f"{name}: the schema must bound it to int64")
        return int.__repr__, "i"
    if isinstance(kind, msgspec.inspect.StrType):

        def write(value: Any) -> str:
            return field_text(value, key, measurement)

        return write, ""
    raise TypeError(f"{name}: no line protocol type for {kind}")


def _getter(keys: Sequence[str]) -> Callable[[object], tuple[Any, ...]]:
    """The values of ``keys`` of an object, as a tuple (also for one key, or none)."""
    if not keys:
        return lambda _: ()
    if len(keys) == 1:
        one = attrgetter(keys[0])
        return lambda source: (one(source),)
    return attrgetter(*keys)


# Checked at import: a name or a schema type that cannot be written is a bug, found at start.
_SYSTEM = _Table("system", SystemSample, SYSTEM_FIELDS)
_INTERFACE = _Table("network", InterfaceSample, INTERFACE_FIELDS)
_LINK = _Table("link", NetworkSample, LINK_FIELDS)
_POWER = _Table("power", PowerSample, POWER_FIELDS)
_CELSIUS = field_prefix(TEMPERATURE_FIELD, "temperature")  # temperatures: dict[Label, float]
_SEQ = field_prefix("seq", "network")
_Table("network", NetworkSample, ("seq",))  # seq is written as an int64: check the schema says so
_HISTORICAL = {
    historical: "," + field_prefix("historical", "system") + _BOOL_TEXT[historical]
    for historical in (False, True)
}
_LONGEST_FIELD_KEY = max(
    len(key.encode())
    for key in (*SYSTEM_FIELDS, *INTERFACE_FIELDS, *LINK_FIELDS, *POWER_FIELDS, "historical")
)


# --- the model: Point records ---------------------------------------------------------------


def sample_points(sample: Sample, tags: dict[str, str], historical: bool) -> list[Point]:
    """The points of one sample (see the module docstring), each checked by `Point`."""
    ts = sample.ts
    if isinstance(sample, SystemSample):
        points = [Point("system", tags, _fields(SYSTEM_FIELDS, sample, historical), ts)]
        points.extend(
            Point("temperature", {**tags, "sensor": sensor}, {TEMPERATURE_FIELD: celsius}, ts)
            for sensor, celsius in sample.temperatures.items()
        )
        return points
    if isinstance(sample, NetworkSample):
        points = []
        for iface in sample.interfaces:
            fields = _fields(INTERFACE_FIELDS, iface, None)
            fields.update(seq=sample.seq, historical=historical)
            iface_tags = {**tags, "iface": iface.name, "kind": iface.kind}
            points.append(Point("network", iface_tags, fields, ts))
        link = _fields(LINK_FIELDS, sample, None)
        if link:
            link.update(seq=sample.seq, historical=historical)
            points.append(Point("link", tags, link, ts))
        return points
    return [Point("power", tags, _fields(POWER_FIELDS, sample, historical), ts)]


def _fields(keys: Sequence[str], source: object, historical: bool | None) -> dict[str, FieldValue]:
    fields: dict[str, FieldValue] = {}
    for key in keys:
        value = getattr(source, key)
        if value is not None:
            fields[key] = value
    if historical is not None:
        fields["historical"] = historical
    return fields


# --- the hot path: lines straight from samples ----------------------------------------------


class TerminalLines:
    """Line protocol for one terminal's samples, its series keys checked once and kept."""

    __slots__ = ("_series", "_tags")

    def __init__(self, tags: dict[str, str]) -> None:
        self._tags = tuple(tags.items())
        self._series: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}

    def lines(self, sample: Sample, historical: bool, out: list[str]) -> None:
        """Append the lines of ``sample`` (decoded by the protocol codec, see the module
        docstring) to ``out``, without newlines. `LineProtocolError` if any of them cannot be
        stored exactly (``out`` may then hold some of its lines)."""
        hist = _HISTORICAL[historical]
        if type(sample) is SystemSample:
            ts = f" {timestamp(sample.ts, 'system')}"
            out.append(f"{self._series_key('system', ())} {_SYSTEM.encode(sample)}{hist}{ts}")
            for sensor, celsius in sample.temperatures.items():
                key = self._series_key("temperature", (("sensor", sensor),))
                out.append(f"{key} {_CELSIUS}{celsius!r}{ts}")
        elif type(sample) is NetworkSample:
            link = _LINK.encode(sample)
            if not (sample.interfaces or link):
                return  # nothing measured, no point: not even its seq or time is looked at
            ts = f" {timestamp(sample.ts, 'network')}"
            seq = f",{_SEQ}{sample.seq}i{hist}"
            for iface in sample.interfaces:
                key = self._series_key("network", (("iface", iface.name), ("kind", iface.kind)))
                out.append(f"{key} {_INTERFACE.encode(iface)}{seq}{ts}")
            if link:
                out.append(f"{self._series_key('link', ())} {link}{seq}{ts}")
        else:
            assert type(sample) is PowerSample
            ts = f" {timestamp(sample.ts, 'power')}"
            out.append(f"{self._series_key('power', ())} {_POWER.encode(sample)}{hist}{ts}")

    def _series_key(self, measurement: str, extra: tuple[tuple[str, str], ...]) -> str:
        cached = self._series.get((measurement, extra))
        if cached is not None:
            return cached
        key = series_key(measurement, self._tags + extra)
        if len(key.encode()) + len("#!~#") + _LONGEST_FIELD_KEY > MAX_KEY_BYTES:
            # Not reachable with the schema's bounded labels; kept so that this path can never
            # write what `Point` refuses.
            raise LineProtocolError(f"measurement {measurement!r}: series key too long")
        if len(self._series) < MAX_SERIES_PER_TERMINAL:
            self._series[(measurement, extra)] = key
        return key
