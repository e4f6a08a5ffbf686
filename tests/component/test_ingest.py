"""Ingest with a real registry (SQLite in tmp_path) and a recording point sink: presence from
state messages, tagged points from telemetry, and garbage counted, acknowledged and dropped."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio

from fleet_protocol import (
    MAX_PAYLOAD,
    Channel,
    State,
    SystemSample,
    Telemetry,
    TerminalId,
    encode,
    site_id,
    terminal_id,
)
from fleet_protocol.topics import topic
from fleet_server.ingest import ClockFault, Ingest, IngestLimits, QuarantinedSample
from fleet_server.lineproto import Point
from fleet_server.mqtt_ingest import Delivery
from fleet_server.registry import Registry, SiteRecord
from tests.component.fakes import AckCounter, RecordingSink

NOW = 1_732_190_400_000
KIOSK = terminal_id("kiosk-pd-001")
OTHER = terminal_id("kiosk-pd-002")
SITE = SiteRecord(site_id("pd-zhangjiang-01"), "张江镇政务服务中心", "张江镇", "浦东新区")
TAGS = {"terminal": KIOSK, "site": SITE.id, "town": SITE.town, "district": SITE.district}

SAMPLE = SystemSample(
    seq=41,
    ts=NOW - 5_000,
    cpu_percent=12.5,
    memory_percent=43.25,
    memory_available=8_123_456_789,
    disk_percent=55.5,
    disk_free=123_456_789_012,
    uptime_s=86_400.25,
    net_bytes_sent=1_234_567,
    net_bytes_recv=9_876_543,
    load_1m=0.52,
    temperatures={"cpu": 47.5, "gpu": 51.0},
    on_ac=True,
    battery_percent=100.0,
)
SAMPLE_FIELDS = {
    "cpu_percent": 12.5,
    "memory_percent": 43.25,
    "memory_available": 8_123_456_789,
    "disk_percent": 55.5,
    "disk_free": 123_456_789_012,
    "uptime_s": 86_400.25,
    "net_bytes_sent": 1_234_567,
    "net_bytes_recv": 9_876_543,
    "seq": 41,
    "historical": False,
    "load_1m": 0.52,
    "on_ac": True,
    "battery_percent": 100.0,
}


def birth(session: int, site: str | None = SITE.id) -> State:
    return State(
        online=True,
        session=session,
        ts=NOW,
        site=site_id(site) if site else None,
        agent_version="1.4.0",
    )


def death(session: int) -> State:
    return State(online=False, session=session, ts=NOW, reason="lost")


def telemetry(*samples: SystemSample, historical: bool = False) -> bytes:
    return encode(Telemetry(samples=list(samples) or [SAMPLE], historical=historical))


def as_tuple(p: Point) -> tuple[str, dict[str, str], dict[str, object], int]:
    return p.measurement, dict(p.tags), dict(p.fields), p.ts_ms


@dataclass
class Fleet:
    """The ingest under test, with the registry and point sink it talks to."""

    ingest: Ingest
    registry: Registry
    sink: RecordingSink

    async def deliver(self, where: str, payload: bytes) -> AckCounter:
        ack = AckCounter()
        await self.ingest.handle(Delivery(where, payload, ack))
        return ack

    async def state(self, terminal: TerminalId, message: State) -> AckCounter:
        return await self.deliver(topic(terminal, Channel.STATE), encode(message))

    async def telemetry(self, terminal: TerminalId, payload: bytes) -> AckCounter:
        return await self.deliver(topic(terminal, Channel.TELEMETRY), payload)


@pytest_asyncio.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with Registry(tmp_path / "registry.db") as registry:
        await registry.migrate()
        await registry.put_sites([SITE])
        sink = RecordingSink()
        ingest = Ingest(registry, sink, logging.getLogger("test.ingest"), now_ms=lambda: NOW)
        yield Fleet(ingest, registry, sink)


@pytest.mark.asyncio
async def test_a_birth_puts_the_terminal_online_at_its_site(fleet: Fleet) -> None:
    ack = await fleet.state(KIOSK, birth(7))

    assert ack.calls == 1
    [view] = await fleet.registry.terminals()
    assert (view.id, view.status, view.session, view.since_ms) == (KIOSK, "online", 7, NOW)
    assert (view.site, view.site_name, view.town, view.district) == (
        SITE.id,
        SITE.name,
        SITE.town,
        SITE.district,
    )
    assert view.agent_version == "1.4.0"
    assert fleet.sink.batches == []


@pytest.mark.asyncio
async def test_telemetry_becomes_points_tagged_with_the_site(fleet: Fleet) -> None:
    await fleet.state(KIOSK, birth(7))
    later = msgspec.structs.replace(SAMPLE, seq=42, ts=NOW, cpu_percent=98.0, temperatures={})

    ack = await fleet.telemetry(KIOSK, telemetry(SAMPLE, later))

    assert [as_tuple(p) for p in fleet.sink.points] == [
        ("system", TAGS, SAMPLE_FIELDS, SAMPLE.ts),
        ("temperature", {**TAGS, "sensor": "cpu"}, {"celsius": 47.5}, SAMPLE.ts),
        ("temperature", {**TAGS, "sensor": "gpu"}, {"celsius": 51.0}, SAMPLE.ts),
        ("system", TAGS, {**SAMPLE_FIELDS, "seq": 42, "cpu_percent": 98.0}, NOW),
    ]
    # One delivery, one sink entry: the sink acknowledges once the points are stored.
    [(_, sink_ack)] = fleet.sink.batches
    assert ack.calls == 0
    sink_ack()
    assert ack.calls == 1
    assert fleet.ingest.last_seen == {KIOSK: NOW}


@pytest.mark.asyncio
async def test_absent_optional_readings_are_not_written_and_backlog_is_marked(
    fleet: Fleet,
) -> None:
    await fleet.state(KIOSK, birth(7))
    bare = msgspec.structs.replace(
        SAMPLE, load_1m=None, on_ac=None, battery_percent=None, temperatures={}
    )

    await fleet.telemetry(KIOSK, telemetry(bare, historical=True))

    [system] = fleet.sink.points
    assert dict(system.fields) == {
        k: v for k, v in SAMPLE_FIELDS.items() if k not in {"load_1m", "on_ac", "battery_percent"}
    } | {"historical": True}


@pytest.mark.asyncio
async def test_telemetry_before_the_birth_gets_full_tags_once_the_site_is_known(
    fleet: Fleet,
) -> None:
    bare = msgspec.structs.replace(SAMPLE, temperatures={})
    await fleet.telemetry(KIOSK, telemetry(bare))
    await fleet.state(KIOSK, birth(7))
    await fleet.telemetry(KIOSK, telemetry(bare))

    first, second = fleet.sink.points
    assert dict(first.tags) == {"terminal": KIOSK}
    assert dict(second.tags) == TAGS


@pytest.mark.asyncio
async def test_a_stale_death_after_a_newer_birth_leaves_the_terminal_online(
    fleet: Fleet,
) -> None:
    await fleet.state(KIOSK, birth(5))
    await fleet.state(KIOSK, birth(6))
    # The last will of connection 5, delivered after connection 6 was born.
    ack = await fleet.state(KIOSK, death(5))

    assert ack.calls == 1
    [view] = await fleet.registry.terminals()
    assert (view.status, view.session, view.reason) == ("online", 6, None)

    # The will of the current connection does count.
    await fleet.state(KIOSK, death(6))
    [view] = await fleet.registry.terminals()
    assert (view.status, view.session, view.reason) == ("offline", 6, "lost")


def _invalid_utf8_in_a_sensor_name() -> bytes:
    payload = telemetry()
    assert b'"cpu"' in payload
    return payload.replace(b'"cpu"', b'"c\xffu"')


def _oversize_but_valid_json() -> bytes:
    payload = telemetry()
    return payload + b" " * (MAX_PAYLOAD + 1 - len(payload))


GARBAGE = [
    pytest.param(Channel.TELEMETRY, b'{"samples": [', "malformed", id="truncated-json"),
    pytest.param(Channel.STATE, b"\x00\x01binary", "malformed", id="binary-state"),
    pytest.param(Channel.TELEMETRY, _invalid_utf8_in_a_sensor_name(), "malformed", id="bad-utf8"),
    pytest.param(Channel.TELEMETRY, b'{"samples": []}', "schema", id="no-samples"),
    pytest.param(
        Channel.STATE, b'{"online": "yes", "session": 1, "ts": 1}', "schema", id="ill-typed"
    ),
    pytest.param(
        Channel.STATE,
        b'{"online": true, "session": 1, "ts": 1, "reason": "lost"}',
        "schema",
        id="online-with-reason",
    ),
    pytest.param(Channel.TELEMETRY, _oversize_but_valid_json(), "too_large", id="oversize"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("channel", "payload", "reason"), GARBAGE)
async def test_garbage_is_counted_acknowledged_and_dropped(
    fleet: Fleet, channel: Channel, payload: bytes, reason: str
) -> None:
    await fleet.state(KIOSK, birth(7))

    ack = await fleet.deliver(topic(KIOSK, channel), payload)

    assert fleet.ingest.rejected == {(KIOSK, reason): 1}
    assert ack.calls == 1  # dropped for good: the broker must not redeliver it forever
    assert fleet.sink.batches == []
    [view] = await fleet.registry.terminals()
    assert (view.status, view.session) == ("online", 7)

    # The next good message from the same kiosk goes through.
    await fleet.telemetry(KIOSK, telemetry())
    assert len(fleet.sink.points) == 3
    assert dict(fleet.sink.points[0].tags) == TAGS
    assert fleet.ingest.rejected == {(KIOSK, reason): 1}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "where",
    [
        "kiosk/v1/Kiosk PD 001/telemetry",  # not a terminal id
        "kiosk/v1/kiosk-pd-001/telemetry/extra",
        "kiosk/v1/kiosk-pd-001/weather",
        "kiosk/v2/kiosk-pd-001/telemetry",
        "",
    ],
)
async def test_a_message_on_a_bad_topic_is_counted_acknowledged_and_dropped(
    fleet: Fleet, where: str
) -> None:
    ack = await fleet.deliver(where, telemetry())

    assert fleet.ingest.rejected == {("-", "bad_topic"): 1}
    assert ack.calls == 1
    assert fleet.sink.batches == []
    assert await fleet.registry.terminals() == []

    await fleet.telemetry(KIOSK, telemetry())
    assert len(fleet.sink.points) == 3


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "sensor",
    [
        pytest.param("cpu\ttemp", id="control-character"),
        pytest.param("cpu\\", id="trailing-backslash"),
    ],
)
async def test_valid_json_that_influx_cannot_store_is_refused_whole(
    fleet: Fleet, sensor: str
) -> None:
    await fleet.state(KIOSK, birth(7))
    good = msgspec.structs.replace(SAMPLE, seq=1)
    bad = msgspec.structs.replace(SAMPLE, seq=2, temperatures={"cpu": 40.0, sensor: 41.0})

    ack = await fleet.telemetry(KIOSK, telemetry(good, bad))

    assert fleet.ingest.rejected == {(KIOSK, "unstorable"): 1}
    assert ack.calls == 1
    assert fleet.sink.batches == []  # not even the good sample: never half a message

    await fleet.telemetry(KIOSK, telemetry(good))
    assert len(fleet.sink.points) == 3


@pytest.mark.asyncio
async def test_a_sensor_named_time_is_stored_as_a_tag_value(fleet: Fleet) -> None:
    # "time" is reserved only as a tag or field *key*; the sensor name is a tag value, which
    # InfluxDB stores and selects like any other.
    await fleet.state(KIOSK, birth(7))
    sample = msgspec.structs.replace(SAMPLE, temperatures={"time": 40.0})

    ack = await fleet.telemetry(KIOSK, telemetry(sample))

    assert fleet.ingest.rejected == {}
    assert ack.calls == 0  # left to the sink, which acknowledges once stored
    assert [as_tuple(p) for p in fleet.sink.points][1] == (
        "temperature",
        {**TAGS, "sensor": "time"},
        {"celsius": 40.0},
        SAMPLE.ts,
    )


@pytest.mark.asyncio
async def test_rejections_are_counted_per_terminal_and_reason(fleet: Fleet) -> None:
    for _ in range(3):
        await fleet.telemetry(KIOSK, b"not json")
    await fleet.telemetry(OTHER, b"not json")
    await fleet.telemetry(OTHER, b'{"samples": []}')
    await fleet.deliver("kiosk/v1/BAD/state", b"{}")

    assert fleet.ingest.rejected == {
        (KIOSK, "malformed"): 3,
        (OTHER, "malformed"): 1,
        (OTHER, "schema"): 1,
        ("-", "bad_topic"): 1,
    }
    assert fleet.ingest.received[Channel.TELEMETRY] == 5


# --- timestamps outside the window: quarantined, and a clock fault on the terminal ----------

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def system(seq: int, ts: int) -> SystemSample:
    return msgspec.structs.replace(SAMPLE, seq=seq, ts=ts, temperatures={})


@pytest.mark.asyncio
async def test_a_sample_stamped_two_hours_ahead_is_quarantined_not_written(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.state(KIOSK, birth(7))

    ack = await fleet.telemetry(KIOSK, telemetry(system(1, NOW + 2 * HOUR_MS)))

    assert fleet.sink.batches == []
    assert ack.calls == 1  # nothing to store, so nothing to wait for
    assert fleet.ingest.quarantined == {(KIOSK, "future"): 1}
    assert fleet.ingest.clock_faults == {KIOSK: ClockFault(NOW, NOW, 2 * HOUR_MS, 1)}
    [example] = fleet.ingest.quarantine[KIOSK]
    assert example == QuarantinedSample("system", 1, NOW + 2 * HOUR_MS, NOW, "future")
    assert fleet.ingest.rejected == {}
    assert [r.getMessage() for r in caplog.records if "clock fault" in r.getMessage()] == [
        f"{KIOSK}: clock fault, samples stamped +7200 s from server time are quarantined, "
        "not stored"
    ]


@pytest.mark.asyncio
async def test_in_a_mixed_message_only_the_samples_outside_the_window_are_held_back(
    fleet: Fleet,
) -> None:
    await fleet.state(KIOSK, birth(7))
    samples = [
        system(1, NOW - 9 * DAY_MS),  # older than the outbox keeps anything
        system(2, NOW - 7 * DAY_MS),  # an old backlog, still in the window
        system(3, NOW + 9 * 60_000),  # slightly ahead: within the 10 minutes allowed
        system(4, NOW + 11 * 60_000),
    ]

    ack = await fleet.telemetry(KIOSK, telemetry(*samples, historical=True))

    assert [p.fields["seq"] for p in fleet.sink.points] == [2, 3]
    assert ack.calls == 0  # left to the sink, which acknowledges once stored
    assert fleet.ingest.quarantined == {(KIOSK, "too_old"): 1, (KIOSK, "future"): 1}
    assert fleet.ingest.clock_faults[KIOSK] == ClockFault(NOW, NOW, 11 * 60_000, 2)
    assert [s.seq for s in fleet.ingest.quarantine[KIOSK]] == [1, 4]


@pytest.mark.asyncio
async def test_the_window_is_configurable(tmp_path: Path) -> None:
    async with Registry(tmp_path / "registry.db") as registry:
        await registry.migrate()
        sink = RecordingSink()
        ingest = Ingest(
            registry,
            sink,
            logging.getLogger("test.ingest"),
            now_ms=lambda: NOW,
            limits=IngestLimits(max_ahead_ms=1000, max_behind_ms=HOUR_MS),
        )
        topic_ = topic(KIOSK, Channel.TELEMETRY)
        payload = telemetry(system(1, NOW + 1001), system(2, NOW - HOUR_MS - 1), system(3, NOW))
        await ingest.handle(Delivery(topic_, payload, AckCounter()))

    assert [p.fields["seq"] for p in sink.points] == [3]
    assert ingest.quarantined == {(KIOSK, "future"): 1, (KIOSK, "too_old"): 1}


@pytest.mark.asyncio
async def test_the_clock_fault_clears_with_the_next_live_message_in_the_window(
    fleet: Fleet,
) -> None:
    await fleet.state(KIOSK, birth(7))
    for seq in (1, 2, 3):
        await fleet.telemetry(KIOSK, telemetry(system(seq, NOW + 2 * HOUR_MS + seq)))
    assert fleet.ingest.clock_faults[KIOSK].count == 3

    # A backlog proves nothing about the clock now; a live sample does.
    await fleet.telemetry(KIOSK, telemetry(system(4, NOW - HOUR_MS), historical=True))
    assert KIOSK in fleet.ingest.clock_faults
    await fleet.telemetry(KIOSK, telemetry(system(5, NOW)))
    assert fleet.ingest.clock_faults == {}

    # The counts stay; only five examples are kept.
    for seq in range(6, 12):
        await fleet.telemetry(KIOSK, telemetry(system(seq, NOW + DAY_MS)))
    assert fleet.ingest.quarantined == {(KIOSK, "future"): 9}
    assert [s.seq for s in fleet.ingest.quarantine[KIOSK]] == [7, 8, 9, 10, 11]
    assert fleet.ingest.clock_faults[KIOSK].count == 6
    assert [p.fields["seq"] for p in fleet.sink.points] == [4, 5]


# --- flooding -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now


@pytest.mark.asyncio
async def test_a_terminal_sending_more_than_allowed_a_minute_is_flagged_once_per_episode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    async with Registry(tmp_path / "registry.db") as registry:
        await registry.migrate()
        sink = RecordingSink()
        limits = IngestLimits(flood_per_minute=5)
        ingest = Ingest(registry, sink, logging.getLogger("test.ingest"), clock, limits=limits)
        fleet = Fleet(ingest, registry, sink)
        for _ in range(5):
            await fleet.telemetry(KIOSK, telemetry(system(1, NOW)))
            await fleet.telemetry(OTHER, telemetry(system(1, NOW)))
        assert fleet.ingest.flooding() == {}

        # The sixth message in a minute, garbage or not, makes KIOSK a flooder; more of them
        # are not logged again.
        for _ in range(20):
            clock.now += 100
            await fleet.telemetry(KIOSK, b"not json")
        assert fleet.ingest.flooding() == {KIOSK: NOW + 100}
        warnings = [r for r in caplog.records if "floods" in r.getMessage()]
        assert [r.getMessage() for r in warnings] == [
            f"{KIOSK} floods: more than 5 messages a minute (an agent sends about 10)"
        ]

        # A minute at the limit ends the episode.
        clock.now = NOW + 60_000
        for _ in range(5):
            await fleet.telemetry(KIOSK, telemetry(system(1, NOW)))
        assert KIOSK in fleet.ingest.flooding()
        clock.now = NOW + 120_000
        await fleet.telemetry(KIOSK, telemetry(system(1, NOW)))
        assert fleet.ingest.flooding() == {}

        # A backlog replayed fast (marked historical) is not a flood; and a flooder that
        # falls silent is let go after a quiet minute.
        for _ in range(50):
            await fleet.telemetry(OTHER, telemetry(system(1, NOW), historical=True))
        assert fleet.ingest.flooding() == {}
        for _ in range(6):
            await fleet.deliver(topic(OTHER, Channel.EVENTS), b"{}")
        assert fleet.ingest.flooding() == {OTHER: NOW + 120_000}
        clock.now += 2 * 60_000
        assert fleet.ingest.flooding() == {}
        assert fleet.ingest.rejected == {(KIOSK, "malformed"): 20}
