"""Importing a hand-made sites file: forgiving of Excel, strict on meaning, all problems at once."""

from __future__ import annotations

import string
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol.ids import site_id
from fleet_protocol.site_import import SitesFileError, parse_sites, render_sites_toml
from fleet_protocol.sites import (
    DAY_NAMES,
    Calendar,
    Interval,
    MakeupDay,
    OpeningHours,
    Owner,
    Schedule,
    Site,
    SiteKind,
)

TOML = """\
# 金山区 sites
[[sites]]
id = "zhujing-dqzx"
name = "朱泾镇党群服务中心"
district = "金山区"
town = "朱泾镇"
kind = "党群服务中心"
address = "金山区朱泾镇人民路1号"
lat = 30.898
lon = 121.161
owners = [{ name = "王磊", email = "wang.lei@zhujing.example.gov.cn" }]
grace_s = 600
[sites.hours]
mon-fri = ["08:30-12:00", "13:30-17:00"]
"周六" = "09:00-12:00"

[[sites]]
id = "zhujing-24h"
name = "朱泾社区24小时自助服务区"
district = "金山区"
town = "朱泾镇"
kind = "community-centre"
address = "金山区朱泾镇人民路3号"
owners = ["李娜 <li.na@zhujing.example.gov.cn>"]
open_24h = true
[sites.calendar]
closed = [2026-10-08]

[calendar]
closed = ["2026-10-01", "2026-10-02"]
workdays = [{ date = "2026-10-11", as = "mon" }, "2026-09-20=fri"]
"""

HEADER = "id,name,district,town,kind,address,lat,lon,owners,hours,open_24h,grace_s,closed,workdays"
ROW = (
    "zhujing-dqzx,朱泾镇党群服务中心,金山区,朱泾镇,党群服务中心,金山区朱泾镇人民路1号,30.898,121.161,"
    '"王磊 <wang@zhujing.example.cn>; 李娜 <li@zhujing.example.cn>",'
    '"mon-fri 08:30-12:00,13:30-17:00; 周六 09:00-12:00",no,,2026-10-01 2026/10/2,'
    '"2026-10-11=mon; 2026-10-12"'
)


def problems(data: bytes, filename: str) -> list[str]:
    with pytest.raises(SitesFileError) as caught:
        parse_sites(data, filename)
    lines = str(caught.value).splitlines()
    assert len(lines) == len(caught.value.problems)
    return lines


def test_a_toml_file_gives_typed_sites_with_the_file_calendar() -> None:
    centre, zone = parse_sites(TOML.encode(), "sites.toml")
    assert centre.kind is SiteKind.PARTY_MASS_CENTRE
    assert centre.owners == (Owner("王磊", "wang.lei@zhujing.example.gov.cn"),)
    assert (centre.lat, centre.lon, centre.grace_s) == (30.898, 121.161, 600)
    hours = centre.schedule.hours
    assert hours.fri == (Interval(510, 720), Interval(810, 1020))
    assert hours.sat == (Interval(540, 720),)
    assert hours.sun == ()
    assert centre.schedule.calendar.workdays == {
        MakeupDay(date(2026, 10, 11), "mon"),
        MakeupDay(date(2026, 9, 20), "fri"),
    }
    assert zone.schedule.open_24h
    assert zone.kind is SiteKind.COMMUNITY_CENTRE
    assert zone.schedule.calendar.closed == {date(2026, 10, d) for d in (1, 2, 8)}


def test_a_csv_row_in_excels_ways() -> None:
    (site,) = parse_sites(f"{HEADER}\n{ROW}\n,,,,\n".encode(), "sites.csv")
    assert [o.email for o in site.owners] == ["wang@zhujing.example.cn", "li@zhujing.example.cn"]
    assert site.schedule.hours.wed == (Interval(510, 720), Interval(810, 1020))
    assert site.schedule.hours.sat == (Interval(540, 720),)
    assert site.schedule.calendar == Calendar(
        closed=frozenset({date(2026, 10, 1), date(2026, 10, 2)}),
        workdays=frozenset({MakeupDay(date(2026, 10, 11)), MakeupDay(date(2026, 10, 12))}),
    )
    assert site.grace_s == 300


def test_a_bom_and_gb18030_are_read() -> None:
    text = f"{HEADER}\r\n{ROW}\r\n"
    for data in (text.encode("utf-8-sig"), text.encode("gb18030")):
        (site,) = parse_sites(data, "SITES.CSV")
        assert (site.name, site.town) == ("朱泾镇党群服务中心", "朱泾镇")
    (site,) = parse_sites(TOML[: TOML.index("\n\n[[")].encode("utf-8-sig"), "s.toml")
    assert site.id == "zhujing-dqzx"


