"""The board model: configuration checks, register decoding, what a read means, power-cycles."""

from __future__ import annotations

import tomllib
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.errors import ConfigError
from firmware_bridge.health import Health
from firmware_bridge.modbus.board import (
    BoardConfig,
    BoardStatus,
    DigitalInput,
    InputMeaning,
    PowerChannel,
    RegisterKind,
    RegisterReading,
    Span,
    StepKind,
    WordOrder,
    assess,
    contiguous_spans,
    decode_status,
    from_mapping,
    plan_power_cycle,
    read_plan,
)

KIOSK_TOML = """
[board]
unit = 3
default_off_s = 4
timeout_s = 0.3

[[board.channels]]
name = "terminal_psu"
coil = 0
self_powered = true
pulse_register = 20

[[board.channels]]
name = "screen"
coil = 1

[[board.channels]]
name = "printer"
coil = 2
inverted = true

[[board.channels]]
name = "document_camera"
coil = 5
normally_on = false

[[board.inputs]]
name = "door_switch"
address = 0
meaning = "cabinet_door_open"

[[board.inputs]]
name = "tilt_switch"
address = 1
active_low = true
meaning = "tilted"

[[board.registers]]
name = "supply_voltage"
address = 0
scale = 0.01
unit = "V"
low = 11.0
high = 13.8

[[board.registers]]
name = "cabinet_temperature"
address = 1
kind = "int16"
scale = 0.1
unit = "°C"
high = 45

[[board.registers]]
name = "energy"
address = 4
kind = "uint32"
word_order = "little"
unit = "Wh"
"""


def kiosk_table() -> dict[str, object]:
    board = tomllib.loads(KIOSK_TOML)["board"]
    assert isinstance(board, dict)
    return board


@pytest.fixture
def config() -> BoardConfig:
    return from_mapping(kiosk_table())


# ---------------------------------------------------------------------------------------------
# Configuration


def test_mapping_gives_typed_records(config: BoardConfig) -> None:
    assert config.unit == 3
    assert config.default_off_s == 4.0
    assert config.channel("terminal_psu") == PowerChannel(
        "terminal_psu", 0, pulse_register=20, self_powered=True
    )
    assert config.channel("printer").inverted
    assert config.input("tilt_switch") == DigitalInput(
        "tilt_switch", 1, active_low=True, meaning=InputMeaning.TILTED
    )
    assert config.reading("energy") == RegisterReading(
        "energy", 4, kind="uint32", word_order="little", unit="Wh"
    )


def _with(path: tuple[str | int, ...], value: object) -> dict[str, object]:
    table = kiosk_table()
    target: object = table
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    target[path[-1]] = value  # type: ignore[index]
    return table


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("registers", 1, "scale"), "x", r"^board\.registers\[1\]\.scale: must be a number"),
        (("registers", 1, "scale"), 0, r"^board\.registers\[1\]\.scale: must not be zero"),
        (("registers", 0, "kind"), "float", r"^board\.registers\[0\]\.kind: 'float' is not one"),
        (("registers", 0, "word_order"), "middle", r"^board\.registers\[0\]\.word_order: "),
        (("registers", 0, "high"), 10.0, r"^board\.registers\[0\]\.high: 10.0 must be above low"),
        (("channels", 1, "coil"), True, r"^board\.channels\[1\]\.coil: must be an integer"),
        (("channels", 1, "coil"), 70000, r"^board\.channels\[1\]\.coil: 70000 is not an address"),
        (("channels", 1, "coil"), 0, r"^board\.channels\[1\]\.coil: coil 0 is also used by term"),
        (("channels", 2, "name"), "screen", r"^board\.channels\[2\]\.name: screen is also the"),
        (("channels", 2, "name"), "Printer!", r"^board\.channels\[2\]\.name: 'Printer!' must be"),
        (("channels", 0, "colour"), "red", r"^board\.channels\[0\]\.colour: unknown field"),
        (("inputs", 1, "address"), 0, r"^board\.inputs\[1\]\.address: input 0 is also used by"),
        (("inputs", 0, "meaning"), "smoke", r"^board\.inputs\[0\]\.meaning: 'smoke' is not one"),
        (("unit",), 0, r"^board\.unit: 0 is not a Modbus unit id"),
        (("timeout_s",), 0, r"^board\.timeout_s: 0.0 is not in"),
        (("channels",), {"name": "x"}, r"^board\.channels: must be a list of tables"),
        (("channels", 1), "screen", r"^board\.channels\[1\]: must be a table"),
    ],
)
def test_mapping_errors_name_the_field_with_its_path(
    path: tuple[str | int, ...], value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        from_mapping(_with(path, value))


def test_missing_field_is_named() -> None:
    table = kiosk_table()
    del table["channels"][1]["coil"]  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"^board\.channels\[1\]\.coil: missing"):
        from_mapping(table)


