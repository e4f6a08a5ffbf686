"""Adapter: the agent's SQLite database (the only module that imports sqlite3).

One file holds, per terminal:

- the outbox (:mod:`edge_agent.outbox`): every message until the broker acknowledged it;
- the drop counters of the outbox, so they survive restarts;
- the command ledger: every command id ever claimed, and its result (run at most once).

Several terminals may share one file: ``fleet-sim`` runs thousands of agents in one process and
gives them one database instead of thousands of open files. On a kiosk there is one terminal.

Durability: WAL journal. With ``synchronous=NORMAL`` (the default) a committed write survives
the agent being killed at any moment; a power cut may lose the last second of writes but never
corrupts the file. ``synchronous=FULL`` also keeps that last second, at the cost of an fsync per
write, which wears a kiosk's cheap SSD.

Every call runs in a worker thread (``asyncio.to_thread``); a lock makes the one connection safe
to use from whichever worker runs it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TypeVar

from edge_agent.errors import StateDirError
from edge_agent.outbox import (
    DROP_FULL,
    DROP_TOO_OLD,
    OutboxLimits,
    Outgoing,
    Priority,
    Stored,
)
from fleet_protocol.codec import decode, encode
from fleet_protocol.errors import ProtocolError
from fleet_protocol.messages import CommandResult

T = TypeVar("T")
Synchronous = Literal["normal", "full"]

SCHEMA_VERSION: Final = 1
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    terminal    TEXT NOT NULL,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    retain      INTEGER NOT NULL,
    priority    INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    replace_key TEXT,
    correlation BLOB
);
CREATE INDEX IF NOT EXISTS outbox_by_terminal ON outbox (terminal, id);
CREATE INDEX IF NOT EXISTS outbox_by_priority ON outbox (terminal, priority, id);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_replace
    ON outbox (terminal, replace_key) WHERE replace_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS dropped (
    terminal TEXT NOT NULL,
    reason   TEXT NOT NULL,
    priority INTEGER NOT NULL,
    count    INTEGER NOT NULL,
    PRIMARY KEY (terminal, reason, priority)
);
CREATE TABLE IF NOT EXISTS sequences (
    terminal TEXT NOT NULL,
    stream   TEXT NOT NULL,
    reserved INTEGER NOT NULL,
    PRIMARY KEY (terminal, stream)
);
CREATE TABLE IF NOT EXISTS commands (
    terminal    TEXT NOT NULL,
    id          TEXT NOT NULL,
    name        TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    result      BLOB,
    PRIMARY KEY (terminal, id)
);
"""