def test_full_width_punctuation_and_spaces_are_forgiven() -> None:
    row = ROW.replace("08:30-12:00,13:30-17:00", " 08：30－12：00，13：30～17：00 ")
    row = row.replace("mon-fri", "周一至周五").replace("; 李娜", "；李娜")
    (site,) = parse_sites(f" Id ,{HEADER[3:]}\n{row}\n".encode(), "sites.csv")
    assert site.schedule.hours.mon == (Interval(510, 720), Interval(810, 1020))
    assert len(site.owners) == 2


def test_every_problem_is_reported_with_its_physical_line() -> None:
    good = ROW.replace("zhujing-dqzx,", "{id},", 1)
    lines = [
        HEADER,
        good.format(id="site-one"),
        good.format(id="site-two").replace("朱泾镇党群服务中心", '"朱泾镇\n党群服务中心"'),
        good.format(id="site-three").replace("<wang@zhujing.example.cn>", "wang@"),
        "",
        good.format(id="site-four").replace("13:30-17:00", "13:30-25:00"),
        good.format(id="site-five").replace(",no,", ",maybe,"),
    ]
    assert problems("\n".join(lines).encode(), "sites.csv") == [
        "sites.csv line 3, field \"name\": '朱泾镇\\n党群服务中心' contains a control character "
        "or line break",
        'sites.csv line 5, field "owners": "王磊 wang@": "wang@" is not an e-mail address',
        'sites.csv line 7, field "hours": mon-fri: "25:00" is not a time of day (00:00 to 24:00)',
        'sites.csv line 8, field "open_24h": expected true or false, got "maybe"',
    ]


def test_all_problems_of_one_row_are_reported() -> None:
    row = ROW.replace("党群服务中心,金山区朱泾", "超市,金山区朱泾").replace("30.898", "91")
    row = row.replace("2026-10-11=mon", "2026-10-11=mo")
    found = problems(f"{HEADER}\n{row}\n".encode(), "sites.csv")
    assert [line.split(":")[0] for line in found] == [
        'sites.csv line 2, field "kind"',
        'sites.csv line 2, field "lat"',
        'sites.csv line 2, field "workdays"',
    ]


def test_duplicate_ids_name_both_lines() -> None:
    data = f"{HEADER}\n{ROW}\n{ROW.replace('wang@', 'w@')}\n".encode()
    assert problems(data, "sites.csv") == [
        'sites.csv line 3, field "id": site id zhujing-dqzx is already used on line 2'
    ]


@pytest.mark.parametrize(
    ("hours", "problem"),
    [
        ("mon 25:00-26:00", '"25:00" is not a time of day'),
        ("mon 12:00-11:00", "mon: 12:00-11:00 does not end after it starts"),
        ("mon 08:00-12:00,11:00-14:00", "mon: 08:00-12:00 and 11:00-14:00 overlap"),
        ("mon 08:00-12:00,12:00-14:00", "touch; write them as one, 08:00-14:00"),
        ("mon-fri 08:00-12:00; wed 13:00-14:00", "wed is given twice"),
        ("fri-mon 08:00-12:00", "a range of days runs forward"),
        ("holiday 08:00-12:00", '"holiday" is not a day'),
        ("mon", "expected days and times"),
        ("", "no opening hours: give hours or set open_24h true"),
    ],
)
def test_bad_hours_are_explained(hours: str, problem: str) -> None:
    row = ROW.replace('"mon-fri 08:30-12:00,13:30-17:00; 周六 09:00-12:00"', f'"{hours}"')
    (found,) = problems(f"{HEADER}\n{row}\n".encode(), "sites.csv")
    assert found.startswith('sites.csv line 2, field "hours": ')
    assert problem in found


def test_columns_are_checked_before_rows() -> None:
    header = HEADER.replace("owners", "owner").replace("grace_s", "grace")
    assert problems(f"{header}\n{ROW}\n".encode(), "sites.csv") == [
        "sites.csv line 1: unknown columns owner, grace; use id, name, district, town, kind, "
        "address, lat, lon, owners, hours, open_24h, grace_s, closed, workdays, timezone",
        "sites.csv line 1: missing required columns owners",
    ]
    (found,) = problems(b"id,name\n", "sites.csv")
    assert (
        found == "sites.csv line 1: missing required columns district, town, kind, address, owners"
    )


