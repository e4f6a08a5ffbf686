"""``fleetctl``: the ops command line.

Layout, so that a new command group (``terminals``, ``demo``, ...) is three small additions:

- ``_add_<group>_commands(subparsers)`` declares the group's argparse sub-commands and tags
  each with ``set_defaults(command="<group> <action>")``; it is listed in ``_GROUPS``;
- one body per command, ``(args, out) -> exit code``, reads its typed options and does the
  work; it is listed in ``_COMMANDS`` under the same ``"<group> <action>"`` key;
- :func:`main` parses, dispatches through ``_COMMANDS``, and turns a
  :class:`~provisioning.errors.ProvisioningError` into one ``fleetctl: error: ...`` message on
  stderr and exit status 2, without a traceback.

Exit status: 0 success, 1 ``stack status`` found something not running or ``sites import``
found problems in the file, 2 usage or user error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Final, TextIO, TypeAlias
from zoneinfo import ZoneInfo

from fleet_protocol.ops import AlertEntry, TerminalView
from fleet_protocol.site_import import SitesFileError, parse_sites
from fleet_protocol.sites import DAY_NAMES, Schedule, Site
from provisioning import demo, ops_client, pki_commands, stack
from provisioning.authority import default_actor
from provisioning.errors import InvalidSettings, ProvisioningError

PROG: Final = "fleetctl"
EXIT_OK: Final = 0
EXIT_NOT_RUNNING: Final = 1
EXIT_FILE_PROBLEMS: Final = 1
EXIT_USER_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130

DEFAULT_WORKDIR: Final = Path(".fleet-stack")
DEFAULT_ALERTS: Final = 50
MAX_ALERTS: Final = 5000
#: How many alert log entries ``alerts ack`` looks through for the id.
ACK_LOOKBACK: Final = 1000
#: Alert times are shown as the district reads its clocks.
LOCAL_ZONE: Final = ZoneInfo("Asia/Shanghai")

Command = Callable[[argparse.Namespace, TextIO], int]
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # noqa: SLF001 -- argparse has no public name for what add_subparsers() returns


# --- argparse setup -----------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not in 1..65535")
    return port


def _add_stack_commands(subparsers: _Subparsers) -> None:
    group = subparsers.add_parser(
        "stack",
        help="local Mosquitto, InfluxDB and SMTP sink for development, demos and tests",
        description="Run real Mosquitto, InfluxDB and an SMTP sink as background processes, "
        "bound to 127.0.0.1, with configs, data and logs under one work dir.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="{up,down,status,reload}")

    def with_workdir(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--workdir",
            type=Path,
            default=DEFAULT_WORKDIR,
            metavar="DIR",
            help=f"the stack's configs, data and logs (default: ./{DEFAULT_WORKDIR})",
        )
        return parser

    up = with_workdir(
        actions.add_parser(
            "up",
            help="start the stack (what is not already running)",
            description="Start the stack. Ports left out reuse the previous run's ports when "
            "free, else free ports are chosen. Data from earlier runs is kept.",
        )
    )
    for name, service in (("mqtt", "Mosquitto"), ("influx", "InfluxDB HTTP"), ("smtp", "SMTP")):
        up.add_argument(
            f"--{name}-port",
            type=_port,
            metavar="PORT",
            help=f"{service} port on 127.0.0.1 (default: previous or a free port)",
        )
    up.add_argument("--json", action="store_true", help="print the stack's info as JSON")
    up.set_defaults(command="stack up")

    down = with_workdir(
        actions.add_parser(
            "down",
            help="stop the stack's processes (data is kept)",
            description="Stop exactly the processes `stack up` started in this work dir.",
        )
    )
    down.set_defaults(command="stack down")

    status = with_workdir(
        actions.add_parser(
            "status",
            help="show endpoints, pids and whether each service runs",
            description="Show the stack. Exit status 1 if any service is not running.",
        )
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(command="stack status")

    reload = with_workdir(
        actions.add_parser(
            "reload",
            help="make the broker reread its CRL and ACL (after a revocation)",
            description="Send SIGHUP to the stack's Mosquitto.",
        )
    )
    reload.set_defaults(command="stack reload")


def _add_terminals_commands(subparsers: _Subparsers) -> None:
    group = subparsers.add_parser(
        "terminals",
        help="the fleet's terminals, as the fleet server knows them",
        description="Ask the fleet server's ops API about terminals.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="{list,revoke}")
    listing = actions.add_parser(
        "list",
        help="every terminal with its status (online/offline) and when it was last seen",
        description="List every terminal with status, site and last seen time.",
    )
    _server_option(listing)
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(command="terminals list")
    pki_commands.add_revoke_command(actions)


def _server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=ops_client.default_server(),
        metavar="URL",
        help=f"the fleet server's ops API (default: ${ops_client.SERVER_ENV} "
        f"or {ops_client.DEFAULT_SERVER})",
    )


def _alert_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= count <= MAX_ALERTS:
        raise argparse.ArgumentTypeError(f"{count} is not in 1..{MAX_ALERTS}")
    return count


def _add_sites_commands(subparsers: _Subparsers) -> None:
    group = subparsers.add_parser(
        "sites",
        help="sites (点位): where terminals stand, who answers for them, when they are open",
        description="Import sites from a CSV or TOML file, and show the sites the fleet "
        "server knows. Owners are e-mailed when a terminal of their site drops offline "
        "during its opening hours.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="{import,list,show}")
    importing = actions.add_parser(
        "import",
        help="check a sites file and store its sites on the fleet server",
        description="Check FILE here and list every problem with its line and field; when "
        "there is none, send the sites to the fleet server, which adds new ids and replaces "
        "the sites whose id it already has. Nothing is sent while any problem is left.",
    )
    importing.add_argument(
        "file",
        type=Path,
        metavar="FILE",
        help="a .csv (UTF-8 or GB18030, as Excel saves it) or .toml sites file",
    )
    importing.add_argument(
        "--dry-run", action="store_true", help="only check the file; send nothing"
    )
    importing.add_argument("--json", action="store_true", help="print the outcome as JSON")
    _server_option(importing)
    importing.set_defaults(command="sites import")

    listing = actions.add_parser(
        "list",
        help="every site: name, district/town, kind, today's hours, owners",
        description="List the sites imported on the fleet server.",
    )
    listing.add_argument("--json", action="store_true", help="print the sites as JSON")
    _server_option(listing)
    listing.set_defaults(command="sites list")

    show = actions.add_parser(
        "show",
        help="one site in full: owners, weekly hours, closed and make-up days, grace",
        description="Show everything the fleet server has about one site.",
    )
    show.add_argument("id", metavar="ID", help="the site id, as `sites list` shows it")
    show.add_argument("--json", action="store_true", help="print the site as JSON")
    _server_option(show)
    show.set_defaults(command="sites show")


def _add_alerts_commands(subparsers: _Subparsers) -> None:
    group = subparsers.add_parser(
        "alerts",
        help="the alert log (what was sent, held back, escalated, resolved) and acknowledgements",
        description="Read the fleet server's alert decisions and acknowledge alerts.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="{list,ack}")
    listing = actions.add_parser(
        "list",
        help="the newest alert decisions first",
        description="List alert decisions, newest first, with the alert id to acknowledge.",
    )
    listing.add_argument(
        "--limit",
        type=_alert_count,
        default=DEFAULT_ALERTS,
        metavar="N",
        help=f"how many entries (default {DEFAULT_ALERTS}, at most {MAX_ALERTS})",
    )
    listing.add_argument("--json", action="store_true", help="print the entries as JSON")
    _server_option(listing)
    listing.set_defaults(command="alerts list")

    ack = actions.add_parser(
        "ack",
        help="acknowledge an alert: no more reminders, no escalation",
        description="Acknowledge an alert, as an owner's e-mail link does: reminders and "
        "escalation to district ops stop; the recovery notice is still sent. The alerting "
        "engine applies it within seconds.",
    )
    ack.add_argument("alert_id", metavar="ALERT_ID", help="the alert id, as `alerts list` shows")
    ack.add_argument(
        "--who",
        metavar="NAME",
        help="who acknowledges, for the alert log (default: fleetctl:<your user name>)",
    )
    _server_option(ack)
    ack.set_defaults(command="alerts ack")


def _add_demo_commands(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole system locally: stack, fleet server, kiosks (what `make demo` runs)",
        description="Start the local stack, a fleet server, kiosk agents at Jinshan town "
        "centres and simulated village kiosks; Ctrl-C stops everything it started.",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        metavar="DIR",
        help="configs, data and logs of the demo (default: ./.demo)",
    )
    parser.add_argument(
        "--sim-terminals",
        type=int,
        default=12,
        metavar="N",
        help="simulated village kiosks besides the real agent processes (default 12)",
    )
    parser.add_argument(
        "--for",
        dest="duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop by itself after this long (default: run until Ctrl-C)",
    )
    parser.set_defaults(command="demo")


_GROUPS: Final[Sequence[Callable[[_Subparsers], None]]] = (
    _add_stack_commands,
    _add_terminals_commands,
    _add_sites_commands,
    _add_alerts_commands,
    pki_commands.add_ca_commands,
    pki_commands.add_token_commands,
    pki_commands.add_audit_commands,
    _add_demo_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Kiosk fleet operations.")
    subparsers = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for add_commands in _GROUPS:
        add_commands(subparsers)
    return parser


# --- command bodies -----------------------------------------------------------------------


def _stack_up(args: argparse.Namespace, out: TextIO) -> int:
    workdir: Path = args.workdir
    as_json: bool = args.json
    if not as_json:
        print(f"starting the stack in {workdir.resolve()} ...", file=sys.stderr, flush=True)
    info = stack.up(
        workdir,
        mqtt_port=args.mqtt_port,
        influx_port=args.influx_port,
        smtp_port=args.smtp_port,
        detach=True,
    )
    if as_json:
        out.write(info.to_json())
        return EXIT_OK
    out.write(_describe(stack.status(workdir)))
    return EXIT_OK


def _stack_down(args: argparse.Namespace, out: TextIO) -> int:
    workdir: Path = args.workdir
    stopped = stack.down(workdir)
    if stopped:
        out.write("".join(f"stopped {what}\n" for what in stopped))
    else:
        out.write(f"nothing of the stack in {workdir.resolve()} was running\n")
    return EXIT_OK


def _stack_reload(args: argparse.Namespace, out: TextIO) -> int:
    stack.reload(args.workdir)
    out.write("the broker rereads its CRL and ACL\n")
    return EXIT_OK


def _stack_status(args: argparse.Namespace, out: TextIO) -> int:
    workdir: Path = args.workdir
    as_json: bool = args.json
    found = stack.status(workdir)
    out.write(found.to_json() if as_json else _describe(found))
    return EXIT_OK if found.running else EXIT_NOT_RUNNING


def _describe(found: stack.StackStatus) -> str:
    if found.info is None:
        return f"no stack in {found.workdir}; start one with: {PROG} stack up --workdir ...\n"
    info = found.info
    state = "running" if found.running else "NOT fully running"
    lines = [f"stack in {found.workdir}: {state}"]
    for service in found.services:
        extra = (
            f"  database {info.influx_database}" if service.service is stack.Service.INFLUX else ""
        )
        lines.append(
            f"  {service.service:<10} {service.endpoint:<24} pid {service.pid:<8} "
            f"{'running' if service.running else 'stopped'}{extra}"
        )
    lines.append(f"mail sent to the SMTP sink is stored as .eml files in {info.maildir}")
    lines.append("logs:")
    lines.extend(f"  {service.log_file}" for service in found.services)
    workdir_option = (
        ""
        if found.workdir == DEFAULT_WORKDIR.resolve()
        else f" --workdir {shlex.quote(str(found.workdir))}"
    )
    verb = "down" if found.running else "up"
    lines.append(
        f"{'stop' if found.running else 'start'} it with: {PROG} stack {verb}{workdir_option}"
    )
    return "\n".join(lines) + "\n"


def _terminals_list(args: argparse.Namespace, out: TextIO) -> int:
    listing = ops_client.terminals(args.server)
    if args.json:
        out.write(ops_client.to_json(listing) + "\n")
        return EXIT_OK
    if not listing.terminals:
        out.write("no terminals yet / 暂无终端\n")
        return EXIT_OK
    now_ms = time.time() * 1000
    rows = [("终端 terminal", "状态 status", "站点 site", "镇 town", "最后在线 last seen", "")]
    for t in listing.terminals:
        status = {"online": "在线 online", "offline": "离线 offline"}.get(t.status, "未知 unknown")
        if t.status == "offline" and t.reason:
            status += f" ({t.reason})"
        seen = "-" if t.last_seen_ms is None else _ago(now_ms - t.last_seen_ms)
        site = t.site_name or t.site or "-"
        rows.append((t.id, status, site, t.town or "-", seen, _terminal_notes(t)))
    _table(rows, out)
    online = sum(t.status == "online" for t in listing.terminals)
    out.write(f"{online}/{len(listing.terminals)} online\n")
    return EXIT_OK


_PRESENCE_NOTES: Final = {
    "stale": "无数据 stale",
    "planned": "计划重启 planned",
    "flapping": "频繁掉线 flapping",
}


def _terminal_notes(t: TerminalView) -> str:
    """What else ops should see about a terminal: its presence beyond on/off, a wrong clock
    (its samples are quarantined), a flood of messages."""
    notes = []
    if t.presence in _PRESENCE_NOTES:
        notes.append(_PRESENCE_NOTES[t.presence])
    if t.clock_offset_ms is not None:
        notes.append(f"时钟偏差 clock {t.clock_offset_ms / 1000:+.0f} s")
    if t.flooding:
        notes.append("消息过多 flooding")
    return ", ".join(notes)


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(_pad(cell, w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _sites_import(args: argparse.Namespace, out: TextIO) -> int:
    path: Path = args.file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidSettings(f"cannot read the sites file {path}: {exc.strerror}") from exc
    try:
        sites = parse_sites(data, str(path))
    except SitesFileError as exc:
        for problem in exc.problems:
            print(exc.describe(problem), file=sys.stderr)
        count = len(exc.problems)
        print(
            f"{count} 处问题，未导入任何点位 / {count} problem(s) in {path}; "
            "nothing was imported. Fix them and run the import again.",
            file=sys.stderr,
        )
        if args.json:
            out.write(ops_client.to_json({"problems": exc.problems}) + "\n")
        return EXIT_FILE_PROBLEMS
    if not sites:
        raise InvalidSettings(f"{path} holds no sites; nothing to import")
    if args.dry_run:
        if args.json:
            out.write(ops_client.to_json({"dry_run": True, "valid": len(sites), "sites": sites}))
            out.write("\n")
            return EXIT_OK
        _sites_table(sites, datetime.now(LOCAL_ZONE), out)
        out.write(
            f"文件有效：{len(sites)} 个点位，未导入（--dry-run） / "
            f"{path} is valid: {len(sites)} sites, nothing imported (dry run)\n"
        )
        return EXIT_OK
    result = ops_client.import_sites(args.server, sites)
    if args.json:
        out.write(ops_client.to_json(result) + "\n")
        return EXIT_OK
    n, added, updated = len(sites), result.added, result.updated
    out.write(
        f"导入 {n} 个点位（新增 {added}，更新 {updated}） / "
        f"imported {n} sites ({added} new, {updated} updated)\n"
    )
    return EXIT_OK


def _sites_list(args: argparse.Namespace, out: TextIO) -> int:
    sites = ops_client.sites(args.server)
    if args.json:
        out.write(ops_client.to_json(sites) + "\n")
        return EXIT_OK
    if not sites:
        out.write(f"no sites yet / 暂无点位; import them with: {PROG} sites import FILE\n")
        return EXIT_OK
    _sites_table(sites, datetime.now(LOCAL_ZONE), out)
    return EXIT_OK


def _sites_table(sites: Sequence[Site], now: datetime, out: TextIO) -> None:
    rows = [
        (
            "点位 site",
            "名称 name",
            "区/镇 district/town",
            "类型 kind",
            "今日 today",
            "负责人 owners",
        )
    ]
    rows.extend(
        (
            site.id,
            site.name,
            f"{site.district}/{site.town}",
            site.kind.zh,
            hours_on(site.schedule, now),
            str(len(site.owners)),
        )
        for site in sites
    )
    _table(rows, out)
    out.write(f"{len(sites)} 个点位 / sites\n")


def hours_on(schedule: Schedule, now: datetime) -> str:
    """The site's hours on the local day of ``now`` (holidays and make-up days applied)."""
    if schedule.open_24h:
        return "24小时 24h"
    today = now.astimezone(ZoneInfo(schedule.timezone)).date()
    weekday = schedule.calendar.weekday_of(today)
    intervals = schedule.hours.on(weekday) if weekday else ()
    return ",".join(str(i) for i in intervals) or "休息 closed"


