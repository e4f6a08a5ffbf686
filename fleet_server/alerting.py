"""Alerting in the running server: the presence table and the alert policy, fed by ingest,
kept in the registry, and their e-mails handed to the mailer.

One process decides. Every server process sharing a registry asks for the ``alerting`` lease
each tick; the holder runs the engines, the others only keep the inputs of the last minute.
Each process receives every ``state`` and ``peripherals`` message (those subscriptions are not
shared), so a process that takes over restores the engines' last snapshot from the registry
and replays what it kept since: a state already applied is a repeat and changes nothing.
Telemetry is shared between the processes, so the heartbeat comes from the registry's
last-seen times, which every process writes.

Decisions are stored under their key (UNIQUE) in the same transaction as the snapshots, and
only the ones newly stored are mailed: a decision replayed after a takeover is not sent twice.

A registry that fails for a while (locked past its busy timeout by another process, a full
disk) does not stop the server: the tick is logged and tried again at the next one, and the
decisions (and statuses) a failed save did not store are kept and saved with the next, so no
alert is lost by the engines having moved on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgspec

from fleet_protocol.ids import TerminalId
from fleet_protocol.messages import Peripherals, State
from fleet_protocol.sites import Site as SiteRecord
from fleet_server.ack_links import ack_token
from fleet_server.alert_policy import (
    Alert,
    AlertPolicy,
    AlertSettings,
    Decision,
    Fleet,
    PolicySnapshot,
    SitePolicy,
)
from fleet_server.errors import RegistryError
from fleet_server.mail_message import Alert as MailAlert
from fleet_server.mail_message import (
    DistrictOutage,
    Envelope,
    Escalation,
    Flapping,
    Mailbox,
    Notice,
    PeripheralFault,
    PeripheralFaults,
    Reminder,
    Resolved,
    Site,
    SiteOffline,
    SiteTerminals,
    TerminalBack,
    TerminalOffline,
    compose,
)
from fleet_server.mailer import Mailer
from fleet_server.presence_table import (
    PresenceSettings,
    PresenceSnapshot,
    PresenceTable,
    Transition,
)
from fleet_server.registry import AlertLogEntry, Registry
from fleet_server.stopping import sleep_unless_stopped

LEASE = "alerting"
#: A snapshot is saved when something changed, and at least this often.
SAVE_EVERY_MS = 30_000
#: How long an acknowledge link in an e-mail stays valid.
ACK_LINK_MS = 14 * 24 * 3600 * 1000


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, kw_only=True)
class AlertingSettings:
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    #: district -> e-mail addresses of its ops (district alerts, escalations).
    district_ops: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sender: Mailbox = field(
        default_factory=lambda: Mailbox("政务服务自助终端运维", "kiosk-fleet@localhost.localdomain")
    )
    #: Right-hand side of Message-IDs.
    mail_domain: str = "localhost.localdomain"
    #: Where acknowledge links point (the ops API as site owners reach it); None: no links.
    ack_base_url: str | None = None
    ack_secret: bytes | None = None
    tick_s: float = 1.0
    lease_ttl_ms: int = 15_000
    fleet_refresh_ms: int = 10_000
    #: Inputs a process that is not deciding keeps, for when it takes over.
    keep_inputs_ms: int = 60_000


@dataclass(frozen=True, slots=True)
class _Input:
    terminal: str
    message: State | Peripherals
    received_ms: int


@dataclass(slots=True)
class AlertingCounters:
    decisions: int = 0
    mails_queued: int = 0
    inputs_dropped: int = 0
    #: Ticks that failed because the registry did (each tried again at the next tick).
    registry_errors: int = 0
    leading: bool = False
    statuses: dict[str, int] = field(default_factory=dict)


class AlertingService:
    def __init__(
        self,
        registry: Registry,
        settings: AlertingSettings,
        mailer: Mailer | None,
        *,
        holder: str,
        log: logging.Logger,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._mailer = mailer
        self._holder = holder
        self._log = log
        self._clock = clock
        self._inputs: deque[_Input] = deque(maxlen=200_000)
        self._table: PresenceTable | None = None
        self._policy: AlertPolicy | None = None
        self._sites: dict[str, SiteRecord] = {}
        self._fleet_at = 0
        self._heard: dict[str, int] = {}
        self._saved_at = 0
        #: What a failed save did not store, to be saved with the next.
        self._unsaved: tuple[list[Decision], dict[str, str]] = ([], {})
        self.counters = AlertingCounters()

    # --- inputs (from ingest, in every process) -------------------------------------------

    def state(self, terminal: TerminalId, message: State, received_ms: int) -> None:
        self._put(_Input(terminal, message, received_ms))

    def peripherals(self, terminal: TerminalId, message: Peripherals, received_ms: int) -> None:
        self._put(_Input(terminal, message, received_ms))

    def _put(self, item: _Input) -> None:
        if len(self._inputs) == self._inputs.maxlen:
            self.counters.inputs_dropped += 1
        self._inputs.append(item)

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        failing = False
        try:
            while not stopping.is_set():
                try:
                    await self.step_once()
                except RegistryError as exc:
                    self.counters.registry_errors += 1
                    if not failing:  # once per spell, not once a tick
                        self._log.warning("alerting: %s; trying again every tick", exc)
                    failing = True
                else:
                    if failing:
                        self._log.info("alerting: the registry works again")
                    failing = False
                await sleep_unless_stopped(stopping, self._settings.tick_s)
        finally:
            if self._table is not None:
                await self._save(self._clock(), [], {}, force=True)
                await self._registry.release_lease(LEASE, self._holder)

    async def step_once(self) -> None:
        """One tick: decide if this process holds the lease, else keep the recent inputs."""
        s = self._settings
        now = self._clock()
        if await self._registry.hold_lease(LEASE, self._holder, now, s.lease_ttl_ms):
            if self._table is None:
                await self._take_over(now)
            await self._step(now)
            return
        if self._table is not None:
            self._log.warning("alerting: another server process decides now")
        self._table, self._policy = None, None
        self._unsaved = ([], {})  # the process deciding now replays the inputs instead
        self.counters.leading = False
        while self._inputs and self._inputs[0].received_ms < now - s.keep_inputs_ms:
            self._inputs.popleft()

    async def _take_over(self, now: int) -> None:
        fleet = await self._fleet(now)
        presence = await self._registry.engine_state("presence")
        policy = await self._registry.engine_state("alerts")
        if presence is not None and policy is not None:
            snapshot = msgspec.json.decode(presence, type=PresenceSnapshot)
            self._table = PresenceTable.restore(snapshot, now, self._settings.presence)
            self._policy = AlertPolicy.restore(
                msgspec.json.decode(policy, type=PolicySnapshot), fleet, self._settings.alerts
            )
            self._heard = {t: p.heard_ms or 0 for t, p in snapshot.terminals.items()}
        else:
            self._table = PresenceTable(self._settings.presence)
            self._policy = AlertPolicy(fleet, self._settings.alerts)
        self.counters.leading = True
        self._log.info("alerting: this process decides (%s)", self._holder)

    async def _step(self, now: int) -> None:
        table, policy = self._table, self._policy
        assert table is not None
        assert policy is not None
        placed = policy.fleet.terminals
        newcomer = any(i.terminal not in placed for i in self._inputs)
        if newcomer or now - self._fleet_at >= self._settings.fleet_refresh_ms:
            # A terminal heard of for the first time is placed (at the site its state names)
            # before its message is decided on: its first drop must not go unalerted.
            policy.fleet = await self._fleet(now)
        # Every registry read and take before the engines move: a registry failing here must
        # leave the inputs and the engines as they were, for the next tick.
        last_seen = await self._registry.last_seen()
        acks = await self._registry.take_acks()
        decisions: list[Decision] = []
        statuses: dict[str, str] = {}

        def transitions(changes: list[Transition]) -> None:
            for t in changes:
                decisions.extend(policy.on_transition(t, now))
                statuses[t.terminal] = t.new

        while self._inputs:
            item = self._inputs.popleft()
            if isinstance(item.message, State):
                transitions(table.on_state(item.terminal, item.message, item.received_ms))
            else:
                decisions.extend(policy.on_peripherals(item.terminal, item.message, now))
        for terminal, heard in last_seen.items():
            if heard > self._heard.get(terminal, 0):
                self._heard[terminal] = heard
                transitions(table.on_telemetry(terminal, min(heard, now)))
        transitions(table.tick(now))
        for alert_id, who, _at in acks:
            decisions.extend(policy.ack(alert_id, who, now))
        decisions.extend(policy.tick(now))
        await self._save(now, decisions, statuses)

    async def _save(
        self,
        now: int,
        decisions: list[Decision],
        statuses: dict[str, str],
        *,
        force: bool = False,
    ) -> None:
        table, policy = self._table, self._policy
        if table is None or policy is None:
            return
        unsaved_decisions, unsaved_statuses = self._unsaved
        decisions = unsaved_decisions + decisions
        statuses = unsaved_statuses | statuses
        if not (decisions or statuses or force) and now - self._saved_at < SAVE_EVERY_MS:
            return
        presence_now = table.snapshot()
        self._unsaved = (decisions, statuses)
        new = await self._registry.save_engines(
            {
                "presence": msgspec.json.encode(presence_now),
                "alerts": msgspec.json.encode(policy.snapshot()),
            },
            statuses,
            [_entry(d) for d in decisions],
            now,
        )
        self._unsaved = ([], {})
        self._saved_at = now
        self.counters.decisions += len(new)
        counts: dict[str, int] = {}
        for presence in presence_now.terminals.values():
            counts[presence.status] = counts.get(presence.status, 0) + 1
        self.counters.statuses = counts
        fresh = set(new)
        for d in decisions:
            if d.key in fresh:
                self._log.info(
                    "alert %s: %s%s%s",
                    d.alert.id,
                    d.action,
                    f" ({d.reason})" if d.reason else "",
                    f" -> {', '.join(d.recipients)}" if d.recipients else "",
                )
                if d.recipients:
                    await self._mail(d, now)

    async def _fleet(self, now: int) -> Fleet:
        sites: dict[str, SiteRecord] = {s.id: s for s in await self._registry.sites()}
        placed = await self._registry.site_terminals()
        self._sites = sites
        self._fleet_at = now
        return Fleet(
            sites={
                s.id: SitePolicy(
                    site=s.id,
                    district=s.district,
                    schedule=s.schedule,
                    grace_ms=s.grace_s * 1000,
                    open_24h=s.schedule.open_24h,
                    owners=tuple(o.email for o in s.owners),
                )
                for s in sites.values()
            },
            terminals={t: site for t, site in placed.items() if site in sites},
            district_ops=self._settings.district_ops,
        )

    # --- e-mail -----------------------------------------------------------------------------

    async def _mail(self, decision: Decision, now: int) -> None:
        if self._mailer is None:
            return
        notice = self._notice(decision)
        if notice is None:
            return
        names = {o.email: o.name for s in self._sites.values() for o in s.owners}
        s = self._settings
        ack_url = None
        if s.ack_base_url and s.ack_secret and decision.action != "resolved":
            token = ack_token(decision.alert.id, s.ack_secret, now + ACK_LINK_MS)
            ack_url = f"{s.ack_base_url.rstrip('/')}/ack/{token}"
        message = compose(
            notice,
            Envelope(
                key=decision.key,
                sender=s.sender,
                to=tuple(Mailbox(names.get(a, ""), a) for a in decision.recipients),
                domain=s.mail_domain,
                date_ms=now,
                ack_url=ack_url,
            ),
        )
        if await self._mailer.enqueue(decision.key, message):
            self.counters.mails_queued += 1

    def _notice(self, decision: Decision) -> Notice | None:
        alert = decision.alert
        base = self._alert_notice(alert)
        if base is None:
            return None
        if decision.action == "reminded":
            return Reminder(base, alert.opened_at_ms)
        if decision.action == "escalated":
            return Escalation(base, alert.opened_at_ms)
        if decision.action == "resolved":
            if isinstance(base, TerminalOffline):
                return TerminalBack(
                    base.site,
                    base.terminal,
                    alert.opened_at_ms,
                    alert.resolved_at_ms or decision.at_ms,
                )
            return Resolved(base, alert.opened_at_ms, alert.resolved_at_ms or decision.at_ms)
        return base

    def _alert_notice(self, alert: Alert) -> MailAlert | None:
        site = self._mail_site(alert.site)
        if alert.kind == "district-outage":
            fleet = self._policy.fleet if self._policy is not None else None
            total = len(fleet.terminals_of_district(alert.district)) if fleet else 0
            by_site: dict[str, list[TerminalId]] = {}
            for t in alert.terminals:
                by_site.setdefault(fleet.terminals.get(t, "") if fleet else "", []).append(
                    TerminalId(t)
                )
            return DistrictOutage(
                alert.district,
                tuple(
                    SiteTerminals(self._mail_site(s) or Site(s, alert.district), tuple(ts))
                    for s, ts in sorted(by_site.items())
                ),
                total,
                alert.opened_at_ms,
            )
        if site is None:
            return None
        terminal = TerminalId(alert.subject)
        if alert.kind == "terminal-offline":
            return TerminalOffline(site, terminal, alert.opened_at_ms)
        if alert.kind == "site-offline":
            return SiteOffline(
                site, tuple(TerminalId(t) for t in alert.terminals), alert.opened_at_ms
            )
        if alert.kind == "terminal-flapping":
            presence = self._table.get(alert.subject) if self._table is not None else None
            losses = presence.losses_ms if presence is not None else ()
            return Flapping(
                site,
                terminal,
                len(losses),
                self._settings.presence.flap_window_ms,
                losses[-1] if losses else alert.opened_at_ms,
            )
        return PeripheralFaults(
            site,
            tuple(PeripheralFault(terminal, f.peripheral, f.reason) for f in alert.faults),
            alert.opened_at_ms,
        )

    def _mail_site(self, site_id: str | None) -> Site | None:
        site = self._sites.get(site_id) if site_id else None
        return Site(site.name, site.district, site.town) if site is not None else None


def _entry(d: Decision) -> AlertLogEntry:
    a = d.alert
    return AlertLogEntry(
        key=d.key,
        alert_id=a.id,
        action=d.action,
        at_ms=d.at_ms,
        kind=a.kind,
        subject=a.subject,
        site=a.site,
        district=a.district,
        reason=d.reason,
        recipients=d.recipients,
    )
