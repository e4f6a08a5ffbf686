"""The state of every peripheral of the kiosk, debounced, as the agent reports and shows it.

Two sources observe peripherals: the firmware_bridge drivers (an assessment per poll that
changed) and USB hotplug (a device with the peripheral's vendor:product id came or went). The
:class:`PeripheralBook` combines them into one *committed* state per peripheral and commits a
new one only when it has held for ``debounce_ms``, so a cable that drops out for a moment
produces nothing. A peripheral that keeps changing (more than ``flap_flips`` times within
``flap_window_ms``) is committed as *degraded* with the reason ``flapping`` instead of staying
silent forever; its real state is committed once it has stayed put for ``flap_settle_ms``.

The first observation of each peripheral is committed at once: at start-up the kiosk should
say what it has, not wait. Before that a peripheral is *absent*: ``usb_missing`` for one seen
only through USB, ``not_checked`` for one the bridge polls.

How the sources combine: a peripheral the bridge talks to takes its state from the bridge's
assessment; USB can only overrule it with a removal (``usb_unplugged``), which it reports
before the next poll notices. A USB-only peripheral (protocol ``none``) takes its state from
USB alone.

Pure: the clock is injected (wall-clock milliseconds). Debouncing measures the time that
passed between calls and ignores a clock set backwards, so an NTP correction after a power cut
neither freezes nor fires a pending change.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from edge_agent import peripheral_words
from edge_agent.errors import AgentError
from edge_agent.peripheral_words import FLAPPING, NOT_CHECKED, UNWATCHED, USB_MISSING
from edge_agent.status_model import PeripheralState, PeripheralView, Words
from firmware_bridge.health import Health
from firmware_bridge.profiles import DeviceProtocol, Peripheral, Profile
from firmware_bridge.roles import Role
from fleet_protocol.messages import Event, Peripherals, PeripheralStatus, Severity

Source = Literal["bridge", "usb"]

STATES: Final[tuple[PeripheralState, ...]] = get_args(PeripheralState)
#: A bridge assessment's health as a peripheral state (the same four words).
HEALTH_STATES: Final[dict[Health, PeripheralState]] = {
    Health.OK: "ok",
    Health.DEGRADED: "degraded",
    Health.FAULTY: "faulty",
    Health.ABSENT: "absent",
}
#: Reasons that say a USB device is not plugged in: their end is a plug-in, not a recovery.
USB_ABSENCE: Final = frozenset({peripheral_words.USB_MISSING, peripheral_words.USB_UNPLUGGED})
#: Reasons that are an emergency whatever the device: the kiosk is about to lose power, or has
#: been knocked over or carried off.
_CRITICAL: Final = frozenset({"low_battery", "tilted"})

_MAX_TEXT: Final = 4000  # fleet_protocol.messages.Text
_MAX_DETAIL: Final = 500
_MAX_PERIPHERALS: Final = 256  # fleet_protocol.messages.Peripherals
_KIND_FIRST: Final = "abcdefghijklmnopqrstuvwxyz"


class PeripheralError(AgentError, ValueError):
    """A peripheral the profile does not declare, a state that does not exist, or a profile
    the agent cannot report (too many peripherals, an id the wire format refuses)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """What one source says about one peripheral."""

    state: PeripheralState
    reasons: tuple[str, ...] = ()
    detail: str = ""

    @property
    def key(self) -> tuple[PeripheralState, tuple[str, ...]]:
        # The detail carries changing numbers (timeouts, charge); what people are told about
        # is the state and the reasons.
        return self.state, self.reasons


@dataclass(frozen=True, slots=True)
class PeripheralChange:
    """A committed change of one peripheral's state (or of its reasons)."""

    peripheral_id: str
    role: str
    #: None for the first state committed after start-up.
    old: PeripheralState | None
    new: PeripheralState
    reasons: tuple[str, ...]
    at_ms: int
    old_reasons: tuple[str, ...] = ()
    detail: str = ""

    @property
    def initial(self) -> bool:
        return self.old is None


