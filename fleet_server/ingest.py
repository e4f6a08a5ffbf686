"""What the server does with each delivery: presence from ``state``, points from ``telemetry``.

Bad input is counted (per terminal and reason) and dropped, never raised: one broken kiosk
must not stop ingest for the others.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from fleet_protocol.codec import decode
from fleet_protocol.errors import DecodeError, TopicError
from fleet_protocol.ids import TerminalId
from fleet_protocol.messages import (
    NetworkSample,
    PowerSample,
    Sample,
    State,
    SystemSample,
    Telemetry,
)
from fleet_protocol.topics import Channel, parse
from fleet_server.batcher import Ack
from fleet_server.lineproto import FieldValue, LineProtocolError, Point
from fleet_server.mqtt_ingest import Delivery
from fleet_server.presence import Presence
from fleet_server.registry import Placement

#: Counter key for messages whose topic names no valid terminal.
UNKNOWN_TERMINAL = "-"


class PresenceStore(Protocol):
    async def apply_state(
        self, terminal: TerminalId, message: State, received_ms: int
    ) -> Presence | None: ...

    async def placement(self, terminal: TerminalId) -> Placement: ...


class PointSink(Protocol):
    async def add(self, points: list[Point], ack: Ack) -> None: ...


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


Fields = dict[str, FieldValue]


def sample_points(sample: Sample, tags: dict[str, str], historical: bool) -> list[Point]:
    """The points of one sample, each at the sample's own timestamp with the terminal's tags.

    - system: one ``system`` point, and one ``temperature`` point per sensor (tag ``sensor``).
    - network: one ``network`` point per interface (tags ``iface`` and ``kind``) and, when the
      agent measured its link, one ``link`` point (broker round trip, DNS).
    - power: one ``power`` point.

    Every point carries ``seq`` and ``historical`` as fields; optional values the agent did not
    send are left out, never stored as a default.
    """
    if isinstance(sample, SystemSample):
        return _system_points(sample, tags, historical)
    if isinstance(sample, NetworkSample):
        return _network_points(sample, tags, historical)
    return _power_points(sample, tags, historical)


def _optional(fields: Fields, **values: FieldValue | None) -> Fields:
    fields.update({key: value for key, value in values.items() if value is not None})
    return fields


def _system_points(sample: SystemSample, tags: dict[str, str], historical: bool) -> list[Point]:
    fields: Fields = {
        "cpu_percent": sample.cpu_percent,
        "memory_percent": sample.memory_percent,
        "memory_available": sample.memory_available,
        "disk_percent": sample.disk_percent,
        "disk_free": sample.disk_free,
        "uptime_s": sample.uptime_s,
        "net_bytes_sent": sample.net_bytes_sent,
        "net_bytes_recv": sample.net_bytes_recv,
        "seq": sample.seq,
        "historical": historical,
    }
    _optional(
        fields,
        load_1m=sample.load_1m,
        on_ac=sample.on_ac,
        battery_percent=sample.battery_percent,
        boot_ms=sample.boot_ms,
        reboot_count=sample.reboot_count,
        clock_offset_ms=sample.clock_offset_ms,
    )
    points = [Point("system", tags, fields, sample.ts)]
    points.extend(
        Point("temperature", {**tags, "sensor": sensor}, {"celsius": celsius}, sample.ts)
        for sensor, celsius in sample.temperatures.items()
    )
    return points


def _network_points(sample: NetworkSample, tags: dict[str, str], historical: bool) -> list[Point]:
    points = [
        Point(
            "network",
            {**tags, "iface": iface.name, "kind": iface.kind},
            _optional(
                {
                    "up": iface.up,
                    "bytes_sent": iface.bytes_sent,
                    "bytes_recv": iface.bytes_recv,
                    "seq": sample.seq,
                    "historical": historical,
                },
                errors=iface.errors,
            ),
            sample.ts,
        )
        for iface in sample.interfaces
    ]
    link = _optional(
        {}, broker_rtt_ms=sample.broker_rtt_ms, dns_ok=sample.dns_ok, dns_ms=sample.dns_ms
    )
    if link:
        link.update(seq=sample.seq, historical=historical)
        points.append(Point("link", tags, link, sample.ts))
    return points


def _power_points(sample: PowerSample, tags: dict[str, str], historical: bool) -> list[Point]:
    fields = _optional(
        {"seq": sample.seq, "historical": historical},
        on_ac=sample.on_ac,
        battery_percent=sample.battery_percent,
        ups_status=sample.ups_status,
        ups_on_battery=sample.ups_on_battery,
        ups_charge_percent=sample.ups_charge_percent,
        ups_runtime_s=sample.ups_runtime_s,
        supply_voltage=sample.supply_voltage,
        cabinet_door_open=sample.cabinet_door_open,
        cabinet_temperature=sample.cabinet_temperature,
    )
    return [Point("power", tags, fields, sample.ts)]


def placement_tags(terminal: TerminalId, placement: Placement) -> dict[str, str]:
    tags = {"terminal": str(terminal)}
    if placement.site:
        tags["site"] = placement.site
    if placement.town:
        tags["town"] = placement.town
    if placement.district:
        tags["district"] = placement.district
    return tags


class Ingest:
    def __init__(
        self,
        presence: PresenceStore,
        points: PointSink,
        logger: logging.Logger,
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self._presence = presence
        self._points = points
        self._log = logger
        self._now_ms = now_ms
        self._tags: dict[TerminalId, dict[str, str]] = {}
        self.received: Counter[Channel] = Counter()
        self.rejected: Counter[tuple[str, str]] = Counter()  # (terminal, reason)
        self.last_seen: dict[TerminalId, int] = {}

    async def handle(self, delivery: Delivery) -> None:
        try:
            where = parse(delivery.topic)
        except TopicError:
            self._reject(UNKNOWN_TERMINAL, "bad_topic", delivery)
            return
        terminal = where.terminal
        self.received[where.channel] += 1
        try:
            if where.channel is Channel.STATE:
                await self._state(terminal, decode(State, delivery.payload), delivery.ack)
            elif where.channel is Channel.TELEMETRY:
                await self._telemetry(terminal, decode(Telemetry, delivery.payload), delivery.ack)
            else:
                delivery.ack()
        except DecodeError as exc:
            self._reject(terminal, exc.reason, delivery, exc.detail)
        except LineProtocolError as exc:
            # Valid JSON that InfluxDB cannot store as sent (a control character or a trailing
            # backslash in a sensor name): the whole message is refused, never half of it.
            self._reject(terminal, "unstorable", delivery, str(exc))

    def _reject(self, terminal: str, reason: str, delivery: Delivery, detail: str = "") -> None:
        self.rejected[(terminal, reason)] += 1
        count = self.rejected[(terminal, reason)]
        # Log the first few and then every hundredth, so a flood cannot flood the log too.
        if count <= 3 or count % 100 == 0:
            self._log.warning(
                "dropped message #%d from %s on %r (%s): %s",
                count,
                terminal,
                delivery.topic[:200],
                reason,
                detail[:200],
            )
        delivery.ack()

    async def _state(self, terminal: TerminalId, message: State, ack: Ack) -> None:
        now = self._now_ms()
        presence = await self._presence.apply_state(terminal, message, now)
        if presence is not None:
            self._tags.pop(terminal, None)  # the site may be newly known
            self._log.info(
                "%s %s (session %d%s)",
                terminal,
                "online" if presence.online else "offline",
                presence.session,
                f", {presence.reason}" if presence.reason else "",
            )
        ack()

    async def _telemetry(self, terminal: TerminalId, message: Telemetry, ack: Ack) -> None:
        tags = self._tags.get(terminal)
        if tags is None:
            tags = placement_tags(terminal, await self._presence.placement(terminal))
            if "site" in tags:  # cache only complete placements; retry until the site is known
                self._tags[terminal] = tags
        points: list[Point] = []
        for sample in message.samples:
            points.extend(sample_points(sample, tags, message.historical))
        self.last_seen[terminal] = max(self.last_seen.get(terminal, 0), self._now_ms())
        await self._points.add(points, ack)
