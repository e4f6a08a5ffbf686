"""The registry on a real SQLite file in tmp_path: schema migration, last-seen times, and
presence decided consistently when several server processes share the file."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest

from fleet_protocol import State, TerminalId, site_id, terminal_id
from fleet_server.errors import RegistryError
from fleet_server.registry import SCHEMA_VERSION, AlertLogEntry, Registry, SiteRecord

NOW = 1_732_190_400_000
KIOSK = terminal_id("kiosk-pd-001")
SITE = SiteRecord(site_id("pd-zhangjiang-01"), "张江镇政务服务中心", "张江镇", "浦东新区")


def birth(session: int) -> State:
    return State(online=True, session=session, ts=NOW, site=SITE.id)


def death(session: int) -> State:
    return State(online=False, session=session, ts=NOW, reason="lost")


async def user_version(registry: Registry) -> int:
    async with registry.db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.asyncio
async def test_migrating_twice_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    async with Registry(path) as registry:
        assert await registry.migrate() == (0, SCHEMA_VERSION)
        await registry.put_sites([SITE])
        await registry.apply_state(KIOSK, birth(3), NOW)
        assert await registry.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)

    # Another process starting on the same file later.
    async with Registry(path) as registry:
        assert await registry.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
        [view] = await registry.terminals()
        assert (view.id, view.status, view.session, view.town) == (KIOSK, "online", 3, SITE.town)


@pytest.fixture
def registry_from_the_future(tmp_path: Path) -> Path:
    """A registry file written by a newer fleet-server (schema version one above ours)."""
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE terminals (id TEXT PRIMARY KEY, shiny_new_column TEXT)")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    return path


@pytest.mark.asyncio
async def test_a_registry_from_a_newer_server_is_refused_untouched(
    registry_from_the_future: Path,
) -> None:
    async with Registry(registry_from_the_future) as registry:
        with pytest.raises(RegistryError, match="upgrade fleet-server") as refused:
            await registry.migrate()
        assert f"schema {SCHEMA_VERSION + 1}" in str(refused.value)
        assert str(registry_from_the_future) in str(refused.value)

        # Nothing was changed, and the connection is not left inside a transaction.
        assert await user_version(registry) == SCHEMA_VERSION + 1
        with pytest.raises(RegistryError, match="upgrade fleet-server"):
            await registry.migrate()


@pytest.mark.asyncio
async def test_last_seen_never_moves_backwards(tmp_path: Path) -> None:
    async with Registry(tmp_path / "registry.db") as registry:
        await registry.migrate()
        await registry.touch({KIOSK: NOW})
        await registry.touch({KIOSK: NOW - 60_000})  # a late batch from another process
        [view] = await registry.terminals()
        assert view.last_seen_ms == NOW

        await registry.touch({KIOSK: NOW + 1_000})
        [view] = await registry.terminals()
        assert view.last_seen_ms == NOW + 1_000

        # A state received with an older clock does not move it back either.
        await registry.apply_state(KIOSK, birth(1), NOW - 5_000)
        [view] = await registry.terminals()
        assert (view.status, view.last_seen_ms) == ("online", NOW + 1_000)


@pytest.mark.asyncio
async def test_a_terminal_only_seen_through_telemetry_has_unknown_status(tmp_path: Path) -> None:
    other = terminal_id("kiosk-pd-002")
    async with Registry(tmp_path / "registry.db") as registry:
        await registry.migrate()
        await registry.put_sites([SITE])
        await registry.apply_state(KIOSK, birth(1), NOW)
        await registry.touch({other: NOW})

        views = {v.id: v for v in await registry.terminals()}
        assert views[KIOSK].status == "online"
        unknown = views[other]
        assert (unknown.status, unknown.session, unknown.site, unknown.reason) == (
            "unknown",
            None,
            None,
            None,
        )
        assert unknown.last_seen_ms == NOW

        # Its first birth then settles it.
        await registry.apply_state(other, birth(4), NOW + 10)
        views = {v.id: v for v in await registry.terminals()}
        assert (views[other].status, views[other].session) == ("online", 4)
        assert views[other].town == SITE.town


def state_stream(terminal: TerminalId, sessions: int, seed: int) -> list[State]:
    """Every birth 1..sessions and every death but the last session's, shuffled."""
    stream = [birth(s) for s in range(1, sessions + 1)] + [death(s) for s in range(1, sessions)]
    random.Random(seed).shuffle(stream)
    return stream


@pytest.mark.asyncio
async def test_two_processes_sharing_the_file_agree_on_the_newest_session(
    tmp_path: Path,
) -> None:
    # Each server process sees every state message (a plain subscription) in its own order
    # and applies them one at a time; the two processes run at the same time on one file.
    path = tmp_path / "registry.db"
    terminals = [terminal_id(f"kiosk-pd-{n:03d}") for n in range(1, 4)]
    sessions = 15

    async def process(registry: Registry, seed: int) -> None:
        streams = [state_stream(t, sessions, seed * 100 + i) for i, t in enumerate(terminals)]
        for step, messages in enumerate(zip(*streams, strict=True)):
            for terminal, message in zip(terminals, messages, strict=True):
                await registry.apply_state(terminal, message, NOW + step)

    async with Registry(path) as first, Registry(path) as second:
        await first.migrate()
        await second.migrate()
        await first.put_sites([SITE])
        await asyncio.gather(process(first, seed=1), process(second, seed=2))

        for registry in (first, second):
            views = await registry.terminals()
            assert [(v.id, v.status, v.session, v.reason) for v in views] == [
                (t, "online", sessions, None) for t in terminals
            ]


