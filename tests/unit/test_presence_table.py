"""The presence table: births, wills, silence, planned absences and flapping, on a fake clock."""

from __future__ import annotations

import msgspec
import pytest

from fleet_protocol.messages import State
from fleet_server.presence_table import (
    MINUTE,
    SECOND,
    PresenceSettings,
    PresenceSnapshot,
    PresenceTable,
    Transition,
)

T = "kiosk-001"
START = 1_700_000_000_000


def birth(session: int) -> State:
    return State(online=True, session=session, ts=1)


def will(session: int) -> State:
    return State(online=False, session=session, ts=1, reason="lost")


def planned(session: int, back_ms: int) -> State:
    return State(online=False, session=session, ts=1, reason="planned", expected_back=back_ms)


def moves(transitions: list[Transition]) -> list[tuple[str, str, str]]:
    return [(t.old, t.new, t.reason) for t in transitions]


@pytest.fixture
def table() -> PresenceTable:
    return PresenceTable()


def test_a_birth_makes_an_unknown_terminal_online(table: PresenceTable) -> None:
    assert table.status(T) == "unknown"
    assert table.on_state(T, birth(1), START) == [
        Transition(T, "unknown", "online", START, "birth", 1)
    ]
    assert table.status(T) == "online"


def test_a_will_takes_it_offline_and_a_late_will_of_an_old_session_is_ignored(
    table: PresenceTable,
) -> None:
    table.on_state(T, birth(1), START)
    assert moves(table.on_state(T, will(1), START + SECOND)) == [("online", "offline", "lost")]
    table.on_state(T, birth(2), START + 2 * SECOND)
    assert table.on_state(T, will(1), START + 3 * SECOND) == []
    assert table.on_state(T, birth(2), START + 4 * SECOND) == []
    assert table.status(T) == "online"


def test_silence_makes_it_stale_then_telemetry_brings_it_back(table: PresenceTable) -> None:
    table.on_state(T, birth(1), START)
    assert table.tick(START + 3 * MINUTE - 1) == []
    assert moves(table.tick(START + 3 * MINUTE)) == [("online", "stale", "no-telemetry")]
    assert moves(table.on_telemetry(T, START + 4 * MINUTE)) == [("stale", "online", "telemetry")]


def test_telemetry_keeps_it_online(table: PresenceTable) -> None:
    table.on_state(T, birth(1), START)
    for minute in range(1, 60):
        table.on_telemetry(T, START + minute * MINUTE)
        assert table.tick(START + minute * MINUTE + 30 * SECOND) == []
    assert table.status(T) == "online"


def test_heartbeat_backstop_when_the_will_never_comes(table: PresenceTable) -> None:
    table.on_state(T, birth(1), START)
    table.tick(START + 3 * MINUTE)
    assert moves(table.tick(START + 5 * MINUTE)) == [("stale", "offline", "heartbeat")]
    # The will arriving late confirms it: no second transition, a better reason.
    assert table.on_state(T, will(1), START + 6 * MINUTE) == []
    record = table.get(T)
    assert record is not None
    assert record.reason == "lost"


def test_telemetry_revives_a_heartbeat_offline_but_not_a_dead_terminal(
    table: PresenceTable,
) -> None:
    table.on_state(T, birth(1), START)
    table.tick(START + 10 * MINUTE)
    assert table.status(T) == "offline"
    # A retained redelivery of the same birth is no sign of life.
    assert table.on_state(T, birth(1), START + 11 * MINUTE) == []
    assert moves(table.on_telemetry(T, START + 12 * MINUTE)) == [("offline", "online", "telemetry")]
    table.on_state(T, will(1), START + 13 * MINUTE)
    assert table.on_telemetry(T, START + 14 * MINUTE) == []
    assert table.status(T) == "offline"


def test_a_planned_absence_back_in_time(table: PresenceTable) -> None:
    table.on_state(T, birth(1), START)
    back = START + 10 * MINUTE
    assert moves(table.on_state(T, planned(1, back), START + MINUTE)) == [
        ("online", "planned", "planned")
    ]
    assert table.tick(back + 4 * MINUTE) == []
    assert moves(table.on_state(T, birth(2), back + 4 * MINUTE)) == [("planned", "online", "birth")]


