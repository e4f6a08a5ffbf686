"""What a peripheral's reason codes mean to the person standing at the kiosk, and what to do.

The drivers of :mod:`firmware_bridge` report stable reason codes (``paper_out``, ``no_answer``,
``cabinet_door_open`` ...); the agent adds its own for USB hotplug (``usb_missing``,
``usb_unplugged``), for a cable that comes and goes (``flapping``) and for a device it cannot
check (``unwatched``, ``not_checked``). Village staff are not IT people, so every code becomes a
plain problem and a plain action, Chinese first. Pure: tables and string formatting only.

Texts may name the device (``{device}``): the peripheral's own title when the caller has it,
otherwise the role's title. A code without a text of its own still gets a sensible sentence
naming the code, so staff can read it to the service desk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from edge_agent.status_model import Words
from firmware_bridge.roles import ROLE_TITLES, Role

#: Reasons the agent itself gives (the bridge gives the rest).
USB_MISSING: Final = "usb_missing"
"""A USB peripheral not seen since the agent started."""
USB_UNPLUGGED: Final = "usb_unplugged"
"""A USB peripheral that was there and was removed."""
FLAPPING: Final = "flapping"
"""The peripheral changed state too often within a short time: a loose cable or connector."""
UNWATCHED: Final = "unwatched"
"""Nothing can check this peripheral here (no udev, no driver): its state is not known."""
NOT_CHECKED: Final = "not_checked"
"""The agent has just started and has not heard from the peripheral yet."""

AGENT_REASONS: Final = (USB_MISSING, USB_UNPLUGGED, FLAPPING, UNWATCHED, NOT_CHECKED)


@dataclass(frozen=True, slots=True)
class ReasonText:
    """One reason code in plain words."""

    code: str
    problem: Words
    action: Words | None
    #: False for the generic fallback of a code this module has no text for.
    specific: bool = True


@dataclass(frozen=True, slots=True)
class _Text:
    problem_zh: str
    problem_en: str
    action_zh: str | None = None
    action_en: str | None = None


_GENERIC: Final = _Text(
    "{device}报告异常（代码 {code}）",
    "The {device} reports a problem (code {code})",
    "请重新上电；如果仍然出现，请联系运维并告知代码 {code}",
    "Power it off and on again; if it persists, call the service desk and give the code {code}",
)

# --- the texts -------------------------------------------------------------------------------

_CHECK_CABLE_ZH: Final = "请检查{device}的电源和线缆是否插好，或重新上电"
_CHECK_CABLE_EN: Final = "Check the {device}'s power and cable, or power it off and on again"
_POWER_CYCLE_ZH: Final = "请重新上电；如果仍然出现，请联系运维"
_POWER_CYCLE_EN: Final = "Power it off and on again; if it persists, call the service desk"
_GARBLED: Final = _Text(
    "{device}回复的数据有误",
    "The {device} sends garbled replies",
    "请重新上电；如果仍然出现，请检查线缆或联系运维",
    "Power it off and on again; if it persists, check the cable or call the service desk",
)
_USB_ACTION_ZH: Final = "请检查 USB 线是否插好，或重新上电"
_USB_ACTION_EN: Final = "Check that the USB cable is plugged in, or power the device off and on"
_CALL_DESK_ZH: Final = "请联系运维"
_CALL_DESK_EN: Final = "Call the service desk"

_TEXTS: Final[Mapping[str, _Text]] = MappingProxyType(
    {
        # -- the agent's own reasons
        USB_MISSING: _Text(
            "未检测到{device}", "The {device} is not detected", _USB_ACTION_ZH, _USB_ACTION_EN
        ),
        USB_UNPLUGGED: _Text(
            "{device}的 USB 连接已断开",
            "The {device} was unplugged",
            _USB_ACTION_ZH,
            _USB_ACTION_EN,
        ),
        FLAPPING: _Text(
            "{device}接触不良，时断时续",
            "The {device} keeps disconnecting and reconnecting",
            "请检查线缆是否插牢，必要时更换线缆",
            "Check that its cable is firmly plugged in; replace the cable if needed",
        ),
        UNWATCHED: _Text(
            "无法检测{device}的状态",
            "The kiosk cannot check the {device}",
            "如果设备能正常使用则无需处理；否则请联系运维",
            "Nothing to do if it works; otherwise call the service desk",
        ),
        NOT_CHECKED: _Text(
            "正在检测{device}", "Checking the {device}", "请稍候", "Please wait a moment"
        ),
        # -- the link to a device (firmware_bridge.link, errors.py defaults): absent
        "unreachable": _Text(
            "无法连接{device}",
            "The kiosk cannot reach the {device}",
            _CHECK_CABLE_ZH,
            _CHECK_CABLE_EN,
        ),
        "no_answer": _Text(
            "{device}没有回应", "The {device} does not answer", _CHECK_CABLE_ZH, _CHECK_CABLE_EN
        ),
        "connect_timeout": _Text(
            "连接{device}超时",
            "Connecting to the {device} timed out",
            _CHECK_CABLE_ZH,
            _CHECK_CABLE_EN,
        ),
        "port_missing": _Text(
            "未检测到{device}的连接",
            "The {device} is not connected",
            _CHECK_CABLE_ZH,
            _CHECK_CABLE_EN,
        ),
        "connection_refused": _Text(
            "{device}拒绝连接",
            "The {device} refused the connection",
            _POWER_CYCLE_ZH,
            _POWER_CYCLE_EN,
        ),
        "permission_denied": _Text(
            "终端程序没有权限访问{device}",
            "The kiosk agent may not open the {device}'s port",
            "请联系运维检查端口的权限设置",
            "Call the service desk: the port's permissions need fixing",
        ),
        "port_busy": _Text(
            "{device}的端口被其他程序占用",
            "Another program is using the {device}'s port",
            "请重启终端；如果仍然出现，请联系运维",
            "Restart the terminal; if it persists, call the service desk",
        ),
        "open_failed": _Text(
            "无法打开{device}的连接端口",
            "The {device}'s port cannot be opened",
            _CHECK_CABLE_ZH,
            _CHECK_CABLE_EN,
        ),
        "closed": _Text(
            "与{device}的连接已关闭",
            "The connection to the {device} was closed",
            "通常会自动恢复；如果持续出现，请重新上电",
            "This usually recovers by itself; if it persists, power it off and on again",
        ),
        "io_error": _Text(
            "与{device}通信出错",
            "Communication with the {device} failed",
            _CHECK_CABLE_ZH,
            _CHECK_CABLE_EN,
        ),
        "disconnected": _Text(
            "{device}断开了连接",
            "The {device} dropped the connection",
            _CHECK_CABLE_ZH,
            _CHECK_CABLE_EN,
        ),
        "send_timeout": _Text(
            "向{device}发送数据超时",
            "Sending to the {device} timed out",
            _CHECK_CABLE_ZH,
            _CHECK_CABLE_EN,
        ),
        # -- replies that break the protocol: faulty
        "malformed": _GARBLED,
        "bad_fixed_bits": _GARBLED,
        "overlong": _GARBLED,
        "short": _GARBLED,
        "bad_length": _GARBLED,
        "bad_echo": _GARBLED,
        "wrong_function": _GARBLED,
        "bad_quoting": _GARBLED,
        "bad_escape": _GARBLED,
        "bad_encoding": _GARBLED,
        "bad_error_line": _GARBLED,
        "trailing_data": _GARBLED,
        "too_many_lines": _GARBLED,
        "unexpected_line": _GARBLED,
        "bad_variable_name": _GARBLED,
        "duplicate_variable": _GARBLED,
        "bad_number": _GARBLED,
        "number_out_of_range": _GARBLED,
        "bad_crc": _Text(
            "与{device}的通信受到干扰（校验错误）",
            "Communication with the {device} is disturbed (checksum errors)",
            "请检查串口线是否插牢、是否挨着电源线；如果仍然出现，请联系运维",
            "Check that the serial cable is firm and away from power cables; "
            "if it persists, call the service desk",
        ),
        "wrong_unit": _Text(
            "回应的不是这块控制板（地址不对）",
            "Another board answered (wrong Modbus address)",
            "请联系运维核对控制板的地址设置",
            "Call the service desk to check the board's address setting",
        ),
        "wrong_ups": _Text(
            "UPS 监控服务返回了另一台 UPS 的数据",
            "The UPS monitoring service answered about another UPS",
            "请联系运维核对 UPS 名称设置",
            "Call the service desk to check the UPS name in the settings",
        ),
        # -- refusals and the bridge's other general codes
        "refused": _Text(
            "{device}拒绝了请求", "The {device} refused a request", _POWER_CYCLE_ZH, _POWER_CYCLE_EN
        ),
        "error": _Text(
            "{device}出现错误", "The {device} has an error", _POWER_CYCLE_ZH, _POWER_CYCLE_EN
        ),
        "config": _Text(
            "{device}的设置有误",
            "The {device}'s settings are wrong",
            "请联系运维检查设备配置",
            "Call the service desk to check the device settings",
        ),
        "busy": _Text(
            "{device}正在重新上电",
            "The {device} is being power-cycled already",
            "请稍候再试",
            "Wait a moment and try again",
        ),
        "self_powered": _Text(
            "终端主机的电源不能单独关闭",
            "The terminal's own power cannot simply be switched off",
            "请使用“重启终端”",
            "Use 'Restart terminal' instead",
        ),
        # -- ESC/POS receipt printer (firmware_bridge.escpos.protocol.assess)
        "paper_out": _Text(
            "打印机缺纸", "The printer is out of paper", "请更换纸卷", "Load a new paper roll"
        ),
        "paper_near_end": _Text(
            "打印纸快用完了",
            "The paper roll is nearly used up",
            "请准备新纸卷，尽快更换",
            "Have a new roll ready and change it soon",
        ),
        "cover_open": _Text(
            "打印机盖没有关好",
            "The printer cover is open",
            "请合上打印机盖",
            "Close the printer cover",
        ),
        "cutter_error": _Text(
            "打印机切刀卡住",
            "The printer's paper cutter is jammed",
            "请打开打印机盖，清除卡纸后合上；如果仍然出现，请重新上电",
            "Open the cover, clear the jammed paper and close it; "
            "if it persists, power the printer off and on",
        ),
        "unrecoverable_error": _Text(
            "打印机故障，无法自行恢复",
            "The printer has a fault it cannot recover from",
            "请重新上电；如果仍然出现，请联系运维维修",
            "Power it off and on again; if it persists, call the service desk for repair",
        ),
        "recoverable_error": _Text(
            "打印机卡纸或机械故障",
            "The printer has a paper jam or a mechanical fault",
            "请打开打印机盖清除卡纸，再合上",
            "Open the cover, clear the jam and close it",
        ),
        "unspecified_error": _Text(
            "打印机报告故障",
            "The printer reports an error",
            "请检查纸卷和打印机盖，然后重新上电",
            "Check the paper roll and the cover, then power the printer off and on",
        ),
        "offline": _Text(
            "打印机处于离线状态",
            "The printer is offline",
            "请检查打印机盖和纸卷；如果仍然离线，请重新上电",
            "Check the cover and the paper roll; if it stays offline, power it off and on",
        ),
        "auto_recoverable_error": _Text(
            "打印头过热，正在冷却",
            "The print head is too hot and is cooling down",
            "无需处理，稍后会自动恢复",
            "Nothing to do: it resumes by itself",
        ),
        "feed_button": _Text(
            "有人正在按打印机的走纸键",
            "Someone is pressing the printer's paper feed button",
            "松开走纸键即可",
            "Release the feed button",
        ),
        # -- the controller board (firmware_bridge.modbus.board.assess and the driver)
        "cabinet_door_open": _Text(
            "机柜门开着",
            "The cabinet door is open",
            "维护完成后请关好并锁上机柜门；如无人维护，请到现场查看",
            "Close and lock the cabinet door after service; "
            "if nobody is servicing it, go and check",
        ),
        "tilted": _Text(
            "终端被移动或倾倒",
            "The kiosk has been tilted or moved",
            "请立即到现场查看终端是否倾倒或被搬动",
            "Go and check the kiosk at once: it may have fallen over or been moved",
        ),
        "supply_voltage_low": _Text(
            "供电电压偏低",
            "The mains voltage is too low",
            "请联系电工检查供电线路",
            "Ask an electrician to check the power supply",
        ),
        "supply_voltage_high": _Text(
            "供电电压偏高",
            "The mains voltage is too high",
            "请联系电工检查供电线路",
            "Ask an electrician to check the power supply",
        ),
        "cabinet_temperature_high": _Text(
            "机柜内温度过高",
            "The cabinet is too hot inside",
            "请检查机柜风扇和通风口是否被挡住",
            "Check that the cabinet's fans and vents are not blocked",
        ),
        "cabinet_temperature_low": _Text(
            "机柜内温度过低",
            "The cabinet is too cold inside",
            "请检查机柜加热器是否工作",
            "Check that the cabinet heater works",
        ),
        "not_switched_on": _Text(
            "控制板没能接通电源",
            "The controller board did not switch the power on",
            "请联系运维检查控制板的继电器",
            "Call the service desk to check the board's relays",
        ),
        "not_switched_off": _Text(
            "控制板没能断开电源",
            "The controller board did not switch the power off",
            "请联系运维检查控制板的继电器",
            "Call the service desk to check the board's relays",
        ),
        # -- the UPS through NUT (firmware_bridge.nut.protocol)
        "on_battery": _Text(
            "市电停电，终端正在使用 UPS 电池供电",
            "Mains power is off: the kiosk runs on the UPS battery",
            "请检查市电是否恢复（空气开关、插座）",
            "Check why mains power is off (circuit breaker, socket)",
        ),
        "low_battery": _Text(
            "UPS 电池电量低，终端即将断电",
            "The UPS battery is nearly empty: the kiosk will lose power soon",
            "请尽快恢复市电供电",
            "Restore mains power as soon as possible",
        ),
        "replace_battery": _Text(
            "UPS 电池需要更换",
            "The UPS battery needs replacing",
            "请联系运维更换 UPS 电池",
            "Call the service desk to replace the UPS battery",
        ),
        "overload": _Text(
            "UPS 负载过重",
            "The UPS is overloaded",
            "请拔掉接在 UPS 上的非终端设备（如电暖器、热水壶）",
            "Unplug anything on the UPS that is not part of the kiosk (heaters, kettles)",
        ),
        "bypass": _Text(
            "UPS 处于旁路状态，停电时无法保护终端",
            "The UPS is on bypass and will not protect the kiosk in a power cut",
            "请联系运维检查 UPS",
            "Call the service desk to check the UPS",
        ),
        "ups_off": _Text(
            "UPS 输出已关闭",
            "The UPS output is switched off",
            "请检查 UPS 的开关是否打开",
            "Check that the UPS is switched on",
        ),
        "ups_status_unknown": _Text(
            "UPS 没有报告是市电还是电池供电",
            "The UPS does not report whether it is on mains or on battery",
            "请检查 UPS 与终端之间的数据线",
            "Check the data cable between the UPS and the kiosk",
        ),
        "ups_unknown": _Text(
            "UPS 监控服务里没有这台 UPS",
            "The UPS monitoring service does not know this UPS",
            "请联系运维检查 UPS 名称设置",
            "Call the service desk to check the UPS name in the settings",
        ),
        "ups_driver_not_connected": _Text(
            "UPS 没有连接到终端",
            "The UPS is not connected to the kiosk",
            "请检查 UPS 的 USB 数据线是否插好",
            "Check that the UPS's USB data cable is plugged in",
        ),
        "ups_data_stale": _Text(
            "UPS 已连接，但不再报告数据",
            "The UPS is connected but not reporting",
            "请检查 UPS 数据线，必要时拔下重插",
            "Check the UPS data cable; unplug and replug it if needed",
        ),
        "nut_access_denied": _Text(
            "UPS 监控服务拒绝访问",
            "The UPS monitoring service denies access",
            "请联系运维检查 UPS 监控服务的访问设置",
            "Call the service desk to check the UPS monitoring service's access settings",
        ),
    }
)

_UPS_SERVICE_DOWN: Final = _Text(
    "UPS 监控服务没有运行",
    "The UPS monitoring service is not running",
    "请重启终端；如果仍然出现，请联系运维检查 UPS 监控服务（upsd）",
    "Restart the terminal; if it persists, call the service desk about the UPS service (upsd)",
)
_BOARD_SILENT: Final = _Text(
    "控制板没有回应",
    "The controller board does not answer",
    "请检查控制板的电源和串口线；如果仍然出现，请联系运维",
    "Check the board's power and serial cable; if it persists, call the service desk",
)

# The same code means something more precise on some devices: a UPS is reached through the
# upsd service on the kiosk itself, so a refused connection means that service is down.
_BY_ROLE: Final[Mapping[tuple[Role, str], _Text]] = MappingProxyType(
    {
        (Role.UPS, "connection_refused"): _UPS_SERVICE_DOWN,
        (Role.UPS, "connect_timeout"): _UPS_SERVICE_DOWN,
        (Role.UPS, "unreachable"): _UPS_SERVICE_DOWN,
        (Role.UPS, "no_answer"): _UPS_SERVICE_DOWN,
        (Role.UPS, "disconnected"): _UPS_SERVICE_DOWN,
        (Role.CONTROLLER_BOARD, "no_answer"): _BOARD_SILENT,
        (Role.CONTROLLER_BOARD, "port_missing"): _BOARD_SILENT,
    }
)

# Power channels of the shipped profiles that are not named after a role.
_CHANNEL_TITLES: Final[Mapping[str, tuple[str, str]]] = MappingProxyType(
    {
        "terminal_psu": ("终端主机", "the terminal's computer"),
        "screen": ("显示屏", "the screen"),
        "card_readers": ("读卡器", "the card readers"),
        "cameras": ("摄像头", "the cameras"),
        "locker": ("取件柜", "the pickup locker"),
        "heater": ("机柜加热器", "the cabinet heater"),
    }
)


def _channel_title(name: str) -> tuple[str, str]:
    if name in _CHANNEL_TITLES:
        return _CHANNEL_TITLES[name]
    try:
        role = Role(name)
    except ValueError:
        return f"电源通道“{name}”", f"power channel '{name}'"
    zh, en = ROLE_TITLES[role]
    return zh, f"the {_mid_sentence(en)}"


def _channel_off(match: re.Match[str]) -> _Text:
    zh, en = _channel_title(match["name"])
    return _Text(
        f"{zh}的电源已关闭",
        f"Power to {en} is off",
        "可在本页对相应设备重新上电；如果又断开，请联系运维",
        "Power-cycle that device from this page; if it goes off again, call the service desk",
    )


def _reading(match: re.Match[str]) -> _Text:
    name, side = match["name"], match["side"]
    zh, en = ("偏低", "below") if side == "low" else ("偏高", "above")
    return _Text(
        f"控制板读数“{name}”{zh}",
        f"The board's reading '{name}' is {en} its limit",
        _CALL_DESK_ZH,
        _CALL_DESK_EN,
    )


def _modbus_exception(match: re.Match[str]) -> _Text:
    return _Text(
        f"控制板拒绝了指令（Modbus 异常 {match['n']}）",
        f"The controller board refused a command (Modbus exception {match['n']})",
        "请对控制板重新上电；如果仍然出现，请联系运维",
        "Power the board off and on; if it persists, call the service desk",
    )


def _nut_refusal(match: re.Match[str]) -> _Text:
    return _Text(
        f"UPS 监控服务拒绝了请求（{match['what']}）",
        f"The UPS monitoring service refused a request ({match['what']})",
        "请联系运维检查 UPS 监控服务的设置",
        "Call the service desk to check the UPS monitoring service's settings",
    )


# Codes the bridge builds from names in the board's register map or from a peer's error code.
_PATTERNS: Final[tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], _Text]], ...]] = (
    (re.compile(r"(?P<name>[a-z][a-z0-9_]*)_off"), _channel_off),
    (re.compile(r"(?P<name>[a-z][a-z0-9_]*)_(?P<side>low|high)"), _reading),
    (re.compile(r"modbus_exception_(?P<n>[0-9]+)"), _modbus_exception),
    (re.compile(r"nut_(?P<what>[a-z0-9_]+)"), _nut_refusal),
)


def _mid_sentence(title_en: str) -> str:
    # "Receipt printer" reads "the receipt printer" mid-sentence; "ID-card reader" and "UPS"
    # keep their capitals.
    if len(title_en) > 1 and title_en[0].isupper() and title_en[1].islower():
        return title_en[0].lower() + title_en[1:]
    return title_en


def device_title(role: str | None, title: Words | None = None) -> Words:
    """What to call the device: its own title, else its role's, else just "device"."""
    if title is not None:
        return title
    if role is not None:
        try:
            zh, en = ROLE_TITLES[Role(role)]
        except ValueError:
            pass
        else:
            return Words(zh, en)
    return Words("设备", "device")