@pytest.mark.asyncio
async def test_state_and_last_seen_updates_from_concurrent_tasks_of_one_process(
    tmp_path: Path,
) -> None:
    # fleet_server.app runs the ingest task (apply_state for each state message) and the
    # last-seen task (touch every 2 s) at the same time on one Registry.
    other = terminal_id("kiosk-pd-002")
    sessions = 20

    async with Registry(tmp_path / "registry.db") as registry:
        await registry.migrate()

        async def ingest() -> None:
            for session in range(1, sessions + 1):
                await registry.apply_state(KIOSK, birth(session), NOW + session)

        async def last_seen() -> None:
            for n in range(1, sessions + 1):
                await registry.touch({other: NOW + n})

        await asyncio.gather(ingest(), last_seen())

        views = {v.id: v for v in await registry.terminals()}
        assert (views[KIOSK].status, views[KIOSK].session) == ("online", sessions)
        assert (views[other].status, views[other].last_seen_ms) == ("unknown", NOW + sessions)


@pytest.mark.asyncio
async def test_one_holder_keeps_the_alerting_lease_until_it_lapses(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    async with Registry(path) as a, Registry(path) as b:
        await a.migrate()
        assert await a.hold_lease("alerting", "server-a", NOW, 15_000)
        assert not await b.hold_lease("alerting", "server-b", NOW + 1_000, 15_000)
        assert await a.hold_lease("alerting", "server-a", NOW + 10_000, 15_000)  # renewed
        assert not await b.hold_lease("alerting", "server-b", NOW + 20_000, 15_000)
        # server-a stops renewing (it died): server-b takes over once the lease lapsed.
        assert await b.hold_lease("alerting", "server-b", NOW + 26_000, 15_000)
        assert not await a.hold_lease("alerting", "server-a", NOW + 27_000, 15_000)
        await b.release_lease("alerting", "server-b")
        assert await a.hold_lease("alerting", "server-a", NOW + 28_000, 15_000)


@pytest.mark.asyncio
async def test_a_decision_is_stored_once_and_reported_new_once(tmp_path: Path) -> None:
    entry = AlertLogEntry(
        key="terminal-offline:kiosk-01:1/sent",
        alert_id="terminal-offline:kiosk-01:1",
        action="sent",
        at_ms=NOW,
        kind="terminal-offline",
        subject="kiosk-01",
        site="site-01",
        district="金山区",
        reason=None,
        recipients=("wang@example.gov.cn",),
    )
    async with Registry(tmp_path / "registry.db") as registry:
        await registry.migrate()
        first = await registry.save_engines(
            {"alerts": b"{}"}, {"kiosk-01": "offline"}, [entry], NOW
        )
        again = await registry.save_engines({"alerts": b"{}"}, {}, [entry], NOW + 1)
        assert (first, again) == ([entry.key], [])
        assert await registry.alert_log() == [entry]
        assert await registry.engine_state("alerts") == b"{}"
        [view] = await registry.terminals()
        assert view.presence == "offline"


@pytest.mark.asyncio
async def test_reads_beside_writes_in_one_process_never_find_the_database_locked(
    tmp_path: Path,
) -> None:
    """Two processes share the file; in one of them the ops API and the alerting engine read
    while ingest writes, and the other process writes too. A read still open on the
    connection when a write transaction begins would hold an old snapshot, and SQLite refuses
    to upgrade it at once ("database is locked", without waiting), which stopped the server."""
    path = tmp_path / "registry.db"
    kiosks = [terminal_id(f"kiosk-pd-{n:03d}") for n in range(50)]
    async with Registry(path) as a, Registry(path) as b:
        await a.migrate()
        await a.put_sites([SITE])
        for kiosk in kiosks:
            await a.apply_state(kiosk, birth(1), NOW)

        async def other_process() -> None:
            for n in range(200):
                await b.touch(dict.fromkeys(kiosks, NOW + n))

        async def reads() -> None:
            for _ in range(100):
                await a.terminals()
                await a.last_seen()

        async def writes() -> None:
            for session in range(2, 102):
                await a.apply_state(kiosks[session % len(kiosks)], birth(session), NOW)

        await asyncio.gather(other_process(), reads(), writes())
        assert len(await a.terminals()) == len(kiosks)


@pytest.mark.asyncio
async def test_a_write_cancelled_while_waiting_for_the_lock_leaves_no_transaction_open(
    tmp_path: Path,
) -> None:
    """The server's task group cancels its tasks when one fails or on shutdown. A write
    cancelled while its ``BEGIN`` waited for another process's write lock must not leave the
    connection inside a transaction: the alerting state saved next (on the way out, or after a
    broker restart) must still be stored, not fail with "cannot start a transaction within a
    transaction" and stop the server."""
    path = tmp_path / "registry.db"
    async with Registry(path) as registry:
        await registry.migrate()
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another server process is writing
            waiting = asyncio.create_task(
                registry.save_engines({"alerts": b"{}"}, {"kiosk-01": "offline"}, [], NOW)
            )
            await asyncio.sleep(0.3)  # its BEGIN is now waiting on the lock, on its thread
            waiting.cancel()
            await asyncio.sleep(0.1)
            # The lock is freed: the cancelled BEGIN goes through now, on aiosqlite's thread.
            other.execute("COMMIT")
        finally:
            other.close()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await registry.save_engines({"alerts": b'{"saved": 2}'}, {"kiosk-01": "online"}, [], NOW)
        assert await registry.engine_state("alerts") == b'{"saved": 2}'
        [view] = await registry.terminals()
        assert view.presence == "online"
        await registry.touch({terminal_id("kiosk-01"): NOW + 1})
