"""The kiosk clock against the fleet server's: offset estimation and the check of its bound.

Pure: the server's time comes through a :class:`ClockReference` (HTTPS to the fleet server on
a kiosk, see ``enrolment_client.HttpsClockReference``; the true clock in ``fleet-sim``), and
the local wall clock is injected.

One measurement asks the reference for its time between two readings of the local clock. The
server read its clock somewhere in that round trip, so assuming the middle::

    offset = (sent_ms + received_ms) / 2 - server_ms        (positive: the kiosk is ahead)

and the error of that is at most half the round trip. Of the last few measurements the one
with the shortest round trip is the best estimate (NTP's clock filter, in miniature). When a
new measurement cannot be reconciled with the kept ones (their error bounds do not overlap)
the kiosk's clock was stepped (NTP caught up after a power cut, someone set it by hand): the
older measurements describe a clock that no longer exists, and are forgotten.

A clock wrong by more than ``max_offset_ms`` makes certificates look expired or not yet valid
and puts samples at the wrong place in the fleet's history; :class:`ClockCheck` says when it
becomes wrong and when it is right again, once each, so the agent reports it as a fault.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from edge_agent.errors import AgentError
from edge_agent.status_model import ClockView, Words

#: How many recent measurements the estimate chooses from.
KEEP: Final = 5
#: Measurements per check: the first may pay for a connection set-up the later ones reuse.
ROUNDS: Final = 3
#: Server and kiosk clocks are read in whole ms: slack for the rounding of both.
_ROUNDING_MS: Final = 1.0


class ClockUnavailable(AgentError):
    """The reference clock could not be read (the fleet server is out of reach, or answered
    something that is not its time)."""


class ClockReference(Protocol):
    """The clock the kiosk's is compared with; raises :class:`ClockUnavailable`."""

    async def server_time_ms(self) -> int: ...


@dataclass(frozen=True, slots=True)
class FixedClockReference:
    """A reference that is a local callable: for ``fleet-sim``, where it is the true clock and
    a simulated kiosk with a skewed clock has its own ``now_ms``."""

    now_ms: Callable[[], int]

    async def server_time_ms(self) -> int:
        return self.now_ms()


@dataclass(frozen=True, slots=True)
class ClockMeasurement:
    sent_ms: int
    received_ms: int
    server_ms: int

    @property
    def rtt_ms(self) -> int:
        return self.received_ms - self.sent_ms

    @property
    def offset_ms(self) -> float:
        """Kiosk clock minus server clock (positive: the kiosk is ahead)."""
        return (self.sent_ms + self.received_ms) / 2 - self.server_ms

    @property
    def error_ms(self) -> float:
        """The most the true offset can differ from :attr:`offset_ms`."""
        return self.rtt_ms / 2 + _ROUNDING_MS


async def measure(reference: ClockReference, wall_ms: Callable[[], int]) -> ClockMeasurement:
    """One round trip to ``reference``, read against the local wall clock ``wall_ms``.

    The reference's own errors (server unreachable) pass through to the caller.
    """
    sent = wall_ms()
    server = await reference.server_time_ms()
    received = wall_ms()
    return ClockMeasurement(sent_ms=sent, received_ms=received, server_ms=server)


class OffsetEstimate:
    """The best offset of the last ``keep`` measurements: the one with the shortest round trip."""

    def __init__(self, keep: int = KEEP) -> None:
        if keep < 1:
            raise ValueError("keep at least one measurement")
        self._kept: deque[ClockMeasurement] = deque(maxlen=keep)

    def add(self, measurement: ClockMeasurement) -> bool:
        """Take ``measurement`` into account; False if it was unusable and ignored.

        A negative round trip means the local clock was stepped back mid-measurement: such a
        measurement says nothing.
        """
        if measurement.rtt_ms < 0:
            return False
        if any(not _consistent(measurement, kept) for kept in self._kept):
            self._kept.clear()
        self._kept.append(measurement)
        return True

    async def measure(
        self, reference: ClockReference, wall_ms: Callable[[], int], rounds: int = ROUNDS
    ) -> float | None:
        """Measure ``rounds`` times in a row and return the estimate (None if still unknown).

        Back to back, because the first round trip may include setting up the connection
        (TCP, TLS) and the later ones then show the network's own round trip. Raises
        :class:`ClockUnavailable` when the reference cannot be read; what was measured before
        is kept.
        """
        for _ in range(rounds):
            self.add(await measure(reference, wall_ms))
        return self.offset_ms

    @property
    def best(self) -> ClockMeasurement | None:
        if not self._kept:
            return None
        # min() keeps the first of equals; prefer the newest of equally good round trips.
        return min(reversed(self._kept), key=lambda m: m.rtt_ms)

    @property
    def offset_ms(self) -> float | None:
        """Kiosk clock minus server clock, ms; None until measured."""
        best = self.best
        return None if best is None else best.offset_ms


def _consistent(a: ClockMeasurement, b: ClockMeasurement) -> bool:
    return abs(a.offset_ms - b.offset_ms) <= a.error_ms + b.error_ms


class ClockVerdict(enum.Enum):
    UNKNOWN = "unknown"
    OK = "ok"
    WRONG = "wrong"


class ClockCheck:
    """Whether the clock is within ``max_offset_ms`` of the server's, and when that changes."""

    def __init__(self, max_offset_ms: float) -> None:
        if not max_offset_ms > 0:
            raise ValueError("max_offset_ms must be positive")
        self.max_offset_ms = max_offset_ms
        self._last = ClockVerdict.UNKNOWN

    def verdict(self, offset_ms: float | None) -> ClockVerdict:
        if offset_ms is None:
            return ClockVerdict.UNKNOWN
        return ClockVerdict.WRONG if abs(offset_ms) > self.max_offset_ms else ClockVerdict.OK

    def update(self, offset_ms: float | None) -> ClockVerdict | None:
        """The new verdict when it changed (to report once), else None.

        Unknown never replaces a known verdict: a server out of reach does not make a wrong
        clock right. The first known verdict counts as a change only if it is WRONG, so a
        kiosk whose clock is fine reports nothing at start.
        """
        verdict = self.verdict(offset_ms)
        if verdict is ClockVerdict.UNKNOWN or verdict is self._last:
            return None
        previous, self._last = self._last, verdict
        if previous is ClockVerdict.UNKNOWN and verdict is ClockVerdict.OK:
            return None
        return verdict

    def view(self, offset_ms: float | None) -> ClockView:
        return ClockView(offset_ms=offset_ms, max_offset_ms=self.max_offset_ms)

    def describe(self, offset_ms: float) -> Words:
        """The clock's state in plain words, for the event and the log."""
        seconds = abs(offset_ms) / 1000
        limit = self.max_offset_ms / 1000
        if self.verdict(offset_ms) is ClockVerdict.OK:
            return Words(
                zh=f"终端时钟已正常（与服务器相差 {seconds:.1f} 秒）",
                en=f"The terminal's clock is right again (off by {seconds:.1f} s)",
            )
        zh_dir, en_dir = ("快", "ahead") if offset_ms > 0 else ("慢", "behind")
        return Words(
            zh=(
                f"终端时钟比服务器{zh_dir} {seconds:.1f} 秒，超过允许的 {limit:g} 秒："
                "请检查网络时间同步（NTP）或联系运维"
            ),
            en=(
                f"The terminal's clock is {seconds:.1f} s {en_dir} of the server, more than "
                f"the {limit:g} s allowed: check time synchronisation (NTP) or call ops"
            ),
        )
