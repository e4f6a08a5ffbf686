"""The relay / IO board as configured, and what a read of it means. Pure: no I/O.

A kiosk's controller board switches the power of its peripherals (one coil per channel), reads
a few digital inputs (cabinet door switch, tilt switch) and measures a few analogue values
(supply voltage, cabinet temperature) into input registers. :class:`BoardConfig` describes
one such board and validates itself on construction; :func:`from_mapping` builds one from a
plain mapping (a TOML table) and names the bad field with its path. :func:`read_plan` says
which registers one poll reads, :func:`decode_status` turns what was read into a
:class:`BoardStatus`, :func:`assess` into a health. :func:`plan_power_cycle` lists the steps
of a power-cycle, which the driver carries out and reports as a :class:`PowerCycleReport`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from firmware_bridge.errors import ConfigError
from firmware_bridge.health import OK, Assessment, Health, worst
from firmware_bridge.modbus.protocol import MAX_BITS, MAX_REGISTERS

RegisterKind = Literal["uint16", "int16", "uint32", "int32"]
WordOrder = Literal["big", "little"]

_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
_KINDS: dict[str, tuple[int, bool]] = {
    "uint16": (1, False),
    "int16": (1, True),
    "uint32": (2, False),
    "int32": (2, True),
}
_WORD_ORDERS = ("big", "little")
MAX_PULSE_TENTHS = 0xFFFF
"""The pulse register holds the off-time in 0.1 s units, so 6553.5 s at most."""


class InputMeaning(enum.StrEnum):
    """What an *active* digital input means; the value is the reason code it raises."""

    CABINET_DOOR_OPEN = "cabinet_door_open"
    """The cabinet's service door is open: degraded (someone is at it, or it was forced)."""
    TILTED = "tilted"
    """The tilt switch tripped: the kiosk was knocked over or is being carried off; faulty."""
    INFO = "info"
    """Reported in the status only."""


# ---------------------------------------------------------------------------------------------
# Configuration records


@dataclass(frozen=True, slots=True)
class PowerChannel:
    """One switched power output.

    ``inverted``: the coil *off* means power *on* (a normally-closed relay contact).
    ``self_powered``: it feeds the computer running the agent (terminal_psu). The agent cannot
    switch its own power back on, so such a channel is power-cycled only by the board's
    firmware: writing the off-time (0.1 s units) to ``pulse_register`` makes the board switch
    it off and on again by itself. ``normally_on``: it should be on when nobody is switching it;
    off is then reported as degraded.
    """

    name: str
    coil: int
    inverted: bool = False
    pulse_register: int | None = None
    self_powered: bool = False
    normally_on: bool = True

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_address("coil", self.coil)
        _check_bool("inverted", self.inverted)
        if self.pulse_register is not None:
            _check_address("pulse_register", self.pulse_register)
        _check_bool("self_powered", self.self_powered)
        _check_bool("normally_on", self.normally_on)
        if self.self_powered and self.pulse_register is None:
            raise ConfigError(
                f"pulse_register: {self.name} powers the computer running the agent, which "
                "cannot switch itself back on; a power-cycle needs the board's pulse register"
            )

    def coil_level(self, on: bool) -> bool:
        """The coil value that switches the power ``on`` (or off)."""
        return on != self.inverted

    def power_on(self, coil_level: bool) -> bool:
        """Whether the power is on when the coil reads ``coil_level``."""
        return coil_level != self.inverted


@dataclass(frozen=True, slots=True)
class DigitalInput:
    """One discrete input; ``active_low``: the contact reads 0 when the condition holds."""

    name: str
    address: int
    active_low: bool = False
    meaning: InputMeaning = field(kw_only=True)

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_address("address", self.address)
        _check_bool("active_low", self.active_low)
        try:
            object.__setattr__(self, "meaning", InputMeaning(self.meaning))
        except ValueError as exc:
            raise ConfigError(
                f"meaning: {self.meaning!r} is not one of {', '.join(InputMeaning)}"
            ) from exc

    def active(self, level: bool) -> bool:
        return level != self.active_low

    def level(self, active: bool) -> bool:
        return active != self.active_low


