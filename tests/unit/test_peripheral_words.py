"""Every reason a driver or the agent can give reaches village staff as a plain problem and a
plain action, Chinese first; a code nobody wrote a text for still names itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_agent.peripheral_words import AGENT_REASONS, explain, explain_all
from edge_agent.status_model import Words
from firmware_bridge.profiles import load_profile
from firmware_bridge.roles import Role

BRIDGE = Path(__file__).resolve().parents[2] / "firmware_bridge"

# Every reason code firmware_bridge can put in an assessment, found by reading it:
_LINK = [  # link.py and the defaults of errors.py: the device cannot be reached (absent)
    "unreachable", "no_answer", "connect_timeout", "port_missing", "connection_refused",
    "permission_denied", "port_busy", "open_failed", "closed", "io_error", "disconnected",
    "send_timeout",
]  # fmt: skip
_GENERAL = ["malformed", "refused", "error", "busy"]  # errors.py defaults
_ESCPOS = [  # escpos/protocol.py: assess() and the status decoders
    "paper_out", "cover_open", "cutter_error", "unrecoverable_error", "recoverable_error",
    "unspecified_error", "offline", "paper_near_end", "auto_recoverable_error", "feed_button",
    "bad_fixed_bits", "overlong", "short",
]  # fmt: skip
_MODBUS = [  # modbus/protocol.py replies, modbus/driver.py switching, modbus/board.py assess()
    "bad_crc", "wrong_unit", "wrong_function", "bad_length", "bad_echo",
    "not_switched_on", "not_switched_off", "self_powered",
    "cabinet_door_open", "tilted",
    *(f"modbus_exception_{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 10, 11)),
]  # fmt: skip
_NUT = [  # nut/protocol.py: upsd's errors, the parsers, assess()
    "ups_unknown", "ups_driver_not_connected", "ups_data_stale", "nut_access_denied",
    "nut_unknown_command", "nut_invalid_argument", "bad_quoting", "bad_escape",
    "bad_encoding", "bad_error_line", "trailing_data", "too_many_lines", "unexpected_line",
    "wrong_ups", "bad_variable_name", "duplicate_variable", "bad_number",
    "number_out_of_range", "ups_status_unknown", "on_battery", "low_battery",
    "replace_battery", "overload", "bypass", "ups_off",
]  # fmt: skip


def _board_codes() -> list[str]:
    """The codes board.assess() builds from the shipped profiles' channel and reading names."""
    codes = []
    for name in ("comprehensive", "zone24"):
        board = load_profile(name).board
        assert board is not None
        assert board.board is not None
        codes += [f"{c.name}_off" for c in board.board.channels]
        codes += [f"{r.name}_{side}" for r in board.board.registers for side in ("low", "high")]
    return sorted(set(codes))


BRIDGE_CODES = sorted({*_LINK, *_GENERAL, *_ESCPOS, *_MODBUS, *_NUT, *_board_codes()})

# Reasons in firmware_bridge that never reach an assessment: a ConfigError (our side) is raised
# out of a poll, not reported as the device's health.
NOT_HEALTH = {
    "unknown_peripheral", "no_printer", "no_board", "no_power_channel", "not_simulated",
    "not_started", "listen_failed", "port", "unknown_input", "unknown_channel",
    "unknown_reading", "unknown_code_page", "out_of_range", "config",
}  # fmt: skip


@pytest.mark.parametrize("code", [*BRIDGE_CODES, *AGENT_REASONS])
def test_every_known_reason_has_its_own_words(code: str) -> None:
    text = explain(code, role="receipt_printer")
    assert text.specific, code
    assert text.action is not None, code
    for words in (text.problem, text.action):
        assert words.zh
        assert words.en
        assert re.search(r"[\u4e00-\u9fff]", words.zh), f"{code}: Chinese text is not Chinese"
        assert "{" not in words.zh + words.en, f"{code}: unfilled template"


