"""The presence table: births, wills, silence, planned absences and flapping, on a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- a tick settles what is due, with the same outcome as settling every terminal -----------


class EveryTerminalTable(PresenceTable):
    """The reference: a tick settles every terminal, however quiet (what `tick` did before
    it kept deadlines)."""

    def tick(self, now_ms: int) -> list[Transition]:
        now = self._clock(now_ms)
        out: list[Transition] = []
        for terminal in sorted(self._records):
            out += self._settle(terminal, self._records[terminal], now, cause="telemetry")
        return out


TERMINALS = ("kiosk-001", "kiosk-002", "kiosk-003")
#: Short timings, so that random steps cross every deadline often.
FAST = PresenceSettings(
    stale_after_ms=30 * SECOND,
    heartbeat_timeout_ms=50 * SECOND,
    planned_margin_ms=20 * SECOND,
    flap_window_ms=60 * SECOND,
    flap_threshold=3,
    flap_quiet_ms=40 * SECOND,
)

#: A state message, made at the time it is sent: a planned one names when it expects to be back.
_state = st.one_of(
    st.builds(lambda session: lambda _now: birth(session), st.integers(1, 4)),
    st.builds(lambda session: lambda _now: will(session), st.integers(1, 4)),
    st.builds(
        lambda session: lambda _now: State(online=False, session=session, ts=1, reason="shutdown"),
        st.integers(1, 4),
    ),
    st.builds(
        lambda session, back_s: lambda now: planned(session, now + back_s * SECOND),
        st.integers(1, 4),
        st.integers(0, 60),
    ),
)
_step = st.tuples(
    # Time that passes first, in whole seconds like every timing above: ticks land right on
    # deadlines as often as just before or after them.
    st.integers(0, 25).map(lambda s: s * SECOND),
    st.sampled_from(("tick", "tick", "telemetry", "state")),
    st.sampled_from(TERMINALS),
    _state,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_step, max_size=80), st.booleans())
def test_a_tick_that_settles_only_what_is_due_decides_as_one_that_settles_everything(
    steps: list[tuple[int, str, str, Callable[[int], State]]], restart: bool
) -> None:
    table, reference = PresenceTable(FAST), EveryTerminalTable(FAST)
    now = START
    for index, (wait, kind, terminal, make_state) in enumerate(steps):
        now += wait
        if restart and index == len(steps) // 2:
            saved = table.snapshot()
            table = PresenceTable.restore(saved, now + MINUTE, FAST)
            reference = EveryTerminalTable.restore(saved, now + MINUTE, FAST)
            now += MINUTE
        if kind == "tick":
            assert table.tick(now) == reference.tick(now)
        elif kind == "telemetry":
            assert table.on_telemetry(terminal, now) == reference.on_telemetry(terminal, now)
        else:
            state = make_state(now)
            assert table.on_state(terminal, state, now) == reference.on_state(terminal, state, now)
    # A last tick after every deadline could have passed leaves both tables agreeing.
    now += 10 * MINUTE
    assert table.tick(now) == reference.tick(now)
    for terminal in TERMINALS:
        mine, theirs = table.get(terminal), reference.get(terminal)
        assert (mine is None) == (theirs is None)
        if mine is not None and theirs is not None:
            assert (mine.status, mine.reason, mine.since_ms) == (
                theirs.status,
                theirs.reason,
                theirs.since_ms,
            )


def test_a_tick_of_a_quiet_fleet_settles_no_one() -> None:
    table = PresenceTable()
    for n in range(1000):
        table.on_state(f"kiosk-{n:04d}", birth(1), START)
    settled: list[str] = []
    original = table._settle

    def counting(terminal: str, *args: object, **kwargs: object) -> list[Transition]:
        settled.append(terminal)
        return original(terminal, *args, **kwargs)  # type: ignore[arg-type]

    table._settle = counting  # type: ignore[method-assign]
    assert table.tick(START + MINUTE) == []
    assert settled == []
    # At the stale deadline every one of them is due, and goes stale.
    assert len(table.tick(START + 3 * MINUTE)) == 1000
    assert len(settled) == 1000
