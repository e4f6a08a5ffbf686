"""What the status page says, in Chinese and English, and its answer to "is this terminal working,
and if not, what do I do?". Pure: snapshot in, :class:`Words` out.

The readers are village staff, not IT people: every sentence says what is wrong in everyday words
and what to do about it, and durations read "3 分 12 秒", never "192000 ms".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from edge_agent.status_model import (
    ActionKind,
    ClockView,
    InterfaceKind,
    LinkView,
    PeripheralState,
    PeripheralView,
    StatusSnapshot,
    Words,
)

Level = Literal["ok", "attention", "broken"]

#: A backlog older than this while the link is up is not catching up by itself.
OUTBOX_STALE_S: Final = 600.0


class PageTexts:
    """The page's fixed texts; templates read them as ``text.<name>``."""

    title: Final = Words("终端状态", "Terminal status")
    lang_switch: Final = Words("English", "中文")
    auto_refresh: Final = Words("本页每 10 秒自动刷新", "This page refreshes every 10 seconds")
    updated_at: Final = Words("更新于", "Updated")
    terminal: Final = Words("终端编号", "Terminal")
    site: Final = Words("点位", "Site")
    uptime: Final = Words("已运行", "Running for")
    what_to_do: Final = Words("需要处理的问题", "What needs doing")
    link: Final = Words("管理平台连接", "Connection to the fleet server")
    link_state: Final = Words("状态", "State")
    server: Final = Words("服务器", "Server")
    round_trip: Final = Words("响应时间", "Round trip")
    dns_failed: Final = Words(
        "无法解析服务器地址（域名解析失败）", "The server's name cannot be looked up (DNS)"
    )
    network: Final = Words("网络", "Network")
    no_interfaces: Final = Words("没有检测到网络接口", "No network interface found")
    interface_up: Final = Words("已连接", "Connected")
    interface_down: Final = Words("未连接", "Not connected")
    sent_received: Final = Words("已发送 / 已接收", "Sent / received")
    power: Final = Words("供电", "Power")
    power_source: Final = Words("电源", "Power source")
    on_mains: Final = Words("市电供电", "On mains power")
    on_battery: Final = Words("电池供电（市电已断开）", "On battery (mains power is off)")
    unknown: Final = Words("未知", "Unknown")
    battery: Final = Words("电池电量", "Battery")
    ups: Final = Words("UPS 不间断电源", "UPS (backup power)")
    ups_charge: Final = Words("UPS 电量", "UPS charge")
    ups_runtime: Final = Words("UPS 可供电", "UPS can run for")
    supply_voltage: Final = Words("供电电压", "Supply voltage")
    cabinet_door: Final = Words("机柜门", "Cabinet door")
    door_open: Final = Words("开着", "Open")
    door_closed: Final = Words("已关好", "Closed")
    cabinet_temperature: Final = Words("机柜温度", "Cabinet temperature")
    peripherals: Final = Words("外接设备", "Devices")
    no_peripherals: Final = Words("没有配置外接设备", "No devices are configured")
    not_essential: Final = Words("（非必需）", "(not essential)")
    since: Final = Words("持续", "For")
    outbox: Final = Words("待发送数据", "Data waiting to be sent")
    outbox_empty: Final = Words("没有积压，数据已全部发送", "Nothing waiting: all data is sent")
    outbox_pending: Final = Words("待发送", "Waiting")
    outbox_items: Final = Words("条", "messages")
    outbox_oldest: Final = Words("最早一条已等待", "Oldest has waited")
    outbox_dropped: Final = Words("已丢弃", "Dropped")
    versions: Final = Words("软件版本", "Versions")
    events: Final = Words("最近事件", "Recent events")
    no_events: Final = Words("暂无事件", "No events yet")
    actor: Final = Words("操作人", "By")
    clock_wrong: Final = Words("终端时间不准", "The terminal's clock is wrong")
    staff_actions: Final = Words("工作人员操作", "Staff actions")
    staff_login: Final = Words("工作人员登录", "Staff login")
    logged_in_as: Final = Words("已登录", "Logged in")
    logout: Final = Words("退出登录", "Log out")
    read_only: Final = Words(
        "本页面只读：本终端没有配置工作人员账号，无法在此操作。",
        "This page is read-only: no staff accounts are set up on this terminal.",
    )
    login_title: Final = Words("工作人员登录", "Staff login")
    login_who: Final = Words("请选择您的名字", "Choose your name")
    passcode: Final = Words("密码", "Passcode")
    login_button: Final = Words("登录", "Log in")
    back: Final = Words("返回状态页", "Back to the status page")
    cancel: Final = Words("取消", "Cancel")
    confirm_title: Final = Words("请确认操作", "Please confirm")
    confirm_button: Final = Words("确认执行", "Yes, do it")
    outcome_ok: Final = Words("操作已完成", "Done")
    outcome_failed: Final = Words("操作未成功", "It did not work")
    planned_title: Final = Words("正在按计划重启", "Planned restart under way")
    planned_hint: Final = Words(
        "无需操作，请稍候，终端会自动恢复。", "Nothing to do: please wait, it comes back by itself."
    )
    planned_no_actions: Final = Words(
        "重启完成前暂不能操作。", "Actions are unavailable until the restart is over."
    )
    choose_staff: Final = Words("请选择您的名字。", "Please choose your name.")
    session_ended: Final = Words(
        "登录已失效（长时间未操作或已超过最长登录时间），请重新登录。",
        "Your login has ended (idle too long or past its time limit). Please log in again.",
    )
    form_expired: Final = Words(
        "页面已过期，请重新操作。", "This page has expired. Please try again."
    )
    cross_site: Final = Words(
        "已拒绝：请求不是从本页面发出的。", "Refused: the request did not come from this page."
    )
    bad_host: Final = Words(
        "已拒绝：请使用终端的地址或名称打开本页面。",
        "Refused: open this page by the terminal's own address or name.",
    )
    not_found: Final = Words("没有这个页面。", "There is no such page.")
    not_allowed: Final = Words(
        "此页面不能这样打开，请从状态页操作。",
        "This page cannot be opened this way; use the buttons on the status page.",
    )
    action_error: Final = Words(
        "操作没有完成，请稍后再试；仍不行请联系运维人员。",
        "The action did not complete. Try again later; if it still fails, call IT support.",
    )
    verdict_ok: Final = Words("终端运行正常，无需操作。", "The terminal is working. Nothing to do.")