def test_a_planned_absence_past_its_deadline_is_offline(table: PresenceTable) -> None:
    table.on_state(T, birth(1), START)
    back = START + 10 * MINUTE
    table.on_state(T, planned(1, back), START + MINUTE)
    assert table.tick(back + 5 * MINUTE - 1) == []
    assert moves(table.tick(back + 5 * MINUTE)) == [("planned", "offline", "planned-overdue")]


def flap(table: PresenceTable, times: int, start: int, every_ms: int) -> list[Transition]:
    out: list[Transition] = []
    now = start
    for session in range(1, times + 1):
        out += table.on_state(T, birth(session), now)
        out += table.on_state(T, will(session), now + every_ms // 2)
        now += every_ms
    out += table.on_state(T, birth(times + 1), now)
    return out


def test_three_drops_in_ten_minutes_are_not_flapping(table: PresenceTable) -> None:
    transitions = flap(table, 3, START, MINUTE)
    assert "flapping" not in [t.new for t in transitions]
    assert len(transitions) == 7


def test_thirty_drops_give_one_flapping_transition(table: PresenceTable) -> None:
    transitions = flap(table, 30, START, 20 * SECOND)
    assert [t.new for t in transitions] == [
        "online", "offline", "online", "offline", "online", "offline", "online", "flapping"
    ]  # fmt: skip
    assert transitions[-1].reason == "flapping"


def test_flapping_ends_after_a_quiet_period(table: PresenceTable) -> None:
    flap(table, 5, START, 20 * SECOND)
    last = START + 5 * 20 * SECOND
    for minute in range(1, 10):
        assert table.on_telemetry(T, last + minute * MINUTE) == []
        assert table.tick(last + minute * MINUTE) == []
    assert moves(table.tick(last + 10 * MINUTE)) == [("flapping", "online", "stable")]


def test_flapping_ends_offline_when_it_stays_down(table: PresenceTable) -> None:
    flap(table, 5, START, 20 * SECOND)
    down = START + 6 * MINUTE
    table.on_state(T, will(6), down)
    assert table.tick(down + 10 * MINUTE - 1) == []
    assert moves(table.tick(down + 10 * MINUTE)) == [("flapping", "offline", "lost")]


def test_slow_drops_outside_the_window_are_not_flapping(table: PresenceTable) -> None:
    transitions = flap(table, 8, START, 4 * MINUTE)
    assert "flapping" not in [t.new for t in transitions]


def test_a_clock_stepping_back_stands_still(table: PresenceTable) -> None:
    table.on_state(T, birth(1), START)
    table.on_telemetry(T, START + 2 * MINUTE)
    (transition,) = table.on_state(T, will(1), START)
    assert transition.at_ms == START + 2 * MINUTE


def test_telemetry_from_an_unknown_terminal_does_not_make_it_online(
    table: PresenceTable,
) -> None:
    assert table.on_telemetry(T, START) == []
    assert table.status(T) == "unknown"


def test_restore_resumes_without_spurious_transitions(table: PresenceTable) -> None:
    table.on_state(T, birth(1), START)
    table.on_state("kiosk-002", birth(1), START)
    table.on_state("kiosk-002", will(1), START + MINUTE)
    table.on_telemetry(T, START + 2 * MINUTE)
    saved = table.snapshot()
    wire = msgspec.json.decode(msgspec.json.encode(saved), type=PresenceSnapshot)
    assert wire == saved
    # The server was down for an hour: no news is not bad news.
    resumed = PresenceTable.restore(wire, START + 62 * MINUTE)
    assert resumed.tick(START + 62 * MINUTE) == []
    assert resumed.on_state(T, birth(1), START + 62 * MINUTE) == []
    assert resumed.status(T) == "online"
    assert resumed.status("kiosk-002") == "offline"
    # Silence counts again from the restart.
    assert resumed.tick(START + 64 * MINUTE) == []
    assert moves(resumed.tick(START + 65 * MINUTE)) == [("online", "stale", "no-telemetry")]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        PresenceSettings(stale_after_ms=10 * MINUTE, heartbeat_timeout_ms=5 * MINUTE)
    with pytest.raises(ValueError, match="flapping"):
        PresenceSettings(flap_threshold=1)
