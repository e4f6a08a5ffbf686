"""The connection session counter (Sparkplug's bdSeq), persisted across restarts.

Each broker connection takes the next number and puts it in both the birth and the last will,
so the server can tell a stale death (of an earlier connection) from a real one. It must never
go backwards, even across a power cut: the file is replaced atomically and fsynced.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_agent.errors import StateDirError

_FILE = "session"


def next_session(state_dir: Path) -> int:
    """Return the next session number and persist it before it is used (blocking I/O)."""
    path = state_dir / _FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            current = int(path.read_text(encoding="ascii").strip() or "0")
        except FileNotFoundError:
            current = 0
        nxt = current + 1
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="ascii") as fh:
            fh.write(f"{nxt}\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        dir_fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except ValueError as exc:
        raise StateDirError(f"{path} is corrupt (not a number); remove it to restart at 1") from exc
    except OSError as exc:
        raise StateDirError(f"state directory {state_dir}: {exc.strerror}") from exc
    return nxt
