"""What waits to be published while the broker is away: bounded, oldest dropped first.

A message leaves the backlog only after the broker acknowledged it, so a connection that
drops mid-publish loses nothing: the same message goes out again after the reconnect (the
server's store overwrites a redelivered sample). The on-disk outbox replaces this in-memory
bound when the agent learns to survive its own restarts.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False


class Backlog:
    def __init__(self, max_items: int) -> None:
        self._items: deque[Outgoing] = deque()
        self._max_items = max_items
        self._changed = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Outgoing) -> None:
        if len(self._items) >= self._max_items:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._changed.set()

    def peek(self) -> Outgoing | None:
        return self._items[0] if self._items else None

    def done(self, item: Outgoing) -> None:
        """Remove ``item`` after its acknowledgement (unless overflow already dropped it)."""
        if self._items and self._items[0] is item:
            self._items.popleft()

    def wake(self) -> None:
        """Wake a waiter without adding anything (used when the agent is stopping)."""
        self._changed.set()

    async def changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()
