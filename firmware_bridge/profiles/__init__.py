"""Device profiles: which peripherals a kiosk has, what each is for and how to reach it.

A profile is a TOML file with a ``[profile]`` table and one ``[[peripherals]]`` entry per device::

    [[peripherals]]
    id = "receipt-printer"          # stable id, lower case, digits and dashes
    role = "receipt_printer"        # see firmware_bridge.roles.Role
    transport = "usb-serial"        # usb | serial | usb-serial | tcp
    protocol = "escpos"             # none | escpos | modbus-rtu | nut
    url = "/dev/serial/by-id/usb-…" # serial path, pyserial URL (socket://…) or tcp://host:port
    usb = ["0416:5011"]             # vendor:product ids the agent matches on USB hotplug
    power_channel = "printer"       # the controller board's channel that powers it
    essential = true                # the kiosk cannot serve citizens without it

Two profiles ship with the package: ``comprehensive`` (综合类自助终端) and ``zone24``
(24 小时自助服务区终端). A kiosk's own config names one and overrides what differs on that
machine (ports, ids, a device that is not fitted) with :func:`apply_overrides`.

Parsing validates everything once and names the field of every error, e.g.
``zone24.toml: peripherals[3].url: required for protocol escpos``; past this module only typed
records travel.
"""

from __future__ import annotations

import enum
import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec

from firmware_bridge.errors import ConfigError
from firmware_bridge.escpos.protocol import code_page_named
from firmware_bridge.link import Endpoint
from firmware_bridge.modbus.board import BoardConfig, from_mapping
from firmware_bridge.roles import Role

PERIPHERAL_ID_PATTERN: Final = r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$"
_USB_ID: Final = re.compile(r"^(?P<vendor>[0-9a-f]{4}):(?P<product>[0-9a-f]{4})$")
_AT_PATH: Final = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
BUILTIN: Final = ("comprehensive", "zone24")


class Transport(enum.StrEnum):
    USB = "usb"
    """Seen only through USB hotplug (udev); the bridge does not talk to it."""
    SERIAL = "serial"
    USB_SERIAL = "usb-serial"
    TCP = "tcp"


class DeviceProtocol(enum.StrEnum):
    NONE = "none"
    ESCPOS = "escpos"
    MODBUS_RTU = "modbus-rtu"
    NUT = "nut"


_TRANSPORTS: Final[dict[DeviceProtocol, frozenset[Transport]]] = {
    DeviceProtocol.NONE: frozenset(Transport),
    DeviceProtocol.ESCPOS: frozenset({Transport.SERIAL, Transport.USB_SERIAL, Transport.TCP}),
    DeviceProtocol.MODBUS_RTU: frozenset({Transport.SERIAL, Transport.USB_SERIAL, Transport.TCP}),
    DeviceProtocol.NUT: frozenset({Transport.TCP}),
}


@dataclass(frozen=True, slots=True, order=True)
class UsbId:
    vendor: int
    product: int

    @classmethod
    def parse(cls, text: str) -> UsbId:
        match = _USB_ID.match(text.lower())
        if match is None:
            raise ValueError(f"{text!r} is not vendor:product in hex, like 0416:5011")
        return cls(int(match["vendor"], 16), int(match["product"], 16))

    def __str__(self) -> str:
        return f"{self.vendor:04x}:{self.product:04x}"


@dataclass(frozen=True, slots=True)
class Peripheral:
    """One device of a kiosk, validated."""

    id: str
    role: Role
    title: str
    title_en: str
    transport: Transport
    protocol: DeviceProtocol
    usb_ids: tuple[UsbId, ...] = ()
    endpoint: Endpoint | None = None
    power_channel: str | None = None
    essential: bool = False
    poll_s: float = 5.0
    timeout_s: float = 1.0
    code_page: str | None = None
    ups_name: str | None = None
    board: BoardConfig | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    id: str
    title: str
    title_en: str
    peripherals: tuple[Peripheral, ...]
    source: str = field(default="", compare=False)

    def peripheral(self, peripheral_id: str) -> Peripheral:
        for p in self.peripherals:
            if p.id == peripheral_id:
                return p
        raise KeyError(peripheral_id)

    def with_role(self, role: Role) -> tuple[Peripheral, ...]:
        return tuple(p for p in self.peripherals if p.role is role)

    def match_usb(self, usb_id: UsbId) -> Peripheral | None:
        """The peripheral a hot-plugged USB device is, by its vendor:product id."""
        for p in self.peripherals:
            if usb_id in p.usb_ids:
                return p
        return None

    @property
    def board(self) -> Peripheral | None:
        boards = [p for p in self.peripherals if p.protocol is DeviceProtocol.MODBUS_RTU]
        return boards[0] if boards else None


# The raw shape of the TOML, checked by msgspec (types, unknown fields, enums) before the
# cross-field rules below.