def test_toml_problems_name_the_line_and_site() -> None:
    text = (
        TOML.replace("grace_s = 600", 'grace_s = "600"')
        .replace('"周六" = "09:00-12:00"', '"周六" = "09:00-12:00"\nsun = ["08:00-07:00"]')
        .replace("open_24h = true", "open_24h = true\nphone = 110")
        .replace('as = "mon"', 'as = "monday"')
    )
    assert problems(text.encode(), "sites.toml") == [
        'sites.toml line 2 (site zhujing-dqzx), field "hours": sun: 08:00-07:00 does not end '
        "after it starts",
        'sites.toml line 2 (site zhujing-dqzx), field "grace_s": expected a whole number, '
        'got "600"',
        'sites.toml line 18 (site zhujing-24h), field "phone": unknown key; expected one of '
        "address, calendar, district, grace_s, hours, id, kind, lat, lon, name, open_24h, owners, "
        "timezone, town",
        'sites.toml line 31, field "calendar.workdays": expected a day of the week like mon or '
        '周一, got "monday"',
    ]


def test_a_24_hour_site_with_hours_is_refused() -> None:
    text = TOML.replace("open_24h = true", 'open_24h = true\nhours = { mon = ["08:00-09:00"] }')
    (found,) = problems(text.encode(), "sites.toml")
    assert "(site zhujing-24h)" in found
    assert "24-hour site has no opening hours" in found


@pytest.mark.parametrize(
    ("data", "filename", "problem"),
    [
        (b"a,b\n", "sites.xlsx", '".xlsx" is not a sites file type: use .csv or .toml'),
        (b"[[sites]\n", "sites.toml", "sites.toml: not valid TOML"),
        (b"\xff\xfe\x00", "sites.toml", "not UTF-8 text"),
        (b"", "sites.csv", "no header row"),
    ],
)
def test_unreadable_files_say_why(data: bytes, filename: str, problem: str) -> None:
    (found,) = problems(data, filename)
    assert problem in found


def test_an_empty_file_with_a_header_has_no_sites() -> None:
    assert parse_sites(f"{HEADER}\n".encode(), "sites.csv") == []
    assert parse_sites(b"", "sites.toml") == []


# --- round trip -----------------------------------------------------------------------------

text = st.text(
    st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=20
).filter(lambda s: s == s.strip() and s != "")
owner_names = text.filter(lambda s: not set(s) & set(',;<>"\\'))
emails = st.builds(
    "{}@{}.cn".format,
    st.text(string.ascii_lowercase + string.digits + "._-", min_size=1, max_size=10).filter(
        lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s
    ),
    st.text(string.ascii_lowercase, min_size=1, max_size=10),
)
owners = st.lists(
    st.builds(Owner, owner_names, emails), min_size=1, max_size=3, unique_by=lambda o: o.email
).map(tuple)


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    days = {}
    for day in DAY_NAMES:
        points = sorted(draw(st.sets(st.integers(0, 1440), max_size=4)))
        days[day] = tuple(Interval(a, b) for a, b in zip(points[::2], points[1::2], strict=False))
    hours = OpeningHours(**days)
    dates = draw(st.lists(st.dates(), max_size=6, unique=True))
    split = draw(st.integers(0, len(dates)))
    workdays = frozenset(MakeupDay(d, draw(st.sampled_from(DAY_NAMES))) for d in dates[split:])
    calendar = Calendar(closed=frozenset(dates[:split]), workdays=workdays)
    open_24h = hours.is_empty() or draw(st.booleans())
    return Schedule(
        hours=OpeningHours() if open_24h else hours,
        calendar=calendar,
        open_24h=open_24h,
        timezone=draw(st.sampled_from(["Asia/Shanghai", "Asia/Urumqi", "UTC"])),
    )


coordinates = st.none() | st.tuples(
    st.floats(-90, 90, allow_nan=False), st.floats(-180, 180, allow_nan=False)
)


@st.composite
def sites(draw: st.DrawFn) -> Site:
    where = draw(coordinates)
    return Site(
        id=site_id(draw(st.from_regex(r"[a-z0-9][a-z0-9-]{2,20}", fullmatch=True))),
        name=draw(text),
        district=draw(text),
        town=draw(text),
        kind=draw(st.sampled_from(SiteKind)),
        address=draw(text),
        owners=draw(owners),
        schedule=draw(schedules()),
        lat=where and where[0],
        lon=where and where[1],
        grace_s=draw(st.integers(0, 86400)),
    )


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(sites(), max_size=3, unique_by=lambda s: s.id))
def test_rendered_toml_parses_back_to_the_same_sites(original: list[Site]) -> None:
    assert parse_sites(render_sites_toml(original).encode(), "export.toml") == original


def test_a_calendar_conflict_is_reported_with_other_problems() -> None:
    row = ROW.replace("党群服务中心,金山区朱泾", "超市,金山区朱泾").replace(
        "2026/10/2", "2026-10-11"
    )
    found = problems(f"{HEADER}\n{row}\n".encode(), "sites.csv")
    assert found[1] == (
        'sites.csv line 2, field "workdays": 2026-10-11 is both closed and a make-up day'
    )