@dataclass(frozen=True, slots=True)
class RegisterReading:
    """An analogue value in one or two input registers: ``value = raw * scale`` in ``unit``.

    32-bit kinds take two registers from ``address`` on; ``word_order`` says which comes first
    (``big``: the high word). ``low`` / ``high`` are the limits outside which the reading is
    reported as degraded (``<name>_low`` / ``<name>_high``).
    """

    name: str
    address: int
    kind: RegisterKind = "uint16"
    scale: float = 1.0
    unit: str = ""
    word_order: WordOrder = "big"
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_address("address", self.address)
        if self.kind not in _KINDS:
            raise ConfigError(f"kind: {self.kind!r} is not one of {', '.join(_KINDS)}")
        if self.address + self.width - 1 > 0xFFFF:
            raise ConfigError(f"address: a {self.kind} at {self.address} runs past 65535")
        _check_number("scale", self.scale)
        if self.scale == 0:
            raise ConfigError("scale: must not be zero")
        if not isinstance(self.unit, str):
            raise ConfigError(f"unit: {self.unit!r} must be a string")
        if self.word_order not in _WORD_ORDERS:
            raise ConfigError(f"word_order: {self.word_order!r} must be big or little")
        if self.low is not None:
            _check_number("low", self.low)
        if self.high is not None:
            _check_number("high", self.high)
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ConfigError(f"high: {self.high} must be above low ({self.low})")

    @property
    def width(self) -> int:
        """Registers it takes."""
        return _KINDS[self.kind][0]

    @property
    def addresses(self) -> range:
        return range(self.address, self.address + self.width)

    def decode(self, words: Sequence[int]) -> float:
        """The value in ``unit`` from its registers (as read, first address first)."""
        if len(words) != self.width or any(not 0 <= w <= 0xFFFF for w in words):
            raise ConfigError(f"{self.name}: {list(words)} are not {self.width} register(s)")
        raw = _join_words(words, self.word_order)
        bits = 16 * self.width
        if _KINDS[self.kind][1] and raw >= 1 << (bits - 1):
            raw -= 1 << bits
        # Rounding drops the float noise of the multiplication (1234 * 0.01 = 12.340000000000002).
        return round(raw * self.scale, 9)

    def encode(self, value: float) -> tuple[int, ...]:
        """The registers that read as ``value`` (nearest step of ``scale``)."""
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{self.name}: {value!r} is not a finite number")
        raw = round(value / self.scale)
        bits = 16 * self.width
        signed = _KINDS[self.kind][1]
        lowest, highest = (
            (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        )
        if not lowest <= raw <= highest:
            raise ConfigError(
                f"{self.name}: {value} {self.unit} does not fit a {self.kind} "
                f"at scale {self.scale}",
                reason="out_of_range",
            )
        raw &= (1 << bits) - 1
        if self.width == 1:
            return (raw,)
        high_word, low_word = raw >> 16, raw & 0xFFFF
        return (high_word, low_word) if self.word_order == "big" else (low_word, high_word)


@dataclass(frozen=True, slots=True)
class BoardConfig:
    """One relay / IO board on one Modbus unit id."""

    unit: int
    channels: tuple[PowerChannel, ...] = ()
    inputs: tuple[DigitalInput, ...] = ()
    registers: tuple[RegisterReading, ...] = ()
    default_off_s: float = 5.0
    timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if (
            isinstance(self.unit, bool)
            or not isinstance(self.unit, int)
            or not 1 <= self.unit <= 247
        ):
            raise ConfigError(f"unit: {self.unit!r} is not a Modbus unit id 1..247")
        for name, kind in (
            ("channels", PowerChannel),
            ("inputs", DigitalInput),
            ("registers", RegisterReading),
        ):
            items = getattr(self, name)
            if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
                raise ConfigError(f"{name}: must be a sequence of {kind.__name__}")
            object.__setattr__(self, name, tuple(items))
            for i, item in enumerate(getattr(self, name)):
                if not isinstance(item, kind):
                    raise ConfigError(f"{name}[{i}]: {item!r} is not a {kind.__name__}")
        _check_number("default_off_s", self.default_off_s)
        if not 0.1 <= self.default_off_s <= MAX_PULSE_TENTHS / 10:
            raise ConfigError(f"default_off_s: {self.default_off_s} is not in 0.1..6553.5 s")
        _check_number("timeout_s", self.timeout_s)
        if not 0 < self.timeout_s <= 10:
            raise ConfigError(f"timeout_s: {self.timeout_s} is not in (0, 10] s")
        self._check_unique()

    def _check_unique(self) -> None:
        names: dict[str, str] = {}
        coils: dict[int, str] = {}
        pulses: dict[int, str] = {}
        inputs: dict[int, str] = {}
        words: dict[int, str] = {}

        def claim(table: dict[int, str], key: int, path: str, what: str, owner: str) -> None:
            if key in table:
                raise ConfigError(f"{path}: {what} {key} is also used by {table[key]}")
            table[key] = owner

        items: list[tuple[str, PowerChannel | DigitalInput | RegisterReading]] = [
            *((f"channels[{i}]", c) for i, c in enumerate(self.channels)),
            *((f"inputs[{i}]", d) for i, d in enumerate(self.inputs)),
            *((f"registers[{i}]", r) for i, r in enumerate(self.registers)),
        ]
        for path, item in items:
            if item.name in names:
                raise ConfigError(
                    f"{path}.name: {item.name} is also the name of {names[item.name]}"
                )
            names[item.name] = path
            if isinstance(item, PowerChannel):
                claim(coils, item.coil, f"{path}.coil", "coil", item.name)
                if item.pulse_register is not None:
                    claim(
                        pulses, item.pulse_register, f"{path}.pulse_register", "register", item.name
                    )
            elif isinstance(item, DigitalInput):
                claim(inputs, item.address, f"{path}.address", "input", item.name)
            else:
                for address in item.addresses:
                    claim(words, address, f"{path}.address", "input register", item.name)

    def channel(self, name: str) -> PowerChannel:
        for channel in self.channels:
            if channel.name == name:
                return channel
        known = ", ".join(c.name for c in self.channels) or "none"
        raise ConfigError(
            f"channel: no channel {name!r} (known: {known})", reason="unknown_channel"
        )

    def input(self, name: str) -> DigitalInput:
        for item in self.inputs:
            if item.name == name:
                return item
        raise ConfigError(f"input: no input {name!r}", reason="unknown_input")

    def reading(self, name: str) -> RegisterReading:
        for item in self.registers:
            if item.name == name:
                return item
        raise ConfigError(f"reading: no register reading {name!r}", reason="unknown_reading")


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"name: {name!r} must be lower-case letters, digits and _ (it becomes a reason code)"
        )


