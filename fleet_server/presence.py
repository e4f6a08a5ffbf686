"""Terminal presence from state messages: which state wins, and which is stale.

Every connection of an agent has a session number (``State.session``, Sparkplug's bdSeq) that
appears in its birth and in its last will. Ordering (session, birth < death):

- a death counts only for the current session or a newer one: a will from an earlier
  connection that arrives after the terminal reconnected is stale and ignored;
- a birth counts when its session is newer, or when the terminal is offline and the number is
  a different one (an agent whose state directory was wiped starts counting again at 1; it
  must still come back online);
- the same state again (a retained redelivery after a server restart) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet_protocol.messages import OfflineReason, State


@dataclass(frozen=True, slots=True)
class Presence:
    online: bool
    session: int
    since_ms: int
    reason: OfflineReason | None = None
    expected_back_ms: int | None = None


def apply_state(current: Presence | None, message: State, received_ms: int) -> Presence | None:
    """The presence after ``message``, or None when the message is stale or a repeat."""
    if current is not None:
        if message.online:
            newer = message.session > current.session
            restarted = not current.online and message.session != current.session
            if not (newer or restarted):
                return None
        elif message.session < current.session or (
            message.session == current.session and not current.online
        ):
            return None
    return Presence(
        online=message.online,
        session=message.session,
        since_ms=received_ms,
        reason=message.reason,
        expected_back_ms=message.expected_back,
    )
