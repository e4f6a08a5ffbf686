"""The alert policy on a fake clock: the presence table feeds it, as the server will.

Time starts on Monday 8 January 2024 in China Standard Time. Sites keep weekday hours
08:30-17:00 unless they are 24-hour sites. Kiosks send telemetry every minute while connected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta, timezone

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_protocol.messages import Peripherals, PeripheralStatus, State
from fleet_server.alert_policy import (
    HOUR,
    AlertPolicy,
    AlertSettings,
    Decision,
    Fleet,
    PolicySnapshot,
    SitePolicy,
)
from fleet_server.presence_table import (
    MINUTE,
    SECOND,
    PresenceSnapshot,
    PresenceTable,
    Transition,
)

CST = timezone(timedelta(hours=8))
MONDAY = date(2024, 1, 8)


def at(day: int, hh: int, mm: int = 0, ss: int = 0) -> int:
    """Milliseconds at ``hh:mm:ss`` on the ``day``-th day after Monday 8 January 2024."""
    moment = datetime.combine(MONDAY + timedelta(days=day), time(hh, mm, ss), CST)
    return int(moment.timestamp()) * 1000


@dataclass(frozen=True)
class WeekdayHours:
    """Mon-Fri 08:30-17:00, China Standard Time."""

    opens: time = time(8, 30)
    closes: time = time(17, 0)

    def is_open(self, at_ms: int) -> bool:
        moment = datetime.fromtimestamp(at_ms / 1000, CST)
        return moment.weekday() < 5 and self.opens <= moment.time() < self.closes

    def next_opening_ms(self, after_ms: int) -> int | None:
        day = datetime.fromtimestamp(after_ms / 1000, CST).date()
        for offset in range(8):
            candidate = day + timedelta(days=offset)
            opening = int(datetime.combine(candidate, self.opens, CST).timestamp()) * 1000
            if candidate.weekday() < 5 and opening > after_ms:
                return opening
        return None


def site(name: str, district: str = "pudong", *, open_24h: bool = False) -> SitePolicy:
    return SitePolicy(
        site=name,
        district=district,
        schedule=WeekdayHours(),
        open_24h=open_24h,
        owners=(f"owner@{name}.example.cn",),
    )


def fleet_of(*sites: tuple[SitePolicy, int]) -> Fleet:
    """Sites with that many terminals each, named ``{site}-{n}``."""
    return Fleet(
        sites={policy.site: policy for policy, _ in sites},
        terminals={f"{p.site}-{n}": p.site for p, count in sites for n in range(1, count + 1)},
        district_ops={"pudong": ("ops@pudong.example.cn",)},
    )


class World:
    """Kiosks, the presence table and the alert policy, on one fake clock."""

    def __init__(self, fleet: Fleet, start: int, settings: AlertSettings | None = None) -> None:
        self.now = start
        self.table = PresenceTable()
        self.policy = AlertPolicy(fleet, settings)
        self.decisions: list[Decision] = []
        self.sessions: dict[str, int] = {}
        self.connected: set[str] = set()
        for terminal in fleet.terminals:
            self.connect(terminal)

    def feed(self, transitions: list[Transition]) -> None:
        for transition in transitions:
            self.decisions += self.policy.on_transition(transition, self.now)

    def connect(self, terminal: str) -> None:
        self.sessions[terminal] = self.sessions.get(terminal, 0) + 1
        self.connected.add(terminal)
        state = State(online=True, session=self.sessions[terminal], ts=self.now)
        self.feed(self.table.on_state(terminal, state, self.now))

    def lose(self, *terminals: str) -> None:
        for terminal in terminals:
            self.connected.discard(terminal)
            state = State(online=False, session=self.sessions[terminal], ts=self.now, reason="lost")
            self.feed(self.table.on_state(terminal, state, self.now))

    def silence(self, terminal: str) -> None:
        """Still connected as far as the broker knows, but sending nothing."""
        self.connected.discard(terminal)

    def plan(self, terminal: str, back_in_ms: int) -> None:
        self.connected.discard(terminal)
        state = State(
            online=False,
            session=self.sessions[terminal],
            ts=self.now,
            reason="planned",
            expected_back=self.now + back_in_ms,
        )
        self.feed(self.table.on_state(terminal, state, self.now))

    def peripherals(self, terminal: str, **states: str) -> None:
        message = Peripherals(
            ts=self.now,
            peripherals=[
                PeripheralStatus(id=role.replace("_", "-"), role=role, state=state, since=1)  # type: ignore[arg-type]
                for role, state in states.items()
            ],
        )
        self.decisions += self.policy.on_peripherals(terminal, message, self.now)

    def ack(self, alert_id: str, who: str = "王芳") -> list[Decision]:
        decisions = self.policy.ack(alert_id, who, self.now)
        self.decisions += decisions
        return decisions

    def run(self, duration_ms: int, step_ms: int = 30 * SECOND) -> None:
        end = self.now + duration_ms
        while self.now < end:
            self.now = min(end, self.now + step_ms)
            if self.now % MINUTE < step_ms:
                for terminal in sorted(self.connected):
                    self.feed(self.table.on_telemetry(terminal, self.now))
            self.feed(self.table.tick(self.now))
            self.decisions += self.policy.tick(self.now)

    def run_until(self, moment: int) -> None:
        self.run(moment - self.now)

    def mails(self) -> list[Decision]:
        return [d for d in self.decisions if d.notify]

    def summary(self) -> list[tuple[str, str, str]]:
        """What the owners were mailed (ops' district alerts have tests of their own)."""
        return [
            (d.action, d.alert.kind, d.alert.subject)
            for d in self.mails()
            if d.alert.kind != "district-outage"
        ]


ONE_SITE = fleet_of((site("town-a"), 3))


def test_a_drop_inside_hours_alerts_once_after_grace_and_recovers_once() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.lose("town-a-1")
    world.run(4 * MINUTE)
    assert world.mails() == []
    world.run(2 * MINUTE)
    assert world.summary() == [("sent", "terminal-offline", "town-a-1")]
    (sent,) = world.mails()
    assert sent.recipients == ("owner@town-a.example.cn",)
    assert sent.at_ms == at(0, 10, 5)
    world.run(HOUR)
    world.connect("town-a-1")
    world.run(HOUR)
    assert world.summary()[1:] == [("resolved", "terminal-offline", "town-a-1")]
    recovery = world.mails()[-1]
    assert recovery.alert.duration_ms == HOUR + 6 * MINUTE
    assert recovery.recipients == ("owner@town-a.example.cn",)


def test_a_blip_within_grace_leaves_no_trace() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.lose("town-a-1")
    world.run(MINUTE)
    world.connect("town-a-1")
    world.run(HOUR)
    assert world.decisions == []


def test_a_drop_at_night_alerts_fifteen_minutes_after_opening() -> None:
    world = World(ONE_SITE, at(0, 20))
    world.lose("town-a-1")
    world.run_until(at(1, 8, 44, 30))
    assert world.mails() == []
    assert [(d.action, d.reason) for d in world.decisions] == [("suppressed", "outside-hours")]
    world.run_until(at(1, 9))
    assert world.summary() == [("sent", "terminal-offline", "town-a-1")]
    assert world.mails()[0].at_ms == at(1, 8, 45)


def test_a_drop_just_before_closing_waits_for_the_next_morning() -> None:
    world = World(ONE_SITE, at(0, 16, 58))
    world.lose("town-a-1")
    world.run_until(at(1, 8, 44))
    assert world.mails() == []
    world.run_until(at(1, 8, 46))
    assert [d.at_ms for d in world.mails()] == [at(1, 8, 45)]


def test_back_before_opening_sends_nothing_at_all() -> None:
    world = World(ONE_SITE, at(0, 20))
    world.lose("town-a-1")
    world.run_until(at(1, 8, 40))
    world.connect("town-a-1")
    world.run_until(at(1, 12))
    assert world.mails() == []
    assert [(d.action, d.reason) for d in world.decisions] == [
        ("suppressed", "outside-hours"),
        ("resolved", "recovered-before-sent"),
    ]


def test_a_weekend_outage_is_alerted_on_monday() -> None:
    world = World(ONE_SITE, at(4, 18))  # Friday evening
    world.lose("town-a-1")
    world.run_until(at(7, 9))
    assert [d.at_ms for d in world.mails()] == [at(7, 8, 45)]


def test_a_24_hour_site_alerts_at_night() -> None:
    world = World(fleet_of((site("zone-24", open_24h=True), 2)), at(0, 3))
    world.lose("zone-24-1")
    world.run(10 * MINUTE)
    assert [d.at_ms for d in world.mails()] == [at(0, 3, 5)]


def test_a_silent_terminal_is_not_alerted_while_stale_but_once_the_backstop_fires() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.silence("town-a-1")
    world.run(9 * MINUTE)
    assert world.table.status("town-a-1") == "offline"
    assert world.mails() == []
    world.run(2 * MINUTE)
    # Heard last at 10:00; stale at 10:03, offline (heartbeat) at 10:05, alerted at 10:10.
    assert [d.at_ms for d in world.mails()] == [at(0, 10, 10)]


def test_a_planned_reboot_back_in_time_sends_nothing() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.plan("town-a-1", back_in_ms=20 * MINUTE)
    world.run(15 * MINUTE)
    world.connect("town-a-1")
    world.run(HOUR)
    assert world.mails() == []
    assert [(d.action, d.reason) for d in world.decisions] == [
        ("suppressed", "planned"),
        ("resolved", "recovered-before-sent"),
    ]


def test_a_planned_reboot_past_its_deadline_alerts() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.plan("town-a-1", back_in_ms=10 * MINUTE)
    world.run(30 * MINUTE)
    assert world.summary() == [("sent", "terminal-offline", "town-a-1")]
    # Deadline: expected back plus the presence table's 5-minute margin.
    assert world.mails()[0].at_ms == at(0, 10, 15)
    world.connect("town-a-1")
    assert world.mails()[-1].alert.duration_ms == 30 * MINUTE


def test_a_whole_site_down_is_one_site_alert() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.lose("town-a-1")
    world.run(MINUTE)
    world.lose("town-a-2", "town-a-3")
    world.run(HOUR)
    assert world.summary() == [("sent", "site-offline", "town-a")]
    (alert,) = [d.alert for d in world.mails() if d.alert.kind == "site-offline"]
    assert alert.terminals == ("town-a-1", "town-a-2", "town-a-3")
    merged = [d.alert.subject for d in world.decisions if d.reason == "merged-into-site"]
    assert merged == ["town-a-1", "town-a-2", "town-a-3"]
    for terminal in ("town-a-1", "town-a-2", "town-a-3"):
        world.connect(terminal)
        world.run(MINUTE)
    assert world.summary()[1:] == [("resolved", "site-offline", "town-a")]


def test_after_a_site_alert_further_terminal_alerts_of_the_site_are_suppressed() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.lose("town-a-1", "town-a-2", "town-a-3")
    world.run(10 * MINUTE)
    world.connect("town-a-1")
    world.run(10 * MINUTE)
    world.lose("town-a-1")
    world.run(HOUR)
    assert world.summary() == [("sent", "site-offline", "town-a")]


def test_a_site_coming_partly_back_before_its_alert_goes_out_alerts_per_terminal() -> None:
    world = World(ONE_SITE, at(0, 20))
    world.lose("town-a-1", "town-a-2", "town-a-3")
    world.run_until(at(1, 8, 40))
    world.connect("town-a-1")
    world.run_until(at(1, 9))
    assert world.summary() == [
        ("sent", "terminal-offline", "town-a-2"),
        ("sent", "terminal-offline", "town-a-3"),
    ]


def test_thirty_flaps_in_ten_minutes_are_one_alert() -> None:
    world = World(ONE_SITE, at(0, 10))
    for _ in range(30):
        world.lose("town-a-1")
        world.run(10 * SECOND, step_ms=10 * SECOND)
        world.connect("town-a-1")
        world.run(10 * SECOND, step_ms=10 * SECOND)
    world.run(5 * MINUTE)
    assert world.summary() == [("sent", "terminal-flapping", "town-a-1")]
    world.run(HOUR)
    assert world.summary() == [
        ("sent", "terminal-flapping", "town-a-1"),
        ("resolved", "terminal-flapping", "town-a-1"),
    ]


def big_district(sites: int, per_site: int) -> Fleet:
    return fleet_of(*[(site(f"village-{n:02d}"), per_site) for n in range(sites)])


def test_a_tenth_of_a_district_down_is_one_ops_alert_on_top_of_owner_alerts() -> None:
    world = World(big_district(10, 3), at(0, 10))  # 30 terminals: threshold 3
    world.lose("village-00-1", "village-01-1", "village-02-1")
    world.run(HOUR)
    ops = [d for d in world.mails() if d.notify == ("ops",)]
    assert [(d.action, d.alert.subject) for d in ops] == [("sent", "pudong")]
    assert ops[0].recipients == ("ops@pudong.example.cn",)
    assert ops[0].alert.terminals == ("village-00-1", "village-01-1", "village-02-1")
    owners = [d.alert.subject for d in world.mails() if d.notify == ("owners",)]
    assert owners == ["village-00-1", "village-01-1", "village-02-1"]
    world.connect("village-00-1")
    assert [d.action for d in world.mails() if d.notify == ("ops",)] == ["sent", "resolved"]


def test_fewer_than_three_or_under_a_tenth_is_no_district_alert() -> None:
    world = World(big_district(10, 4), at(0, 10))  # 40 terminals: threshold 4
    world.lose("village-00-1", "village-01-1", "village-02-1")
    world.run(HOUR)
    assert [d for d in world.decisions if d.alert.kind == "district-outage"] == []
    small = World(big_district(2, 1), at(0, 10))  # 2 terminals: 100 %, but fewer than 3
    small.lose("village-00-1", "village-01-1")
    small.run(HOUR)
    assert [d for d in small.decisions if d.alert.kind == "district-outage"] == []


def test_kiosks_switched_off_at_night_do_not_page_ops() -> None:
    world = World(big_district(10, 3), at(0, 18))
    world.lose("village-00-1", "village-01-1", "village-02-1", "village-03-1")
    world.run_until(at(1, 8, 20))
    for terminal in ("village-00-1", "village-01-1", "village-02-1", "village-03-1"):
        world.connect(terminal)
    world.run(HOUR)
    assert world.mails() == []
    assert {d.alert.kind for d in world.decisions} == {"terminal-offline"}


def test_a_paper_change_does_not_alert() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.peripherals("town-a-1", id_card_reader="ok", receipt_printer="faulty")
    world.run(20 * SECOND, step_ms=10 * SECOND)
    world.peripherals("town-a-1", id_card_reader="ok", receipt_printer="ok")
    world.run(HOUR)
    assert world.decisions == []


def test_peripheral_faults_of_a_terminal_are_one_alert() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.peripherals("town-a-1", id_card_reader="ok", receipt_printer="faulty")
    world.run(2 * MINUTE)
    world.peripherals("town-a-1", id_card_reader="absent", receipt_printer="faulty")
    world.run(8 * MINUTE)
    assert world.summary() == [("sent", "peripherals", "town-a-1")]
    faults = world.mails()[0].alert.faults
    assert [(f.role, f.state) for f in faults] == [
        ("id_card_reader", "absent"),
        ("receipt_printer", "faulty"),
    ]
    assert world.mails()[0].at_ms == at(0, 10, 5)
    world.peripherals("town-a-1", id_card_reader="ok", receipt_printer="faulty")
    world.run(MINUTE)
    assert [d.action for d in world.decisions] == ["sent", "updated"]
    world.peripherals("town-a-1", id_card_reader="ok", receipt_printer="ok")
    assert world.summary()[-1] == ("resolved", "peripherals", "town-a-1")


def test_a_degraded_printer_or_a_broken_camera_does_not_alert() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.peripherals("town-a-1", receipt_printer="degraded", document_camera="faulty")
    world.run(HOUR)
    assert world.decisions == []


def test_peripheral_alerts_wait_while_their_terminal_is_down() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.peripherals("town-a-1", receipt_printer="faulty")
    world.lose("town-a-1")
    world.run(HOUR)
    assert world.summary() == [("sent", "terminal-offline", "town-a-1")]
    assert ("suppressed", "terminal-down") in [(d.action, d.reason) for d in world.decisions]
    world.connect("town-a-1")
    world.run(MINUTE)
    assert world.summary()[1:] == [
        ("resolved", "terminal-offline", "town-a-1"),
        ("sent", "peripherals", "town-a-1"),
    ]


def test_reminders_every_four_hours_and_one_escalation_after_two() -> None:
    world = World(fleet_of((site("zone-24", open_24h=True), 2)), at(0, 0))
    world.lose("zone-24-1")
    world.run(5 * MINUTE)
    world.run(13 * HOUR)
    assert [(d.action, d.at_ms - at(0, 0, 5)) for d in world.mails()] == [
        ("sent", 0),
        ("escalated", 2 * HOUR),
        ("reminded", 4 * HOUR),
        ("reminded", 8 * HOUR),
        ("reminded", 12 * HOUR),
    ]
    escalated = world.mails()[1]
    assert (escalated.notify, escalated.recipients) == (("ops",), ("ops@pudong.example.cn",))
    world.connect("zone-24-1")
    recovery = world.mails()[-1]
    assert recovery.action == "resolved"
    assert recovery.recipients == ("owner@zone-24.example.cn", "ops@pudong.example.cn")


def test_reminders_wait_for_opening_hours() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.lose("town-a-1")
    world.run_until(at(1, 10))
    reminders = [d.at_ms for d in world.mails() if d.action == "reminded"]
    assert reminders == [at(0, 14, 5), at(1, 8, 30)]


def test_an_acknowledged_alert_is_neither_reminded_nor_escalated() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.lose("town-a-1")
    world.run(HOUR)
    (sent,) = world.mails()
    (acked,) = world.ack(sent.alert.id)
    assert (acked.action, acked.reason, acked.notify) == ("acknowledged", "王芳", ())
    assert world.ack(sent.alert.id) == []
    assert world.ack("terminal-offline:nope:1") == []
    world.run(10 * HOUR)
    assert [d.action for d in world.mails()] == ["sent"]


def test_decision_keys_are_unique_and_stable() -> None:
    world = World(ONE_SITE, at(0, 10))
    world.lose("town-a-1")
    world.run(9 * HOUR)
    world.connect("town-a-1")
    keys = [d.key for d in world.decisions]
    assert len(set(keys)) == len(keys)
    alert_id = f"terminal-offline:town-a-1:{at(0, 10)}"
    assert keys[:2] == [f"{alert_id}/sent", f"{alert_id}/escalated"]
    assert keys[-1] == f"{alert_id}/resolved"


def test_the_fleet_must_place_terminals_at_known_sites() -> None:
    with pytest.raises(ValueError, match="unknown sites"):
        Fleet(sites={}, terminals={"kiosk-001": "nowhere"})


# --- snapshot and restore -----------------------------------------------------------------

MIXED = fleet_of((site("town-a"), 3), (site("zone-24", open_24h=True), 1), (site("bank-b"), 2))
TERMINALS = sorted(MIXED.terminals)

Step = tuple[str, int, int]
steps = st.lists(
    st.tuples(
        st.sampled_from(["lose", "connect", "plan", "paper", "fix", "ack", "wait"]),
        st.integers(0, len(TERMINALS) - 1),
        st.integers(1, 5 * 60),  # minutes of waiting after the step
    ),
    min_size=1,
    max_size=25,
)


def play(world: World, step: Step) -> None:
    action, index, minutes = step
    terminal = TERMINALS[index]
    if action == "lose" and terminal in world.connected:
        world.lose(terminal)
    elif action in ("connect", "lose"):
        world.connect(terminal)
    elif action == "plan" and terminal in world.connected:
        world.plan(terminal, back_in_ms=minutes * MINUTE // 2)
    elif action == "paper":
        world.peripherals(terminal, receipt_printer="faulty", id_card_reader="ok")
    elif action == "fix":
        world.peripherals(terminal, receipt_printer="ok", id_card_reader="ok")
    elif action == "ack" and world.policy.alerts():
        alerts = world.policy.alerts()
        world.ack(alerts[index % len(alerts)].id)
    world.run(minutes * MINUTE, step_ms=2 * MINUTE)


def restart(world: World) -> None:
    """The server stops and starts again at once, from what it persisted (through JSON)."""
    table = msgspec.json.decode(msgspec.json.encode(world.table.snapshot()), type=PresenceSnapshot)
    policy = msgspec.json.decode(msgspec.json.encode(world.policy.snapshot()), type=PolicySnapshot)
    world.table = PresenceTable.restore(table, world.now)
    world.policy = AlertPolicy.restore(policy, MIXED)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=steps, cut=st.integers(0, 25))
def test_a_restart_mid_way_decides_exactly_as_an_uninterrupted_run(
    script: list[Step], cut: int
) -> None:
    straight = World(MIXED, at(0, 7))
    resumed = World(MIXED, at(0, 7))
    for i, step in enumerate(script):
        if i == cut:
            restart(resumed)
        play(straight, step)
        play(resumed, step)
    assert resumed.decisions == straight.decisions
    keys = [d.key for d in straight.decisions]
    assert len(set(keys)) == len(keys)
    # Whatever happened, nobody is told twice that the same thing was sent or resolved.
    mailed = [(d.alert.id, d.action) for d in straight.mails() if d.action != "reminded"]
    assert len(set(mailed)) == len(mailed)


# A district of 18 terminals (threshold 3): three weekday sites and three 24-hour zones.
DISTRICT = fleet_of(
    *[(site(f"village-{n}"), 3) for n in range(3)],
    *[(site(f"zone-{n}", open_24h=True), 3) for n in range(3)],
)
DISTRICT_TERMINALS = sorted(DISTRICT.terminals)

moves = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["lose", "connect"]), st.sets(st.integers(0, 17), max_size=6)),
        st.tuples(st.just("wait"), st.integers(1, 90)),
        st.tuples(st.sampled_from(["move", "restart"]), st.just(0)),
    ),
    min_size=1,
    max_size=30,
)