class _RawProfileHead(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: Annotated[str, msgspec.Meta(pattern=PERIPHERAL_ID_PATTERN)]
    title: str
    title_en: str


class _RawPeripheral(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: Annotated[str, msgspec.Meta(pattern=PERIPHERAL_ID_PATTERN)]
    role: Role
    transport: Transport
    protocol: DeviceProtocol = DeviceProtocol.NONE
    title: str | None = None
    title_en: str | None = None
    usb: list[str] = msgspec.field(default_factory=list)
    url: str | None = None
    baudrate: int = 9600
    bytesize: int = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    power_channel: str | None = None
    essential: bool = False
    poll_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    code_page: str | None = None
    ups: str | None = None
    board: dict[str, object] | None = None


class _RawProfile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    profile: _RawProfileHead
    peripherals: list[_RawPeripheral]


def parse_profile(raw: Mapping[str, object], source: str) -> Profile:
    """Validate a profile given as the mapping TOML decodes to."""
    try:
        parsed = msgspec.convert(raw, _RawProfile, strict=True)
    except msgspec.ValidationError as exc:
        match = _AT_PATH.match(str(exc))
        path = match["path"].removeprefix(".") if match and match["path"] else ""
        problem = match["problem"] if match else str(exc)
        raise ConfigError(f"{source}: {path + ': ' if path else ''}{problem}") from exc
    peripherals = tuple(
        _peripheral(p, f"{source}: peripherals[{i}]") for i, p in enumerate(parsed.peripherals)
    )
    _check_across(peripherals, source)
    head = parsed.profile
    return Profile(head.id, head.title, head.title_en, peripherals, source)


def _peripheral(raw: _RawPeripheral, where: str) -> Peripheral:
    def bad(field_name: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}.{field_name}: {problem}")

    if raw.transport not in _TRANSPORTS[raw.protocol]:
        allowed = ", ".join(sorted(_TRANSPORTS[raw.protocol]))
        raise bad("transport", f"{raw.transport} cannot carry {raw.protocol} (use {allowed})")
    usb_ids: list[UsbId] = []
    for i, text in enumerate(raw.usb):
        try:
            usb_ids.append(UsbId.parse(text))
        except ValueError as exc:
            raise bad(f"usb[{i}]", str(exc)) from exc
    if raw.transport in (Transport.USB, Transport.USB_SERIAL) and not usb_ids:
        raise bad("usb", f"a {raw.transport} device needs its vendor:product id(s)")
    return Peripheral(
        id=raw.id,
        role=raw.role,
        title=raw.title or raw.role.title_zh,
        title_en=raw.title_en or raw.role.title_en,
        transport=raw.transport,
        protocol=raw.protocol,
        usb_ids=tuple(usb_ids),
        endpoint=_endpoint(raw, where, bad),
        power_channel=raw.power_channel,
        essential=raw.essential,
        poll_s=raw.poll_s,
        timeout_s=raw.timeout_s,
        code_page=_code_page(raw, bad),
        ups_name=_ups_name(raw, bad),
        board=_board(raw, where, bad),
    )


_Bad = Callable[[str, str], ConfigError]


def _endpoint(raw: _RawPeripheral, where: str, bad: _Bad) -> Endpoint | None:
    if raw.protocol is DeviceProtocol.NONE:
        if raw.url is not None:
            raise bad("url", "a device with protocol none is not talked to; remove url")
        return None
    if raw.url is None:
        raise bad("url", f"required for protocol {raw.protocol}")
    # A serial device may sit behind a serial-to-Ethernet converter (socket://, rfc2217://);
    # a plain TCP service (tcp://) is not a serial line.
    networked = raw.url.startswith(("tcp://", "socket://", "rfc2217://"))
    if (raw.transport is Transport.TCP and not networked) or (
        raw.transport is not Transport.TCP and raw.url.startswith("tcp://")
    ):
        raise bad("url", f"{raw.url!r} does not fit transport {raw.transport}")
    try:
        return Endpoint(
            raw.url,
            baudrate=raw.baudrate,
            bytesize=raw.bytesize,
            parity=raw.parity,
            stopbits=raw.stopbits,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from exc


def _code_page(raw: _RawPeripheral, bad: _Bad) -> str | None:
    if raw.protocol is not DeviceProtocol.ESCPOS:
        if raw.code_page is not None:
            raise bad("code_page", "only an escpos printer has a code page")
        return None
    try:
        return code_page_named(raw.code_page or "gb18030").name
    except ConfigError as exc:
        raise bad("code_page", str(exc).removeprefix("code_page: ")) from exc


def _ups_name(raw: _RawPeripheral, bad: _Bad) -> str | None:
    if raw.protocol is DeviceProtocol.NUT:
        if not raw.ups:
            raise bad("ups", "a nut device needs the UPS name upsd knows it by")
    elif raw.ups is not None:
        raise bad("ups", "only a nut device has a UPS name")
    return raw.ups


def _board(raw: _RawPeripheral, where: str, bad: _Bad) -> BoardConfig | None:
    if raw.protocol is DeviceProtocol.MODBUS_RTU:
        if raw.board is None:
            raise bad("board", "a modbus-rtu board needs its [board] register map")
        return from_mapping(raw.board, f"{where}.board")
    if raw.board is not None:
        raise bad("board", "only a modbus-rtu device has a register map")
    return None


def _check_across(peripherals: Sequence[Peripheral], source: str) -> None:
    seen: dict[str, int] = {}
    for i, p in enumerate(peripherals):
        if p.id in seen:
            raise ConfigError(
                f"{source}: peripherals[{i}].id: {p.id!r} is already peripherals[{seen[p.id]}]"
            )
        seen[p.id] = i
    owners: dict[UsbId, str] = {}
    for i, p in enumerate(peripherals):
        for usb_id in p.usb_ids:
            if usb_id in owners:
                raise ConfigError(
                    f"{source}: peripherals[{i}].usb: {usb_id} is already {owners[usb_id]!r}"
                )
            owners[usb_id] = p.id
    boards = [p for p in peripherals if p.board is not None]
    if len(boards) > 1:
        raise ConfigError(f"{source}: peripherals: more than one controller board")
    channels = {c.name for c in boards[0].board.channels} if boards and boards[0].board else set()
    for i, p in enumerate(peripherals):
        if p.power_channel is None:
            continue
        if not boards:
            raise ConfigError(
                f"{source}: peripherals[{i}].power_channel: no controller board in this profile"
            )
        if p.power_channel not in channels:
            known = ", ".join(sorted(channels))
            raise ConfigError(
                f"{source}: peripherals[{i}].power_channel: {p.power_channel!r} is not a "
                f"channel of the board ({known})"
            )


def apply_overrides(
    raw: Mapping[str, object], overrides: Sequence[Mapping[str, object]]
) -> dict[str, object]:
    """A copy of a raw profile with per-kiosk changes, matched to peripherals by ``id``.

    An override with ``disabled = true`` removes a peripheral this kiosk does not have; other
    keys replace the profile's values. An override for an unknown id is an error, so a typo does
    not silently leave the profile's value in place.
    """
    result = dict(raw)
    items = raw.get("peripherals", [])
    if not isinstance(items, list):
        raise ConfigError("peripherals: must be a list of tables")
    peripherals: list[object] = list(items)
    for n, override in enumerate(overrides):
        target = override.get("id")
        index = next(
            (
                i
                for i, p in enumerate(peripherals)
                if isinstance(p, Mapping) and p.get("id") == target
            ),
            None,
        )
        if index is None:
            raise ConfigError(f"overrides[{n}].id: no peripheral {target!r} in the profile")
        if override.get("disabled") is True:
            del peripherals[index]
            continue
        current = peripherals[index]
        assert isinstance(current, Mapping)
        merged = {**current, **{k: v for k, v in override.items() if k != "disabled"}}
        peripherals[index] = merged
    result["peripherals"] = peripherals
    return result


def read_profile_mapping(name_or_path: str) -> tuple[dict[str, object], str]:
    """The raw mapping of a built-in profile (by name) or of a TOML file (by path)."""
    if name_or_path in BUILTIN:
        source = f"{name_or_path}.toml"
        text = resources.files("firmware_bridge.profiles").joinpath(source).read_text("utf-8")
    else:
        source = name_or_path
        try:
            text = Path(name_or_path).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name_or_path}: cannot read profile: {exc}") from exc
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc


def load_profile(name_or_path: str, overrides: Sequence[Mapping[str, object]] = ()) -> Profile:
    """A built-in profile by name (``comprehensive``, ``zone24``) or a profile file by path."""
    raw, source = read_profile_mapping(name_or_path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_profile(raw, source)


def read_overrides(path: Path) -> list[dict[str, object]]:
    """Per-kiosk overrides from a TOML file of ``[[peripherals]]`` tables, each with ``id``."""
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read overrides: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    items = raw.get("peripherals", [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{path}: peripherals: must be [[peripherals]] tables")
    for n, item in enumerate(items):
        if not isinstance(item.get("id"), str):
            raise ConfigError(f"{path}: peripherals[{n}].id: missing")
    return items


def render_overrides(overrides: Sequence[Mapping[str, object]]) -> str:
    """Overrides as the TOML :func:`read_overrides` reads (string, number and bool values)."""
    lines = []
    for item in overrides:
        lines.append("[[peripherals]]")
        for key, value in item.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = repr(value)
            else:
                text = json.dumps(str(value), ensure_ascii=False)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)