@dataclass(slots=True)
class _Track:
    peripheral: Peripheral
    committed: Reading
    since_ms: int
    observed: bool = False
    sources: dict[Source, Reading] = field(default_factory=dict)
    raw: Reading | None = None
    #: Internal elapsed time (ms) at which ``raw``'s state and reasons last changed.
    raw_since: int = 0
    #: The same moment on the wall clock: when a committed state began.
    raw_wall: int = 0
    #: Internal elapsed times of the recent changes of the raw state.
    flips: deque[int] = field(default_factory=deque)

    @property
    def flapping(self) -> bool:
        return self.committed.reasons == (FLAPPING,)


def usb_only(peripheral: Peripheral) -> bool:
    """Seen only through USB hotplug: no driver talks to it."""
    return peripheral.protocol is DeviceProtocol.NONE and bool(peripheral.usb_ids)


def bridge_driven(peripheral: Peripheral) -> bool:
    """Polled by a firmware_bridge driver."""
    return peripheral.protocol is not DeviceProtocol.NONE


def printable(peripheral: Peripheral) -> bool:
    """A receipt printer the bridge can print a test ticket on."""
    return peripheral.role is Role.RECEIPT_PRINTER and peripheral.protocol is DeviceProtocol.ESCPOS


def title_of(peripheral: Peripheral) -> Words:
    return Words(peripheral.title, peripheral.title_en)


