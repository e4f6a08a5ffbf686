"""Which state wins: the session ordering that keeps a late will from flipping a terminal."""

from __future__ import annotations

from fleet_protocol.messages import State
from fleet_server.presence import Presence, apply_state


def birth(session: int) -> State:
    return State(online=True, session=session, ts=1)


def death(session: int, reason: str = "lost") -> State:
    if reason == "planned":
        return State(online=False, session=session, ts=1, reason="planned", expected_back=5)
    return State(online=False, session=session, ts=1, reason=reason)  # type: ignore[arg-type]


def run(*messages: State) -> Presence | None:
    current: Presence | None = None
    for i, message in enumerate(messages):
        current = apply_state(current, message, received_ms=1000 + i) or current
    return current


def test_first_birth_makes_the_terminal_online() -> None:
    p = apply_state(None, birth(1), 1000)
    assert p == Presence(online=True, session=1, since_ms=1000)


def test_death_of_the_current_session_makes_it_offline_with_the_reason() -> None:
    p = run(birth(4), death(4))
    assert p is not None
    assert (p.online, p.session, p.reason) == (False, 4, "lost")


def test_late_death_of_an_earlier_session_is_ignored() -> None:
    p = run(birth(4), death(4), birth(5), death(4))
    assert p is not None
    assert (p.online, p.session) == (True, 5)


def test_a_repeat_of_the_same_state_changes_nothing() -> None:
    first = apply_state(None, birth(2), 1000)
    assert first is not None
    assert apply_state(first, birth(2), 2000) is None
    down = apply_state(first, death(2), 3000)
    assert down is not None
    assert apply_state(down, death(2), 4000) is None


def test_a_stale_birth_after_its_own_death_is_ignored() -> None:
    p = run(birth(3), death(3), birth(3))
    assert p is not None
    assert p.online is False


def test_a_terminal_whose_counter_was_reset_still_comes_back_online() -> None:
    p = run(birth(57), death(57), birth(1))
    assert p is not None
    assert (p.online, p.session) == (True, 1)


def test_an_older_birth_does_not_replace_a_newer_online_session() -> None:
    p = run(birth(9), birth(8))
    assert p is not None
    assert p.session == 9


def test_a_death_for_a_newer_session_we_never_saw_born_counts() -> None:
    p = run(birth(2), death(3))
    assert p is not None
    assert (p.online, p.session) == (False, 3)


def test_planned_shutdown_carries_the_expected_return() -> None:
    p = run(birth(2), death(2, "planned"))
    assert p is not None
    assert (p.reason, p.expected_back_ms) == ("planned", 5)
