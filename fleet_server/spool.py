"""Adapter: the write spool in SQLite, the only fleet_server module that imports ``sqlite3``.

The spool is a FIFO of line-protocol write bodies that InfluxDB could not take when they were
due (see `fleet_server.batcher` for when and why). Chosen for being durable before the
broker is acknowledged, simple, and bounded:

- One table, one row per batch, ids in arrival order (``AUTOINCREMENT``: never reused, so
  "everything up to id N" is exactly what a replayed run read). ``synchronous=FULL`` in WAL
  mode: an append has reached the disk when `Spool.append` returns, so acknowledging the
  deliveries afterwards cannot lose them even to a power cut.
- The stdlib ``sqlite3`` module on one worker thread of its own: every call is a short
  statement, none blocks the event loop, and the calls are serialised in submission order.
  (The registry uses aiosqlite; the spool needs nothing from it and keeps its own thread.)
- The cap counts the bytes of the bodies, which is what a backlog costs; the file is somewhat
  larger (SQLite pages, the WAL). Freed pages go back to the file system once the spool is
  empty again (incremental auto-vacuum), so a drained outage does not leave a large file.
- ``locking_mode=EXCLUSIVE``: the file belongs to one server process for as long as it runs.
  A second process pointed at the same file fails at start instead of replaying the same rows.

The depth (batches, points, bytes) is kept in memory, read from the file at open and updated
on the worker thread right after each commit, so it is right even when the awaiting task was
cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypeVar

from fleet_server.batcher import SpoolDepth, SpooledRun, SpoolError

__all__ = ["Spool"]

T = TypeVar("T")

_SCHEMA: Final = """
    CREATE TABLE IF NOT EXISTS batches (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        points      INTEGER NOT NULL,
        body        BLOB NOT NULL
    )
"""


class Spool:
    """The spool file at ``path`` holding at most ``max_bytes`` of line protocol.

    Use as ``async with Spool(path, max_bytes) as spool``; every method raises `SpoolError`
    when SQLite or the file system fails.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"spool cap must be positive, not {max_bytes}")
        self._path = path
        self._max_bytes = max_bytes
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._depth = SpoolDepth()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def depth(self) -> SpoolDepth:
        return SpoolDepth(self._depth.batches, self._depth.points, self._depth.bytes)

    def has_room(self, size: int) -> bool:
        return self._depth.bytes + size <= self._max_bytes

    async def __aenter__(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("this spool is already open")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        try:
            await self._call(self._open, "open")
        except BaseException:
            self._thread.shutdown(wait=True)
            self._thread = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(thread, self._close)
        finally:
            thread.shutdown(wait=False)

    async def append(self, body: bytes, points: int) -> None:
        await self._call(lambda: self._append(body, points), "append a batch to")

    async def head(self, max_points: int) -> SpooledRun | None:
        return await self._call(lambda: self._head(max_points), "read")

    async def drop(self, run: SpooledRun) -> None:
        await self._call(lambda: self._drop(run), "delete replayed batches from")

    async def _call(self, work: Callable[[], T], what: str) -> T:
        if self._thread is None:
            raise SpoolError(f"spool {self._path} is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work)
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"cannot {what} spool {self._path}: {exc}") from exc

    # --- on the worker thread ------------------------------------------------------------

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # timeout=0: a spool locked by another process is an error now, not a wait.
        db = sqlite3.connect(self._path, timeout=0, isolation_level=None)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA journal_size_limit=67108864")
            db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock for good
            db.execute(_SCHEMA)
            db.execute("COMMIT")
            batches, points, size = db.execute(
                "SELECT count(*), coalesce(sum(points), 0), coalesce(sum(length(body)), 0) "
                "FROM batches"
            ).fetchone()
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc):
                raise SpoolError(
                    f"spool {self._path} is in use by another fleet-server process; give each "
                    "process its own [influx] spool_path"
                ) from exc
            raise
        except BaseException:
            db.close()
            raise
        self._db = db
        self._depth = SpoolDepth(int(batches), int(points), int(size))

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"spool {self._path} is not open")
        return self._db

    def _append(self, body: bytes, points: int) -> None:
        self._connection().execute(
            "INSERT INTO batches(points, body) VALUES (?, ?)", (points, body)
        )  # autocommit: one statement, one durable transaction
        d = self._depth
        self._depth = SpoolDepth(d.batches + 1, d.points + points, d.bytes + len(body))

    def _head(self, max_points: int) -> SpooledRun | None:
        rows = self._connection().execute("SELECT id, points, body FROM batches ORDER BY id")
        try:
            last_id, batches, points, bodies = 0, 0, 0, []
            for row_id, row_points, body in rows:
                if batches and points + row_points > max_points:
                    break
                last_id, batches, points = row_id, batches + 1, points + row_points
                bodies.append(bytes(body))
        finally:
            rows.close()
        if not batches:
            return None
        return SpooledRun(last_id, batches, points, b"\n".join(bodies))

    def _drop(self, run: SpooledRun) -> None:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            batches, points, size = db.execute(
                "SELECT count(*), coalesce(sum(points), 0), coalesce(sum(length(body)), 0) "
                "FROM batches WHERE id <= ?",
                (run.last_id,),
            ).fetchone()
            db.execute("DELETE FROM batches WHERE id <= ?", (run.last_id,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        d = self._depth
        self._depth = SpoolDepth(d.batches - batches, d.points - points, d.bytes - size)
        if not self._depth.batches:
            # executescript steps the pragma to the end; execute() would free a single page.
            db.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")
