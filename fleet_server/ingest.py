"""What the server does with each delivery: presence from ``state``, points from ``telemetry``.

Bad input is counted (per terminal and reason) and dropped, never raised: one broken kiosk
must not stop ingest for the others. Reasons: ``bad_topic`` (terminal ``-``), ``too_large``
(over `fleet_protocol.MAX_PAYLOAD`, before anything is parsed), ``malformed``, ``schema``,
``unstorable`` (valid JSON that line protocol cannot carry).

Two things are flagged per terminal, for ops to see (stats, /metrics), without dropping data
that is fine:

- Clock faults. A sample stamped far from server time (more than ``max_ahead_ms`` ahead, or
  older than ``max_behind_ms``, which covers the agent outbox's 7 days) would land at the
  wrong place in the fleet's history, where nobody looks for it and where it may overwrite a
  real point of the same series. It is *quarantined* instead: not written, counted per
  terminal and reason, the last few kept as examples, and the terminal gets a `ClockFault`
  until a live message arrives whose samples are all in the window again. The quarantine is
  evidence for ops, kept in memory, not storage: bounded per terminal, it could not hold a
  broken clock's weeks of samples anyway, and the fault comes back with the next sample
  after a restart if the clock is still wrong.
- Flooding: more than ``flood_per_minute`` messages in a minute (an agent sends about 10). An
  agent replaying its outbox after an outage sends faster on purpose (its ``replay_rate``),
  so telemetry marked historical does not count. Logged once per episode; the episode ends
  after a minute at or under the limit.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from fleet_protocol.codec import decode
from fleet_protocol.errors import DecodeError, TopicError
from fleet_protocol.ids import TerminalId
from fleet_protocol.messages import (
    NetworkSample,
    Peripherals,
    Sample,
    State,
    SystemSample,
    Telemetry,
)
from fleet_protocol.topics import Channel, parse
from fleet_server.batcher import Ack
from fleet_server.lineproto import LineProtocolError
from fleet_server.mqtt_ingest import Delivery
from fleet_server.presence import Presence
from fleet_server.registry import Placement
from fleet_server.telemetry_lines import TerminalLines

#: Counter key for messages whose topic names no valid terminal.
UNKNOWN_TERMINAL = "-"
#: Quarantined samples kept per terminal as examples for ops.
QUARANTINE_EXAMPLES: Final = 5
FLOOD_WINDOW_MS: Final = 60_000

#: ``future``: stamped more than ``max_ahead_ms`` after server time; ``too_old``: more than
#: ``max_behind_ms`` before it.
QuarantineReason = Literal["future", "too_old"]


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """Sanity bounds on what terminals send (``[ingest]`` in the server config)."""

    max_ahead_ms: int = 10 * 60_000
    #: The agent's outbox keeps 7 days; a day more for a backlog still being replayed.
    max_behind_ms: int = 8 * 86_400_000
    flood_per_minute: int = 600


@dataclass(frozen=True, slots=True)
class ClockFault:
    """A terminal whose samples are stamped outside the window: its clock is wrong.

    ``first_ms`` and ``last_ms`` are server times of the first and latest quarantined sample
    of this episode, ``offset_ms`` the latest one's timestamp minus server time (positive: the
    kiosk is ahead), ``count`` the samples quarantined in this episode.
    """

    first_ms: int
    last_ms: int
    offset_ms: int
    count: int


@dataclass(frozen=True, slots=True)
class QuarantinedSample:
    kind: str
    seq: int
    ts: int
    received_ms: int
    reason: QuarantineReason


class FloodWatch:
    """Messages per terminal in fixed one-minute windows; flags those over ``limit``.

    A window starts with a terminal's first message after the previous one ended. The flag
    goes up in the window that passes the limit and comes down when a later window ends at or
    under it (a minute without any message counts as such a window).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._windows: dict[str, tuple[int, int]] = {}  # terminal -> (start_ms, count)
        #: Flagged terminals, with the server time the episode began.
        self.flagged: dict[str, int] = {}

    def count(self, terminal: str, now_ms: int) -> Literal["started", "ended"] | None:
        """Count one message; "started" or "ended" when the terminal's flag changes."""
        start, count = self._windows.get(terminal, (now_ms, 0))
        change: Literal["started", "ended"] | None = None
        if now_ms - start >= FLOOD_WINDOW_MS:
            if terminal in self.flagged and (
                count <= self._limit or now_ms - start >= 2 * FLOOD_WINDOW_MS
            ):
                del self.flagged[terminal]
                change = "ended"
            start, count = now_ms, 0
        count += 1
        self._windows[terminal] = (start, count)
        if count > self._limit and terminal not in self.flagged:
            self.flagged[terminal] = now_ms
            change = "started"
        return change

    def expire(self, now_ms: int) -> list[str]:
        """Lower the flags of terminals silent for a whole window; returns them."""
        ended = [
            terminal
            for terminal in self.flagged
            if now_ms - self._windows[terminal][0] >= 2 * FLOOD_WINDOW_MS
        ]
        for terminal in ended:
            del self.flagged[terminal]
        return ended