def _lookup(code: str, role: str | None) -> tuple[_Text, bool]:
    if role is not None:
        try:
            by_role = _BY_ROLE.get((Role(role), code))
        except ValueError:
            by_role = None
        if by_role is not None:
            return by_role, True
    text = _TEXTS.get(code)
    if text is not None:
        return text, True
    for pattern, build in _PATTERNS:
        match = pattern.fullmatch(code)
        if match is not None:
            return build(match), True
    return _GENERIC, False


def explain(code: str, *, role: str | None = None, title: Words | None = None) -> ReasonText:
    """One reason code in plain words, for a device of ``role`` called ``title``."""
    text, specific = _lookup(code, role)
    device = device_title(role, title)
    zh_device, en_device = device.zh, _mid_sentence(device.en)

    def fill(template: str, device_name: str) -> str:
        return template.replace("{device}", device_name).replace("{code}", code)

    action = None
    if text.action_zh is not None and text.action_en is not None:
        action = Words(fill(text.action_zh, zh_device), fill(text.action_en, en_device))
    return ReasonText(
        code,
        Words(fill(text.problem_zh, zh_device), fill(text.problem_en, en_device)),
        action,
        specific,
    )


def explain_all(
    codes: Iterable[str], *, role: str | None = None, title: Words | None = None
) -> tuple[Words | None, Words | None]:
    """The problem and the action for several reasons at once (each said once, in order)."""
    texts = [explain(c, role=role, title=title) for c in dict.fromkeys(codes)]
    if not texts:
        return None, None
    problems = list(dict.fromkeys(t.problem for t in texts))
    actions = list(dict.fromkeys(t.action for t in texts if t.action is not None))
    problem = Words("；".join(p.zh for p in problems), "; ".join(p.en for p in problems))
    action = (
        Words("；".join(a.zh for a in actions), "; ".join(a.en for a in actions))
        if actions
        else None
    )
    return problem, action