def make_move(world: World, action: str, arg: object) -> None:
    """One move of the district test; ``move`` takes zone-2 to another district, or back."""
    if action in ("lose", "connect"):
        chosen = [DISTRICT_TERMINALS[i] for i in sorted(arg)]  # type: ignore[call-overload]
        if action == "lose":
            world.lose(*[t for t in chosen if t in world.connected])
        for terminal in chosen if action == "connect" else ():
            if terminal not in world.connected:
                world.connect(terminal)
    elif action == "wait":
        world.run(arg * MINUTE, step_ms=5 * MINUTE)  # type: ignore[operator]
    elif action == "move":
        zone = world.policy.fleet.sites["zone-2"]
        zone = replace(zone, district="minhang" if zone.district == "pudong" else "pudong")
        others = [(p, 3) for p in DISTRICT.sites.values() if p.site != "zone-2"]
        world.policy.fleet = fleet_of(*others, (zone, 3))
    else:
        snapshot = msgspec.json.encode(world.policy.snapshot())
        world.policy = AlertPolicy.restore(
            msgspec.json.decode(snapshot, type=PolicySnapshot), world.policy.fleet
        )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=moves)
def test_the_district_alert_follows_the_rule_whatever_the_order_of_changes(
    script: list[tuple[str, object]],
) -> None:
    """Open as soon as 3 terminals at open sites are offline; close once fewer than 3 are.

    Changes arrive several at one moment (as in a broker restart), time crosses closing time,
    a site moves to another district and back, the server restarts: the alert keeps the rule,
    and once time has passed it lists exactly the district's offline terminals.
    """
    world = World(DISTRICT, at(0, 16, 30))
    status: dict[str, str] = {}
    feed = world.feed

    def feed_and_watch(transitions: list[Transition]) -> None:
        status.update({t.terminal: t.new for t in transitions})
        feed(transitions)

    world.feed = feed_and_watch  # type: ignore[method-assign]
    settled = True
    for action, arg in script:
        make_move(world, action, arg)
        # A new fleet counts from the next tick (or from a change in that district).
        settled = action == "wait" or (settled and action != "move")
        if not settled:
            continue
        fleet = world.policy.fleet
        pudong = fleet.terminals_of_district("pudong")
        offline = sorted(t for t, s in status.items() if s == "offline" and t in pudong)
        serving = [t for t in offline if fleet.sites[fleet.terminals[t]].is_open(world.now)]
        alerts = [a for a in world.policy.alerts() if a.subject == "pudong"]
        if len(serving) >= 3:
            assert alerts, f"{serving} are offline at open sites, and no alert"
        for alert in alerts:
            assert len(offline) >= 3, f"the alert stays open with only {offline} offline"
            if action == "wait":
                assert list(alert.terminals) == offline
    for decision in world.decisions:
        if decision.alert.subject == "pudong" and decision.action == "resolved":
            assert len(decision.alert.terminals) >= 3  # what was down, not what is left
