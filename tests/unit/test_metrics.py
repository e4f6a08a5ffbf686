"""The Prometheus text exposition of fleet_server.metrics: format, escaping, order, and what
the fleet server's families show (and keep out)."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from fleet_server.metrics import (
    CONTENT_TYPE,
    AlertingView,
    ClockFaultView,
    Family,
    IngestStats,
    SpoolView,
    fleet_families,
    render,
)

BASE = IngestStats(
    received={},
    rejected={},
    points_written=0,
    batches_written=0,
    write_retries=0,
    points_rejected=0,
    broker_connected=True,
)


def stats(**changes: Any) -> IngestStats:
    return msgspec.structs.replace(BASE, **changes)


def samples(text: str, name: str) -> dict[str, str]:
    """``{labels: value}`` of one family's sample lines (labels as written, "" for none)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, brace, labels = key.partition("{")
        if metric == name:
            found[brace + labels] = value
    return found


def test_each_family_has_help_and_type_then_its_samples() -> None:
    text = render(
        [
            Family.single("fleet_up", "gauge", "1 while up.", 1),
            Family.by("fleet_things_total", "counter", "Things.", "kind", {"b": 2, "a": 1}),
        ]
    )

    assert text == (
        "# HELP fleet_up 1 while up.\n"
        "# TYPE fleet_up gauge\n"
        "fleet_up 1\n"
        "# HELP fleet_things_total Things.\n"
        "# TYPE fleet_things_total counter\n"
        'fleet_things_total{kind="a"} 1\n'
        'fleet_things_total{kind="b"} 2\n'
    )


def test_label_values_and_help_text_are_escaped() -> None:
    text = render(
        [
            Family(
                "fleet_odd",
                "gauge",
                'Back\\slash and\nnewline; "quotes" stay in help.',
                (({"terminal": 'a"b\\c\nd', "site": "张江镇"}, 1),),
            )
        ]
    )

    assert text.splitlines() == [
        '# HELP fleet_odd Back\\\\slash and\\nnewline; "quotes" stay in help.',
        "# TYPE fleet_odd gauge",
        'fleet_odd{site="张江镇",terminal="a\\"b\\\\c\\nd"} 1',
    ]


def test_values_are_written_as_prometheus_reads_them() -> None:
    family = Family(
        "fleet_v",
        "gauge",
        "Values.",
        (
            ({"v": "a"}, True),
            ({"v": "b"}, False),
            ({"v": "c"}, 12_345_678_901),
            ({"v": "d"}, 0.25),
            ({"v": "e"}, math.nan),
            ({"v": "f"}, math.inf),
            ({"v": "g"}, -math.inf),
            ({"v": "h"}, 1e-7),
        ),
    )

    assert samples(render([family]), "fleet_v") == {
        '{v="a"}': "1",
        '{v="b"}': "0",
        '{v="c"}': "12345678901",
        '{v="d"}': "0.25",
        '{v="e"}': "NaN",
        '{v="f"}': "+Inf",
        '{v="g"}': "-Inf",
        '{v="h"}': "1e-07",
    }


def test_output_does_not_depend_on_the_order_samples_came_in() -> None:
    forward = {"b": 1, "a": 2, "c": 3}
    backward = dict(reversed(forward.items()))

    one = render([Family.by("fleet_x", "gauge", "X.", "k", forward)])
    two = render([Family.by("fleet_x", "gauge", "X.", "k", backward)])

    assert one == two
    assert list(samples(one, "fleet_x")) == ['{k="a"}', '{k="b"}', '{k="c"}']


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("fleet-x", {}),
        ("1fleet", {}),
        ("fleet_x", {"bad-label": "v"}),
        ("fleet_x", {"__reserved": "v"}),
    ],
)
def test_a_bad_name_is_our_bug_and_raises(name: str, labels: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="not a"):
        Family(name, "gauge", "X.", ((labels, 1),))


def test_two_samples_with_the_same_labels_raise() -> None:
    with pytest.raises(ValueError, match="two samples"):
        Family("fleet_x", "gauge", "X.", (({"a": "1"}, 1), ({"a": "1"}, 2)))


def test_nothing_renders_as_nothing() -> None:
    assert render([]) == ""