class PeripheralBook:
    """Committed and pending state of every peripheral the profile declares."""

    def __init__(
        self,
        profile: Profile,
        *,
        debounce_ms: int,
        now_ms: Callable[[], int],
        flap_flips: int = 4,
        flap_window_ms: int = 60_000,
        flap_settle_ms: int | None = None,
    ) -> None:
        if debounce_ms < 0:
            raise PeripheralError(f"debounce_ms: {debounce_ms} must not be negative")
        if flap_flips < 1 or flap_window_ms <= 0:
            raise PeripheralError("flap_flips and flap_window_ms must be above zero")
        if len(profile.peripherals) > _MAX_PERIPHERALS:
            raise PeripheralError(
                f"profile {profile.id}: {len(profile.peripherals)} peripherals, "
                f"more than the {_MAX_PERIPHERALS} one snapshot can carry"
            )
        for p in profile.peripherals:
            # Profile ids may start with a digit; the wire's peripheral id may not.
            if p.id[0] not in _KIND_FIRST:
                raise PeripheralError(
                    f"profile {profile.id}: peripheral id {p.id!r} must start with a letter "
                    "to be reported to the fleet server"
                )
        self.profile = profile
        self.debounce_ms = debounce_ms
        self.flap_flips = flap_flips
        self.flap_window_ms = flap_window_ms
        self.flap_settle_ms = flap_window_ms if flap_settle_ms is None else flap_settle_ms
        self._now_ms = now_ms
        self._last_wall = now_ms()
        self._elapsed = 0
        self._tracks: dict[str, _Track] = {}
        for p in profile.peripherals:
            if usb_only(p):
                start = Reading("absent", (USB_MISSING,))
            elif bridge_driven(p):
                start = Reading("absent", (NOT_CHECKED,))
            else:
                # Declared without a way to check it (protocol none, no USB id): say so once.
                start = Reading("degraded", (UNWATCHED,), "no driver and no USB id")
            track = _Track(p, start, self._last_wall)
            track.observed = start.reasons == (UNWATCHED,)
            self._tracks[p.id] = track

    # --- inputs ---------------------------------------------------------------------------

    def now_ms(self) -> int:
        """The book's wall clock, for timestamps that go with its changes."""
        return self._now_ms()

    def observe(
        self,
        peripheral_id: str,
        state: PeripheralState,
        reasons: tuple[str, ...] = (),
        detail: str = "",
        *,
        source: Source = "bridge",
    ) -> list[PeripheralChange]:
        """What ``source`` sees now; the changes this commits (usually none or one)."""
        track = self._track(peripheral_id)
        if state not in STATES:
            raise PeripheralError(f"{peripheral_id}: {state!r} is not one of {', '.join(STATES)}")
        if state != "ok" and not reasons:
            raise PeripheralError(f"{peripheral_id}: a {state} observation needs a reason")
        elapsed = self._advance()
        track.sources[source] = Reading(state, tuple(reasons), detail)
        effective = _effective(track)
        if effective is None:
            return []
        return self._update(track, effective, elapsed)

    def tick(self) -> list[PeripheralChange]:
        """Commit what has held long enough; call it regularly."""
        elapsed = self._advance()
        changes: list[PeripheralChange] = []
        for track in self._tracks.values():
            self._forget_old_flips(track, elapsed)
            change = self._mature(track, elapsed)
            if change is not None:
                changes.append(change)
        return changes

    # --- outputs --------------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """Every peripheral has had its first observation."""
        return all(t.observed for t in self._tracks.values())

    def state_of(self, peripheral_id: str) -> Reading:
        """The committed state of one peripheral."""
        return self._track(peripheral_id).committed

    def views(self) -> tuple[PeripheralView, ...]:
        """Every peripheral as the status page shows it, in profile order."""
        views = []
        for track in self._tracks.values():
            p, committed = track.peripheral, track.committed
            problem, action = self._words(p, committed)
            views.append(
                PeripheralView(
                    id=p.id,
                    role=p.role.value,
                    title=title_of(p),
                    state=committed.state,
                    since_ms=track.since_ms,
                    problem=problem,
                    action=action,
                    essential=p.essential,
                    power_channel=p.power_channel,
                    printable=printable(p),
                )
            )
        return tuple(views)

    def snapshot(self, ts_ms: int, changed: Iterable[str] = ()) -> Peripherals:
        """The retained ``peripherals`` message; ``changed`` names the peripherals that changed."""
        statuses = []
        for track in self._tracks.values():
            p, committed = track.peripheral, track.committed
            statuses.append(
                PeripheralStatus(
                    id=p.id,
                    role=p.role.value,
                    state=committed.state,
                    since=track.since_ms,
                    reason=self._reason_text(p, committed),
                )
            )
        named = [pid for pid in dict.fromkeys(changed) if pid in self._tracks]
        return Peripherals(ts=ts_ms, peripherals=statuses, changed=named)

    def event(self, change: PeripheralChange, seq: int, ts_ms: int) -> Event:
        """The ``events`` message for a committed change."""
        p = self._track(change.peripheral_id).peripheral
        attributes: dict[str, str | int | float | bool] = {
            "peripheral": p.id,
            "role": p.role.value,
            "old": change.old or "none",
            "new": change.new,
            "reasons": ",".join(change.reasons),
            "essential": p.essential,
        }
        if change.detail:
            attributes["detail"] = change.detail[:_MAX_DETAIL]
        return Event(
            seq=seq,
            ts=ts_ms,
            kind=_kind(change),
            severity=_severity(change, p.essential),
            message=self._message(p, change)[:_MAX_TEXT],
            attributes=attributes,
        )

    # --- inside ---------------------------------------------------------------------------

    def _track(self, peripheral_id: str) -> _Track:
        try:
            return self._tracks[peripheral_id]
        except KeyError:
            raise PeripheralError(
                f"peripheral {peripheral_id!r} is not in profile {self.profile.id}"
            ) from None

    def _advance(self) -> int:
        wall = self._now_ms()
        self._elapsed += max(0, wall - self._last_wall)
        self._last_wall = wall
        return self._elapsed

    def _update(self, track: _Track, effective: Reading, elapsed: int) -> list[PeripheralChange]:
        if not track.observed:
            track.observed = True
            track.raw, track.raw_since, track.raw_wall = effective, elapsed, self._last_wall
            return [self._commit(track, effective, self._last_wall, initial=True)]
        previous = track.raw
        if previous is None or previous.state != effective.state:
            track.flips.append(elapsed)
        if previous is None or previous.key != effective.key:
            track.raw_since, track.raw_wall = elapsed, self._last_wall
        track.raw = effective
        self._forget_old_flips(track, elapsed)
        if len(track.flips) > self.flap_flips and not track.flapping:
            window_s = self.flap_window_ms / 1000
            detail = f"{len(track.flips)} changes within {window_s:g} s"
            flapping = Reading("degraded", (FLAPPING,), detail)
            return [self._commit(track, flapping, self._last_wall)]
        if effective.key == track.committed.key:
            # Back where it was before the debounce ran out: nothing to tell anyone.
            track.committed = effective
            return []
        change = self._mature(track, elapsed)
        return [change] if change is not None else []

    def _mature(self, track: _Track, elapsed: int) -> PeripheralChange | None:
        raw = track.raw
        if raw is None or raw.key == track.committed.key:
            return None
        hold = self.flap_settle_ms if track.flapping else self.debounce_ms
        if elapsed - track.raw_since < hold:
            return None
        if track.flapping:
            track.flips.clear()
        return self._commit(track, raw, track.raw_wall)

    def _forget_old_flips(self, track: _Track, elapsed: int) -> None:
        while track.flips and track.flips[0] <= elapsed - self.flap_window_ms:
            track.flips.popleft()

    def _commit(
        self, track: _Track, reading: Reading, at: int, *, initial: bool = False
    ) -> PeripheralChange:
        old = track.committed
        change = PeripheralChange(
            peripheral_id=track.peripheral.id,
            role=track.peripheral.role.value,
            old=None if initial else old.state,
            new=reading.state,
            reasons=reading.reasons,
            at_ms=at,
            old_reasons=() if initial else old.reasons,
            detail=reading.detail,
        )
        track.committed = reading
        track.since_ms = at
        return change

    def _words(self, p: Peripheral, reading: Reading) -> tuple[Words | None, Words | None]:
        if reading.state == "ok" and not reading.reasons:
            return None, None
        return peripheral_words.explain_all(reading.reasons, role=p.role.value, title=title_of(p))

    def _reason_text(self, p: Peripheral, reading: Reading) -> str:
        problem, action = self._words(p, reading)
        if problem is None:
            return ""
        text = problem.zh + (f"：{action.zh}" if action is not None else "")
        codes = f" [{','.join(reading.reasons)}]"
        return (text[: max(0, _MAX_TEXT - len(codes))] + codes)[:_MAX_TEXT]

    def _message(self, p: Peripheral, change: PeripheralChange) -> str:
        title = p.title
        if change.new == "ok":
            if change.old is None:
                return f"{title}正常"
            if USB_ABSENCE.intersection(change.old_reasons):
                return f"{title}已连接，工作正常"
            return f"{title}已恢复正常"
        problem, action = peripheral_words.explain_all(
            change.reasons, role=p.role.value, title=title_of(p)
        )
        assert problem is not None  # a state other than ok always has a reason
        return f"{title}：{problem.zh}。" + (f"{action.zh}。" if action is not None else "")


