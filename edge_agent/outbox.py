"""The outbox: everything the agent sends waits here, on disk, until the broker acknowledged it.

The records and the policy live here (pure); :mod:`edge_agent.store` keeps them in SQLite.

What goes in, and in which order it is given up when the outbox is full
-------------------------------------------------------------------------
Every message has a :class:`Priority`. The outbox is bounded by its total payload size
(``max_bytes``) and by age (``max_age_s``). When a new message would pass the size bound, the
oldest messages of the *lowest* priority present are dropped first: telemetry samples go
before peripheral snapshots, which go before events, which go before command results and staff
actions. A message older than ``max_age_s`` is dropped whatever its priority (after a week
offline, telemetry of the first day is no longer worth the wait of what came after). Every
drop is counted by reason (``full``, ``too_old``) and priority, and the counts are kept on disk
and shown on the status page and in diagnostics.

Retained snapshots (the ``peripherals`` topic) carry a ``replace_key``: a newer snapshot
replaces an unsent older one, because only the latest matters to the broker's retained copy.

Replay after an outage
----------------------
When a connection comes up, everything already waiting is *backlog*: it is published at most
``replay_rate`` messages a second (a village link that just came back should not be flooded)
and marked historical (``Telemetry.historical``, ``Event.historical``) so the server never
takes it for live state. What is put after the connection came up is live.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import msgspec

from fleet_protocol.codec import decode, encode
from fleet_protocol.errors import ProtocolError
from fleet_protocol.messages import Event, Telemetry


class Priority(enum.IntEnum):
    """Lower is given up first when the outbox is full."""

    TELEMETRY = 0
    SNAPSHOT = 1
    EVENT = 2
    ACTION = 3  # command results and staff actions: what a person did must arrive

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish (QoS 1)."""

    topic: str
    payload: bytes
    priority: Priority
    retain: bool = False
    #: A newer message with the same key replaces an unsent older one.
    replace_key: str | None = None
    #: MQTT 5 correlation data to echo (command results).
    correlation: bytes | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """An :class:`Outgoing` as the outbox holds it."""

    id: int
    created_ms: int
    message: Outgoing


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    max_bytes: int
    max_age_ms: int


DROP_FULL: Final = "full"
DROP_TOO_OLD: Final = "too_old"


def as_historical(stored: Stored) -> bytes:
    """The payload to publish for a message replayed from the backlog.

    Telemetry batches and events say they are historical; other payloads (snapshots, command
    results) go as they are. A payload that does not decode is sent unchanged: the outbox
    never loses a message because it could not improve it.
    """
    message = stored.message
    kind: type[Telemetry] | type[Event]
    if message.priority is Priority.TELEMETRY:
        kind = Telemetry
    elif message.priority is Priority.EVENT:
        kind = Event
    else:
        return message.payload
    try:
        decoded = decode(kind, message.payload)
        if decoded.historical:
            return message.payload
        return encode(msgspec.structs.replace(decoded, historical=True))
    except ProtocolError:  # undecodable, or a batch at the size limit with no room for the flag
        return message.payload


class ReplayPace:
    """A token bucket: at most ``rate`` backlog messages a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def wait_s(self, now: float) -> float:
        """Seconds to wait before the next backlog message may go (0: now); takes a token."""
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        wait = (1.0 - self._tokens) / self._rate
        self._tokens -= 1.0
        return wait