def test_the_list_above_covers_every_literal_reason_in_the_bridge() -> None:
    """A reason added to firmware_bridge fails here until it has words (or is declared not to
    be a health reason)."""
    found: set[str] = set()
    for path in BRIDGE.rglob("*.py"):
        source = path.read_text("utf-8")
        # reason="..." not followed by "+" (a prefix such as "nut_" + code is listed above)
        found |= set(re.findall(r"reason\s*=\s*\"([a-z0-9_]+)\"(?!\s*\+)", source))
        found |= set(re.findall(r"Assessment\(\s*Health\.\w+,\s*\(\"([a-z0-9_]+)\",\)", source))
        found |= set(re.findall(r"(?:faults|warnings)\.append\(\"([a-z0-9_]+)\"\)", source))
        found |= set(re.findall(r"\(\s*\w+,\s*\"([a-z0-9_]+)\",", _ups_errors(source)))
        # modbus replies: self._violation(f"...", "bad_crc"); link: return "port_missing"
        found |= set(re.findall(r"_violation\(\s*f?\"[^\"]*\",\s*\"([a-z0-9_]+)\"", source))
        found |= set(re.findall(r"return \"([a-z0-9_]+)\"", _function(source, "_open_reason")))
    missing = found - set(BRIDGE_CODES) - NOT_HEALTH
    assert not missing
    # The search itself works: it finds codes of every family and every way they are written.
    assert {
        "paper_out", "paper_near_end", "no_answer", "ups_data_stale", "ups_unknown",
        "port_missing", "bad_crc", "low_battery",
    } <= found  # fmt: skip


def _function(source: str, name: str) -> str:
    start = source.find(f"def {name}(")
    return source[start : source.find("\n\n", start)] if start >= 0 else ""


def _ups_errors(source: str) -> str:
    start = source.find("_UPS_ERRORS")
    return source[start : source.find("}", start)] if start >= 0 else ""


def test_receipt_printer_paper_out_in_both_languages() -> None:
    text = explain("paper_out", role="receipt_printer")
    assert text.problem == Words("打印机缺纸", "The printer is out of paper")
    assert text.action == Words("请更换纸卷", "Load a new paper roll")


def test_missing_usb_reader_names_the_device() -> None:
    text = explain("usb_missing", role=Role.ID_CARD_READER.value)
    assert text.problem == Words("未检测到身份证阅读器", "The ID-card reader is not detected")
    assert text.action is not None
    assert text.action.zh == "请检查 USB 线是否插好，或重新上电"


def test_the_peripherals_own_title_wins_over_the_roles() -> None:
    text = explain("no_answer", role="receipt_printer", title=Words("取号打印机", "Ticket printer"))
    assert text.problem == Words("取号打印机没有回应", "The ticket printer does not answer")


def test_the_same_code_is_more_precise_on_a_ups() -> None:
    printer = explain("connection_refused", role="receipt_printer")
    ups = explain("connection_refused", role="ups")
    assert ups.action is not None
    assert "UPS 监控服务" in ups.problem.zh
    assert "upsd" in ups.action.en
    assert printer.problem.zh == "凭条打印机拒绝连接"


def test_board_codes_built_from_names_read_as_the_thing_they_name() -> None:
    assert explain("receipt_printer_off").problem.zh == "凭条打印机的电源已关闭"
    assert explain("screen_off").problem.en == "Power to the screen is off"
    assert explain("supply_voltage_low").problem.zh == "供电电压偏低"
    assert explain("fan_speed_low").problem.zh == "控制板读数“fan_speed”偏低"
    assert "Modbus 异常 6" in explain("modbus_exception_6").problem.zh


def test_an_unknown_code_still_says_something_and_names_the_code() -> None:
    text = explain("warp_core_breach", role="qr_scanner")
    assert not text.specific
    assert text.problem == Words(
        "扫码器报告异常（代码 warp_core_breach）",
        "The QR code scanner reports a problem (code warp_core_breach)",
    )
    assert text.action is not None
    assert "warp_core_breach" in text.action.zh


def test_an_unknown_role_still_gets_a_sentence() -> None:
    assert explain("no_answer", role="teleporter").problem.zh == "设备没有回应"


def test_several_reasons_are_each_said_once_in_order() -> None:
    problem, action = explain_all(["paper_out", "cover_open", "paper_out"], role="receipt_printer")
    assert problem == Words(
        "打印机缺纸；打印机盖没有关好", "The printer is out of paper; The printer cover is open"
    )
    assert action is not None
    assert action.zh == "请更换纸卷；请合上打印机盖"
    assert explain_all([], role="receipt_printer") == (None, None)
