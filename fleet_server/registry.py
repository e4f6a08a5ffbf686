"""Adapter: the terminal registry in SQLite (WAL): sites, terminals, the alerting engines' state.

Several server processes may share one registry file; every read-modify-write runs inside
``BEGIN IMMEDIATE`` so presence decisions are serialised by SQLite itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, get_args

import aiosqlite
import msgspec

from fleet_protocol.ids import SiteId, TerminalId
from fleet_protocol.messages import OfflineReason, State
from fleet_protocol.ops import PresenceStatus, TerminalView
from fleet_protocol.sites import Site
from fleet_server.errors import RegistryError
from fleet_server.presence import Presence, apply_state

SCHEMA_VERSION: Final = 2

_MIGRATIONS: Final[dict[int, str]] = {
    1: """
        CREATE TABLE sites (
            id        TEXT PRIMARY KEY,
            name      TEXT NOT NULL,
            town      TEXT NOT NULL,
            district  TEXT NOT NULL
        );
        CREATE TABLE terminals (
            id              TEXT PRIMARY KEY,
            site            TEXT,
            online          INTEGER,            -- NULL: never heard a state from it
            session         INTEGER,
            reason          TEXT,
            since_ms        INTEGER,
            expected_back_ms INTEGER,
            last_seen_ms    INTEGER,
            agent_version   TEXT
        );
        CREATE INDEX terminals_site ON terminals(site);
    """,
    2: """
        -- The whole site as imported (fleet_protocol.sites.Site, JSON): owners, hours, calendar.
        ALTER TABLE sites ADD COLUMN doc TEXT;
        -- The presence table's status (online, stale, offline, planned, flapping).
        ALTER TABLE terminals ADD COLUMN status TEXT;
        -- Snapshots of the single-writer engines (presence table, alert policy).
        CREATE TABLE engine_state (
            name      TEXT PRIMARY KEY,
            doc       BLOB NOT NULL,
            saved_ms  INTEGER NOT NULL
        );
        -- Who runs the engines: one holder among the server processes sharing this file.
        CREATE TABLE leases (
            name        TEXT PRIMARY KEY,
            holder      TEXT NOT NULL,
            expires_ms  INTEGER NOT NULL
        );
        -- Every alert decision, once: sent, suppressed, reminded, escalated, acknowledged,
        -- resolved. The key is the engine's decision key, so a replay inserts nothing.
        CREATE TABLE alert_log (
            key         TEXT PRIMARY KEY,
            alert_id    TEXT NOT NULL,
            action      TEXT NOT NULL,
            at_ms       INTEGER NOT NULL,
            kind        TEXT NOT NULL,
            subject     TEXT NOT NULL,
            site        TEXT,
            district    TEXT NOT NULL,
            reason      TEXT,
            recipients  TEXT NOT NULL
        );
        CREATE INDEX alert_log_alert ON alert_log(alert_id, at_ms);
        -- Acknowledgements asked for (ops API, e-mail link) until the engine has taken them.
        CREATE TABLE alert_acks (
            alert_id  TEXT NOT NULL,
            who       TEXT NOT NULL,
            at_ms     INTEGER NOT NULL,
            taken     INTEGER NOT NULL DEFAULT 0
        );
    """,
}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a terminal stands: the tags its telemetry carries."""

    site: SiteId | None
    town: str | None
    district: str | None


@dataclass(frozen=True, slots=True)
class SiteRecord:
    id: SiteId
    name: str
    town: str
    district: str


async def _roll_back(db: aiosqlite.Connection) -> None:
    """``ROLLBACK`` whatever this connection has open; nothing if it has nothing open (a
    ``BEGIN`` that failed, a ``COMMIT`` that went through before a cancellation arrived)."""
    with contextlib.suppress(sqlite3.OperationalError):  # "no transaction is active"
        await db.execute("ROLLBACK")  # queued now, so it runs even if we are cancelled again