_WEEKDAYS_ZH: Final = dict(
    zip(DAY_NAMES, ("周一", "周二", "周三", "周四", "周五", "周六", "周日"), strict=True)
)


def _sites_show(args: argparse.Namespace, out: TextIO) -> int:
    found = ops_client.site(args.server, args.id)
    if args.json:
        out.write(ops_client.to_json(found) + "\n")
        return EXIT_OK
    out.write(describe_site(found))
    return EXIT_OK


def describe_site(site: Site) -> str:
    """Everything about ``site``, one labelled line per value."""
    schedule, calendar = site.schedule, site.schedule.calendar
    fields: list[tuple[str, Iterable[str]]] = [
        ("点位 site", [site.id]),
        ("名称 name", [site.name]),
        ("类型 kind", [f"{site.kind.zh} ({site.kind.value})"]),
        ("区 district", [site.district]),
        ("镇 town", [site.town]),
        ("地址 address", [site.address]),
    ]
    if site.lat is not None and site.lon is not None:
        fields.append(("坐标 lat, lon", [f"{site.lat}, {site.lon}"]))
    fields.append(("负责人 owners", [str(owner) for owner in site.owners]))
    if schedule.open_24h:
        hours = ["24小时开放，节假日无休 / open 24 hours, holidays included"]
    else:
        hours = [
            f"{_WEEKDAYS_ZH[day]} {day}  "
            + (", ".join(str(i) for i in schedule.hours.on(day)) or "休息 closed")
            for day in DAY_NAMES
        ]
    fields.append(("开放时间 hours", hours))
    fields.append(("休息日 closed", [str(day) for day in sorted(calendar.closed)] or ["-"]))
    makeups = sorted(calendar.workdays, key=lambda m: m.day)
    fields.append(
        (
            "调休 make-up days",
            [f"{m.day} 按{_WEEKDAYS_ZH[m.works_as]} (hours of {m.works_as})" for m in makeups]
            or ["-"],
        )
    )
    if schedule.open_24h and not calendar.is_empty():
        fields.append(("", ["（24小时点位不按节假日休息 / not applied to a 24-hour site）"]))
    grace = f"{site.grace_s} 秒 s"
    if site.grace_s and site.grace_s % 60 == 0:
        grace += f"（{site.grace_s // 60} 分钟 min）"
    fields.append(("离线宽限 grace", [grace]))
    fields.append(("时区 time zone", [schedule.timezone]))
    width = max(_width(label) for label, _ in fields)
    lines = []
    for label, values in fields:
        for n, value in enumerate(values):
            lines.append(f"{_pad(label if n == 0 else '', width)}  {value}")
    return "\n".join(lines) + "\n"


