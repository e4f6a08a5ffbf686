"""``fleetctl sites`` and ``alerts`` without a server: the file is checked here first, and
what ops read (hours today, a site in full, an alert row) is formatted for them."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from fleet_protocol.ids import site_id
from fleet_protocol.ops import AlertEntry
from fleet_protocol.sites import (
    Calendar,
    Interval,
    MakeupDay,
    OpeningHours,
    Owner,
    Schedule,
    Site,
    SiteKind,
)
from provisioning import cli, ops_client

GOOD_CSV = """\
id,name,district,town,kind,address,owners,hours,open_24h
zhujing-dqzx,朱泾党群中心,金山区,朱泾镇,党群服务中心,人民路1号,王磊 <w@x.cn>,mon-fri 08:30-17:00,
zhujing-24h,朱泾24小时自助服务区,金山区,朱泾镇,社区事务受理服务中心,人民路3号,李娜 <l@x.cn>,,是
"""
THREE_MISTAKES = """\
id,name,district,town,kind,address,owners,hours
zhujing-a,朱泾A,金山区,朱泾镇,党群服务中心,地址1,王磊 <wang@x.example.cn>,mon-fri 08:30-12:00
Bad Id,朱泾B,金山区,朱泾镇,党群服务中心,地址2,王磊 <wang@x.example.cn>,mon-fri 08:30-12:00
zhujing-c,朱泾C,金山区,朱泾镇,超市,地址3,王磊 <wang@x.example.cn>,mon-fri 08:30-12:00
zhujing-d,朱泾D,金山区,朱泾镇,mall,地址4,王磊 <wang@x.example.cn>,mon-fri 12:00-08:00
"""
#: No server listens here; nothing in these tests may need one.
NO_SERVER = ("--server", "http://127.0.0.1:9")


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("the fleet server was contacted")

    for name in ("import_sites", "sites", "site", "alerts", "ack_alert"):
        monkeypatch.setattr(ops_client, name, refuse)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_every_problem_of_a_file_is_printed_with_its_line_and_nothing_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "sites.csv", THREE_MISTAKES)

    assert cli.main(["sites", "import", path, *NO_SERVER]) == cli.EXIT_FILE_PROBLEMS
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith(f'{path} line 3, field "id": ')
    assert lines[1].startswith(f'{path} line 4, field "kind": "超市" is not a site kind')
    assert lines[2].startswith(f'{path} line 5, field "hours": ')
    assert "3 处问题，未导入任何点位" in lines[3]
    assert len(lines) == 4
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_problems_come_as_json_too_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "sites.csv", THREE_MISTAKES)
    assert cli.main(["sites", "import", path, "--json", *NO_SERVER]) == cli.EXIT_FILE_PROBLEMS
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["line"], p["field"]) for p in problems] == [(3, "id"), (4, "kind"), (5, "hours")]


def test_a_dry_run_checks_a_good_file_and_shows_what_would_be_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "sites.csv", GOOD_CSV)

    assert cli.main(["sites", "import", path, "--dry-run", *NO_SERVER]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "zhujing-dqzx" in out
    assert "社区事务受理服务中心" in out
    assert out.splitlines()[-1] == (
        f"文件有效：2 个点位，未导入（--dry-run） / {path} is valid: 2 sites, nothing imported "
        "(dry run)"
    )

    assert cli.main(["sites", "import", path, "--dry-run", "--json", *NO_SERVER]) == cli.EXIT_OK
    answer = json.loads(capsys.readouterr().out)
    assert answer["valid"] == 2
    assert [s["id"] for s in answer["sites"]] == ["zhujing-dqzx", "zhujing-24h"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.csv", None, "cannot read the sites file"),
        ("empty.toml", "# nothing yet\n", "holds no sites"),
    ],
)
def test_a_file_that_cannot_be_read_or_is_empty_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str | None, message: str
) -> None:
    path = write(tmp_path, name, text) if text is not None else str(tmp_path / name)
    assert cli.main(["sites", "import", path, *NO_SERVER]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_limit_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["alerts", "list", "--limit", "0", *NO_SERVER]) == cli.EXIT_USER_ERROR
    assert "0 is not in 1..5000" in capsys.readouterr().err


# --- what ops read ------------------------------------------------------------------------------

HOURS = Schedule(
    hours=OpeningHours(mon=(Interval(510, 720), Interval(810, 1020)), sat=(Interval(540, 720),)),
    calendar=Calendar(
        closed=frozenset({date(2026, 10, 1)}),
        workdays=frozenset({MakeupDay(date(2026, 10, 11), "mon")}),
    ),
)
SITE = Site(
    id=site_id("zhujing-dqzx"),
    name="朱泾镇党群服务中心",
    district="金山区",
    town="朱泾镇",
    kind=SiteKind.PARTY_MASS_CENTRE,
    address="金山区朱泾镇人民路1号",
    owners=(Owner("王磊", "wang@zhujing.example.cn"), Owner("李娜", "li@zhujing.example.cn")),
    schedule=HOURS,
    grace_s=300,
)


def beijing(year: int, month: int, day: int, hour: int) -> datetime:
    return datetime(year, month, day, hour, tzinfo=cli.LOCAL_ZONE)


@pytest.mark.parametrize(
    ("now", "shown"),
    [
        (beijing(2026, 9, 28, 10), "08:30-12:00,13:30-17:00"),  # a Monday
        (beijing(2026, 10, 1, 10), "休息 closed"),  # 国庆, though a Thursday
        (beijing(2026, 10, 11, 10), "08:30-12:00,13:30-17:00"),  # a Sunday worked as Monday
        # 17:00 UTC on a Friday is already Saturday in Beijing.
        (datetime(2026, 10, 16, 17, 0, tzinfo=UTC), "09:00-12:00"),
    ],
)
def test_today_s_hours_follow_the_site_s_calendar_and_time_zone(now: datetime, shown: str) -> None:
    assert cli.hours_on(HOURS, now) == shown
    assert cli.hours_on(Schedule(open_24h=True), now) == "24小时 24h"


def test_a_site_in_full_names_every_weekday_the_calendar_and_the_grace() -> None:
    text = cli.describe_site(SITE)
    assert "党群服务中心 (party-mass-centre)" in text
    assert "王磊 <wang@zhujing.example.cn>" in text
    assert "李娜 <li@zhujing.example.cn>" in text
    for day in ("周一 mon  08:30-12:00, 13:30-17:00", "周二 tue  休息 closed", "周六 sat  09:00"):
        assert day in text
    assert "周日 sun" in text
    assert "2026-10-01" in text
    assert "2026-10-11 按周一 (hours of mon)" in text
    assert "300 秒 s（5 分钟 min）" in text
    assert "Asia/Shanghai" in text
    # Values line up in one column behind labels of mixed width, Chinese included.
    first, last = text.splitlines()[0], text.splitlines()[-1]
    assert first.endswith("  zhujing-dqzx")
    assert last.endswith("  Asia/Shanghai")
    assert cli._width(first.removesuffix("zhujing-dqzx")) == cli._width(
        last.removesuffix("Asia/Shanghai")
    )


def test_an_alert_row_shows_beijing_time_and_words_for_action_and_reason() -> None:
    entry = AlertEntry(
        key="k",
        alert_id="terminal-offline:kiosk-zhujing-01:1",
        action="suppressed",
        at_ms=int(datetime(2026, 11, 21, 6, 5, tzinfo=UTC).timestamp() * 1000),
        kind="terminal-offline",
        subject="kiosk-zhujing-01",
        district="金山区",
        reason="outside-hours",
        recipients=["a@x.example.cn", "b@x.example.cn"],
    )
    assert cli.alert_row(entry) == (
        "2026-11-21 14:05",
        "暂缓 suppressed",
        "终端离线",
        "kiosk-zhujing-01",
        "非开放时间 outside-hours",
        "terminal-offline:kiosk-zhujing-01:1",
        "a@x.example.cn, b@x.example.cn",
    )