class Registry:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
        #: One statement sequence at a time on the connection, reads included (see _rows).
        self._writing = asyncio.Lock()

    async def __aenter__(self) -> Self:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self._path, timeout=30, isolation_level=None)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as exc:
            raise RegistryError(f"cannot open registry {self._path}: {exc}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction at a time per process (tasks share the connection), and
        ``BEGIN IMMEDIATE`` so SQLite serialises the writers of other processes too.

        Safe against cancellation: aiosqlite runs each statement on its own thread, so a
        task cancelled while awaiting ``BEGIN`` (which waits up to 30 s for another process's
        write lock) or ``COMMIT`` leaves that statement still to run. Any failure therefore
        queues a ``ROLLBACK`` behind it (the thread runs statements in order); without it the
        connection would stay inside the transaction and every later write would fail with
        "cannot start a transaction within a transaction"."""
        async with self._writing:
            db = self.db
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException:
                await _roll_back(db)
                raise

    async def _rows(
        self, what: str, sql: str, parameters: Sequence[object] = ()
    ) -> list[tuple[Any, ...]]:
        """The rows of a read, not interleaved with this process's write transactions;
        `RegistryError` "registry: cannot <what>: ..." if SQLite fails.

        A query still open on the connection holds its snapshot; ``BEGIN IMMEDIATE`` then
        cannot take the write lock once another process has written since, and SQLite says
        "database is locked" at once instead of waiting (SQLITE_BUSY_SNAPSHOT). Tasks share
        the connection, so reads (ops API, alerting) take their turn with the writes (ingest)."""
        try:
            async with self._writing, self.db.execute(sql, parameters) as cursor:
                return [tuple(row) for row in await cursor.fetchall()]
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot {what}: {exc}") from exc

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RegistryError("registry is not open")
        return self._db

    async def migrate(self) -> tuple[int, int]:
        """Bring the schema up to date; returns (version before, version after)."""
        try:
            async with self._transaction() as db:
                async with db.execute("PRAGMA user_version") as cur:
                    row = await cur.fetchone()
                before = int(row[0]) if row else 0
                if before > SCHEMA_VERSION:
                    raise RegistryError(
                        f"registry {self._path} has schema {before}, newer than this server's "
                        f"{SCHEMA_VERSION}: upgrade fleet-server"
                    )
                for version in range(before + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[version].split(";"):
                        if statement.strip():
                            await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise RegistryError(f"registry {self._path}: migration failed: {exc}") from exc
        return before, SCHEMA_VERSION

    async def put_sites(self, sites: Iterable[SiteRecord]) -> None:
        rows = [(s.id, s.name, s.town, s.district) for s in sites]
        try:
            async with self._transaction() as db:
                await db.executemany(
                    "INSERT INTO sites(id, name, town, district) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET name=excluded.name, town=excluded.town, "
                    "district=excluded.district",
                    rows,
                )
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot store sites: {exc}") from exc

    async def apply_state(
        self, terminal: TerminalId, message: State, received_ms: int
    ) -> Presence | None:
        """Record ``message`` if it is not stale; returns the new presence or None."""
        try:
            async with self._transaction() as db:
                async with db.execute(
                    "SELECT online, session, since_ms, reason, expected_back_ms "
                    "FROM terminals WHERE id = ?",
                    (terminal,),
                ) as cur:
                    row = await cur.fetchone()
                current = _presence(row) if row is not None else None
                new = apply_state(current, message, received_ms)
                if new is not None:
                    await db.execute(
                        "INSERT INTO terminals(id, site, online, session, reason, since_ms, "
                        "expected_back_ms, last_seen_ms, agent_version) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(id) DO UPDATE SET "
                        # The first site a terminal names sticks; enrolment will bind it for good.
                        "site=coalesce(terminals.site, excluded.site), online=excluded.online, "
                        "session=excluded.session, reason=excluded.reason, "
                        "since_ms=excluded.since_ms, expected_back_ms=excluded.expected_back_ms, "
                        "last_seen_ms=max(coalesce(terminals.last_seen_ms, 0), "
                        "excluded.last_seen_ms), "
                        "agent_version=coalesce(excluded.agent_version, terminals.agent_version)",
                        (
                            terminal,
                            message.site,
                            int(new.online),
                            new.session,
                            new.reason,
                            new.since_ms,
                            new.expected_back_ms,
                            received_ms,
                            message.agent_version,
                        ),
                    )
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot record state of {terminal}: {exc}") from exc
        return new

    async def touch(self, last_seen: Mapping[TerminalId, int]) -> None:
        """Record when each terminal was last heard from (never moving backwards)."""
        if not last_seen:
            return
        try:
            async with self._transaction() as db:
                await db.executemany(
                    "INSERT INTO terminals(id, last_seen_ms) VALUES (?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET last_seen_ms = "
                    "max(coalesce(terminals.last_seen_ms, 0), excluded.last_seen_ms)",
                    list(last_seen.items()),
                )
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot record last-seen times: {exc}") from exc

    async def placement(self, terminal: TerminalId) -> Placement:
        rows = await self._rows(
            f"read placement of {terminal}",
            "SELECT t.site, s.town, s.district FROM terminals t "
            "LEFT JOIN sites s ON s.id = t.site WHERE t.id = ?",
            (terminal,),
        )
        row = rows[0] if rows else None
        if row is None:
            return Placement(None, None, None)
        return Placement(row[0], row[1], row[2])

    async def terminals(self) -> list[TerminalView]:
        rows = await self._rows(
            "list terminals",
            "SELECT t.id, t.online, t.site, s.name, s.town, s.district, t.reason, "
            "t.session, t.since_ms, t.last_seen_ms, t.agent_version, t.status "
            "FROM terminals t LEFT JOIN sites s ON s.id = t.site ORDER BY t.id",
        )
        return [
            TerminalView(
                id=r[0],
                status="unknown" if r[1] is None else ("online" if r[1] else "offline"),
                site=r[2],
                site_name=r[3],
                town=r[4],
                district=r[5],
                reason=r[6],
                session=r[7],
                since_ms=r[8],
                last_seen_ms=r[9],
                agent_version=r[10],
                presence=r[11] if r[11] in _PRESENCE else None,
            )
            for r in rows
        ]

    # --- sites, as imported -------------------------------------------------------------

    async def import_sites(self, sites: Sequence[Site]) -> tuple[int, int]:
        """Store whole sites (replacing those with the same id); returns (added, updated)."""
        rows = [(s.id, s.name, s.town, s.district, msgspec.json.encode(s).decode()) for s in sites]
        try:
            async with self._transaction() as db:
                async with db.execute("SELECT id FROM sites") as cur:
                    known = {r[0] for r in await cur.fetchall()}
                await db.executemany(
                    "INSERT INTO sites(id, name, town, district, doc) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET name=excluded.name, town=excluded.town, "
                    "district=excluded.district, doc=excluded.doc",
                    rows,
                )
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot store sites: {exc}") from exc
        updated = sum(1 for s in sites if s.id in known)
        return len(sites) - updated, updated

    async def sites(self) -> list[Site]:
        """Every site imported with its owners and hours (sites only named in the server's
        config have no schedule and no owners, and are left out)."""
        rows = await self._rows(
            "read sites",
            "SELECT doc FROM sites WHERE doc IS NOT NULL ORDER BY id",
        )
        return [msgspec.json.decode(r[0], type=Site) for r in rows]

    async def site_terminals(self) -> dict[str, str]:
        """terminal -> site, for every terminal placed at a site."""
        rows = await self._rows(
            "read placements",
            "SELECT id, site FROM terminals WHERE site IS NOT NULL",
        )
        return {r[0]: r[1] for r in rows}

    async def last_seen(self) -> dict[str, int]:
        rows = await self._rows(
            "read last-seen times",
            "SELECT id, last_seen_ms FROM terminals WHERE last_seen_ms IS NOT NULL",
        )
        return {r[0]: int(r[1]) for r in rows}

    # --- the engines: one holder, their snapshots and decisions ---------------------------

    async def hold_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        """Take or keep the lease ``name``; True while ``holder`` has it. Every process sharing
        the file asks; the one whose lease has not expired keeps it."""
        try:
            async with self._transaction() as db:
                await db.execute(
                    "INSERT INTO leases(name, holder, expires_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, "
                    "expires_ms=excluded.expires_ms "
                    "WHERE leases.holder = excluded.holder OR leases.expires_ms < ?",
                    (name, holder, now_ms + ttl_ms, now_ms),
                )
                async with db.execute("SELECT holder FROM leases WHERE name = ?", (name,)) as cur:
                    row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot take the {name} lease: {exc}") from exc
        return row is not None and row[0] == holder

    async def release_lease(self, name: str, holder: str) -> None:
        try:
            async with self._transaction() as db:
                await db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot release the {name} lease: {exc}") from exc

    async def engine_state(self, name: str) -> bytes | None:
        rows = await self._rows(
            f"read the {name} state",
            "SELECT doc FROM engine_state WHERE name = ?",
            (name,),
        )
        row = rows[0] if rows else None
        return bytes(row[0]) if row is not None else None

    async def save_engines(
        self,
        states: Mapping[str, bytes],
        statuses: Mapping[str, str],
        log: Sequence[AlertLogEntry],
        now_ms: int,
    ) -> list[str]:
        """In one transaction: the engines' snapshots, the terminals' presence statuses and
        the decisions; returns the keys of the decisions that were new (to be mailed)."""
        try:
            async with self._transaction() as db:
                await db.executemany(
                    "INSERT INTO engine_state(name, doc, saved_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET doc=excluded.doc, saved_ms=excluded.saved_ms",
                    [(n, d, now_ms) for n, d in states.items()],
                )
                await db.executemany(
                    "INSERT INTO terminals(id, status) VALUES (?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET status=excluded.status",
                    list(statuses.items()),
                )
                new: list[str] = []
                for e in log:
                    cur = await db.execute(
                        "INSERT OR IGNORE INTO alert_log(key, alert_id, action, at_ms, kind, "
                        "subject, site, district, reason, recipients) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            e.key,
                            e.alert_id,
                            e.action,
                            e.at_ms,
                            e.kind,
                            e.subject,
                            e.site,
                            e.district,
                            e.reason,
                            " ".join(e.recipients),
                        ),
                    )
                    if cur.rowcount:
                        new.append(e.key)
                    await cur.close()
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot save the alerting state: {exc}") from exc
        return new

    async def alert_log(self, limit: int = 500) -> list[AlertLogEntry]:
        """The newest decisions first."""
        rows = await self._rows(
            "read the alert log",
            "SELECT key, alert_id, action, at_ms, kind, subject, site, district, reason, "
            "recipients FROM alert_log ORDER BY at_ms DESC, key LIMIT ?",
            (limit,),
        )
        return [
            AlertLogEntry(
                key=r[0],
                alert_id=r[1],
                action=r[2],
                at_ms=r[3],
                kind=r[4],
                subject=r[5],
                site=r[6],
                district=r[7],
                reason=r[8],
                recipients=tuple(r[9].split()) if r[9] else (),
            )
            for r in rows
        ]

    async def ask_ack(self, alert_id: str, who: str, now_ms: int) -> None:
        try:
            async with self._transaction() as db:
                await db.execute(
                    "INSERT INTO alert_acks(alert_id, who, at_ms) VALUES (?, ?, ?)",
                    (alert_id, who, now_ms),
                )
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot record the acknowledgement: {exc}") from exc

    async def take_acks(self) -> list[tuple[str, str, int]]:
        """Acknowledgements not yet taken by the engine: (alert id, who, when)."""
        try:
            async with self._transaction() as db:
                async with db.execute(
                    "SELECT rowid, alert_id, who, at_ms FROM alert_acks WHERE taken = 0 "
                    "ORDER BY rowid"
                ) as cur:
                    rows = await cur.fetchall()
                await db.executemany(
                    "UPDATE alert_acks SET taken = 1 WHERE rowid = ?", [(r[0],) for r in rows]
                )
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot read acknowledgements: {exc}") from exc
        return [(r[1], r[2], int(r[3])) for r in rows]


@dataclass(frozen=True, slots=True)
class AlertLogEntry:
    """One alert decision as stored and shown (``fleetctl alerts list``)."""

    key: str
    alert_id: str
    action: str
    at_ms: int
    kind: str
    subject: str
    site: str | None
    district: str
    reason: str | None
    recipients: tuple[str, ...]


_PRESENCE: Final = frozenset(get_args(PresenceStatus))


def _presence(row: sqlite3.Row) -> Presence | None:
    online, session, since_ms, reason, expected_back_ms = row[0], row[1], row[2], row[3], row[4]
    if online is None or session is None:
        return None
    reasons: dict[object, OfflineReason] = {
        "lost": "lost",
        "shutdown": "shutdown",
        "planned": "planned",
    }
    return Presence(
        online=bool(online),
        session=int(session),
        since_ms=int(since_ms or 0),
        reason=reasons.get(reason),
        expected_back_ms=int(expected_back_ms) if expected_back_ms is not None else None,
    )
