"""The kiosk clock against the fleet server's, with fake clocks: offset, round trip, bound."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from edge_agent.clock import (
    ClockCheck,
    ClockMeasurement,
    ClockUnavailable,
    ClockVerdict,
    FixedClockReference,
    OffsetEstimate,
    measure,
)
from edge_agent.enrolment_client import clock_base_url
from edge_agent.errors import AgentError, EnrolmentError

TRUE_MS = 1_732_190_400_000


class FakeNetwork:
    """A server whose clock is the true time, reached over a link with a set delay each way.

    The kiosk's clock is the true time plus ``skew_ms``; asking the server advances the true
    time by the delay there and the delay back.
    """

    def __init__(self, skew_ms: int, delays: Iterator[tuple[int, int]]) -> None:
        self.true_ms = TRUE_MS
        self.skew_ms = skew_ms
        self._delays = delays

    def kiosk_ms(self) -> int:
        return self.true_ms + self.skew_ms

    async def server_time_ms(self) -> int:
        there, back = next(self._delays)
        self.true_ms += there
        answer = self.true_ms
        self.true_ms += back
        return answer


def test_a_kiosk_ahead_of_the_server_has_a_positive_offset() -> None:
    net = FakeNetwork(skew_ms=90_000, delays=iter([(20, 20)]))
    m = asyncio.run(measure(net, net.kiosk_ms))
    assert m.rtt_ms == 40
    assert m.offset_ms == 90_000


def test_a_kiosk_behind_the_server_has_a_negative_offset() -> None:
    net = FakeNetwork(skew_ms=-3_600_000, delays=iter([(5, 5)]))
    m = asyncio.run(measure(net, net.kiosk_ms))
    assert m.offset_ms == -3_600_000


def test_an_asymmetric_link_errs_by_at_most_half_the_round_trip() -> None:
    net = FakeNetwork(skew_ms=0, delays=iter([(300, 10)]))
    m = asyncio.run(measure(net, net.kiosk_ms))
    assert m.offset_ms == -145  # the server answered late in the round trip
    assert abs(m.offset_ms) <= m.error_ms


def test_the_estimate_is_the_measurement_with_the_shortest_round_trip() -> None:
    # The first round trip pays for the TLS handshake and is lopsided; the later ones are not.
    net = FakeNetwork(skew_ms=2_000, delays=iter([(400, 30), (15, 15), (60, 20)]))
    estimate = OffsetEstimate()
    offset = asyncio.run(estimate.measure(net, net.kiosk_ms, rounds=3))
    assert offset == 2_000
    assert estimate.best is not None
    assert estimate.best.rtt_ms == 30


def test_nothing_measured_means_no_offset() -> None:
    estimate = OffsetEstimate()
    assert estimate.offset_ms is None
    assert estimate.best is None


def test_only_the_last_few_measurements_count() -> None:
    estimate = OffsetEstimate(keep=3)
    estimate.add(ClockMeasurement(sent_ms=0, received_ms=2, server_ms=1))  # rtt 2
    for i in range(3):
        start = 1_000 * (i + 1)
        estimate.add(ClockMeasurement(sent_ms=start, received_ms=start + 50, server_ms=start + 25))
    best = estimate.best
    assert best is not None
    assert best.rtt_ms == 50  # the excellent first one has aged out


def test_a_measurement_across_a_clock_step_back_is_ignored() -> None:
    estimate = OffsetEstimate()
    assert not estimate.add(ClockMeasurement(sent_ms=10_000, received_ms=9_000, server_ms=9_500))
    assert estimate.offset_ms is None


def test_after_the_clock_is_corrected_the_old_offset_is_forgotten_at_once() -> None:
    estimate = OffsetEstimate()
    # Ten minutes ahead, measured over a fast link...
    estimate.add(ClockMeasurement(sent_ms=600_000, received_ms=600_010, server_ms=5))
    assert estimate.offset_ms == 600_000
    # ...then NTP steps the clock; the next measurement has a slower round trip but is the
    # only one that describes the clock as it is now.
    estimate.add(ClockMeasurement(sent_ms=1_000, received_ms=1_200, server_ms=1_100))
    assert estimate.offset_ms == 0


def test_the_reference_failing_keeps_what_was_measured() -> None:
    class Unreachable:
        async def server_time_ms(self) -> int:
            raise ClockUnavailable("cannot reach the fleet server")

    estimate = OffsetEstimate()
    estimate.add(ClockMeasurement(sent_ms=100, received_ms=120, server_ms=60))
    with pytest.raises(ClockUnavailable):
        asyncio.run(estimate.measure(Unreachable(), lambda: 200))
    assert estimate.offset_ms == 50
    assert issubclass(ClockUnavailable, AgentError)


def test_a_fixed_reference_is_the_simulators_true_clock() -> None:
    true_ms = [TRUE_MS]
    reference = FixedClockReference(lambda: true_ms[0])
    skewed_kiosk = [TRUE_MS + 45_000]
    m = asyncio.run(measure(reference, lambda: skewed_kiosk[0]))
    assert (m.rtt_ms, m.offset_ms) == (0, 45_000)


# --- the bound -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "verdict"),
    [
        (None, ClockVerdict.UNKNOWN),
        (0.0, ClockVerdict.OK),
        (5_000.0, ClockVerdict.OK),
        (-5_000.0, ClockVerdict.OK),
        (5_000.5, ClockVerdict.WRONG),
        (-5_001.0, ClockVerdict.WRONG),
    ],
)
def test_a_clock_beyond_the_bound_either_way_is_wrong(
    offset: float | None, verdict: ClockVerdict
) -> None:
    check = ClockCheck(max_offset_ms=5_000)
    assert check.verdict(offset) is verdict
    assert check.view(offset).wrong == (verdict is ClockVerdict.WRONG)


def test_a_wrong_clock_is_reported_once_and_its_recovery_once() -> None:
    check = ClockCheck(max_offset_ms=5_000)
    seen = [
        check.update(offset)
        for offset in [None, 200.0, 300.0, 60_000.0, 61_000.0, None, 59_000.0, 100.0, 90.0]
    ]
    assert seen == [
        None,  # not measured yet
        None,  # fine from the start: nothing to report
        None,
        ClockVerdict.WRONG,
        None,
        None,  # the server out of reach does not make the clock right
        None,
        ClockVerdict.OK,
        None,
    ]


def test_a_clock_wrong_from_the_start_is_reported() -> None:
    check = ClockCheck(max_offset_ms=5_000)
    assert check.update(-86_400_000.0) is ClockVerdict.WRONG


def test_the_words_say_which_way_and_what_to_do_chinese_first() -> None:
    check = ClockCheck(max_offset_ms=5_000)
    ahead = check.describe(90_000.0)
    assert "快 90.0 秒" in ahead.zh
    assert "超过允许的 5 秒" in ahead.zh
    assert "NTP" in ahead.zh
    assert "90.0 s ahead" in ahead.en
    behind = check.describe(-7_500.0)
    assert "慢 7.5 秒" in behind.zh
    assert "7.5 s behind" in behind.en
    assert "正常" in check.describe(120.0).zh


def test_a_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ClockCheck(max_offset_ms=0)


# --- where the clock endpoint is -------------------------------------------------------------


@pytest.mark.parametrize(
    ("renew_url", "base"),
    [
        ("https://fleet.example.gov.cn:8701/enroll/v1/renew", "https://fleet.example.gov.cn:8701"),
        ("https://127.0.0.1:45123/enroll/v1/renew", "https://127.0.0.1:45123"),
        ("https://gw.example.gov.cn/fleet/enroll/v1/renew", "https://gw.example.gov.cn/fleet"),
        ("https://fleet.example.gov.cn:8701/other/renew", "https://fleet.example.gov.cn:8701"),
    ],
)
def test_the_clock_is_asked_where_the_certificate_is_renewed(renew_url: str, base: str) -> None:
    assert clock_base_url(renew_url) == base


def test_a_renewal_url_that_is_not_https_gives_no_clock() -> None:
    with pytest.raises(EnrolmentError, match="https"):
        clock_base_url("http://fleet.example.gov.cn:8701/enroll/v1/renew")