class AgentStore:
    """The database file; :meth:`outbox` and :meth:`ledger` give one terminal's part of it."""

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self._db = connection
        self._lock = threading.RLock()  # totals are refreshed inside a transaction
        self.path = path

    @classmethod
    def open(cls, path: Path | None, *, synchronous: Synchronous = "normal") -> AgentStore:
        """Open (creating) the database at ``path``; None keeps it in memory (tests, benches).

        Blocking: call it through ``asyncio.to_thread`` from async code.
        """
        where = ":memory:" if path is None else str(path)
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(where, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateDirError(
                    f"{where} was written by a newer agent (schema {version}); "
                    "update this agent or move the file away"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StateDirError(
                f"{where}: not a usable agent database ({exc}); move it away to start afresh "
                "(what was waiting in it is then lost)"
            ) from exc
        except OSError as exc:
            raise StateDirError(f"{where}: {exc.strerror}") from exc
        return cls(db, where)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def read(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run a blocking database call in a worker thread, translating SQLite's errors."""
        try:
            return await asyncio.to_thread(fn)
        except sqlite3.Error as exc:
            raise StateDirError(f"agent database {self.path}: {exc}") from exc

    def outbox(self, terminal: str, limits: OutboxLimits) -> Outbox:
        """Blocking (reads the current totals)."""
        return Outbox(self, terminal, limits)

    def ledger(self, terminal: str) -> CommandLedger:
        return CommandLedger(self, terminal)

    def sequence(self, terminal: str, stream: str, block: int = 1000) -> Sequence:
        """Blocking (reserves the first block)."""
        return Sequence(self, terminal, stream, block)


@dataclass
class _Totals:
    count: int = 0
    bytes: int = 0
    oldest_ms: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)


class Outbox:
    """One terminal's outbox. ``put`` returns once the message is committed to disk."""

    def __init__(self, store: AgentStore, terminal: str, limits: OutboxLimits) -> None:
        self._store = store
        self._terminal = terminal
        self._limits = limits
        self._changed = asyncio.Event()
        self._totals = self._load_totals()

    # --- what the status page and diagnostics read (no I/O) ---------------------------------

    def __len__(self) -> int:
        return self._totals.count

    @property
    def pending_bytes(self) -> int:
        return self._totals.bytes

    @property
    def oldest_ms(self) -> int | None:
        return self._totals.oldest_ms

    @property
    def dropped(self) -> dict[str, int]:
        """Dropped messages by ``reason/priority`` (e.g. ``full/telemetry``), since ever."""
        return dict(self._totals.dropped)

    @property
    def limits(self) -> OutboxLimits:
        return self._limits

    # --- writing --------------------------------------------------------------------------------

    async def put(self, message: Outgoing, now_ms: int) -> None:
        await self._store.run(lambda: self._put_blocking(message, now_ms))
        self._changed.set()

    async def head(self, limit: int) -> list[Stored]:
        """The oldest ``limit`` messages, oldest first."""
        return await self._store.run(lambda: self._head_blocking(limit))

    async def delete(self, ids: Iterable[int]) -> None:
        """Forget messages the broker acknowledged."""
        wanted = list(ids)
        if wanted:
            await self._store.run(lambda: self._delete_blocking(wanted))

    async def newest_id(self) -> int:
        """The id of the newest message waiting (0 if none): the line between backlog and live."""
        rows = await self._store.run(
            lambda: self._store.read(
                "SELECT COALESCE(MAX(id), 0) FROM outbox WHERE terminal = ?", (self._terminal,)
            )
        )
        return int(str(rows[0][0]))

    async def expire(self, now_ms: int) -> int:
        """Drop what is older than the age bound; the number dropped."""
        return await self._store.run(lambda: self._expire_blocking(now_ms))

    def wake(self) -> None:
        """Wake a waiter without adding anything (used when the agent is stopping)."""
        self._changed.set()

    async def changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    # --- blocking parts, in a worker thread ---------------------------------------------------

    def _load_totals(self) -> _Totals:
        t = self._terminal
        rows = self._store.read(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MIN(created_ms) "
            "FROM outbox WHERE terminal = ?",
            (t,),
        )
        count, size, oldest = rows[0]
        dropped = {
            f"{reason}/{Priority(int(str(prio))).label}": int(str(n))
            for reason, prio, n in self._store.read(
                "SELECT reason, priority, count FROM dropped WHERE terminal = ?", (t,)
            )
        }
        return _Totals(
            int(str(count)),
            int(str(size)),
            None if oldest is None else int(str(oldest)),
            dropped,
        )

    def _put_blocking(self, m: Outgoing, now_ms: int) -> None:
        size = len(m.payload)
        with self._store.transaction() as db:
            if m.replace_key is not None:
                old = db.execute(
                    "DELETE FROM outbox WHERE terminal = ? AND replace_key = ? "
                    "RETURNING LENGTH(payload)",
                    (self._terminal, m.replace_key),
                ).fetchall()
                freed = sum(int(r[0]) for r in old)
                self._totals.count -= len(old)
                self._totals.bytes -= freed
            dropped = self._make_room(db, size)
            db.execute(
                "INSERT INTO outbox (terminal, topic, payload, retain, priority, created_ms, "
                "replace_key, correlation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self._terminal,
                    m.topic,
                    m.payload,
                    int(m.retain),
                    int(m.priority),
                    now_ms,
                    m.replace_key,
                    m.correlation,
                ),
            )
            self._count_drops(db, DROP_FULL, dropped)
            self._totals.count += 1
            self._totals.bytes += size
            if self._totals.oldest_ms is None:
                self._totals.oldest_ms = now_ms
            if dropped:
                self._refresh_oldest()

    def _make_room(self, db: sqlite3.Connection, incoming: int) -> dict[int, int]:
        """Delete the oldest of the lowest priority until ``incoming`` bytes fit."""
        dropped: dict[int, int] = {}
        while self._totals.count and self._totals.bytes + incoming > self._limits.max_bytes:
            row = db.execute(
                "SELECT id, priority, LENGTH(payload) FROM outbox WHERE terminal = ? "
                "ORDER BY priority, id LIMIT 1",
                (self._terminal,),
            ).fetchone()
            if row is None:
                break
            db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
            dropped[int(row[1])] = dropped.get(int(row[1]), 0) + 1
            self._totals.count -= 1
            self._totals.bytes -= int(row[2])
        return dropped

    def _count_drops(self, db: sqlite3.Connection, reason: str, dropped: dict[int, int]) -> None:
        for prio, n in dropped.items():
            db.execute(
                "INSERT INTO dropped (terminal, reason, priority, count) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (terminal, reason, priority) DO UPDATE SET count = count + ?",
                (self._terminal, reason, prio, n, n),
            )
            key = f"{reason}/{Priority(prio).label}"
            self._totals.dropped[key] = self._totals.dropped.get(key, 0) + n

    def _refresh_oldest(self) -> None:
        rows = self._store.read(
            "SELECT MIN(created_ms) FROM outbox WHERE terminal = ?", (self._terminal,)
        )
        oldest = rows[0][0]
        self._totals.oldest_ms = None if oldest is None else int(str(oldest))

    def _head_blocking(self, limit: int) -> list[Stored]:
        rows = self._store.read(
            "SELECT id, created_ms, topic, payload, priority, retain, replace_key, correlation "
            "FROM outbox WHERE terminal = ? ORDER BY id LIMIT ?",
            (self._terminal, limit),
        )
        return [
            Stored(
                id=int(str(r[0])),
                created_ms=int(str(r[1])),
                message=Outgoing(
                    topic=str(r[2]),
                    payload=bytes(r[3]),  # type: ignore[call-overload]
                    priority=Priority(int(str(r[4]))),
                    retain=bool(r[5]),
                    replace_key=None if r[6] is None else str(r[6]),
                    correlation=None if r[7] is None else bytes(r[7]),  # type: ignore[call-overload]
                ),
            )
            for r in rows
        ]

    def _delete_blocking(self, ids: list[int]) -> None:
        with self._store.transaction() as db:
            gone = db.execute(
                f"DELETE FROM outbox WHERE terminal = ? AND id IN ({','.join('?' * len(ids))}) "  # noqa: S608 - placeholders only
                "RETURNING LENGTH(payload)",
                (self._terminal, *ids),
            ).fetchall()
            self._totals.count -= len(gone)
            self._totals.bytes -= sum(int(r[0]) for r in gone)
            self._refresh_oldest()

    def _expire_blocking(self, now_ms: int) -> int:
        cutoff = now_ms - self._limits.max_age_ms
        with self._store.transaction() as db:
            gone = db.execute(
                "DELETE FROM outbox WHERE terminal = ? AND created_ms < ? "
                "RETURNING priority, LENGTH(payload)",
                (self._terminal, cutoff),
            ).fetchall()
            dropped: dict[int, int] = {}
            for prio, _ in gone:
                dropped[int(prio)] = dropped.get(int(prio), 0) + 1
            self._count_drops(db, DROP_TOO_OLD, dropped)
            self._totals.count -= len(gone)
            self._totals.bytes -= sum(int(r[1]) for r in gone)
            if gone:
                self._refresh_oldest()
        return len(gone)


class Sequence:
    """Numbers for one stream (``seq`` of samples or events) that never repeat across restarts.

    Numbers are reserved on disk a block at a time, so numbering costs one write per block; a
    restart skips what was left of the last block (gaps are harmless, repeats are not).
    """

    def __init__(self, store: AgentStore, terminal: str, stream: str, block: int) -> None:
        self._store = store
        self._terminal = terminal
        self._stream = stream
        self._block = block
        self._next = self._reserve_blocking()
        self._end = self._next + block

    def _reserve_blocking(self) -> int:
        with self._store.transaction() as db:
            row = db.execute(
                "INSERT INTO sequences (terminal, stream, reserved) VALUES (?, ?, ?) "
                "ON CONFLICT (terminal, stream) DO UPDATE SET reserved = reserved + ? "
                "RETURNING reserved",
                (self._terminal, self._stream, self._block, self._block),
            ).fetchone()
        return int(row[0]) - self._block + 1

    async def next(self) -> int:
        if self._next >= self._end:
            self._next = await self._store.run(self._reserve_blocking)
            self._end = self._next + self._block
        value = self._next
        self._next += 1
        return value


class CommandLedger:
    """Which command ids this terminal has seen, and what became of them (run at most once)."""

    def __init__(self, store: AgentStore, terminal: str) -> None:
        self._store = store
        self._terminal = terminal

    async def claim(self, command_id: str, name: str, received_ms: int) -> bool:
        """Record ``command_id`` before it runs; False if it was seen before."""

        def claim() -> bool:
            with self._store.transaction() as db:
                cur = db.execute(
                    "INSERT INTO commands (terminal, id, name, received_ms) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (self._terminal, command_id, name, received_ms),
                )
                return cur.rowcount == 1

        return await self._store.run(claim)

    async def finish(self, command_id: str, result: CommandResult) -> None:
        payload = encode(result)

        def finish() -> None:
            with self._store.transaction() as db:
                db.execute(
                    "UPDATE commands SET result = ? WHERE terminal = ? AND id = ?",
                    (payload, self._terminal, command_id),
                )

        await self._store.run(finish)

    async def result_of(self, command_id: str) -> CommandResult | None:
        rows = await self._store.run(
            lambda: self._store.read(
                "SELECT result FROM commands WHERE terminal = ? AND id = ?",
                (self._terminal, command_id),
            )
        )
        if not rows or rows[0][0] is None:
            return None
        try:
            return decode(CommandResult, bytes(rows[0][0]))  # type: ignore[call-overload]
        except ProtocolError:
            return None

    async def interrupted(self) -> list[tuple[str, str, int]]:
        """Claimed but never finished: the agent stopped while they ran."""
        rows = await self._store.run(
            lambda: self._store.read(
                "SELECT id, name, received_ms FROM commands "
                "WHERE terminal = ? AND result IS NULL ORDER BY received_ms",
                (self._terminal,),
            )
        )
        return [(str(r[0]), str(r[1]), int(str(r[2]))) for r in rows]