TEXT: Final = PageTexts()

LEVEL_WORDS: Final[Mapping[Level, Words]] = {
    "ok": Words("正常", "Working"),
    "attention": Words("需要注意", "Needs attention"),
    "broken": Words("无法使用", "Not working"),
}

STATE_WORDS: Final[Mapping[PeripheralState, Words]] = {
    "ok": Words("正常", "OK"),
    "degraded": Words("性能下降", "Degraded"),
    "faulty": Words("故障", "Faulty"),
    "absent": Words("未连接", "Not connected"),
}

#: What to do when a driver gave no action text of its own.
_DEFAULT_ACTION: Final[Mapping[PeripheralState, Words]] = {
    "ok": Words("", ""),
    "degraded": Words(
        "请留意；如影响使用，请联系运维人员",
        "Keep an eye on it; call IT support if it gets in the way",
    ),
    "faulty": Words(
        "请重新上电；仍不行请联系运维人员", "Power-cycle it; if that does not help, call IT support"
    ),
    "absent": Words("请检查连接线是否插好", "Check that its cable is plugged in"),
}

INTERFACE_WORDS: Final[Mapping[InterfaceKind, Words]] = {
    "ethernet": Words("有线网络", "Wired network"),
    "wifi": Words("Wi-Fi 无线网络", "Wi-Fi"),
    "cellular": Words("4G/5G 移动网络", "4G/5G mobile network"),
    "other": Words("其他网络", "Other network"),
}

_VERSION_WORDS: Final[Mapping[str, Words]] = {
    "agent": Words("管理程序", "Agent"),
    "config": Words("配置", "Configuration"),
    "service-items": Words("服务事项", "Service items"),
    "firmware": Words("固件", "Firmware"),
}

_DROP_WORDS: Final[Mapping[str, Words]] = {
    "full": Words("存储已满", "storage full"),
    "too_old": Words("等待太久", "waited too long"),
}
#: What was dropped, by the outbox's priority names (edge_agent.outbox.Priority).
_DROPPED_KIND_WORDS: Final[Mapping[str, Words]] = {
    "telemetry": Words("运行数据", "readings"),
    "snapshot": Words("设备状态", "device states"),
    "event": Words("事件", "events"),
    "action": Words("操作记录", "actions"),
}


def version_kind(kind: str) -> Words:
    return _VERSION_WORDS.get(kind, Words(kind, kind))


def drop_reason(key: str) -> Words:
    """The outbox's drop counter key ``reason/kind`` (e.g. ``full/telemetry``) in words."""
    reason, _, kind = key.partition("/")
    why = _DROP_WORDS.get(reason, Words(reason, reason))
    what = _DROPPED_KIND_WORDS.get(kind)
    if what is None:
        return why if not kind else Words(f"{why.zh}（{kind}）", f"{why.en} ({kind})")
    return Words(f"{why.zh}（{what.zh}）", f"{why.en} ({what.en})")


