"""The agent's recent log lines, kept in memory for "upload logs" and diagnostics.

Bounded: at most ``max_lines`` lines of at most ``max_chars`` characters each (by default
2000 x 300, under a megabyte), the oldest dropped first. A record of several lines (one with a
traceback) counts as several. Nothing is written to disk here: the kiosk's journal keeps the
full log; this is what the fleet server can ask for without a login on the machine.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Final

DEFAULT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_LINES: Final = 2000
MAX_CHARS: Final = 300


class RecentLog(logging.Handler):
    """A logging handler that remembers the last formatted lines."""

    def __init__(
        self,
        max_lines: int = MAX_LINES,
        max_chars: int = MAX_CHARS,
        level: int = logging.NOTSET,
    ) -> None:
        if max_lines < 1 or max_chars < 2:
            raise ValueError("RecentLog keeps at least one line of at least two characters")
        super().__init__(level)
        self.max_chars = max_chars
        self._lines: deque[str] = deque(maxlen=max_lines)
        self.setFormatter(logging.Formatter(DEFAULT_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - logging's contract: a handler never raises into the caller
            self.handleError(record)
            return
        limit = self.max_chars
        # Handler.handle holds self.lock around emit, and tail() takes it too: a log call from
        # another thread never tears a multi-line record apart.
        self._lines.extend(
            line if len(line) <= limit else line[: limit - 1] + "…" for line in text.splitlines()
        )

    def tail(self, lines: int) -> str:
        """The last ``lines`` lines, oldest first, one per line."""
        if lines <= 0:
            return ""
        with self.lock:  # type: ignore[union-attr]
            kept = list(self._lines)
        return "\n".join(kept[-lines:])

    def __len__(self) -> int:
        return len(self._lines)
