"""A site's schedule decides whether an offline terminal is worth an e-mail right now.

Times are built in Shanghai wall time and compared as epoch milliseconds, the clock the alerting
engine uses. October 2026: the 1st is a Thursday, 国庆 runs 1-7 October, the 11th is a Sunday.
"""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol.sites import (
    Calendar,
    Interval,
    InvalidSite,
    MakeupDay,
    OpeningHours,
    Owner,
    Schedule,
    Site,
    SiteKind,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
HOUR = 3600 * 1000


def at(day: int, hour: int, minute: int = 0, month: int = 10, *, zone: ZoneInfo = SHANGHAI) -> int:
    local = datetime(2026, month, day, hour, minute, tzinfo=zone)
    return int(local.timestamp()) * 1000


def iv(text: str) -> tuple[Interval, ...]:
    return tuple(Interval.parse(part) for part in text.split(","))


OFFICE = OpeningHours(
    mon=iv("08:30-12:00,13:30-17:00"),
    tue=iv("08:30-12:00,13:30-17:00"),
    wed=iv("08:30-12:00,13:30-17:00"),
    thu=iv("08:30-12:00,13:30-17:00"),
    fri=iv("08:30-11:30"),
    sat=iv("09:00-12:00"),
)
GUOQING = Calendar(
    closed=frozenset(date(2026, 10, d) for d in range(1, 8)),
    workdays=frozenset({MakeupDay(date(2026, 10, 11)), MakeupDay(date(2026, 9, 20), "fri")}),
)


NO_HOLIDAYS = Calendar()


def office(calendar: Calendar = NO_HOLIDAYS) -> Schedule:
    return Schedule(hours=OFFICE, calendar=calendar)


def test_open_inside_hours_and_closed_at_the_end_of_an_interval() -> None:
    schedule = office()  # 12 October 2026 is a Monday
    assert not schedule.is_open(at(12, 8, 30) - 1)
    assert schedule.is_open(at(12, 8, 30))
    assert schedule.is_open(at(12, 12) - 1)
    assert not schedule.is_open(at(12, 12))  # the end is exclusive: lunch
    assert schedule.open_interval_at(at(12, 14)) == (at(12, 13, 30), at(12, 17))
    assert schedule.open_interval_at(at(12, 12, 30)) is None
    assert not schedule.is_open(at(18, 10))  # Sunday


def test_local_date_not_utc_date_decides_the_day() -> None:
    # 00:30 on Tuesday in Shanghai is still Monday in UTC.
    schedule = Schedule(hours=OpeningHours(tue=iv("00:00-01:00")))
    assert schedule.is_open(at(13, 0, 30))
    assert not schedule.is_open(at(12, 0, 30))


def test_an_interval_ending_at_midnight_is_followed_by_the_next_days_interval() -> None:
    schedule = Schedule(hours=OpeningHours(mon=iv("22:00-24:00"), tue=iv("00:00-02:00")))
    assert schedule.is_open(at(13, 0) - 1)
    assert schedule.open_interval_at(at(12, 23)) == (at(12, 22), at(13, 0))
    assert schedule.open_interval_at(at(13, 0)) == (at(13, 0), at(13, 2))
    assert schedule.next_opening_ms(at(12, 23)) == at(13, 0)  # not merged
    assert not schedule.is_open(at(13, 2))


def test_a_holiday_on_a_weekday_is_closed_all_day() -> None:
    schedule = office(GUOQING)
    assert not schedule.is_open(at(1, 10))  # Thursday, 国庆
    assert schedule.open_interval_at(at(1, 10)) is None
    assert schedule.is_open(at(8, 10))  # Thursday after the holiday


def test_a_makeup_sunday_is_worked_with_mondays_hours() -> None:
    schedule = office(GUOQING)
    assert schedule.is_open(at(11, 16))  # 调休 Sunday, Monday's afternoon
    assert not schedule.is_open(at(11, 12, 30))
    assert not schedule.is_open(at(18, 16))  # an ordinary Sunday


def test_a_makeup_day_can_borrow_another_weekdays_hours() -> None:
    schedule = office(GUOQING)
    assert schedule.is_open(at(20, 11, 0, month=9))  # Sunday as Friday: 08:30-11:30
    assert not schedule.is_open(at(20, 14, 0, month=9))


def test_next_opening_after_the_long_national_day_holiday() -> None:
    schedule = office(GUOQING)
    assert schedule.next_opening_ms(at(30, 17, month=9)) == at(8, 8, 30)


def test_next_opening_while_open_is_the_next_interval() -> None:
    schedule = office()
    assert schedule.next_opening_ms(at(12, 8, 30)) == at(12, 13, 30)
    assert schedule.next_opening_ms(at(12, 8, 29)) == at(12, 8, 30)
    assert schedule.next_opening_ms(at(17, 12)) == at(19, 8, 30)  # Saturday noon to Monday


def test_a_site_without_hours_never_opens() -> None:
    schedule = Schedule(calendar=GUOQING)
    assert not schedule.is_open(at(11, 10))
    assert schedule.next_opening_ms(at(1, 0)) is None


def test_a_24_hour_site_is_always_open_even_on_holidays() -> None:
    schedule = Schedule(open_24h=True, calendar=GUOQING)
    for instant in (at(1, 3), at(3, 23, 59), at(18, 12)):
        assert schedule.is_open(instant)
    assert schedule.next_opening_ms(at(1, 3)) is None  # never opens: it never closes
    assert schedule.open_interval_at(at(1, 3)) == (at(1, 0), at(2, 0))


def test_zoneinfo_is_used_for_any_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")  # DST starts on 29 March 2026
    schedule = Schedule(hours=OpeningHours(sun=iv("08:00-09:00")), timezone="Europe/Berlin")
    start = at(29, 8, month=3, zone=berlin)
    assert schedule.open_interval_at(start) == (start, start + HOUR)
    assert schedule.next_opening_ms(at(22, 9, month=3, zone=berlin)) == start


@pytest.mark.parametrize(
    ("build", "field", "problem"),
    [
        (lambda: Interval.parse("25:00-26:00"), "hours", '"25:00" is not a time of day'),
        (lambda: Interval.parse("12:00-11:00"), "hours", "12:00-11:00 does not end after"),
        (lambda: Interval.parse("24:00-24:00"), "hours", "does not end after it starts"),
        (lambda: Interval.parse("08:60-09:00"), "hours", "not a time of day"),
        (lambda: Interval.parse("8.30-12"), "hours", "not a time of day"),
        (lambda: OpeningHours(mon=iv("08:00-12:00,11:00-13:00")), "hours", "mon: 08:00-12:00 and"),
        (lambda: OpeningHours(tue=iv("13:00-14:00,08:00-09:00")), "hours", "list intervals in"),
        (lambda: OpeningHours(wed=iv("08:00-12:00,12:00-13:00")), "hours", "one, 08:00-13:00"),
        (lambda: Schedule(open_24h=True, hours=OFFICE), "hours", "24-hour site has no"),
        (lambda: Schedule(timezone="Asia/Shanghia"), "timezone", "not a known time zone"),
        (lambda: Schedule(timezone="../etc/passwd"), "timezone", "not a known time zone"),
        (
            lambda: Calendar(
                closed=GUOQING.closed, workdays=frozenset({MakeupDay(date(2026, 10, 3))})
            ),
            "workdays",
            "2026-10-03 is both closed and a make-up day",
        ),
        (lambda: Owner("王磊", "wang@"), "owners", '"wang@" is not an e-mail address'),
        (lambda: Owner("王磊", "wang lei@x.cn"), "owners", "is not an e-mail address"),
        (lambda: Owner("王, 磊", "w@x.cn"), "owners", "may not contain"),
        (lambda: Owner("王磊\r\nBcc: x", "w@x.cn"), "owners", "control character"),
        (lambda: Owner("王磊 <x@y.cn>", "w@x.cn"), "owners", "may not contain"),
        (lambda: SiteKind.parse("超市"), "kind", "mall (商场)"),
    ],
)
def test_invalid_records_name_the_field(build: object, field: str, problem: str) -> None:
    assert callable(build)
    with pytest.raises(InvalidSite) as caught:
        build()
    assert caught.value.field == field
    assert problem in caught.value.problem


OWNER = Owner("王磊", "wang.lei@zhujing.example.gov.cn")


def site(**changes: object) -> Site:
    fields: dict[str, object] = {
        "id": "zhujing-dqzx",
        "name": "朱泾镇党群服务中心",
        "district": "金山区",
        "town": "朱泾镇",
        "kind": SiteKind.PARTY_MASS_CENTRE,
        "address": "金山区朱泾镇人民路1号",
        "owners": (OWNER,),
        "schedule": office(GUOQING),
        "lat": 30.898,
        "lon": 121.161,
    }
    return Site(**(fields | changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"id": "Zhujing"}, "id"),
        ({"name": " 朱泾 "}, "name"),
        ({"town": ""}, "town"),
        ({"owners": ()}, "owners"),
        ({"owners": (OWNER, Owner("王磊2", OWNER.email.upper()))}, "owners"),
        ({"lat": 91.0}, "lat"),
        ({"lon": float("nan")}, "lon"),
        ({"lon": None}, "lon"),
        ({"grace_s": -1}, "grace_s"),
    ],
)
def test_a_site_checks_itself_on_construction(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSite) as caught:
        site(**changes)
    assert caught.value.field == field


