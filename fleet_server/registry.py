"""Adapter: the terminal registry in SQLite (WAL), the only module that imports aiosqlite.

Several server processes may share one registry file; every read-modify-write runs inside
``BEGIN IMMEDIATE`` so presence decisions are serialised by SQLite itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import aiosqlite

from fleet_protocol.ids import SiteId, TerminalId
from fleet_protocol.messages import OfflineReason, State
from fleet_protocol.ops import TerminalView
from fleet_server.errors import RegistryError
from fleet_server.presence import Presence, apply_state

SCHEMA_VERSION: Final = 1

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


class Registry:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
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
        ``BEGIN IMMEDIATE`` so SQLite serialises the writers of other processes too."""
        async with self._writing:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

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
        try:
            async with self.db.execute(
                "SELECT t.site, s.town, s.district FROM terminals t "
                "LEFT JOIN sites s ON s.id = t.site WHERE t.id = ?",
                (terminal,),
            ) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot read placement of {terminal}: {exc}") from exc
        if row is None:
            return Placement(None, None, None)
        return Placement(row[0], row[1], row[2])

    async def terminals(self) -> list[TerminalView]:
        try:
            async with self.db.execute(
                "SELECT t.id, t.online, t.site, s.name, s.town, s.district, t.reason, "
                "t.session, t.since_ms, t.last_seen_ms, t.agent_version "
                "FROM terminals t LEFT JOIN sites s ON s.id = t.site ORDER BY t.id"
            ) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as exc:
            raise RegistryError(f"registry: cannot list terminals: {exc}") from exc
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
            )
            for r in rows
        ]


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
