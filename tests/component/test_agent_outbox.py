"""The agent's outbox and command ledger on a real SQLite file: what waits survives a restart,
a full outbox gives up telemetry before events and staff actions, and every drop is counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.outbox import (
    OutboxLimits,
    Outgoing,
    Priority,
    ReplayPace,
    Stored,
    as_historical,
)
from edge_agent.store import AgentStore
from fleet_protocol.codec import decode, encode
from fleet_protocol.ids import CommandId, CommandName
from fleet_protocol.messages import CommandResult, Event, SystemSample, Telemetry

LIMITS = OutboxLimits(max_bytes=10_000, max_age_ms=3_600_000)


def _msg(priority: Priority, size: int = 100, key: str | None = None) -> Outgoing:
    return Outgoing(
        topic=f"kiosk/v1/t-01/{priority.label}",
        payload=b"x" * size,
        priority=priority,
        replace_key=key,
    )


@pytest.mark.asyncio
async def test_messages_survive_a_restart_in_order_until_deleted(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    store = AgentStore.open(db)
    outbox = store.outbox("t-01", LIMITS)
    for i in range(5):
        await outbox.put(Outgoing("a/b", f"m{i}".encode(), Priority.TELEMETRY), now_ms=1000 + i)
    store.close()  # like a SIGKILL after the writes returned: nothing else was done

    store = AgentStore.open(db)
    outbox = store.outbox("t-01", LIMITS)
    assert len(outbox) == 5
    assert outbox.oldest_ms == 1000
    head = await outbox.head(3)
    assert [s.message.payload for s in head] == [b"m0", b"m1", b"m2"]
    await outbox.delete(s.id for s in head[:2])
    assert [s.message.payload for s in await outbox.head(10)] == [b"m2", b"m3", b"m4"]
    assert outbox.oldest_ms == 1002
    store.close()


@pytest.mark.asyncio
async def test_full_outbox_gives_up_oldest_telemetry_first_and_counts_it() -> None:
    store = AgentStore.open(None)
    outbox = store.outbox("t-01", OutboxLimits(max_bytes=1000, max_age_ms=10**9))
    await outbox.put(_msg(Priority.ACTION), 1)
    await outbox.put(_msg(Priority.EVENT), 2)
    for i in range(8):
        await outbox.put(_msg(Priority.TELEMETRY), 10 + i)
    assert len(outbox) == 10
    assert outbox.pending_bytes == 1000
    await outbox.put(_msg(Priority.EVENT), 100)  # one more: the oldest telemetry goes
    await outbox.put(_msg(Priority.EVENT), 101)
    kept = await outbox.head(100)
    assert [s.message.priority for s in kept].count(Priority.TELEMETRY) == 6
    assert kept[0].message.priority is Priority.ACTION
    assert kept[2].created_ms == 12  # telemetry of ms 10 and 11 went
    assert outbox.dropped == {"full/telemetry": 2}
    assert outbox.pending_bytes == 1000


@pytest.mark.asyncio
async def test_events_go_only_when_no_telemetry_is_left_and_actions_last() -> None:
    store = AgentStore.open(None)
    outbox = store.outbox("t-01", OutboxLimits(max_bytes=300, max_age_ms=10**9))
    await outbox.put(_msg(Priority.ACTION), 1)
    await outbox.put(_msg(Priority.EVENT), 2)
    await outbox.put(_msg(Priority.TELEMETRY), 3)
    await outbox.put(_msg(Priority.ACTION), 4)  # telemetry goes
    await outbox.put(_msg(Priority.ACTION), 5)  # then the event
    await outbox.put(_msg(Priority.ACTION), 6)  # then the oldest action
    assert [s.created_ms for s in await outbox.head(10)] == [4, 5, 6]
    assert outbox.dropped == {"full/telemetry": 1, "full/event": 1, "full/action": 1}


@pytest.mark.asyncio
async def test_drop_counts_survive_a_restart(tmp_path: Path) -> None:
    store = AgentStore.open(tmp_path / "a.db")
    outbox = store.outbox("t-01", OutboxLimits(max_bytes=100, max_age_ms=1000))
    await outbox.put(_msg(Priority.TELEMETRY), 1)
    await outbox.put(_msg(Priority.TELEMETRY), 2)
    await outbox.put(_msg(Priority.EVENT), 3)  # room only for one: both telemetry went
    assert await outbox.expire(now_ms=900) == 0
    assert await outbox.expire(now_ms=2000) == 1  # older than the 1 s age bound
    store.close()
    outbox = AgentStore.open(tmp_path / "a.db").outbox("t-01", LIMITS)
    assert outbox.dropped == {"full/telemetry": 2, "too_old/event": 1}
    assert len(outbox) == 0


@pytest.mark.asyncio
async def test_a_newer_snapshot_replaces_the_unsent_one() -> None:
    store = AgentStore.open(None)
    outbox = store.outbox("t-01", LIMITS)
    await outbox.put(_msg(Priority.SNAPSHOT, 10, key="peripherals"), 1)
    await outbox.put(_msg(Priority.EVENT, 10), 2)
    await outbox.put(_msg(Priority.SNAPSHOT, 20, key="peripherals"), 3)
    head = await outbox.head(10)
    assert [(s.message.priority, len(s.message.payload)) for s in head] == [
        (Priority.EVENT, 10),
        (Priority.SNAPSHOT, 20),
    ]
    assert len(outbox) == 2
    assert outbox.pending_bytes == 30


@pytest.mark.asyncio
async def test_terminals_sharing_a_file_do_not_see_each_others_messages() -> None:
    store = AgentStore.open(None)
    a, b = store.outbox("t-01", LIMITS), store.outbox("t-02", LIMITS)
    await a.put(_msg(Priority.EVENT), 1)
    await b.put(_msg(Priority.TELEMETRY), 2)
    assert [s.created_ms for s in await a.head(10)] == [1]
    assert [s.created_ms for s in await b.head(10)] == [2]
    assert await a.newest_id() < await b.newest_id()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "agent.db"
    bad.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(Exception, match="not a usable agent database"):
        AgentStore.open(bad)


@pytest.mark.asyncio
async def test_a_command_is_claimed_once_and_its_result_kept(tmp_path: Path) -> None:
    store = AgentStore.open(tmp_path / "a.db")
    ledger = store.ledger("t-01")
    assert await ledger.claim("cmd-00000001", "reboot", 1000)
    assert not await ledger.claim("cmd-00000001", "reboot", 1001)
    assert await ledger.claim("cmd-00000002", "diagnostics", 1002)
    assert await store.ledger("t-02").claim("cmd-00000001", "reboot", 1003)  # another terminal's id
    result = CommandResult(
        id=CommandId("cmd-00000002"),
        name=CommandName("diagnostics"),
        status="ok",
        ts=1005,
        output="ok",
    )
    await ledger.finish("cmd-00000002", result)
    store.close()
    ledger = AgentStore.open(tmp_path / "a.db").ledger("t-01")
    assert await ledger.result_of("cmd-00000002") == result
    assert await ledger.result_of("cmd-00000001") is None
    assert await ledger.interrupted() == [("cmd-00000001", "reboot", 1000)]
    assert not await ledger.claim("cmd-00000002", "diagnostics", 2000)


def test_replayed_telemetry_and_events_say_they_are_historical() -> None:
    sample = SystemSample(
        seq=1,
        ts=5,
        cpu_percent=1,
        memory_percent=1,
        memory_available=1,
        disk_percent=1,
        disk_free=1,
        uptime_s=1,
        net_bytes_sent=0,
        net_bytes_recv=0,
    )
    tele = Stored(1, 5, Outgoing("t", encode(Telemetry(samples=[sample])), Priority.TELEMETRY))
    assert decode(Telemetry, as_historical(tele)).historical
    event = Stored(2, 5, Outgoing("e", encode(Event(seq=1, ts=5, kind="x")), Priority.EVENT))
    assert decode(Event, as_historical(event)).historical
    result = Stored(3, 5, Outgoing("r", b"as-is", Priority.ACTION))
    assert as_historical(result) == b"as-is"
    garbage = Stored(4, 5, Outgoing("t", b"{not json", Priority.TELEMETRY))
    assert as_historical(garbage) == b"{not json"


def test_replay_pace_lets_a_burst_through_then_holds_to_the_rate() -> None:
    pace = ReplayPace(rate=10.0, burst=3, now=0.0)
    assert [pace.wait_s(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pace.wait_s(0.0) == pytest.approx(0.1)
    assert pace.wait_s(0.1) == pytest.approx(0.1)
    assert pace.wait_s(10.0) == 0.0  # a quiet while refills the bucket to its burst


@pytest.mark.asyncio
async def test_sequence_numbers_never_repeat_across_restarts(tmp_path: Path) -> None:
    store = AgentStore.open(tmp_path / "a.db")
    seq = store.sequence("t-01", "events", block=3)
    first = [await seq.next() for _ in range(4)]
    assert first == [1, 2, 3, 4]
    store.close()  # killed: the rest of the reserved block is skipped, never reused
    store = AgentStore.open(tmp_path / "a.db")
    seq = store.sequence("t-01", "events", block=3)
    assert await seq.next() > 4
    assert await store.sequence("t-02", "events", block=3).next() == 1
