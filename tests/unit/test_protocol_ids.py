"""Id rules of DESIGN.md: what a terminal, site, command id and command name may be.

A terminal id is also a certificate CN and an MQTT topic level, so anything that could escape
its level (separators, wildcards, whitespace, control characters) must be refused.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fleet_protocol import (
    InvalidId,
    ProtocolError,
    command_id,
    command_name,
    site_id,
    terminal_id,
)

TerminalRule = Callable[[object], str]

# terminal_id and site_id follow the same rule; every case below runs against both.
TERMINAL_LIKE: list[TerminalRule] = [terminal_id, site_id]

VALID_TERMINAL_IDS = [
    "kiosk-001",
    "abc",
    "000",
    "a-b",
    "abc-",
    "pd-zhangjiang-01",
    "a" * 63,
    "k" + "-" * 62,
]

INVALID_TERMINAL_IDS = {
    "empty": "",
    "one-char": "a",
    "two-chars": "ab",
    "64-chars": "a" * 64,
    "100-chars": "a" * 100,
    "upper-case": "Kiosk-001",
    "all-upper": "KIOSK",
    "leading-dash": "-kiosk",
    "slash": "kiosk/001",
    "plus": "kiosk+001",
    "hash": "kiosk#001",
    "bare-plus": "+",
    "bare-hash": "#",
    "space-inside": "kiosk 001",
    "leading-space": " kiosk",
    "trailing-space": "kiosk ",
    "tab": "kiosk\t001",
    "nul": "kiosk\x00001",
    "trailing-newline": "abc\n",
    "leading-newline": "\nabc",
    "underscore": "kiosk_001",
    "dot": "kiosk.001",
    "chinese": "自助终端",
    "chinese-mixed": "kiosk-终端",
    "fullwidth-latin": "ａｂｃ",
    "dollar-share": "$share",
}

NOT_STRINGS = {"int": 123, "none": None, "bytes": b"kiosk-001", "list": ["kiosk-001"]}


@pytest.mark.parametrize("rule", TERMINAL_LIKE, ids=["terminal", "site"])
@pytest.mark.parametrize("value", VALID_TERMINAL_IDS)
def test_valid_terminal_and_site_ids_are_returned_unchanged(rule: TerminalRule, value: str) -> None:
    result = rule(value)
    assert result == value
    assert type(result) is str


@pytest.mark.parametrize("rule", TERMINAL_LIKE, ids=["terminal", "site"])
@pytest.mark.parametrize("value", INVALID_TERMINAL_IDS.values(), ids=INVALID_TERMINAL_IDS.keys())
def test_invalid_terminal_and_site_ids_are_refused(rule: TerminalRule, value: str) -> None:
    with pytest.raises(InvalidId):
        rule(value)


@pytest.mark.parametrize("rule", TERMINAL_LIKE, ids=["terminal", "site"])
@pytest.mark.parametrize("value", NOT_STRINGS.values(), ids=NOT_STRINGS.keys())
def test_terminal_and_site_ids_must_be_strings(rule: TerminalRule, value: object) -> None:
    with pytest.raises(InvalidId, match="must be a string"):
        rule(value)


def test_the_error_names_the_kind_of_id_and_the_value() -> None:
    with pytest.raises(InvalidId, match="terminal id 'Kiosk-001'"):
        terminal_id("Kiosk-001")
    with pytest.raises(InvalidId, match="site id 'a b'"):
        site_id("a b")


def test_invalid_id_is_a_protocol_error_and_a_value_error() -> None:
    with pytest.raises(ProtocolError):
        terminal_id("+")
    with pytest.raises(ValueError, match="terminal id"):
        terminal_id("#")


# --- command ids: 8-64 of letters, digits, '_' and '-', starting with a letter or digit -------

VALID_COMMAND_IDS = [
    "01234567",
    "cmd-0001",
    "A1b2C3d4",
    "abc_DEF-123",
    "0f8fad5b-d9cb-469f-a165-70867728950e",
    "x" * 64,
    "Z" + "_" * 63,
]

INVALID_COMMAND_IDS = {
    "empty": "",
    "7-chars": "cmd-001",
    "65-chars": "x" * 65,
    "leading-underscore": "_abcdefgh",
    "leading-dash": "-abcdefgh",
    "slash": "abcd/efgh",
    "plus": "abcd+efgh",
    "hash": "abcd#efgh",
    "dot": "abcd.efgh",
    "space": "abcd efgh",
    "nul": "abcd\x00efgh",
    "trailing-newline": "abcdefgh\n",
    "chinese": "命令命令命令命令",
}


@pytest.mark.parametrize("value", VALID_COMMAND_IDS)
def test_valid_command_ids_are_returned_unchanged(value: str) -> None:
    assert command_id(value) == value


@pytest.mark.parametrize("value", INVALID_COMMAND_IDS.values(), ids=INVALID_COMMAND_IDS.keys())
def test_invalid_command_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidId, match="command id"):
        command_id(value)


@pytest.mark.parametrize("value", NOT_STRINGS.values(), ids=NOT_STRINGS.keys())
def test_command_ids_must_be_strings(value: object) -> None:
    with pytest.raises(InvalidId, match="must be a string"):
        command_id(value)


# --- command names: the last level of cmd/{name}; 2-32 of a-z, 0-9, '-', starting a-z -------

VALID_COMMAND_NAMES = ["ab", "reboot", "open-door", "s3", "screenshot", "a" * 32, "x-"]

INVALID_COMMAND_NAMES = {
    "empty": "",
    "one-char": "a",
    "33-chars": "a" * 33,
    "upper-case": "Reboot",
    "leading-digit": "1reboot",
    "leading-dash": "-reboot",
    "underscore": "re_boot",
    "slash": "re/boot",
    "bare-plus": "+",
    "bare-hash": "#",
    "space": "re boot",
    "nul": "re\x00boot",
    "trailing-newline": "reboot\n",
    "chinese": "重启",
}


@pytest.mark.parametrize("value", VALID_COMMAND_NAMES)
def test_valid_command_names_are_returned_unchanged(value: str) -> None:
    assert command_name(value) == value


@pytest.mark.parametrize("value", INVALID_COMMAND_NAMES.values(), ids=INVALID_COMMAND_NAMES.keys())
def test_invalid_command_names_are_refused(value: str) -> None:
    with pytest.raises(InvalidId, match="command name"):
        command_name(value)


@pytest.mark.parametrize("value", NOT_STRINGS.values(), ids=NOT_STRINGS.keys())
def test_command_names_must_be_strings(value: object) -> None:
    with pytest.raises(InvalidId, match="must be a string"):
        command_name(value)
