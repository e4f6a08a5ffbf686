"""What happened on this kiosk: every event is numbered, logged locally, kept for the status
page and put in the outbox for the fleet server.

Staff actions and command outcomes go in at the outbox's highest priority (given up last when
the outbox is full); hotplug and faults at event priority.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping

from edge_agent.outbox import Outgoing, Priority
from edge_agent.status_model import EventView
from edge_agent.store import Outbox, Sequence
from fleet_protocol.codec import encode
from fleet_protocol.ids import TerminalId
from fleet_protocol.messages import Event, Scalar, Severity
from fleet_protocol.topics import Channel, topic

RECENT: int = 50
_LOG_LEVEL = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class Journal:
    def __init__(
        self,
        terminal: TerminalId,
        outbox: Outbox,
        sequence: Sequence,
        *,
        now_ms: Callable[[], int],
        logger: logging.Logger,
    ) -> None:
        self._topic = topic(terminal, Channel.EVENTS)
        self._outbox = outbox
        self._sequence = sequence
        self._now_ms = now_ms
        self._log = logger
        self._recent: deque[EventView] = deque(maxlen=RECENT)

    @property
    def recent(self) -> tuple[EventView, ...]:
        """Newest first."""
        return tuple(reversed(self._recent))

    async def record(
        self,
        kind: str,
        message: str,
        *,
        severity: Severity = "info",
        actor: str | None = None,
        attributes: Mapping[str, Scalar] | None = None,
        action: bool = False,
    ) -> Event:
        """Record an event; ``action``: something a person did or asked for (kept longest)."""
        event = Event(
            seq=await self._sequence.next(),
            ts=self._now_ms(),
            kind=kind,
            severity=severity,
            message=message[:4000],
            actor=actor[:200] if actor else None,
            attributes=dict(attributes or {}),
        )
        self._log.log(
            _LOG_LEVEL[severity],
            "event %s%s: %s",
            kind,
            f" by {actor}" if actor else "",
            message,
        )
        self._recent.append(EventView(event.ts, kind, severity, message, actor))
        priority = Priority.ACTION if action else Priority.EVENT
        await self._outbox.put(Outgoing(self._topic, encode(event), priority), event.ts)
        return event