def _effective(track: _Track) -> Reading | None:
    usb = track.sources.get("usb")
    if bridge_driven(track.peripheral):
        # USB can say a bridge-driven device was pulled out before the next poll does; that it
        # is plugged in says nothing about paper or cover, so then the bridge decides.
        if usb is not None and usb.state == "absent":
            return usb
        return track.sources.get("bridge")
    return usb if usb is not None else track.sources.get("bridge")


def _kind(change: PeripheralChange) -> str:
    if change.new == "ok":
        if change.old is None:
            what = "detected"
        elif USB_ABSENCE.intersection(change.old_reasons):
            what = "plugged"
        else:
            what = "recovered"
    elif change.new == "absent":
        what = "unplugged" if peripheral_words.USB_UNPLUGGED in change.reasons else "absent"
    elif change.new == "faulty":
        what = "fault"
    elif FLAPPING in change.reasons:
        what = "flapping"
    elif UNWATCHED in change.reasons:
        what = "unwatched"
    else:
        what = "degraded"
    return f"peripheral.{what}"


def _severity(change: PeripheralChange, essential: bool) -> Severity:
    if _CRITICAL.intersection(change.reasons) and change.new != "ok":
        return "critical"
    if change.new == "ok" or change.reasons == (UNWATCHED,):
        return "info"
    if change.new == "degraded":
        return "warning" if essential else "info"
    return "error" if essential else "warning"
