"""Which alerts to open, send, remind, escalate and resolve: decisions, never e-mails.

The engine consumes presence :class:`~fleet_server.presence_table.Transition` s, peripheral
snapshots, acknowledgements and the passing of time, and returns :class:`Decision` records.
The caller stores every decision and mails those with recipients; the engine does no I/O and
reads no clock.

An alert is one condition of one subject, from the moment it began until it ended:

===================  ===========  ==========================================================
kind                 to           opens when / resolves when
===================  ===========  ==========================================================
terminal-offline     owners       offline or planned (opened at the drop) / back up
terminal-flapping    owners       the terminal starts flapping / stops flapping
peripherals          owners       a service-stopping fault appears / no such fault is left
site-offline         owners       every terminal of a site (2 or more) is offline / none is
district-outage      ops          enough terminals are offline at once / fewer are
===================  ===========  ==========================================================

An alert is *pending* until its grace has passed, then *sent*, then *resolved*. A pending
alert that ends within its grace leaves no trace: a 30-second paper change is not an event.
From the moment an alert would have been sent, everything is recorded: ``sent``,
``suppressed`` (with the reason), ``updated``, ``reminded``, ``escalated``, ``acknowledged``,
``resolved``. A resolution mails its audience (and ops, when escalated) only if the alert was
sent: that is the recovery notice, with the outage in ``Alert.duration_ms``.

What holds a notification back (the ``suppressed`` reasons):

- ``planned``: a terminal inside its announced absence. Past the deadline (expected return
  plus the presence table's margin, which plays the part of the grace) it is ``offline``
  again and its alert, opened when the absence began, is due at once.
- ``flapping``: the terminal's offline alert waits; its one flapping alert speaks for it.
- ``merged-into-site``: while a site alert exists (pending or sent), no terminal-level alert
  of that site is sent, reminded or escalated; a terminal alert already sent stays open and
  still gets its recovery notice. A pending site alert whose site comes partly back is
  dropped, and the terminals still down go back to their own alerts; a sent one stays until
  no terminal of the site is offline.
- ``terminal-down``: peripherals of a terminal that is offline, planned or flapping.
- ``outside-hours``: owner notifications only go out while the site is open (24-hour sites:
  always). An alert whose grace ends while the site is closed, or which began while closed,
  is due at ``max(begin + grace, next opening + 15 min)``: staff get a quarter of an hour to
  switch the kiosk on. Reminders falling outside hours wait for the next open moment.
  Recovery notices and everything to ops go out at any hour.
- ``unassigned``: the subject's site is no longer in the fleet.

Interpretations of the product rules:

- ``stale`` (connected, not reporting) is an up state for alerting: no alert; it shows on the
  dashboard. A stale terminal that stays silent goes ``offline`` by the heartbeat backstop.
- Owners still get their site/terminal alerts when a district alert is open; ops get one
  district alert on top. The district alert opens when at least ``max(3, 10 %)`` of the
  district's terminals are offline *at sites that are open*, so kiosks switched off at night
  never page ops; it is sent after ``district_grace_ms`` (a broker restart must not page
  anyone) and resolves when fewer than the threshold are offline at any hour.
- A flapping alert has no grace (flapping already means 4 drops in 10 minutes) but keeps
  to opening hours. When flapping ends with the terminal down, the flapping alert resolves
  without a notice and a fresh offline alert starts its grace.
- One peripheral alert per terminal lists every service-stopping fault. A fault appearing or
  clearing while the alert is pending just changes the list; once sent, the change is
  recorded as ``updated`` without an e-mail, and the next reminder carries the current list.
  Service-stopping by default: id-card reader faulty or absent, receipt printer faulty
  (paper out, cover open) or absent.
- Escalation to district ops comes 2 hours after sending without an acknowledgement, at any
  hour; reminders come every 4 hours until acknowledged. An acknowledgement of a pending
  alert stops reminders and escalation but not the first e-mail to owners.

Several server processes: the engine is single-writer. Run it in the one process that holds
the alerting lease, and persist :meth:`AlertPolicy.snapshot` (with the presence table's) and
the decisions in one transaction. Alert ids are ``f"{kind}:{subject}:{opened_at_ms}"``, where
``opened_at_ms`` comes from the inputs (a transition's ``at_ms``, the ``now_ms`` of the call
that opened it), and decision keys derive from the alert id and the action (``.../sent``,
``.../escalated``, ``.../resolved``, ``.../reminded/{n}``), not from how often the engine ran.
A process that takes over from an older snapshot and replays the stored inputs with their
stored times therefore produces the same keys: store decisions under a UNIQUE key and mail
only the rows that were newly inserted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Final, Literal, Protocol

from fleet_protocol.messages import Peripherals, PeripheralState
from fleet_server.presence_table import DOWN, MINUTE, UP, PresenceStatus, Transition

HOUR: Final = 60 * MINUTE
DEFAULT_GRACE_MS: Final = 5 * MINUTE

AlertKind = Literal[
    "terminal-offline", "terminal-flapping", "peripherals", "site-offline", "district-outage"
]
Audience = Literal["owners", "ops"]
AlertStatus = Literal["pending", "sent", "resolved"]
Action = Literal[
    "sent", "suppressed", "updated", "reminded", "escalated", "acknowledged", "resolved"
]

#: (peripheral role, state) pairs that stop services at the kiosk.
SERVICE_STOPPING: Final[frozenset[tuple[str, PeripheralState]]] = frozenset(
    {
        ("id_card_reader", "faulty"),
        ("id_card_reader", "absent"),
        ("receipt_printer", "faulty"),
        ("receipt_printer", "absent"),
    }
)


# --- what the caller tells us about sites ---------------------------------------------------


class SiteSchedule(Protocol):
    """A site's opening hours, in the caller's time zone rules."""

    def is_open(self, at_ms: int) -> bool: ...

    def next_opening_ms(self, after_ms: int) -> int | None:
        """The first opening strictly after ``after_ms``; None if it never opens again."""
        ...


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    site: str
    district: str
    schedule: SiteSchedule
    grace_ms: int = DEFAULT_GRACE_MS
    open_24h: bool = False
    #: E-mail addresses of the site's owners (点位负责人).
    owners: tuple[str, ...] = ()

    def is_open(self, at_ms: int) -> bool:
        return self.open_24h or self.schedule.is_open(at_ms)


@dataclass(frozen=True, eq=False)
class Fleet:
    """Sites and where each terminal stands; district sizes are derived from it."""

    sites: Mapping[str, SitePolicy]
    #: terminal -> site
    terminals: Mapping[str, str]
    #: district -> ops e-mail addresses
    district_ops: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, policy in self.sites.items():
            if key != policy.site:
                raise ValueError(f"site {key!r} is filed under another id ({policy.site!r})")
        missing = sorted({s for s in self.terminals.values() if s not in self.sites})
        if missing:
            raise ValueError(f"terminals are placed at unknown sites: {', '.join(missing)}")

    def site_of(self, terminal: str) -> SitePolicy | None:
        site = self.terminals.get(terminal)
        return self.sites[site] if site is not None else None

    def terminals_of_site(self, site: str) -> tuple[str, ...]:
        return self._by_site.get(site, ())

    def terminals_of_district(self, district: str) -> tuple[str, ...]:
        return self._by_district.get(district, ())

    def districts(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_district))

    @cached_property
    def _by_site(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for terminal, site in sorted(self.terminals.items()):
            out.setdefault(site, []).append(terminal)
        return {site: tuple(ts) for site, ts in out.items()}

    @cached_property
    def _by_district(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for terminal, site in sorted(self.terminals.items()):
            out.setdefault(self.sites[site].district, []).append(terminal)
        return {district: tuple(ts) for district, ts in out.items()}


@dataclass(frozen=True, slots=True)
class AlertSettings:
    #: Staff get this long after opening to switch on a kiosk that was down overnight.
    after_opening_ms: int = 15 * MINUTE
    peripheral_grace_ms: int = 5 * MINUTE
    flapping_grace_ms: int = 0
    district_grace_ms: int = 5 * MINUTE
    remind_every_ms: int = 4 * HOUR
    escalate_after_ms: int = 2 * HOUR
    district_percent: int = 10
    district_min_down: int = 3
    #: A single-terminal site gets terminal alerts, never a site alert.
    site_min_terminals: int = 2
    service_stopping: frozenset[tuple[str, PeripheralState]] = SERVICE_STOPPING

    def __post_init__(self) -> None:
        if min(self.remind_every_ms, self.escalate_after_ms) <= 0:
            raise ValueError("reminder and escalation intervals must be positive")
        if not 0 < self.district_percent <= 100 or self.district_min_down < 1:
            raise ValueError("the district threshold needs a percentage and a minimum of 1")


# --- the engine's records -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """A service-stopping peripheral fault, since the server first saw it."""

    peripheral: str
    role: str
    state: PeripheralState
    reason: str
    since_ms: int


@dataclass(frozen=True, slots=True)
class TerminalView:
    """What the engine knows of one terminal."""

    status: PresenceStatus = "unknown"
    faults: tuple[Fault, ...] = ()
    peripherals_ts: int | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    kind: AlertKind
    #: The terminal, site or district the alert is about.
    subject: str
    district: str
    site: str | None
    opened_at_ms: int
    status: AlertStatus = "pending"
    terminals: tuple[str, ...] = ()
    faults: tuple[Fault, ...] = ()
    sent_at_ms: int | None = None
    last_notice_ms: int | None = None
    reminders: int = 0
    escalated_at_ms: int | None = None
    acked_by: str | None = None
    acked_at_ms: int | None = None
    #: The suppression last recorded, so a held alert is recorded once, not every tick.
    held: str | None = None
    resolved_at_ms: int | None = None
    records: int = 0

    @property
    def audience(self) -> Audience:
        return "ops" if self.kind == "district-outage" else "owners"

    @property
    def duration_ms(self) -> int | None:
        """How long the condition lasted, once resolved (the outage of a recovery notice)."""
        if self.resolved_at_ms is None:
            return None
        return self.resolved_at_ms - self.opened_at_ms


@dataclass(frozen=True, slots=True)
class Decision:
    """One thing the engine decided; store it under ``key`` (UNIQUE), mail ``recipients``.

    ``alert`` is the alert as it stands after the decision. ``notify`` is empty for records
    that send nothing (suppressed, updated, acknowledged, a silent resolution).
    """

    key: str
    action: Action
    at_ms: int
    alert: Alert
    notify: tuple[Audience, ...] = ()
    recipients: tuple[str, ...] = ()
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    taken_at_ms: int
    terminals: dict[str, TerminalView] = field(default_factory=dict)
    alerts: tuple[Alert, ...] = ()


# --- the engine -----------------------------------------------------------------------------


class AlertPolicy:
    """Single-writer alert decisions for one fleet. ``fleet`` may be replaced between calls."""

    def __init__(self, fleet: Fleet, settings: AlertSettings | None = None) -> None:
        self.fleet = fleet
        self.settings = settings or AlertSettings()
        self._views: dict[str, TerminalView] = {}
        self._alerts: dict[tuple[AlertKind, str], Alert] = {}
        self._now_ms = 0
        self._down = _DownIndex()

    # --- inputs ----------------------------------------------------------------------------

    def on_transition(self, transition: Transition, now_ms: int) -> list[Decision]:
        now = self._clock(now_ms)
        out: list[Decision] = []
        terminal, new = transition.terminal, transition.new
        came_back = self._view(terminal).status == "offline" and new != "offline"
        self._views[terminal] = replace(self._view(terminal), status=new)
        site = self.fleet.site_of(terminal)
        self._down_index().update(terminal, site, new, now)
        if site is None:
            return out
        offline = self._alerts.get(("terminal-offline", terminal))
        if new in DOWN and offline is None:
            self._open("terminal-offline", terminal, site, transition.at_ms, terminals=(terminal,))
        elif new in UP and offline is not None:
            self._close(out, offline, now, "recovered")
        flapping = self._alerts.get(("terminal-flapping", terminal))
        if new == "flapping" and flapping is None:
            self._open("terminal-flapping", terminal, site, transition.at_ms, terminals=(terminal,))
        elif new != "flapping" and flapping is not None:
            # Down after flapping: the offline alert that just opened tells the owners.
            self._close(out, flapping, now, "stable" if new in UP else "now-offline", new in UP)
        self._check_site(site.site, now, out)
        self._check_district(
            site.district, now, out, full=False, came_back=terminal if came_back else None
        )
        # Grace periods, reminders and escalation advance in tick(), not here: a broker
        # restart is thousands of transitions at once, and walking every open alert for each
        # one made that quadratic (seconds of a stalled event loop at 2,000 terminals).
        return out

    def on_peripherals(self, terminal: str, message: Peripherals, now_ms: int) -> list[Decision]:
        """A peripheral snapshot of ``terminal``; an older one than the last is ignored."""
        now = self._clock(now_ms)
        out: list[Decision] = []
        view = self._view(terminal)
        if view.peripherals_ts is not None and message.ts < view.peripherals_ts:
            return out
        since = {f.peripheral: f.since_ms for f in view.faults}
        faults = tuple(
            Fault(p.id, p.role, p.state, p.reason, since.get(p.id, now))
            for p in sorted(message.peripherals, key=lambda p: p.id)
            if (p.role, p.state) in self.settings.service_stopping
        )
        self._views[terminal] = replace(view, faults=faults, peripherals_ts=message.ts)
        site = self.fleet.site_of(terminal)
        if site is None:
            return out
        alert = self._alerts.get(("peripherals", terminal))
        if alert is None and faults:
            self._open("peripherals", terminal, site, now, terminals=(terminal,), faults=faults)
        elif alert is not None and not faults:
            self._close(out, alert, now, "faults-cleared")
        elif alert is not None and _fault_keys(faults) != _fault_keys(alert.faults):
            alert = replace(alert, faults=faults)
            if alert.status == "sent":
                self._emit(out, alert, "updated", now, reason="faults-changed")
            else:
                self._store(alert)
        return out  # the alert's grace runs out in tick()

    def tick(self, now_ms: int) -> list[Decision]:
        """Let time pass: grace periods, opening hours, reminders, escalation."""
        now = self._clock(now_ms)
        out: list[Decision] = []
        # Alerts of sites and districts no longer in the fleet are checked too, and resolve.
        for site in sorted({s for kind, s in self._alerts if kind == "site-offline"}):
            self._check_site(site, now, out)
        districts = {s for kind, s in self._alerts if kind == "district-outage"}
        for district in sorted(districts.union(self.fleet.districts())):
            self._check_district(district, now, out, full=True)
        self._advance_all(now, out)
        return out

    def ack(self, alert_id: str, who: str, now_ms: int) -> list[Decision]:
        """Someone took the alert on: no more reminders or escalation.

        Acknowledging an unknown, resolved or already acknowledged alert changes nothing and
        returns no decision (a second click, or a second process, is harmless).
        """
        now = self._clock(now_ms)
        out: list[Decision] = []
        for alert in list(self._alerts.values()):
            if alert.id == alert_id and alert.acked_by is None:
                acked = replace(alert, acked_by=who, acked_at_ms=now)
                self._emit(out, acked, "acknowledged", now, reason=who)
        return out

    # --- reading and persistence -----------------------------------------------------------

    def alerts(self) -> tuple[Alert, ...]:
        """The alerts not yet resolved, oldest first."""
        return tuple(sorted(self._alerts.values(), key=lambda a: (a.opened_at_ms, a.id)))

    def snapshot(self) -> PolicySnapshot:
        return PolicySnapshot(self._now_ms, dict(self._views), self.alerts())

    @classmethod
    def restore(
        cls, snapshot: PolicySnapshot, fleet: Fleet, settings: AlertSettings | None = None
    ) -> AlertPolicy:
        """The engine as it was. Whatever fell due while it was down is decided at the next
        call, once: late rather than lost or doubled."""
        policy = cls(fleet, settings)
        policy._views = dict(snapshot.terminals)
        policy._alerts = {(a.kind, a.subject): a for a in snapshot.alerts}
        policy._now_ms = snapshot.taken_at_ms
        return policy

    # --- conditions ------------------------------------------------------------------------

    def _check_site(self, site: str, now: int, out: list[Decision]) -> None:
        terminals = self.fleet.terminals_of_site(site)
        offline = [t for t in terminals if self._view(t).status == "offline"]
        alert = self._alerts.get(("site-offline", site))
        policy = self.fleet.sites.get(site)
        whole = len(terminals) >= self.settings.site_min_terminals
        if whole and len(offline) == len(terminals) and policy is not None:
            if alert is None:
                self._open("site-offline", site, policy, now, terminals=terminals)
        elif alert is not None and (not offline or alert.status == "pending"):
            self._close(out, alert, now, "recovered" if not offline else "site-partly-back")

    def _check_district(
        self,
        district: str,
        now: int,
        out: list[Decision],
        *,
        full: bool,
        came_back: str | None = None,
    ) -> None:
        """Open or close the district's outage alert; ``full`` also updates its terminal list.

        A presence change costs O(1) here unless it opens or closes the alert (a connect storm
        is tens of thousands of changes in one district); tick() brings the list up to date.
        A closed alert lists the terminals that were offline up to its end: with
        ``came_back``, the one whose return ended it.
        """
        s = self.settings
        size = len(self.fleet.terminals_of_district(district))
        threshold = max(s.district_min_down, -(-size * s.district_percent // 100))
        index = self._down_index()
        down = index.count(district)
        alert = self._alerts.get(("district-outage", district))
        if alert is None:
            if down >= threshold and index.serving(district, now, self.fleet) >= threshold:
                self._alerts[("district-outage", district)] = Alert(
                    id=f"district-outage:{district}:{now}",
                    kind="district-outage",
                    subject=district,
                    district=district,
                    site=None,
                    opened_at_ms=now,
                    terminals=index.terminals(district),
                )
        elif down < threshold:
            if not full:  # else a new fleet moved terminals away: the list stands as it was
                alert = replace(alert, terminals=index.terminals(district, also=came_back))
            self._close(out, alert, now, "recovered")
        elif full:
            offline = index.terminals(district)
            if offline != alert.terminals:
                self._store(replace(alert, terminals=offline))

    def _down_index(self) -> _DownIndex:
        """The offline terminals per district, rebuilt when the fleet was replaced."""
        if self._down.fleet is not self.fleet:
            self._down = _DownIndex.build(self.fleet, self._views)
        return self._down

    # --- the alert lifecycle ---------------------------------------------------------------

    def _advance_all(self, now: int, out: list[Decision]) -> None:
        for alert in self.alerts():
            self._advance(alert, now, out)

    def _advance(self, alert: Alert, now: int, out: list[Decision]) -> None:
        if alert.status == "pending":
            self._advance_pending(alert, now, out)
        elif alert.acked_by is None:
            self._advance_sent(alert, now, out)

    def _advance_pending(self, alert: Alert, now: int, out: list[Decision]) -> None:
        base, grace = self._due_base(alert), self._grace(alert)
        if now < base + grace:
            return
        reason = self._held_by(alert) or self._outside_hours(alert, base, grace, now)
        if reason is not None:
            self._hold(out, alert, reason, now)
            return
        alert = replace(alert, status="sent", sent_at_ms=now, last_notice_ms=now, held=None)
        self._emit(out, alert, "sent", now, notify=(alert.audience,))

    def _advance_sent(self, alert: Alert, now: int, out: list[Decision]) -> None:
        """Reminders and escalation of a sent alert nobody has acknowledged."""
        s = self.settings
        sent_at = alert.sent_at_ms if alert.sent_at_ms is not None else alert.opened_at_ms
        last = alert.last_notice_ms if alert.last_notice_ms is not None else sent_at
        escalate = (
            alert.audience == "owners"
            and alert.escalated_at_ms is None
            and now >= sent_at + s.escalate_after_ms
        )
        remind = now >= last + s.remind_every_ms
        if not (escalate or remind):
            return
        reason = self._held_by(alert)
        if reason is not None:
            self._hold(out, alert, reason, now)
            return
        if escalate:
            alert = replace(alert, escalated_at_ms=now, held=None)
            alert = self._emit(out, alert, "escalated", now, notify=("ops",))
        if not remind:
            return
        if alert.audience == "owners" and not _is_open(self._site(alert), now):
            self._hold(out, alert, "outside-hours", now)
            return
        alert = replace(alert, reminders=alert.reminders + 1, last_notice_ms=now, held=None)
        self._emit(out, alert, "reminded", now, notify=(alert.audience,))

    def _held_by(self, alert: Alert) -> str | None:
        """Why no notification of ``alert`` may go out now, opening hours aside."""
        if alert.site is not None and alert.site not in self.fleet.sites:
            return "unassigned"
        if alert.kind in ("site-offline", "district-outage"):
            return None
        status = self._view(alert.subject).status
        if alert.kind == "terminal-offline" and status in ("planned", "flapping"):
            return status
        if alert.kind == "peripherals" and (status in DOWN or status == "flapping"):
            return "terminal-down"
        if alert.site is not None and ("site-offline", alert.site) in self._alerts:
            return "merged-into-site"
        return None

    def _outside_hours(self, alert: Alert, base: int, grace: int, now: int) -> str | None:
        """``outside-hours`` while a pending owner alert is not yet due by the hours rule."""
        site = self._site(alert)
        if alert.audience == "ops" or site is None:
            return None
        due = self._owner_due(site, base, grace)
        if due is None or now < due or not site.is_open(now):
            return "outside-hours"
        return None

    def _owner_due(self, site: SitePolicy, base: int, grace: int) -> int | None:
        ready = base + grace
        if site.open_24h:
            return ready
        schedule = site.schedule
        if schedule.is_open(base) and schedule.is_open(ready):
            return ready
        opening = schedule.next_opening_ms(ready if schedule.is_open(base) else base)
        if opening is None:
            return None
        return max(ready, opening + self.settings.after_opening_ms)

    def _due_base(self, alert: Alert) -> int:
        if alert.kind == "peripherals" and alert.faults:
            return min(f.since_ms for f in alert.faults)
        return alert.opened_at_ms

    def _grace(self, alert: Alert) -> int:
        s = self.settings
        if alert.kind == "peripherals":
            return s.peripheral_grace_ms
        if alert.kind == "terminal-flapping":
            return s.flapping_grace_ms
        if alert.kind == "district-outage":
            return s.district_grace_ms
        site = self._site(alert)
        return site.grace_ms if site is not None else DEFAULT_GRACE_MS

    def _open(
        self,
        kind: AlertKind,
        subject: str,
        site: SitePolicy,
        opened_at: int,
        *,
        terminals: tuple[str, ...],
        faults: tuple[Fault, ...] = (),
    ) -> None:
        self._alerts[(kind, subject)] = Alert(
            id=f"{kind}:{subject}:{opened_at}",
            kind=kind,
            subject=subject,
            district=site.district,
            site=site.site,
            opened_at_ms=opened_at,
            terminals=terminals,
            faults=faults,
        )

    def _close(
        self, out: list[Decision], alert: Alert, now: int, reason: str, notify: bool = True
    ) -> None:
        """Resolve: a notice if it was sent, a record if it was held, else no trace."""
        resolved = replace(alert, status="resolved", resolved_at_ms=now)
        if alert.status == "sent":
            audience: tuple[Audience, ...] = ()
            if notify:
                audience = (alert.audience,)
                if alert.escalated_at_ms is not None and alert.audience == "owners":
                    audience += ("ops",)
            self._emit(out, resolved, "resolved", now, notify=audience, reason=reason)
        elif alert.held is not None:
            self._emit(out, resolved, "resolved", now, reason=f"{reason}-before-sent")
        else:
            self._store(resolved)

    def _hold(self, out: list[Decision], alert: Alert, reason: str, now: int) -> None:
        if alert.held != reason:
            self._emit(out, replace(alert, held=reason), "suppressed", now, reason=reason)

    def _emit(
        self,
        out: list[Decision],
        alert: Alert,
        action: Action,
        now: int,
        *,
        notify: tuple[Audience, ...] = (),
        reason: str | None = None,
    ) -> Alert:
        alert = replace(alert, records=alert.records + 1)
        if action in ("suppressed", "updated"):
            key = f"{alert.id}/{action}/{alert.records}"
        elif action == "reminded":
            key = f"{alert.id}/reminded/{alert.reminders}"
        else:
            key = f"{alert.id}/{action}"
        recipients: list[str] = []
        for audience in notify:
            if audience == "ops":
                addresses = self.fleet.district_ops.get(alert.district, ())
            else:
                site = self._site(alert)
                addresses = site.owners if site is not None else ()
            recipients += [a for a in addresses if a not in recipients]
        out.append(Decision(key, action, now, alert, notify, tuple(recipients), reason))
        self._store(alert)
        return alert

    # --- small things ----------------------------------------------------------------------

    def _store(self, alert: Alert) -> None:
        if alert.status == "resolved":
            self._alerts.pop((alert.kind, alert.subject), None)
        else:
            self._alerts[(alert.kind, alert.subject)] = alert

    def _site(self, alert: Alert) -> SitePolicy | None:
        return self.fleet.sites.get(alert.site) if alert.site is not None else None

    def _view(self, terminal: str) -> TerminalView:
        return self._views.get(terminal) or TerminalView()

    def _clock(self, now_ms: int) -> int:
        self._now_ms = max(self._now_ms, now_ms)
        return self._now_ms


class _DownIndex:
    """Which terminals of each district are offline, kept up to date change by change.

    ``serving`` (how many of them stand at sites open at ``now``) is counted once per ``now``
    and then adjusted by each change: the engine decides on many changes at one ``now``.
    """

    def __init__(self, fleet: Fleet | None = None) -> None:
        self.fleet = fleet
        self._offline: dict[str, set[str]] = {}
        self._serving: dict[str, tuple[int, int]] = {}

    @classmethod
    def build(cls, fleet: Fleet, views: Mapping[str, TerminalView]) -> _DownIndex:
        index = cls(fleet)
        for terminal, view in views.items():
            site = fleet.site_of(terminal)
            if view.status == "offline" and site is not None:
                index._offline.setdefault(site.district, set()).add(terminal)
        return index

    def update(self, terminal: str, site: SitePolicy | None, status: str, now: int) -> None:
        if site is None:
            return
        offline = self._offline.setdefault(site.district, set())
        if (status == "offline") == (terminal in offline):
            return
        if status == "offline":
            offline.add(terminal)
            step = 1
        else:
            offline.discard(terminal)
            step = -1
        counted = self._serving.get(site.district)
        if counted is not None and counted[0] == now and site.is_open(now):
            self._serving[site.district] = (now, counted[1] + step)

    def count(self, district: str) -> int:
        return len(self._offline.get(district, ()))

    def terminals(self, district: str, also: str | None = None) -> tuple[str, ...]:
        offline = self._offline.get(district, set())
        return tuple(sorted(offline if also is None else offline | {also}))

    def serving(self, district: str, now: int, fleet: Fleet) -> int:
        """How many of the district's offline terminals stand at sites open at ``now``."""
        counted = self._serving.get(district)
        if counted is None or counted[0] != now:
            offline = self._offline.get(district, ())
            counted = (now, sum(1 for t in offline if _is_open(fleet.site_of(t), now)))
            self._serving[district] = counted
        return counted[1]


def _is_open(site: SitePolicy | None, now: int) -> bool:
    return site is not None and site.is_open(now)


def _fault_keys(faults: tuple[Fault, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((f.peripheral, f.state) for f in faults)