def duration(seconds: float) -> Words:
    """A length of time in the two largest units that matter: "3 分 12 秒" / "3 min 12 s"."""
    s = max(0, int(seconds))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        big, small = Words(f"{days} 天", f"{days} d"), Words(f"{hours} 小时", f"{hours} h")
        rest = hours
    elif hours:
        big, small = Words(f"{hours} 小时", f"{hours} h"), Words(f"{minutes} 分", f"{minutes} min")
        rest = minutes
    elif minutes:
        big, small = Words(f"{minutes} 分", f"{minutes} min"), Words(f"{secs} 秒", f"{secs} s")
        rest = secs
    else:
        return Words(f"{secs} 秒", f"{secs} s")
    # "2 小时", not "2 小时 0 分".
    return big if rest == 0 else Words(f"{big.zh} {small.zh}", f"{big.en} {small.en}")


def ago(ts_ms: int, now_ms: int) -> Words:
    """How long ago ``ts_ms`` was, seen at ``now_ms``."""
    seconds = (now_ms - ts_ms) / 1000
    if seconds < 10:
        return Words("刚刚", "just now")
    span = duration(seconds)
    return Words(f"{span.zh}前", f"{span.en} ago")


def minutes_left(seconds: float) -> int:
    """Whole minutes, rounded up: "try again in 0 minutes" would be wrong."""
    return max(1, math.ceil(seconds / 60))


def lockout(seconds_left: float) -> Words:
    m = minutes_left(seconds_left)
    unit = "minute" if m == 1 else "minutes"
    return Words(
        f"密码错误次数过多，请 {m} 分钟后再试。",
        f"Too many wrong passcodes. Please try again in {m} {unit}.",
    )


def wrong_passcode(attempts_left: int) -> Words:
    tries = "try" if attempts_left == 1 else "tries"
    return Words(
        f"密码不正确。还可以再试 {attempts_left} 次。",
        f"Wrong passcode. {attempts_left} more {tries} before a lock.",
    )


def link_state(link: LinkView, now_ms: int) -> Words:
    """已连接 2 小时 3 分 / 已断开 3 分 12 秒 / 还没有连上."""
    if link.since_ms is None:
        if link.connected:
            return Words("已连接", "Connected")
        return Words("还没有连上", "Not connected yet")
    span = duration((now_ms - link.since_ms) / 1000)
    if link.connected:
        return Words(f"已连接 {span.zh}", f"Connected for {span.en}")
    return Words(f"已断开 {span.zh}", f"Disconnected for {span.en}")


def clock_offset(clock: ClockView) -> Words | None:
    """快了 5 分 3 秒 / 慢了 ...; None before it was measured."""
    if clock.offset_ms is None:
        return None
    span = duration(abs(clock.offset_ms) / 1000)
    if clock.offset_ms >= 0:
        return Words(f"快了 {span.zh}", f"{span.en} fast")
    return Words(f"慢了 {span.zh}", f"{span.en} slow")


def data_size(size: int) -> str:
    """Bytes for people: 1.2 MB."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _sentence_zh(text: str) -> str:
    return text if not text or text[-1] in "。！？；.!?" else f"{text}。"


def _sentence_en(text: str) -> str:
    return text if not text or text[-1] in ".!?" else f"{text}."


def sentences(*parts: Words) -> Words:
    """``parts`` as consecutive sentences, each closed with its language's full stop."""
    return Words(
        "".join(_sentence_zh(p.zh) for p in parts if p.zh),
        " ".join(_sentence_en(p.en) for p in parts if p.en),
    )


def peripheral_action(peripheral: PeripheralView) -> Words:
    """What staff should do about it (the driver's own words, else a sensible default)."""
    return peripheral.action or _DEFAULT_ACTION[peripheral.state]


def peripheral_problem(peripheral: PeripheralView) -> Words:
    """凭条打印机：打印机缺纸。请更换纸卷。"""
    state = STATE_WORDS[peripheral.state]
    problem = peripheral.problem or state
    return Words(
        f"{peripheral.title.zh}：{sentences(problem, peripheral_action(peripheral)).zh}",
        f"{peripheral.title.en}: {sentences(problem, peripheral_action(peripheral)).en}",
    )


@dataclass(frozen=True, slots=True)
class Concern:
    """One thing on this terminal that is not as it should be, and what to do about it."""

    level: Literal["attention", "broken"]
    words: Words