class PresenceStore(Protocol):
    async def apply_state(
        self, terminal: TerminalId, message: State, received_ms: int
    ) -> Presence | None: ...

    async def placement(self, terminal: TerminalId) -> Placement: ...


class PresenceWatcher(Protocol):
    """Who decides presence and alerts (``fleet_server.alerting``): told every state and
    peripherals snapshot as it arrives, stale ones too (it orders them itself)."""

    def state(self, terminal: TerminalId, message: State, received_ms: int) -> None: ...

    def peripherals(self, terminal: TerminalId, message: Peripherals, received_ms: int) -> None: ...


class PointSink(Protocol):
    async def add(self, lines: bytes, points: int, ack: Ack) -> None:
        """Store ``points`` points, ``lines`` of line protocol; ``ack`` once they are durable."""
        ...


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def placement_tags(terminal: TerminalId, placement: Placement) -> dict[str, str]:
    tags = {"terminal": str(terminal)}
    if placement.site:
        tags["site"] = placement.site
    if placement.town:
        tags["town"] = placement.town
    if placement.district:
        tags["district"] = placement.district
    return tags


class Ingest:
    def __init__(
        self,
        presence: PresenceStore,
        points: PointSink,
        logger: logging.Logger,
        now_ms: Callable[[], int] = wall_ms,
        *,
        limits: IngestLimits = IngestLimits(),
        watcher: PresenceWatcher | None = None,
    ) -> None:
        self._presence = presence
        self._watcher = watcher
        self._points = points
        self._log = logger
        self._now_ms = now_ms
        self._limits = limits
        #: Line protocol writers of terminals whose placement is complete.
        self._lines: dict[TerminalId, TerminalLines] = {}
        self._floods = FloodWatch(limits.flood_per_minute)
        self.received: Counter[Channel] = Counter()
        self.rejected: Counter[tuple[str, str]] = Counter()  # (terminal, reason)
        self.last_seen: dict[TerminalId, int] = {}
        #: Samples not written because of their timestamp, by (terminal, reason).
        self.quarantined: Counter[tuple[str, QuarantineReason]] = Counter()
        #: The last few quarantined samples of each terminal, oldest first.
        self.quarantine: dict[TerminalId, deque[QuarantinedSample]] = {}
        self.clock_faults: dict[TerminalId, ClockFault] = {}

    def flooding(self) -> dict[str, int]:
        """Terminals flagged as flooding now, with the server time their episode began."""
        for terminal in self._floods.expire(self._now_ms()):
            self._log.info("%s no longer floods", terminal)
        return dict(self._floods.flagged)

    async def handle(self, delivery: Delivery) -> None:
        try:
            where = parse(delivery.topic)
        except TopicError:
            self._reject(UNKNOWN_TERMINAL, "bad_topic", delivery)
            return
        terminal = where.terminal
        self.received[where.channel] += 1
        if where.channel is not Channel.TELEMETRY:
            self._watch(terminal)
        try:
            if where.channel is Channel.STATE:
                state = decode(State, delivery.payload)
                if self._watcher is not None:
                    self._watcher.state(terminal, state, self._now_ms())
                await self._state(terminal, state, delivery.ack)
            elif where.channel is Channel.PERIPHERALS:
                snapshot = decode(Peripherals, delivery.payload)
                if self._watcher is not None:
                    self._watcher.peripherals(terminal, snapshot, self._now_ms())
                delivery.ack()
            elif where.channel is Channel.TELEMETRY:
                try:
                    telemetry = decode(Telemetry, delivery.payload)
                except DecodeError:
                    self._watch(terminal)
                    raise
                if not telemetry.historical:
                    self._watch(terminal)
                await self._telemetry(terminal, telemetry, delivery.ack)
            else:
                delivery.ack()
        except DecodeError as exc:
            self._reject(terminal, exc.reason, delivery, exc.detail)
        except LineProtocolError as exc:
            # Valid JSON that InfluxDB cannot store as sent (a control character or a trailing
            # backslash in a sensor name): the whole message is refused, never half of it.
            self._reject(terminal, "unstorable", delivery, str(exc))

    def _reject(self, terminal: str, reason: str, delivery: Delivery, detail: str = "") -> None:
        self.rejected[(terminal, reason)] += 1
        count = self.rejected[(terminal, reason)]
        # Log the first few and then every hundredth, so a flood cannot flood the log too.
        if count <= 3 or count % 100 == 0:
            self._log.warning(
                "dropped message #%d from %s on %r (%s): %s",
                count,
                terminal,
                delivery.topic[:200],
                reason,
                detail[:200],
            )
        delivery.ack()

    def _watch(self, terminal: TerminalId) -> None:
        change = self._floods.count(terminal, self._now_ms())
        if change == "started":
            self._log.warning(
                "%s floods: more than %d messages a minute (an agent sends about 10)",
                terminal,
                self._limits.flood_per_minute,
            )
        elif change == "ended":
            self._log.info("%s no longer floods", terminal)

    async def _state(self, terminal: TerminalId, message: State, ack: Ack) -> None:
        now = self._now_ms()
        presence = await self._presence.apply_state(terminal, message, now)
        if presence is not None:
            self._lines.pop(terminal, None)  # the site may be newly known
            self._log.info(
                "%s %s (session %d%s)",
                terminal,
                "online" if presence.online else "offline",
                presence.session,
                f", {presence.reason}" if presence.reason else "",
            )
        ack()

    async def _telemetry(self, terminal: TerminalId, message: Telemetry, ack: Ack) -> None:
        writer = self._lines.get(terminal)
        if writer is None:
            tags = placement_tags(terminal, await self._presence.placement(terminal))
            writer = TerminalLines(tags)
            if "site" in tags:  # cache only complete placements; retry until the site is known
                self._lines[terminal] = writer
        now = self._now_ms()
        lines: list[str] = []
        outside: list[tuple[Sample, QuarantineReason]] = []
        for sample in message.samples:
            reason = self._outside_window(sample.ts, now)
            if reason is None:
                writer.lines(sample, message.historical, lines)
            else:
                outside.append((sample, reason))
        self.last_seen[terminal] = max(self.last_seen.get(terminal, 0), now)
        if outside:
            self._quarantine(terminal, outside, now)
        elif not message.historical and terminal in self.clock_faults:
            fault = self.clock_faults.pop(terminal)
            self._log.info(
                "%s: clock back in the window after %d quarantined samples", terminal, fault.count
            )
        if lines:
            await self._points.add("\n".join(lines).encode(), len(lines), ack)
        else:
            ack()  # everything quarantined: nothing will be stored, nothing to wait for

    def _outside_window(self, ts: int, now: int) -> QuarantineReason | None:
        if ts > now + self._limits.max_ahead_ms:
            return "future"
        if ts < now - self._limits.max_behind_ms:
            return "too_old"
        return None

    def _quarantine(
        self, terminal: TerminalId, samples: list[tuple[Sample, QuarantineReason]], now: int
    ) -> None:
        examples = self.quarantine.setdefault(terminal, deque(maxlen=QUARANTINE_EXAMPLES))
        for sample, reason in samples:
            self.quarantined[(terminal, reason)] += 1
            examples.append(QuarantinedSample(_kind(sample), sample.seq, sample.ts, now, reason))
        offset = samples[-1][0].ts - now
        fault = self.clock_faults.get(terminal)
        if fault is None:
            self._log.warning(
                "%s: clock fault, samples stamped %+.0f s from server time are quarantined, "
                "not stored",
                terminal,
                offset / 1000,
            )
            fault = ClockFault(now, now, offset, 0)
        self.clock_faults[terminal] = ClockFault(
            fault.first_ms, now, offset, fault.count + len(samples)
        )


def _kind(sample: Sample) -> str:
    if isinstance(sample, SystemSample):
        return "system"
    if isinstance(sample, NetworkSample):
        return "network"
    return "power"
