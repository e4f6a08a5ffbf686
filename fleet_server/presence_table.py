"""The presence of every terminal as a state table, driven by messages and an injected clock.

Statuses:

- ``unknown``: no state message seen yet.
- ``online``: born, and heard from (any state, telemetry, peripherals or event) recently.
- ``stale``: born, but silent for ``stale_after_ms``: still connected as far as we know, yet
  not reporting. A degraded kind of up.
- ``offline``: its will (or shutdown) arrived; or it was silent for ``heartbeat_timeout_ms``,
  the backstop for a will that never comes (reason ``heartbeat``); or a planned absence ran
  past its deadline (reason ``planned-overdue``).
- ``planned``: a planned reboot or shutdown, until ``expected_back + planned_margin_ms``.
- ``flapping``: ``flap_threshold`` losses (up to offline) within ``flap_window_ms``. While
  flapping no transitions are emitted for the individual drops; the table leaves flapping
  once the underlying status has held still for ``flap_quiet_ms``.

Which state message wins is :func:`fleet_server.presence.apply_state`'s business (session
ordering, stale wills); this module adds time. The status is *derived*: from the last
accepted state message, when the terminal was last heard from, and ``now``; the flapping
overlay sits on top of that. Every input returns the :class:`Transition` list it caused, so the
caller persists them and feeds the alert policy, and nothing changes between inputs.

Telemetry never makes a terminal online that the broker declared dead: only a newer birth
does. It does cancel ``stale`` and a ``heartbeat`` offline, since those were inferred from
silence alone.

Default timings follow the agent's defaults: a sample every 15 s, published in batches of 4 or
after 60 s, so telemetry arrives about once a minute. ``stale`` after 3 minutes is three
missed batches; the broker publishes a will within ~45 s of a loss, so a terminal still online
after 5 minutes of silence has lost its will and the heartbeat backstop takes it offline.

The clock is the caller's: every method takes ``now_ms`` and a clock that steps back is
treated as standing still, so transitions are always in order.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Final, Literal, Self

from fleet_protocol.messages import State
from fleet_server.presence import Presence, apply_state

PresenceStatus = Literal["unknown", "online", "stale", "offline", "planned", "flapping"]

#: Statuses in which a terminal is serving (stale: probably; it has not said otherwise).
UP: Final[frozenset[PresenceStatus]] = frozenset({"online", "stale"})
#: Statuses in which a terminal is not serving.
DOWN: Final[frozenset[PresenceStatus]] = frozenset({"offline", "planned"})

SECOND: Final = 1000
MINUTE: Final = 60 * SECOND


@dataclass(frozen=True, slots=True)
class PresenceSettings:
    """Timings of the table; see the module docstring for why these defaults."""

    stale_after_ms: int = 3 * MINUTE
    heartbeat_timeout_ms: int = 5 * MINUTE
    #: Added to a planned absence's expected return before it counts as overdue.
    planned_margin_ms: int = 5 * MINUTE
    flap_window_ms: int = 10 * MINUTE
    flap_threshold: int = 4
    flap_quiet_ms: int = 10 * MINUTE

    def __post_init__(self) -> None:
        if min(self.stale_after_ms, self.planned_margin_ms, self.flap_window_ms) < 0:
            raise ValueError("presence timings are never negative")
        if not 0 < self.stale_after_ms < self.heartbeat_timeout_ms:
            raise ValueError("stale_after_ms must be positive and below heartbeat_timeout_ms")
        if self.flap_threshold < 2 or self.flap_quiet_ms <= 0:
            raise ValueError("flapping needs at least 2 losses and a positive quiet period")


@dataclass(frozen=True, slots=True)
class Transition:
    """A terminal's status changed at ``at_ms`` (the time the table was told or ticked).

    Reasons: ``birth``, ``telemetry`` (heard again after stale or heartbeat), ``stable``
    (flapping ended, up); ``lost``, ``shutdown``, ``heartbeat``, ``planned-overdue``;
    ``planned``; ``no-telemetry`` (stale); ``flapping``.
    """

    terminal: str
    old: PresenceStatus
    new: PresenceStatus
    at_ms: int
    reason: str
    session: int | None


@dataclass(frozen=True, slots=True)
class TerminalPresence:
    """What the table knows of one terminal; also its persisted form.

    ``status``/``reason``/``since_ms`` are what the caller was last told; ``observed`` is what
    the messages and the clock say right now, which differs from ``status`` while flapping.
    """

    status: PresenceStatus = "unknown"
    reason: str | None = None
    since_ms: int = 0
    state: Presence | None = None
    heard_ms: int | None = None
    observed: PresenceStatus = "unknown"
    observed_since_ms: int = 0
    #: When it went from up to offline, inside the flap window.
    losses_ms: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class PresenceSnapshot:
    """The whole table at ``taken_at_ms`` (the latest clock value it had been given)."""

    taken_at_ms: int
    terminals: dict[str, TerminalPresence] = field(default_factory=dict)


def observe(
    record: TerminalPresence, now_ms: int, settings: PresenceSettings
) -> tuple[PresenceStatus, str | None]:
    """The status the messages and the clock give, before the flapping overlay."""
    state = record.state
    if state is None:
        return "unknown", None
    if state.online:
        heard = record.heard_ms if record.heard_ms is not None else state.since_ms
        return _by_silence(now_ms - heard, settings)
    if state.reason == "planned":
        back = state.expected_back_ms if state.expected_back_ms is not None else state.since_ms
        if now_ms >= back + settings.planned_margin_ms:
            return "offline", "planned-overdue"
        return "planned", "planned"
    return "offline", state.reason or "lost"


def due_ms(record: TerminalPresence, settings: PresenceSettings) -> int | None:
    """When the clock alone would next change ``record``'s status, as last settled; None: never.

    Silence takes an ``online`` terminal stale, and a stale one offline; a planned absence runs
    past its deadline; flapping ends after a quiet period. Between inputs, nothing else moves.
    """
    state = record.state
    due: int | None = None
    if state is not None:
        heard = record.heard_ms if record.heard_ms is not None else state.since_ms
        if record.observed == "online" and state.online:
            due = heard + settings.stale_after_ms
        elif record.observed == "stale" and state.online:
            due = heard + settings.heartbeat_timeout_ms
        elif record.observed == "planned" and not state.online:
            back = state.expected_back_ms if state.expected_back_ms is not None else state.since_ms
            due = back + settings.planned_margin_ms
    if record.status == "flapping":
        quiet = record.observed_since_ms + settings.flap_quiet_ms
        due = quiet if due is None else min(due, quiet)
    return due


def _by_silence(silent_ms: int, settings: PresenceSettings) -> tuple[PresenceStatus, str | None]:
    if silent_ms >= settings.heartbeat_timeout_ms:
        return "offline", "heartbeat"
    if silent_ms >= settings.stale_after_ms:
        return "stale", "no-telemetry"
    return "online", None


class PresenceTable:
    """Single-writer presence of the fleet. Not thread-safe; feed it from one task."""

    def __init__(self, settings: PresenceSettings | None = None) -> None:
        self.settings = settings or PresenceSettings()
        self._records: dict[str, TerminalPresence] = {}
        self._now_ms = 0
        # A heap of (due, terminal): when the clock alone may next change each terminal (see
        # `due_ms`), so that a tick settles those and not the whole fleet. One live entry per
        # terminal, the one `_timer_at` names; an entry may be early (telemetry moved the
        # deadline on: it is then settled, to no effect, and timed again), never late.
        self._timers: list[tuple[int, str]] = []
        self._timer_at: dict[str, int] = {}

    # --- inputs ----------------------------------------------------------------------------

    def on_state(self, terminal: str, message: State, now_ms: int) -> list[Transition]:
        """A birth, will or planned shutdown; stale and repeated ones change nothing."""
        now = self._clock(now_ms)
        record = self._records.get(terminal) or TerminalPresence(
            since_ms=now, observed_since_ms=now
        )
        accepted = apply_state(record.state, message, now)
        if accepted is None:
            return []
        record = replace(record, state=accepted, heard_ms=now)
        return self._settle(terminal, record, now, cause="birth")

    def on_telemetry(self, terminal: str, now_ms: int) -> list[Transition]:
        """Anything live from the terminal (telemetry, peripherals, events): a heartbeat."""
        now = self._clock(now_ms)
        record = self._records.get(terminal) or TerminalPresence(
            since_ms=now, observed_since_ms=now
        )
        return self._settle(terminal, replace(record, heard_ms=now), now, cause="telemetry")

    def tick(self, now_ms: int) -> list[Transition]:
        """Let time pass: stale, heartbeat backstop, planned deadlines, end of flapping.

        Settles only the terminals whose deadline has come (in terminal order), so a tick
        costs what is due, not the size of the fleet."""
        now = self._clock(now_ms)
        timers, timer_at = self._timers, self._timer_at
        due: list[str] = []
        while timers and timers[0][0] <= now:
            at, terminal = heapq.heappop(timers)
            if timer_at.get(terminal) == at:  # else superseded by an earlier entry
                del timer_at[terminal]
                due.append(terminal)
        out: list[Transition] = []
        for terminal in sorted(due):
            out += self._settle(terminal, self._records[terminal], now, cause="telemetry")
        return out

    # --- reading ---------------------------------------------------------------------------

    def status(self, terminal: str) -> PresenceStatus:
        record = self._records.get(terminal)
        return record.status if record is not None else "unknown"

    def get(self, terminal: str) -> TerminalPresence | None:
        return self._records.get(terminal)

    def snapshot(self) -> PresenceSnapshot:
        return PresenceSnapshot(taken_at_ms=self._now_ms, terminals=dict(self._records))

    @classmethod
    def restore(
        cls,
        snapshot: PresenceSnapshot,
        now_ms: int,
        settings: PresenceSettings | None = None,
    ) -> Self:
        """The table as it was, resumed at ``now_ms`` with no transition of its own.

        The server heard nothing while it was down, which says nothing about the terminals:
        silence timers are moved on by the downtime so a restart does not take the whole
        fleet stale or offline. Retained state messages redelivered on resubscribe are repeats
        and change nothing; newer ones apply as usual.
        """
        table = cls(settings)
        downtime = max(0, now_ms - snapshot.taken_at_ms)
        for terminal, saved in snapshot.terminals.items():
            record = saved
            if record.heard_ms is not None and record.state is not None and record.state.online:
                record = replace(record, heard_ms=record.heard_ms + downtime)
            table._records[terminal] = record
            table._time(terminal, record)
        table._now_ms = max(snapshot.taken_at_ms, now_ms)
        return table

    # --- the machine -----------------------------------------------------------------------

    def _clock(self, now_ms: int) -> int:
        self._now_ms = max(self._now_ms, now_ms)
        return self._now_ms

    def _settle(
        self, terminal: str, record: TerminalPresence, now: int, cause: str
    ) -> list[Transition]:
        s = self.settings
        observed, reason = observe(record, now, s)
        if observed == "online":
            reason = cause
        losses = tuple(t for t in record.losses_ms if t > now - s.flap_window_ms)
        if observed != record.observed:
            if record.observed in UP and observed == "offline":
                losses = (*losses, now)
            record = replace(record, observed=observed, observed_since_ms=now)
        record = replace(record, losses_ms=losses)

        new: PresenceStatus
        new_reason: str | None
        if record.status == "flapping":
            if now - record.observed_since_ms < s.flap_quiet_ms:
                new, new_reason = "flapping", "flapping"
            else:
                # Cleared, or the last drops would take it straight back to flapping.
                new, new_reason = observed, "stable" if observed in UP else reason
                record = replace(record, losses_ms=())
        elif len(losses) >= s.flap_threshold:
            new, new_reason = "flapping", "flapping"
        else:
            new, new_reason = observed, reason

        out: list[Transition] = []
        if new != record.status:
            session = record.state.session if record.state is not None else None
            out.append(Transition(terminal, record.status, new, now, new_reason or new, session))
            record = replace(record, status=new, reason=new_reason, since_ms=now)
        elif new in DOWN:
            # e.g. a will confirming a heartbeat offline: same status, better reason.
            record = replace(record, reason=new_reason)
        self._records[terminal] = record
        self._time(terminal, record)
        return out

    def _time(self, terminal: str, record: TerminalPresence) -> None:
        """Make sure a tick settles ``terminal`` by its next deadline (see `due_ms`)."""
        due = due_ms(record, self.settings)
        if due is None:
            return
        current = self._timer_at.get(terminal)
        if current is not None and current <= due:
            return  # an earlier entry will settle it, and time it again then
        self._timer_at[terminal] = due
        heapq.heappush(self._timers, (due, terminal))