def test_overlapping_32_bit_reading_is_a_duplicate_address() -> None:
    table = kiosk_table()
    table["registers"].append(  # type: ignore[attr-defined]
        {"name": "counter", "address": 3, "kind": "int32"}
    )
    with pytest.raises(ConfigError, match=r"registers\[3\]\.address: input register 4 is also"):
        from_mapping(table)


def test_self_powered_channel_needs_the_pulse_register() -> None:
    with pytest.raises(ConfigError, match=r"^pulse_register: terminal_psu powers the computer"):
        PowerChannel("terminal_psu", 0, self_powered=True)


def test_records_check_themselves_without_the_parser() -> None:
    with pytest.raises(ConfigError, match=r"^registers\[0\]: 'x' is not a RegisterReading"):
        BoardConfig(unit=1, registers=("x",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^channels\[1\]\.name: a is also the name of"):
        BoardConfig(unit=1, channels=(PowerChannel("a", 0), PowerChannel("a", 1)))
    with pytest.raises(ConfigError, match=r"^kind: 'uint64'"):
        RegisterReading("x", 0, kind="uint64")  # type: ignore[arg-type]


def test_unknown_channel_is_a_config_error(config: BoardConfig) -> None:
    with pytest.raises(ConfigError) as caught:
        config.channel("coffee_machine")
    assert caught.value.reason == "unknown_channel"


# ---------------------------------------------------------------------------------------------
# Register decoding


def test_int16_negative_with_scale() -> None:
    reading = RegisterReading("t", 0, kind="int16", scale=0.1, unit="°C")
    assert reading.decode([0xFF9C]) == -10.0
    assert reading.encode(-10.0) == (0xFF9C,)


def test_uint16_with_scale() -> None:
    assert RegisterReading("v", 0, scale=0.01).decode([1234]) == 12.34


@pytest.mark.parametrize(
    ("word_order", "words"), [("big", (0x0001, 0x86A0)), ("little", (0x86A0, 0x0001))]
)
def test_uint32_in_both_word_orders(word_order: WordOrder, words: tuple[int, int]) -> None:
    reading = RegisterReading("e", 0, kind="uint32", word_order=word_order)
    assert reading.decode(words) == 100000
    assert reading.encode(100000) == words


def test_int32_negative() -> None:
    assert RegisterReading("n", 0, kind="int32").decode([0xFFFF, 0xFFFE]) == -2


def test_value_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        RegisterReading("v", 0, scale=0.01, unit="V").encode(700.0)
    assert caught.value.reason == "out_of_range"


@given(
    kind=st.sampled_from(get_args(RegisterKind)),
    word_order=st.sampled_from(get_args(WordOrder)),
    scale=st.sampled_from([1.0, 0.1, 0.01, 0.5, 10.0, -0.1]),
    data=st.data(),
)
def test_register_encode_decode_round_trip(
    kind: RegisterKind, word_order: WordOrder, scale: float, data: st.DataObject
) -> None:
    reading = RegisterReading("x", 0, kind=kind, scale=scale, word_order=word_order)
    width = reading.width
    words = tuple(data.draw(st.lists(st.integers(0, 0xFFFF), min_size=width, max_size=width)))
    value = reading.decode(words)
    assert reading.encode(value) == words
    # And from a value: back to the nearest step of the scale.
    again = reading.decode(reading.encode(value + scale * 0.3))
    assert again == pytest.approx(value, abs=abs(scale) * 1e-6)


# ---------------------------------------------------------------------------------------------
# Reading the board


def test_read_plan_reads_runs_of_addresses(config: BoardConfig) -> None:
    plan = read_plan(config)
    assert plan.coils == (Span(0, 3), Span(5, 1))
    assert plan.inputs == (Span(0, 2),)
    assert plan.registers == (Span(0, 2), Span(4, 2))


def test_spans_are_split_at_the_request_limit() -> None:
    assert contiguous_spans(range(300), 125) == (Span(0, 125), Span(125, 125), Span(250, 50))


def _status(
    config: BoardConfig,
    *,
    door: bool = False,
    tilted: bool = False,
    volts: int = 1225,
    celsius_tenths: int = 250,
    printer_coil: bool = False,
    screen_coil: bool = True,
    switching: tuple[str, ...] = (),
) -> BoardStatus:
    return decode_status(
        config,
        coils={0: True, 1: screen_coil, 2: printer_coil, 5: False},
        # the tilt switch is active low: 0 means tilted
        inputs={0: door, 1: not tilted},
        registers={0: volts, 1: celsius_tenths & 0xFFFF, 4: 0x5678, 5: 0x1234},
        switching=switching,
    )


def test_quiet_board_is_ok(config: BoardConfig) -> None:
    status = _status(config)
    assert assess(status, config).health is Health.OK
    assert status.power == {
        "terminal_psu": True,
        "screen": True,
        "printer": True,  # inverted: coil off is power on
        "document_camera": False,
    }
    assert status.reading("supply_voltage").value == 12.25
    assert status.reading("supply_voltage").unit == "V"
    assert status.reading("energy").value == 0x12345678


def test_open_door_is_degraded(config: BoardConfig) -> None:
    result = assess(_status(config, door=True), config)
    assert (result.health, result.reasons) == (Health.DEGRADED, ("cabinet_door_open",))


def test_tilt_is_faulty_and_outweighs_the_door(config: BoardConfig) -> None:
    result = assess(_status(config, door=True, tilted=True), config)
    assert (result.health, result.reasons) == (Health.FAULTY, ("tilted",))


@pytest.mark.parametrize(
    ("volts", "celsius_tenths", "reason"),
    [
        (1050, 250, "supply_voltage_low"),
        (1400, 250, "supply_voltage_high"),
        (1225, 512, "cabinet_temperature_high"),
    ],
)
def test_reading_outside_its_limits_is_degraded(
    config: BoardConfig, volts: int, celsius_tenths: int, reason: str
) -> None:
    result = assess(_status(config, volts=volts, celsius_tenths=celsius_tenths), config)
    assert (result.health, result.reasons) == (Health.DEGRADED, (reason,))


def test_negative_temperature_is_not_over_the_limit(config: BoardConfig) -> None:
    status = _status(config, celsius_tenths=-150)
    assert status.reading("cabinet_temperature").value == -15.0
    assert assess(status, config).health is Health.OK


def test_channel_that_should_be_on_but_is_off(config: BoardConfig) -> None:
    status = _status(config, printer_coil=True, screen_coil=False)
    result = assess(status, config)
    assert (result.health, result.reasons) == (Health.DEGRADED, ("screen_off", "printer_off"))


def test_channel_being_switched_is_not_reported_off(config: BoardConfig) -> None:
    status = _status(config, screen_coil=False, switching=("screen",))
    assert assess(status, config).health is Health.OK


# ---------------------------------------------------------------------------------------------
# Power-cycle plans


def test_coil_channel_cycle_is_off_confirm_wait_on_confirm(config: BoardConfig) -> None:
    plan = plan_power_cycle(config, "printer", 2.5)
    assert [s.kind for s in plan.steps] == [
        StepKind.SWITCH_OFF,
        StepKind.CONFIRM_OFF,
        StepKind.WAIT_OFF,
        StepKind.SWITCH_ON,
        StepKind.CONFIRM_ON,
    ]
    assert plan.steps[2].seconds == 2.5
    assert plan.pulse_tenths is None


def test_pulse_channel_cycle_is_left_to_the_board(config: BoardConfig) -> None:
    plan = plan_power_cycle(config, "terminal_psu")  # the board's default: 4 s
    assert [s.kind for s in plan.steps] == [
        StepKind.WRITE_PULSE,
        StepKind.AWAIT_OFF,
        StepKind.AWAIT_ON,
    ]
    assert plan.pulse_tenths == 40
    assert plan.steps[2].seconds > 4.0


@pytest.mark.parametrize(
    ("channel", "off_s"),
    [("printer", 0.0), ("printer", float("nan")), ("terminal_psu", 0.04), ("terminal_psu", 7000)],
)
def test_off_time_out_of_range(config: BoardConfig, channel: str, off_s: float) -> None:
    with pytest.raises(ConfigError, match=r"^off_s: "):
        plan_power_cycle(config, channel, off_s)
