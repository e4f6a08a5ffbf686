"""Device profiles: the two shipped kiosk profiles are valid and complete, and a bad profile is
refused with the file and the field named, so an installer can fix it without a traceback."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from firmware_bridge.errors import ConfigError
from firmware_bridge.profiles import (
    DeviceProtocol,
    Transport,
    UsbId,
    load_profile,
    parse_profile,
    read_profile_mapping,
)
from firmware_bridge.roles import ROLE_TITLES, Role


def test_comprehensive_kiosk_has_what_a_comprehensive_kiosk_has() -> None:
    profile = load_profile("comprehensive")
    assert profile.title == "综合类自助终端"
    roles = {p.role for p in profile.peripherals}
    assert {
        Role.ID_CARD_READER,
        Role.RECEIPT_PRINTER,
        Role.A4_PRINTER,
        Role.DOCUMENT_CAMERA,
        Role.QR_SCANNER,
        Role.TOUCHSCREEN,
        Role.FINGERPRINT_READER,
        Role.CONTROLLER_BOARD,
    } <= roles
    printer = profile.peripheral("receipt-printer")
    assert printer.protocol is DeviceProtocol.ESCPOS
    assert printer.code_page == "gb18030"
    assert printer.endpoint is not None
    assert printer.endpoint.url.startswith("/dev/serial/by-id/")
    assert printer.title == "凭条打印机"
    board = profile.board
    assert board is not None
    assert board.board is not None
    channels = {c.name for c in board.board.channels}
    assert {"terminal_psu", "screen", "receipt_printer", "id_card_reader"} <= channels


def test_zone24_kiosk_adds_the_zone_devices_and_a_ups() -> None:
    profile = load_profile("zone24")
    roles = {p.role for p in profile.peripherals}
    assert {Role.UPS, Role.DOOR_ACCESS_CONTROLLER, Role.PICKUP_LOCKER, Role.FACE_CAMERA} <= roles
    (ups,) = profile.with_role(Role.UPS)
    assert ups.protocol is DeviceProtocol.NUT
    assert ups.ups_name == "kiosk"
    assert ups.endpoint is not None
    assert ups.endpoint.kind == "tcp"


@pytest.mark.parametrize("name", ["comprehensive", "zone24"])
def test_every_usb_device_can_be_matched_and_every_power_channel_exists(name: str) -> None:
    profile = load_profile(name)
    board = profile.board
    assert board is not None
    assert board.board is not None
    channels = {c.name for c in board.board.channels}
    for p in profile.peripherals:
        if p.transport in (Transport.USB, Transport.USB_SERIAL):
            assert p.usb_ids, p.id
            for usb_id in p.usb_ids:
                assert profile.match_usb(usb_id) is p
        if p.power_channel is not None:
            assert p.power_channel in channels
        assert p.title
        assert p.title_en
    assert profile.match_usb(UsbId(0xDEAD, 0xBEEF)) is None


def test_every_role_has_a_chinese_and_an_english_title() -> None:
    assert set(ROLE_TITLES) == set(Role)
    for zh, en in ROLE_TITLES.values():
        assert zh
        assert en.isascii()


def _raw() -> dict[str, object]:
    raw, _ = read_profile_mapping("comprehensive")
    return copy.deepcopy(raw)


def _peripherals(raw: dict[str, object]) -> list[dict[str, object]]:
    items = raw["peripherals"]
    assert isinstance(items, list)
    return items


def _with(index: int, **changes: object) -> dict[str, object]:
    raw = _raw()
    entry = _peripherals(raw)[index]
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return raw


def _index(raw: dict[str, object], peripheral_id: str) -> int:
    return next(i for i, p in enumerate(_peripherals(raw)) if p["id"] == peripheral_id)


PRINTER = _index(_raw(), "receipt-printer")
READER = _index(_raw(), "id-card-reader")
BOARD = _index(_raw(), "controller-board")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with(READER, role="toaster"), rf"peripherals\[{READER}\]\.role: Invalid enum value"),
        (_with(READER, colour="red"), r"unknown field `colour`"),
        (_with(READER, id="ID Card"), rf"peripherals\[{READER}\]\.id:"),
        (_with(PRINTER, url=None), rf"peripherals\[{PRINTER}\]\.url: required for protocol escpos"),
        (_with(PRINTER, transport="usb"), rf"peripherals\[{PRINTER}\]\.transport: usb cannot"),
        (_with(PRINTER, code_page="klingon"), rf"peripherals\[{PRINTER}\]\.code_page: 'klingon'"),
        (_with(PRINTER, baudrate=1234), rf"peripherals\[{PRINTER}\]\.baudrate: 1234"),
        (_with(PRINTER, url="tcp://printer"), rf"peripherals\[{PRINTER}\]\.url:"),
        (_with(READER, usb=[]), rf"peripherals\[{READER}\]\.usb: a usb device needs"),
        (_with(READER, usb=["c35a"]), rf"peripherals\[{READER}\]\.usb\[0\]: 'c35a' is not"),
        (_with(READER, url="/dev/ttyUSB0"), rf"peripherals\[{READER}\]\.url: a device with"),
        (_with(READER, power_channel="kettle"), rf"peripherals\[{READER}\]\.power_channel: 'ke"),
        (_with(READER, ups="kiosk"), rf"peripherals\[{READER}\]\.ups: only a nut device"),
        (_with(READER, poll_s=0), rf"peripherals\[{READER}\]\.poll_s: Expected `float` >"),
        (_with(PRINTER, id="id-card-reader"), r"\.id: 'id-card-reader' is already peripherals"),
        (_with(PRINTER, usb=["0400:c35a"]), r"\.usb: 0400:c35a is already 'id-card-reader'"),
        (_with(BOARD, board=None), rf"peripherals\[{BOARD}\]\.board: a modbus-rtu board needs"),
    ],
)
def test_a_bad_profile_names_the_file_and_the_field(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^kiosk-7\.toml: .*{message}"):
        parse_profile(raw, "kiosk-7.toml")


def test_board_errors_carry_the_path_into_the_board() -> None:
    raw = _raw()
    board = _peripherals(raw)[BOARD]["board"]
    assert isinstance(board, dict)
    board["registers"][0]["scale"] = "lots"
    with pytest.raises(ConfigError, match=rf"peripherals\[{BOARD}\]\.board\.registers\[0\]"):
        parse_profile(raw, "kiosk-7.toml")


def test_a_nut_device_needs_its_ups_name() -> None:
    raw, _ = read_profile_mapping("zone24")
    ups = _index(raw, "ups")
    del _peripherals(raw)[ups]["ups"]
    with pytest.raises(ConfigError, match=rf"peripherals\[{ups}\]\.ups: a nut device needs"):
        parse_profile(raw, "zone24.toml")


def test_overrides_fit_one_kiosk_without_editing_the_shipped_profile() -> None:
    profile = load_profile(
        "comprehensive",
        [
            {"id": "receipt-printer", "url": "/dev/ttyUSB3", "code_page": "cp437"},
            {"id": "fingerprint-reader", "disabled": True},
        ],
    )
    printer = profile.peripheral("receipt-printer")
    assert printer.endpoint is not None
    assert printer.endpoint.url == "/dev/ttyUSB3"
    assert printer.code_page == "cp437"
    assert printer.endpoint.baudrate == 115200
    assert "fingerprint-reader" not in {p.id for p in profile.peripherals}
    assert load_profile("comprehensive").peripheral("receipt-printer").code_page == "gb18030"


def test_an_override_for_a_device_the_profile_does_not_have_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"overrides\[0\]\.id: no peripheral 'reciept-printer'"):
        load_profile("comprehensive", [{"id": "reciept-printer", "url": "/dev/ttyUSB0"}])


def test_profile_from_a_file(tmp_path: Path) -> None:
    raw, _ = read_profile_mapping("zone24")
    text = (Path(__file__).parents[2] / "firmware_bridge/profiles/zone24.toml").read_text()
    path = tmp_path / "site.toml"
    path.write_text(text.replace('id = "zone24"', 'id = "zone24-site"'))
    profile = load_profile(str(path))
    assert profile.id == "zone24-site"
    assert len(profile.peripherals) == len(_peripherals(raw))

    (tmp_path / "broken.toml").write_text("[profile\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_profile(str(tmp_path / "broken.toml"))
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read profile"):
        load_profile(str(tmp_path / "missing.toml"))
