"""Adapter: the mail outbox in SQLite (WAL), through aiosqlite.

A message is stored before anyone is told it will be sent, and its key is UNIQUE, so a retried
or concurrent enqueue of the same alert stores it once. Several server processes may share the
file: a worker claims one message with a single UPDATE that only succeeds while nobody else
holds an unexpired lease on it, and it can finish only a message it still holds.

The table is named for itself and the schema is created if missing (no ``user_version``), so
the outbox can live in its own file or beside the registry's tables.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

import aiosqlite

from fleet_server.mail_message import OutboxError

MessageState = Literal["queued", "sent", "failed"]

_SCHEMA: Final = """
    CREATE TABLE IF NOT EXISTS mail_outbox (
        id              INTEGER PRIMARY KEY,
        key             TEXT NOT NULL UNIQUE,
        subject         TEXT NOT NULL,
        recipients      TEXT NOT NULL,
        message         BLOB NOT NULL,
        state           TEXT NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'sent', 'failed')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        created_ms      INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        lease_until_ms  INTEGER NOT NULL DEFAULT 0,
        lease_owner     TEXT,
        done_ms         INTEGER,
        last_error      TEXT
    );
    CREATE INDEX IF NOT EXISTS mail_outbox_due ON mail_outbox(state, next_attempt_ms)
"""
_STATES: Final[dict[str, MessageState]] = {"queued": "queued", "sent": "sent", "failed": "failed"}


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    key: str
    subject: str
    recipients: str
    message: bytes
    state: MessageState
    attempts: int
    """Delivery attempts started, this one included when the entry was just claimed."""
    created_ms: int
    next_attempt_ms: int
    done_ms: int | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    queued: int = 0
    sent: int = 0
    failed: int = 0


class MailOutbox:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None

    async def __aenter__(self) -> Self:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self._path, timeout=30, isolation_level=None)
            await self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an enqueued alert must survive a power cut, not just a process crash.
            await self._db.execute("PRAGMA synchronous=FULL")
            await self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            await self.__aexit__(None, None, None)
            raise OutboxError(f"cannot open mail outbox {self._path}: {exc}") from exc
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

    async def add(
        self, key: str, message: bytes, *, subject: str, recipients: str, now_ms: int
    ) -> bool:
        """Store a message due now; False (and nothing changed) if ``key`` is already stored."""
        changed = await self._write(
            "INSERT INTO mail_outbox(key, subject, recipients, message, created_ms, "
            "next_attempt_ms) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING",
            (key, subject, recipients, message, now_ms, now_ms),
        )
        return changed == 1

    async def claim(self, now_ms: int, lease_ms: int, owner: str) -> OutboxEntry | None:
        """Take the most overdue queued message nobody holds, for ``lease_ms``."""
        rows = await self._fetch(
            "UPDATE mail_outbox SET attempts = attempts + 1, lease_until_ms = ?, lease_owner = ? "
            "WHERE id = (SELECT id FROM mail_outbox WHERE state = 'queued' "
            "AND next_attempt_ms <= ? AND lease_until_ms <= ? "
            "ORDER BY next_attempt_ms, id LIMIT 1) "
            "RETURNING id, key, subject, recipients, message, state, attempts, created_ms, "
            "next_attempt_ms, done_ms, last_error",
            (now_ms + lease_ms, owner, now_ms, now_ms),
        )
        return _entry(rows[0]) if rows else None

    async def finish(
        self, entry_id: int, owner: str, state: MessageState, now_ms: int, error: str | None
    ) -> bool:
        """Mark a claimed message sent or failed; False if ``owner`` no longer holds it."""
        changed = await self._write(
            "UPDATE mail_outbox SET state = ?, done_ms = ?, last_error = coalesce(?, last_error), "
            "lease_until_ms = 0, lease_owner = NULL WHERE id = ? AND lease_owner = ?",
            (state, now_ms, error, entry_id, owner),
        )
        return changed == 1

    async def retry_later(
        self, entry_id: int, owner: str, next_attempt_ms: int, error: str
    ) -> bool:
        """Release a claimed message to be tried again at ``next_attempt_ms``."""
        changed = await self._write(
            "UPDATE mail_outbox SET next_attempt_ms = ?, last_error = ?, lease_until_ms = 0, "
            "lease_owner = NULL WHERE id = ? AND lease_owner = ?",
            (next_attempt_ms, error, entry_id, owner),
        )
        return changed == 1

    async def next_due_ms(self) -> int | None:
        """When the next queued message may be claimed (None: nothing is queued)."""
        rows = await self._fetch(
            "SELECT min(max(next_attempt_ms, lease_until_ms)) FROM mail_outbox "
            "WHERE state = 'queued'",
            (),
        )
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    async def entry(self, key: str) -> OutboxEntry | None:
        rows = await self._fetch(
            "SELECT id, key, subject, recipients, message, state, attempts, created_ms, "
            "next_attempt_ms, done_ms, last_error FROM mail_outbox WHERE key = ?",
            (key,),
        )
        return _entry(rows[0]) if rows else None

    async def counts(self) -> OutboxCounts:
        rows = await self._fetch("SELECT state, count(*) FROM mail_outbox GROUP BY state", ())
        return OutboxCounts(**{str(state): int(n) for state, n in rows})

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise OutboxError("mail outbox is not open")
        return self._db

    async def _write(self, sql: str, params: tuple[object, ...]) -> int:
        """Run one statement; the number of rows it changed."""
        # Single statements in autocommit mode: each is its own transaction, so tasks can share
        # the connection without a lock.
        try:
            async with self._conn.execute(sql, params) as cursor:
                return cursor.rowcount
        except sqlite3.Error as exc:
            raise OutboxError(f"mail outbox {self._path}: {exc}") from exc

    async def _fetch(self, sql: str, params: tuple[object, ...]) -> list[sqlite3.Row]:
        try:
            async with self._conn.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise OutboxError(f"mail outbox {self._path}: {exc}") from exc


def _entry(row: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(
        id=int(row[0]),
        key=str(row[1]),
        subject=str(row[2]),
        recipients=str(row[3]),
        message=bytes(row[4]),
        state=_STATES[row[5]],
        attempts=int(row[6]),
        created_ms=int(row[7]),
        next_attempt_ms=int(row[8]),
        done_ms=None if row[9] is None else int(row[9]),
        last_error=row[10],
    )