def test_a_site_travels_as_json_and_is_checked_on_the_way_in() -> None:
    original = site()
    data = msgspec.json.encode(original)
    assert b'"kind":"party-mass-centre"' in data
    assert msgspec.json.decode(data, type=Site) == original
    bad = data.replace(b'"lat":30.898', b'"lat":300.0')
    with pytest.raises(msgspec.ValidationError, match="lat"):
        msgspec.json.decode(bad, type=Site)


def test_site_kinds_accept_wire_and_chinese_names() -> None:
    assert SiteKind.parse("社区事务受理服务中心") is SiteKind.COMMUNITY_CENTRE
    assert SiteKind.parse(" bank-branch ") is SiteKind.BANK_BRANCH
    assert SiteKind.VILLAGE_POINT.zh == "村居服务点"


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    days = {}
    for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun"):
        points = sorted(draw(st.sets(st.integers(0, 1440), max_size=4)))
        days[day] = tuple(Interval(a, b) for a, b in zip(points[::2], points[1::2], strict=False))
    closed = draw(st.frozensets(st.dates(date(2026, 9, 1), date(2026, 11, 30)), max_size=20))
    return Schedule(hours=OpeningHours(**days), calendar=Calendar(closed=closed))


@settings(max_examples=60, deadline=None, database=None)
@given(schedules(), st.integers(at(1, 0, month=9), at(30, 0, month=11)))
def test_is_open_agrees_with_intervals_and_next_opening(schedule: Schedule, now: int) -> None:
    interval = schedule.open_interval_at(now)
    assert schedule.is_open(now) == (interval is not None)
    if interval is not None:
        assert interval[0] <= now < interval[1]
    following = schedule.next_opening_ms(now)
    if following is not None:
        assert following > now
        opened = schedule.open_interval_at(following)
        assert opened is not None
        assert opened[0] == following
