"""The connection session counter (Sparkplug's bdSeq), persisted across restarts.

Each broker connection takes the next number and puts it in both the birth and the last will,
so the server can tell a stale death (of an earlier connection) from a real one. It must never
go backwards, even across a power cut: the file is replaced atomically and fsynced.
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.errors import StateDirError
from edge_agent.identity import write_file_atomically

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
        write_file_atomically(path, f"{nxt}\n".encode("ascii"), mode=0o600, dir_mode=0o700)
    except ValueError as exc:
        raise StateDirError(f"{path} is corrupt (not a number); remove it to restart at 1") from exc
    except OSError as exc:
        raise StateDirError(f"state directory {state_dir}: {exc.strerror}") from exc
    return nxt