def test_the_content_type_is_the_text_format_0_0_4() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_fleet_families_count_by_reason_and_list_only_flagged_terminals() -> None:
    snapshot = stats(
        received={"telemetry": 40, "state": 3},
        rejected={"kiosk-a": {"malformed": 2, "too_large": 1}, "kiosk-b": {"malformed": 1}},
        points_written=1200,
        write_retries=4,
        spool=SpoolView(batches=3, points=150, bytes=9000, max_bytes=1 << 30, points_replayed=7),
        quarantined={"kiosk-c": {"future": 5}},
        clock_faults={
            "kiosk-c": ClockFaultView(first_ms=1, last_ms=2, offset_ms=7_200_000, count=5)
        },
        flooding=["kiosk-a"],
    )

    text = render(fleet_families(snapshot, {"online": 2, "offline": 1}, {"sent": 4, "failed": 1}))

    assert samples(text, "fleet_ingest_messages_total") == {
        '{channel="cmd"}': "0",
        '{channel="cmd-result"}': "0",
        '{channel="desired"}': "0",
        '{channel="events"}': "0",
        '{channel="peripherals"}': "0",
        '{channel="reported"}': "0",
        '{channel="state"}': "3",
        '{channel="telemetry"}': "40",
    }
    # By reason over all terminals; known reasons show as 0 before the first happens.
    assert samples(text, "fleet_ingest_rejected_total") == {
        '{reason="bad_topic"}': "0",
        '{reason="malformed"}': "3",
        '{reason="schema"}': "0",
        '{reason="too_large"}': "1",
        '{reason="unstorable"}': "0",
    }
    assert samples(text, "fleet_ingest_quarantined_samples_total") == {
        '{reason="future"}': "5",
        '{reason="too_old"}': "0",
    }
    assert samples(text, "fleet_terminal_clock_fault") == {'{terminal="kiosk-c"}': "1"}
    assert samples(text, "fleet_terminal_clock_offset_seconds") == {
        '{terminal="kiosk-c"}': "7200.0"
    }
    assert samples(text, "fleet_clock_fault_terminals") == {"": "1"}
    assert samples(text, "fleet_terminal_flooding") == {'{terminal="kiosk-a"}': "1"}
    assert samples(text, "fleet_flooding_terminals") == {"": "1"}
    assert samples(text, "fleet_terminals") == {'{state="offline"}': "1", '{state="online"}': "2"}
    assert samples(text, "fleet_mail_total") == {'{outcome="failed"}': "1", '{outcome="sent"}': "4"}
    assert samples(text, "fleet_spool_batches") == {"": "3"}
    assert samples(text, "fleet_spool_points") == {"": "150"}
    assert samples(text, "fleet_spool_bytes") == {"": "9000"}
    assert samples(text, "fleet_spool_replayed_points_total") == {"": "7"}
    assert samples(text, "fleet_influx_points_written_total") == {"": "1200"}
    assert samples(text, "fleet_influx_write_retries_total") == {"": "4"}
    assert samples(text, "fleet_broker_connected") == {"": "1"}
    # kiosk-b is neither faulty nor flooding: no series names it.
    assert "kiosk-b" not in text
    # Every family is announced once, before its samples.
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))


def test_the_alerting_loop_shows_whether_it_leads_and_what_failed() -> None:
    view = AlertingView(leading=True, decisions=7, mails_queued=3, registry_errors=2)
    text = render(fleet_families(stats(), {}, None, view))
    assert samples(text, "fleet_alerting_leader") == {"": "1"}
    assert samples(text, "fleet_alert_decisions_total") == {"": "7"}
    assert samples(text, "fleet_alert_mails_queued_total") == {"": "3"}
    assert samples(text, "fleet_alerting_inputs_dropped_total") == {"": "0"}
    assert samples(text, "fleet_alerting_registry_errors_total") == {"": "2"}
    follower = render(fleet_families(stats(), {}, None, AlertingView()))
    assert samples(follower, "fleet_alerting_leader") == {"": "0"}
    assert "fleet_alerting" not in render(fleet_families(stats(), {}))


def test_without_a_mailer_there_is_no_mail_family() -> None:
    text = render(fleet_families(stats(), {}))
    assert "fleet_mail_total" not in text
    assert samples(text, "fleet_terminal_clock_fault") == {}
    assert "# TYPE fleet_terminal_clock_fault gauge" in text