_ACTIONS_ZH: Final = {
    "sent": "已发送",
    "suppressed": "暂缓",
    "updated": "已更新",
    "reminded": "已提醒",
    "escalated": "已升级",
    "acknowledged": "已确认",
    "resolved": "已恢复",
}
_KINDS_ZH: Final = {
    "terminal-offline": "终端离线",
    "terminal-flapping": "频繁掉线",
    "peripherals": "外设故障",
    "site-offline": "点位离线",
    "district-outage": "区域离线",
}
_REASONS_ZH: Final = {
    "planned": "计划停机",
    "flapping": "频繁掉线",
    "merged-into-site": "并入点位告警",
    "terminal-down": "终端已离线",
    "outside-hours": "非开放时间",
    "unassigned": "不属于任何点位",
}


def _alerts_list(args: argparse.Namespace, out: TextIO) -> int:
    log = ops_client.alerts(args.server, args.limit)
    if args.json:
        out.write(ops_client.to_json(log) + "\n")
        return EXIT_OK
    if not log.entries:
        out.write("no alerts yet / 暂无告警\n")
        return EXIT_OK
    rows = [
        (
            "时间 time",
            "动作 action",
            "类型 kind",
            "对象 subject",
            "原因 reason",
            "告警 alert id",
            "收件人 recipients",
        )
    ]
    rows.extend(alert_row(entry) for entry in log.entries)
    _table(rows, out)
    more = "; more with --limit N" if len(log.entries) == args.limit else ""
    out.write(f"{len(log.entries)} 条，最新在前 / entries, newest first{more}\n")
    return EXIT_OK