def _check_address(field_name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ConfigError(f"{field_name}: {value!r} is not an address 0..65535")


def _check_bool(field_name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field_name}: {value!r} must be true or false")


def _check_number(field_name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{field_name}: must be a number, not {value!r}")


def _join_words(words: Sequence[int], word_order: str) -> int:
    if len(words) == 1:
        return words[0]
    first, second = words
    return (first << 16 | second) if word_order == "big" else (second << 16 | first)


# ---------------------------------------------------------------------------------------------
# Parsing a plain mapping (TOML)

_CHANNEL_FIELDS = {
    "name": str,
    "coil": int,
    "inverted": bool,
    "pulse_register": int,
    "self_powered": bool,
    "normally_on": bool,
}
_INPUT_FIELDS = {"name": str, "address": int, "active_low": bool, "meaning": str}
_READING_FIELDS = {
    "name": str,
    "address": int,
    "kind": str,
    "scale": float,
    "unit": str,
    "word_order": str,
    "low": float,
    "high": float,
}
_BOARD_FIELDS = {
    "unit": int,
    "channels": list,
    "inputs": list,
    "registers": list,
    "default_off_s": float,
    "timeout_s": float,
}
_R = TypeVar("_R")


def from_mapping(data: Mapping[str, object], path: str = "board") -> BoardConfig:
    """A :class:`BoardConfig` from a plain mapping as TOML gives it.

    Every error names the field with its path, e.g. ``board.registers[1].scale: must be a
    number, not 'x'``.
    """
    values = _fields(data, path, _BOARD_FIELDS, BoardConfig)
    for name, spec, kind in (
        ("channels", _CHANNEL_FIELDS, PowerChannel),
        ("inputs", _INPUT_FIELDS, DigitalInput),
        ("registers", _READING_FIELDS, RegisterReading),
    ):
        items = cast(list[object], values.get(name, []))
        values[name] = tuple(
            _record(item, f"{path}.{name}[{i}]", spec, kind) for i, item in enumerate(items)
        )
    return _build(BoardConfig, values, path)


def _record(item: object, path: str, spec: Mapping[str, type], kind: Callable[..., _R]) -> _R:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{path}: must be a table, not {item!r}")
    return _build(kind, _fields(cast(Mapping[str, object], item), path, spec, kind), path)


def _build(kind: Callable[..., _R], values: Mapping[str, object], path: str) -> _R:
    try:
        return kind(**values)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc}", reason=exc.reason) from exc


def _typed(value: object, wanted: type, where: str) -> object:
    if wanted is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: must be a number, not {value!r}")
        return float(value)
    if wanted is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, not {value!r}")
    elif wanted is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, not {value!r}")
    elif wanted is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list of tables, not {value!r}")
    elif not isinstance(value, wanted):
        raise ConfigError(f"{where}: must be a {wanted.__name__}, not {value!r}")
    return value


def _fields(
    data: Mapping[str, object], path: str, spec: Mapping[str, type], kind: object
) -> dict[str, object]:
    """The entries of ``data`` checked against ``spec`` (field → type) and the record's
    required fields; integers are accepted where a number is wanted."""
    values: dict[str, object] = {}
    for key, value in data.items():
        wanted = spec.get(key)
        if wanted is None:
            raise ConfigError(f"{path}.{key}: unknown field (known: {', '.join(spec)})")
        values[key] = _typed(value, wanted, f"{path}.{key}")
    for spec_field in dataclasses.fields(cast(Any, kind)):
        required = (
            spec_field.default is dataclasses.MISSING
            and spec_field.default_factory is dataclasses.MISSING
        )
        if required and spec_field.name not in values:
            raise ConfigError(f"{path}.{spec_field.name}: missing")
    return values


# ---------------------------------------------------------------------------------------------
# Reading the board


@dataclass(frozen=True, slots=True)
class Span:
    """``count`` consecutive addresses from ``address`` on: one read request."""

    address: int
    count: int

    @property
    def addresses(self) -> range:
        return range(self.address, self.address + self.count)


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """The reads of one poll: coils (FC1), discrete inputs (FC2), input registers (FC4)."""

    coils: tuple[Span, ...]
    inputs: tuple[Span, ...]
    registers: tuple[Span, ...]


def contiguous_spans(addresses: Iterable[int], most: int) -> tuple[Span, ...]:
    """Runs of consecutive addresses, each at most ``most`` long.

    Gaps are not read across: an address the board does not have may answer with an
    exception and fail the whole poll.
    """
    spans: list[Span] = []
    for address in sorted(set(addresses)):
        last = spans[-1] if spans else None
        if last is not None and last.address + last.count == address and last.count < most:
            spans[-1] = Span(last.address, last.count + 1)
        else:
            spans.append(Span(address, 1))
    return tuple(spans)


def read_plan(config: BoardConfig) -> ReadPlan:
    return ReadPlan(
        coils=contiguous_spans((c.coil for c in config.channels), MAX_BITS),
        inputs=contiguous_spans((i.address for i in config.inputs), MAX_BITS),
        registers=contiguous_spans(
            (a for r in config.registers for a in r.addresses), MAX_REGISTERS
        ),
    )


@dataclass(frozen=True, slots=True)
class ChannelState:
    name: str
    on: bool


@dataclass(frozen=True, slots=True)
class InputState:
    name: str
    active: bool
    meaning: InputMeaning


@dataclass(frozen=True, slots=True)
class Reading:
    name: str
    value: float
    unit: str


@dataclass(frozen=True, slots=True)
class BoardStatus:
    """One read of the board: power channels, inputs (active or not), readings with units.

    ``switching`` names the channels a power-cycle or switch command is working on right now;
    they are not reported as unexpectedly off.
    """

    channels: tuple[ChannelState, ...]
    inputs: tuple[InputState, ...]
    readings: tuple[Reading, ...]
    switching: tuple[str, ...] = ()

    @property
    def power(self) -> dict[str, bool]:
        """Channel name → power on."""
        return {c.name: c.on for c in self.channels}

    def is_on(self, channel: str) -> bool:
        return self.power[channel]

    def is_active(self, name: str) -> bool:
        return {i.name: i.active for i in self.inputs}[name]

    def reading(self, name: str) -> Reading:
        return {r.name: r for r in self.readings}[name]


def decode_status(
    config: BoardConfig,
    coils: Mapping[int, bool],
    inputs: Mapping[int, bool],
    registers: Mapping[int, int],
    switching: Iterable[str] = (),
) -> BoardStatus:
    """The status from what the reads of :func:`read_plan` returned, by address."""
    return BoardStatus(
        channels=tuple(ChannelState(c.name, c.power_on(coils[c.coil])) for c in config.channels),
        inputs=tuple(
            InputState(i.name, i.active(inputs[i.address]), i.meaning) for i in config.inputs
        ),
        readings=tuple(
            Reading(r.name, r.decode([registers[a] for a in r.addresses]), r.unit)
            for r in config.registers
        ),
        switching=tuple(sorted(set(switching))),
    )


def assess(status: BoardStatus, config: BoardConfig) -> Assessment:
    """Degraded: door open, a reading outside its limits, a channel off that should be on (and
    nobody is switching it). Faulty: the kiosk is tilted."""
    found: list[Assessment] = []
    for signal in status.inputs:
        if signal.active and signal.meaning is InputMeaning.CABINET_DOOR_OPEN:
            found.append(
                Assessment(Health.DEGRADED, (signal.meaning.value,), f"{signal.name} is active")
            )
        elif signal.active and signal.meaning is InputMeaning.TILTED:
            found.append(
                Assessment(Health.FAULTY, (signal.meaning.value,), f"{signal.name} is active")
            )
    for reading in status.readings:
        limits = config.reading(reading.name)
        shown = f"{reading.name} {reading.value:g} {reading.unit}".rstrip()
        if limits.low is not None and reading.value < limits.low:
            found.append(
                Assessment(Health.DEGRADED, (f"{reading.name}_low",), f"{shown} < {limits.low:g}")
            )
        if limits.high is not None and reading.value > limits.high:
            found.append(
                Assessment(Health.DEGRADED, (f"{reading.name}_high",), f"{shown} > {limits.high:g}")
            )
    for state in status.channels:
        spec = config.channel(state.name)
        if spec.normally_on and not state.on and state.name not in status.switching:
            found.append(
                Assessment(Health.DEGRADED, (f"{state.name}_off",), f"{state.name} is off")
            )
    return worst(*found) if found else OK


# ---------------------------------------------------------------------------------------------
# Power-cycle


class StepKind(enum.StrEnum):
    SWITCH_OFF = "switch_off"
    """Write the coil to its off level."""
    CONFIRM_OFF = "confirm_off"
    """Read the coil back: off."""
    WAIT_OFF = "wait_off"
    """Keep it off for the off-time."""
    SWITCH_ON = "switch_on"
    CONFIRM_ON = "confirm_on"
    WRITE_PULSE = "write_pulse"
    """Write the off-time to the pulse register; the board switches off and on by itself."""
    AWAIT_OFF = "await_off"
    """Read the coil until it reads off (bounded)."""
    AWAIT_ON = "await_on"
    """Read the coil until it reads on again (bounded)."""
    RESTORE_ON = "restore_on"
    """After a failed step: switch the channel back on and read it back."""


@dataclass(frozen=True, slots=True)
class PlannedStep:
    kind: StepKind
    seconds: float = 0.0
    """The wait for ``wait_off``; the bound for ``await_off`` / ``await_on``."""


@dataclass(frozen=True, slots=True)
class PowerCyclePlan:
    channel: PowerChannel
    off_s: float
    steps: tuple[PlannedStep, ...]
    pulse_tenths: int | None
    """What is written to the pulse register (off-time in 0.1 s units)."""
    poll_every_s: float
    """How often the await steps read the coil."""


def plan_power_cycle(
    config: BoardConfig, channel: str, off_s: float | None = None
) -> PowerCyclePlan:
    """The steps of a power-cycle of ``channel`` for ``off_s`` (default: the board's)."""
    spec = config.channel(channel)
    off = config.default_off_s if off_s is None else off_s
    _check_number("off_s", off)
    steps: tuple[PlannedStep, ...]
    if spec.pulse_register is None:
        if not 0 < off <= 3600:
            raise ConfigError(f"off_s: {off} is not in (0, 3600] s")
        steps = (
            PlannedStep(StepKind.SWITCH_OFF),
            PlannedStep(StepKind.CONFIRM_OFF),
            PlannedStep(StepKind.WAIT_OFF, off),
            PlannedStep(StepKind.SWITCH_ON),
            PlannedStep(StepKind.CONFIRM_ON),
        )
        return PowerCyclePlan(spec, off, steps, None, 0.0)
    tenths = round(off * 10)
    if not 1 <= tenths <= MAX_PULSE_TENTHS:
        raise ConfigError(f"off_s: {off} is not in 0.1..6553.5 s (the pulse register's range)")
    # Read often enough to see the off phase several times, not so often as to load the bus.
    poll_every = min(0.5, max(0.02, tenths / 10 / 5))
    # The firmware reacts within a request or two; the on edge comes after the off-time.
    react = max(1.0, 4 * config.timeout_s)
    steps = (
        PlannedStep(StepKind.WRITE_PULSE),
        PlannedStep(StepKind.AWAIT_OFF, react),
        PlannedStep(StepKind.AWAIT_ON, tenths / 10 + react),
    )
    return PowerCyclePlan(spec, tenths / 10, steps, tenths, poll_every)


@dataclass(frozen=True, slots=True)
class StepReport:
    """One step as carried out; times are seconds since the power-cycle began."""

    kind: StepKind
    ok: bool
    started_s: float
    duration_s: float
    detail: str = ""
    reason: str = ""
    """The error's reason code when the step failed."""


@dataclass(frozen=True, slots=True)
class PowerCycleReport:
    """What a power-cycle did: ``done``, or ``failed`` at ``failed_step`` with ``reason``.

    After a failure the driver tries to switch the channel back on; that attempt is the last
    step (``restore_on``) and :attr:`restored` tells whether it worked.
    """

    channel: str
    off_s: float
    outcome: Literal["done", "failed"]
    steps: tuple[StepReport, ...]
    failed_step: StepKind | None = None
    reason: str | None = None

    @property
    def restored(self) -> bool | None:
        for step in self.steps:
            if step.kind is StepKind.RESTORE_ON:
                return step.ok
        return None

    @property
    def duration_s(self) -> float:
        if not self.steps:
            return 0.0
        last = self.steps[-1]
        return last.started_s + last.duration_s

    def step(self, kind: StepKind) -> StepReport:
        for step in self.steps:
            if step.kind is kind:
                return step
        raise KeyError(kind)