def concerns(snapshot: StatusSnapshot) -> tuple[Concern, ...]:
    """Everything that needs attention, worst first."""
    found: list[Concern] = []
    now = snapshot.now_ms
    if snapshot.planned is not None:
        found.append(Concern("attention", sentences(snapshot.planned, TEXT.planned_hint)))
    for p in snapshot.peripherals:
        if p.state == "ok":
            continue
        broken = p.essential and p.state in ("faulty", "absent")
        found.append(Concern("broken" if broken else "attention", peripheral_problem(p)))
    power = snapshot.power
    if power.on_ac is False:
        left = (
            power.ups_charge_percent
            if power.ups_charge_percent is not None
            else (power.battery_percent)
        )
        charge = (
            Words(f"（剩余 {left:.0f}%）", f" ({left:.0f}% left)")
            if left is not None
            else (Words("", ""))
        )
        found.append(
            Concern(
                "attention",
                Words(
                    f"停电了，终端正在用电池供电{charge.zh}。请检查电源插座和空气开关。",
                    f"Mains power is off; the terminal runs on battery{charge.en}. "
                    "Check the socket and the circuit breaker.",
                ),
            )
        )
    link = snapshot.link
    if not link.connected:
        if link.since_ms is None:
            headline = Words("还没有连上管理平台", "Not connected to the fleet server yet")
        else:
            state = link_state(link, now)
            headline = Words(f"与管理平台的连接{state.zh}", f"Fleet server connection: {state.en}")
        dns = TEXT.dns_failed if link.dns_ok is False else Words("", "")
        advice = Words(
            "终端仍可办理业务，数据会在恢复后补发。"
            "如果超过 30 分钟仍未恢复，请检查网线和路由器，或联系运维人员",
            "The terminal still serves people and sends its data once the connection is back. "
            "If it is not back within 30 minutes, check the network cable and the router, "
            "or call IT support",
        )
        found.append(Concern("attention", sentences(headline, dns, advice)))
    offset = clock_offset(snapshot.clock)
    if snapshot.clock.wrong and offset is not None:
        found.append(
            Concern(
                "attention",
                Words(
                    f"终端时间不准（{offset.zh}）。请联系运维人员校准时间。",
                    f"The terminal's clock is wrong ({offset.en}). Call IT support to set it.",
                ),
            )
        )
    if power.cabinet_door_open:
        found.append(
            Concern(
                "attention",
                Words(
                    "机柜门开着。请关好并锁上柜门。", "The cabinet door is open. Close and lock it."
                ),
            )
        )
    outbox = snapshot.outbox
    if link.connected and outbox.oldest_ms is not None:
        waited = (now - outbox.oldest_ms) / 1000
        if waited > OUTBOX_STALE_S:
            span = duration(waited)
            found.append(
                Concern(
                    "attention",
                    Words(
                        f"有 {outbox.pending} 条数据积压未发出，最早的已等待 {span.zh}。"
                        "请联系运维人员。",
                        f"{outbox.pending} messages are stuck waiting to be sent, the oldest for "
                        f"{span.en}. Call IT support.",
                    ),
                )
            )
    found.sort(key=lambda c: c.level != "broken")
    return tuple(found)


def verdict(snapshot: StatusSnapshot) -> tuple[Level, Words]:
    """The page's banner: how the terminal is, and the most important thing to do."""
    found = concerns(snapshot)
    if not found:
        return "ok", TEXT.verdict_ok
    return found[0].level, found[0].words


def action_name(kind: ActionKind) -> Words:
    """The button."""
    return {
        ActionKind.REBOOT_TERMINAL: Words("重启终端", "Restart the terminal"),
        ActionKind.RESTART_APP: Words("重启自助服务程序", "Restart the kiosk application"),
        ActionKind.POWER_CYCLE: Words("重新上电", "Power-cycle"),
        ActionKind.PRINT_TEST: Words("打印测试页", "Print a test page"),
    }[kind]


def action_description(kind: ActionKind, peripheral: PeripheralView | None) -> Words:
    """Exactly what will happen, for the confirmation page."""
    title = peripheral.title if peripheral else Words("设备", "the device")
    match kind:
        case ActionKind.REBOOT_TERMINAL:
            return Words(
                "将重新启动整台终端。重启期间（通常 2 到 3 分钟）屏幕会黑掉，终端无法办理业务，"
                "正在办理的业务会中断；之后会自动恢复。",
                "The whole terminal will restart. For 2 to 3 minutes the screen goes dark and "
                "nobody can use it; anything in progress is interrupted. It comes back by itself.",
            )
        case ActionKind.RESTART_APP:
            return Words(
                "将关闭并重新打开自助服务程序。大约 1 分钟内终端无法办理业务，"
                "正在办理的业务会中断。",
                "The kiosk application will close and open again. For about a minute nobody can "
                "use the terminal; anything in progress is interrupted.",
            )
        case ActionKind.POWER_CYCLE:
            return Words(
                f"将关闭并重新打开 {title.zh} 的电源。几秒钟内 {title.zh} 无法使用，"
                "正在进行的操作（如打印）会中断。",
                f"The power of {title.en} will be switched off and on again. For a few seconds "
                f"{title.en} cannot be used; anything it is doing (such as printing) stops.",
            )
        case ActionKind.PRINT_TEST:
            return Words(
                f"将用 {title.zh} 打印一张测试页，用来检查打印是否正常。",
                f"{title.en} will print one test page, to check that printing works.",
            )