def alert_row(entry: AlertEntry) -> tuple[str, str, str, str, str, str, str]:
    """One alert log entry as a row of ``alerts list``."""
    at = datetime.fromtimestamp(entry.at_ms / 1000, LOCAL_ZONE).strftime("%Y-%m-%d %H:%M")
    action = (
        f"{_ACTIONS_ZH[entry.action]} {entry.action}"
        if entry.action in _ACTIONS_ZH
        else entry.action
    )
    kind = _KINDS_ZH.get(entry.kind, entry.kind)
    reason = "-"
    if entry.reason:
        zh = _REASONS_ZH.get(entry.reason)
        reason = f"{zh} {entry.reason}" if zh else entry.reason
    recipients = ", ".join(entry.recipients) or "-"
    return at, action, kind, entry.subject, reason, entry.alert_id, recipients


def _alerts_ack(args: argparse.Namespace, out: TextIO) -> int:
    alert_id: str = args.alert_id
    who: str = args.who if args.who is not None else default_actor()
    # A typo would be queued and silently ignored by the engine: say so, but still send it
    # (an alert older than the entries looked at is still acknowledged).
    recent = ops_client.alerts(args.server, ACK_LOOKBACK).entries
    if not any(entry.alert_id == alert_id for entry in recent):
        print(
            f"{PROG}: warning: {alert_id} is not in the alert log (newest {ACK_LOOKBACK}); the "
            f"alerting engine ignores ids it does not know. `{PROG} alerts list` shows them.",
            file=sys.stderr,
        )
    ops_client.ack_alert(args.server, alert_id, who)
    out.write(
        f"已提交确认，告警引擎将在几秒内处理 / acknowledgement of {alert_id} by {who} queued; "
        "the alerting engine applies it within seconds\n"
    )
    return EXIT_OK


def _ago(ms: float) -> str:
    s = max(0, int(ms / 1000))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago"


def _width(text: str) -> int:
    # CJK characters take two columns in a terminal.
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    if args.sim_terminals < 0:
        raise InvalidSettings("--sim-terminals must be 0 or more")
    return demo.run(args.workdir, args.sim_terminals, args.duration, out)


_COMMANDS: Final[Mapping[str, Command]] = {
    "terminals list": _terminals_list,
    "sites import": _sites_import,
    "sites list": _sites_list,
    "sites show": _sites_show,
    "alerts list": _alerts_list,
    "alerts ack": _alerts_ack,
    "demo": _demo,
    "stack up": _stack_up,
    "stack down": _stack_down,
    "stack status": _stack_status,
    "stack reload": _stack_reload,
    **pki_commands.COMMANDS,
}


# --- entry point --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The ``fleetctl`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    command: str = args.command
    try:
        return _COMMANDS[command](args, sys.stdout)
    except ProvisioningError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
