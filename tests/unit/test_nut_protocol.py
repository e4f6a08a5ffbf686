"""The NUT network protocol, byte by byte: requests, answers in any chunking, every error path,
the typed status, its health and the events between readings."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge.errors import (
    BridgeError,
    ConfigError,
    DeviceUnavailable,
    ProtocolViolation,
    RequestRefused,
)
from firmware_bridge.health import Health
from firmware_bridge.link import Receiver
from firmware_bridge.nut import protocol
from firmware_bridge.nut.driver import NutUps
from firmware_bridge.nut.protocol import (
    MAX_LINE_BYTES,
    MAX_LIST_LINES,
    OkReceiver,
    UpsEntry,
    UpsEvent,
    UpsEventTracker,
    UpsListReceiver,
    UpsStatus,
    VarListReceiver,
    VarReceiver,
    assess,
    events_between,
    split_line,
    status_from_variables,
)

LIST_VAR = (
    b"BEGIN LIST VAR kiosk\n"
    b'VAR kiosk battery.charge "87"\n'
    b'VAR kiosk battery.runtime "1520"\n'
    b'VAR kiosk device.model "Santak \\"C1K\\" \\\\ tower"\n'
    b'VAR kiosk input.voltage "229.5"\n'
    b'VAR kiosk ups.load "23"\n'
    b'VAR kiosk ups.mfr "Santak"\n'
    b'VAR kiosk ups.status "OL CHRG"\n'
    b"END LIST VAR kiosk\n"
)
VARIABLES = {
    "battery.charge": "87",
    "battery.runtime": "1520",
    "device.model": 'Santak "C1K" \\ tower',
    "input.voltage": "229.5",
    "ups.load": "23",
    "ups.mfr": "Santak",
    "ups.status": "OL CHRG",
}

# The receivers are what link.Connection.exchange takes; mypy checks they fit its protocol.
_VAR_LIST: Receiver[dict[str, str]] = VarListReceiver("kiosk")
_UPS_LIST: Receiver[tuple[UpsEntry, ...]] = UpsListReceiver()
_VAR: Receiver[str] = VarReceiver("kiosk", "ups.status")
_OK: Receiver[str] = OkReceiver()


def feed_chunks(receiver: Receiver[object], data: bytes, size: int) -> object:
    """Feed ``data`` in ``size``-byte chunks; only the last chunk may complete the answer."""
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    for chunk in chunks[:-1]:
        assert receiver.feed(chunk) is None
    return receiver.feed(chunks[-1])


def violation(receiver: Receiver[object], data: bytes) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as caught:
        receiver.feed(data)
    return caught.value


def status(flags: str = "OL", **numbers: str) -> UpsStatus:
    variables = {"ups.status": flags} if flags else {}
    variables.update({k.replace("_", "."): v for k, v in numbers.items()})
    return status_from_variables("kiosk", variables)


# --- requests -----------------------------------------------------------------------------------


def test_requests_are_exact_lines() -> None:
    assert protocol.list_var("kiosk") == b"LIST VAR kiosk\n"
    assert protocol.get_var("kiosk-2", "battery.charge") == b"GET VAR kiosk-2 battery.charge\n"
    assert protocol.list_ups() == b"LIST UPS\n"
    assert protocol.logout() == b"LOGOUT\n"
    assert protocol.username("monuser") == b"USERNAME monuser\n"
    assert protocol.password("s3cret") == b"PASSWORD s3cret\n"


def test_a_password_with_blanks_quotes_or_backslashes_is_quoted_and_escaped() -> None:
    assert protocol.password('a b"c\\d') == b'PASSWORD "a b\\"c\\\\d"\n'
    assert protocol.username("巡检 员") == 'USERNAME "巡检 员"\n'.encode()


@pytest.mark.parametrize("name", ["", "two words", "line\nbreak", 'quo"te', "ups@host", "x" * 129])
def test_a_name_that_upsd_could_not_parse_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="ups_name"):
        protocol.list_var(name)
    with pytest.raises(ConfigError, match="variable"):
        protocol.get_var("kiosk", name)


@pytest.mark.parametrize("secret", ["", "new\nline", "x" * 256])
def test_credentials_that_cannot_be_sent_are_refused(secret: str) -> None:
    with pytest.raises(ConfigError, match="password"):
        protocol.password(secret)


# --- LIST VAR -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64, 4096])
def test_list_var_in_chunks_of_any_size(size: int) -> None:
    assert feed_chunks(VarListReceiver("kiosk"), LIST_VAR, size) == VARIABLES


@pytest.mark.parametrize("cut", range(1, len(LIST_VAR)))
def test_list_var_split_at_every_byte_boundary(cut: int) -> None:
    receiver = VarListReceiver("kiosk")
    assert receiver.feed(LIST_VAR[:cut]) is None
    assert receiver.feed(LIST_VAR[cut:]) == VARIABLES


def test_an_empty_list_is_an_answer() -> None:
    assert VarListReceiver("kiosk").feed(b"BEGIN LIST VAR kiosk\nEND LIST VAR kiosk\n") == {}


def test_crlf_line_ends_are_tolerated() -> None:
    data = LIST_VAR.replace(b"\n", b"\r\n")
    assert VarListReceiver("kiosk").feed(data) == VARIABLES


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('VAR kiosk ups.model "Santak \\"C1K\\""', ("VAR", "kiosk", "ups.model", 'Santak "C1K"')),
        ('VAR kiosk x "C:\\\\nut\\\\"', ("VAR", "kiosk", "x", "C:\\nut\\")),
        ('VAR kiosk x ""', ("VAR", "kiosk", "x", "")),
        ('VAR  kiosk\tx   "a  b"', ("VAR", "kiosk", "x", "a  b")),
        ("VAR kiosk x bare", ("VAR", "kiosk", "x", "bare")),
        ('VAR kiosk x "中文 型号"', ("VAR", "kiosk", "x", "中文 型号")),
        ("", ()),
    ],
)
def test_words_of_a_line(line: str, words: tuple[str, ...]) -> None:
    assert split_line(line) == words


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('VAR kiosk x "open', "bad_quoting"),
        ('VAR kiosk x "ends in backslash\\', "bad_escape"),
        ('VAR kiosk x "tab \\t"', "bad_escape"),
        ('VAR kiosk x "a"b', "bad_quoting"),
        ('VAR kiosk x a"b"', "bad_quoting"),
        ("VAR kiosk x a\\b", "bad_quoting"),
    ],
)
def test_bad_quoting_is_a_violation(line: str, reason: str) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        split_line(line)
    assert caught.value.reason == reason
    data = b"BEGIN LIST VAR kiosk\n" + line.encode() + b"\n"
    assert violation(VarListReceiver("kiosk"), data).reason == reason


@pytest.mark.parametrize(
    "data",
    [
        b"BEGIN LIST VAR ups2\n",
        b'BEGIN LIST VAR kiosk\nVAR ups2 battery.charge "87"\n',
        b"BEGIN LIST VAR kiosk\nEND LIST VAR ups2\n",
    ],
    ids=["begin", "item", "end"],
)
def test_an_answer_about_another_ups_is_a_violation(data: bytes) -> None:
    assert violation(VarListReceiver("kiosk"), data).reason == "wrong_ups"


@pytest.mark.parametrize(
    "data",
    [
        b'VAR kiosk battery.charge "87"\n',
        b"OK\n",
        b"\n",
        b"BEGIN LIST UPS\n",
        b"BEGIN LIST VAR\n",
        b"BEGIN LIST VAR kiosk extra\n",
        b"BEGIN LIST VAR kiosk\nEND LIST UPS\n",
        b"BEGIN LIST VAR kiosk\nBEGIN LIST VAR kiosk\n",
        b"BEGIN LIST VAR kiosk\nVAR kiosk battery.charge\n",
        b'BEGIN LIST VAR kiosk\nVAR kiosk battery.charge "87" extra\n',
        b'BEGIN LIST VAR kiosk\nRW kiosk battery.charge "87"\n',
        b"BEGIN LIST VAR kiosk\nERR DATA-STALE\n",
    ],
)
def test_a_line_outside_its_place_is_a_violation(data: bytes) -> None:
    assert violation(VarListReceiver("kiosk"), data).reason == "unexpected_line"


@pytest.mark.parametrize(
    "extra", [b"END LIST VAR kiosk\n", b"BEGIN", b"\n", b'VAR kiosk x "1"\n'], ids=repr
)
def test_anything_after_the_end_of_a_list_is_a_violation(extra: bytes) -> None:
    assert violation(VarListReceiver("kiosk"), LIST_VAR + extra).reason == "trailing_data"
    receiver = VarListReceiver("kiosk")
    assert receiver.feed(LIST_VAR) == VARIABLES
    assert violation(receiver, extra).reason == "trailing_data"


def test_a_variable_sent_twice_or_badly_named_is_a_violation() -> None:
    twice = b'BEGIN LIST VAR kiosk\nVAR kiosk a "1"\nVAR kiosk a "2"\n'
    assert violation(VarListReceiver("kiosk"), twice).reason == "duplicate_variable"
    bad = b'BEGIN LIST VAR kiosk\nVAR kiosk "bad name" "2"\n'
    assert violation(VarListReceiver("kiosk"), bad).reason == "bad_variable_name"


def test_a_line_of_the_limit_is_read_and_one_byte_more_is_overlong() -> None:
    head = b'VAR kiosk ups.model "'
    value = b"x" * (MAX_LINE_BYTES - len(head) - 1)
    line = head + value + b'"'
    assert len(line) == MAX_LINE_BYTES
    data = b"BEGIN LIST VAR kiosk\n" + line + b"\nEND LIST VAR kiosk\n"
    assert VarListReceiver("kiosk").feed(data) == {"ups.model": value.decode()}
    too_long = b"BEGIN LIST VAR kiosk\n" + head + value + b'x"\n'
    assert violation(VarListReceiver("kiosk"), too_long).reason == "overlong"


def test_an_endless_line_is_overlong_before_its_newline_arrives() -> None:
    receiver = VarListReceiver("kiosk")
    assert receiver.feed(b"x" * MAX_LINE_BYTES) is None
    assert violation(receiver, b"x").reason == "overlong"


def test_a_list_longer_than_its_bound_is_a_violation() -> None:
    items = b"".join(b'VAR kiosk v%d "1"\n' % i for i in range(MAX_LIST_LINES))
    data = b"BEGIN LIST VAR kiosk\n" + items + b"END LIST VAR kiosk\n"
    assert violation(VarListReceiver("kiosk"), data).reason == "too_many_lines"
    fits = b"".join(b'VAR kiosk v%d "1"\n' % i for i in range(MAX_LIST_LINES - 2))
    result = VarListReceiver("kiosk").feed(
        b"BEGIN LIST VAR kiosk\n" + fits + b"END LIST VAR kiosk\n"
    )
    assert result is not None
    assert len(result) == MAX_LIST_LINES - 2
    assert violation(VarListReceiver("kiosk", max_lines=3), LIST_VAR).reason == "too_many_lines"


@pytest.mark.parametrize(
    "data", [b"BEGIN LIST VAR kiosk\n\xff\xfe\n", b"BEGIN LIST VAR kiosk\nVAR kiosk a \x00\n"]
)
def test_bytes_that_are_not_text_are_a_violation(data: bytes) -> None:
    assert violation(VarListReceiver("kiosk"), data).reason == "bad_encoding"


# --- errors -------------------------------------------------------------------------------------

UPS_ERRORS = [
    ("UNKNOWN-UPS", DeviceUnavailable, "ups_unknown"),
    ("DRIVER-NOT-CONNECTED", DeviceUnavailable, "ups_driver_not_connected"),
    ("DATA-STALE", RequestRefused, "ups_data_stale"),
]
OTHER_ERRORS = [
    ("ACCESS-DENIED", "nut_access_denied"),
    ("VAR-NOT-SUPPORTED", "nut_var_not_supported"),
    ("INVALID-ARGUMENT", "nut_invalid_argument"),
    ("UNKNOWN-COMMAND", "nut_unknown_command"),
    ("USERNAME-REQUIRED", "nut_username_required"),
    ("FEATURE-NOT-CONFIGURED", "nut_feature_not_configured"),
    ("SOMETHING-NEW-2", "nut_something_new_2"),
]
RECEIVERS: dict[str, Callable[[], Receiver[object]]] = {
    "list_var": lambda: VarListReceiver("kiosk"),
    "list_ups": UpsListReceiver,
    "get_var": lambda: VarReceiver("kiosk", "ups.status"),
    "ok": OkReceiver,
}


@pytest.mark.parametrize("receiver", RECEIVERS)
@pytest.mark.parametrize(("code", "kind", "reason"), UPS_ERRORS)
def test_errors_about_the_ups_say_absent_or_stale(
    receiver: str, code: str, kind: type[BridgeError], reason: str
) -> None:
    with pytest.raises(BridgeError) as caught:
        feed_chunks(RECEIVERS[receiver](), f"ERR {code}\n".encode(), 3)
    assert type(caught.value) is kind
    assert caught.value.reason == reason
    assert code in str(caught.value)


@pytest.mark.parametrize("receiver", RECEIVERS)
@pytest.mark.parametrize(("code", "reason"), OTHER_ERRORS)
def test_other_errors_are_refusals_with_the_code_as_reason(
    receiver: str, code: str, reason: str
) -> None:
    with pytest.raises(RequestRefused) as caught:
        RECEIVERS[receiver]().feed(f"ERR {code} some extra words\n".encode())
    assert caught.value.reason == reason
    assert "some extra words" in str(caught.value)


@pytest.mark.parametrize("line", [b"ERR\n", b"ERR data-stale\n", b'ERR "DATA STALE"\n'])
def test_a_malformed_error_line_is_a_violation(line: bytes) -> None:
    assert violation(VarListReceiver("kiosk"), line).reason == "bad_error_line"


# --- the other answers --------------------------------------------------------------------------


def test_list_ups() -> None:
    data = b'BEGIN LIST UPS\nUPS kiosk "Santak C1K"\nUPS door "\\"Door\\" UPS"\nEND LIST UPS\n'
    assert feed_chunks(UpsListReceiver(), data, 4) == (
        UpsEntry("kiosk", "Santak C1K"),
        UpsEntry("door", '"Door" UPS'),
    )
    assert violation(UpsListReceiver(), b"BEGIN LIST UPS\nUPS kiosk\n").reason == "unexpected_line"


def test_get_var() -> None:
    assert feed_chunks(
        VarReceiver("kiosk", "ups.status"), b'VAR kiosk ups.status "OB LB"\n', 2
    ) == ("OB LB")
    wrong_var = b'VAR kiosk ups.load "3"\n'
    assert violation(VarReceiver("kiosk", "ups.status"), wrong_var).reason == "unexpected_line"
    wrong_ups = b'VAR ups2 ups.status "OL"\n'
    assert violation(VarReceiver("kiosk", "ups.status"), wrong_ups).reason == "wrong_ups"


@pytest.mark.parametrize("answer", [b"OK\n", b"OK Goodbye\n", b"Goodbye...\n"])
def test_ok_and_goodbye(answer: bytes) -> None:
    assert OkReceiver().feed(answer) == answer.decode().strip()


def test_anything_but_ok_is_a_violation() -> None:
    assert violation(OkReceiver(), b"BEGIN LIST UPS\n").reason == "unexpected_line"


# --- status -------------------------------------------------------------------------------------


def test_status_from_variables() -> None:
    result = status_from_variables("kiosk", VARIABLES)
    assert result == UpsStatus(
        ups="kiosk",
        flags=("OL", "CHRG"),
        on_mains=True,
        on_battery=False,
        low_battery=False,
        replace_battery=False,
        charging=True,
        overload=False,
        bypass=False,
        off=False,
        fsd=False,
        battery_charge=87.0,
        runtime_s=1520.0,
        load=23.0,
        input_voltage=229.5,
        output_voltage=None,
        manufacturer="Santak",
        model='Santak "C1K" \\ tower',
    )


def test_optional_variables_missing_are_none() -> None:
    result = status_from_variables("kiosk", {"ups.status": "OL"})
    assert result.battery_charge is None
    assert result.runtime_s is None
    assert result.load is None
    assert result.input_voltage is None
    assert result.output_voltage is None
    assert result.manufacturer is None
    assert result.model is None


def test_ups_names_win_over_device_names() -> None:
    variables = {"ups.mfr": "A", "device.mfr": "B", "ups.model": "C", "device.model": "D"}
    result = status_from_variables("kiosk", variables)
    assert (result.manufacturer, result.model) == ("A", "C")
    result = status_from_variables("kiosk", {"device.mfr": "B", "device.model": "D"})
    assert (result.manufacturer, result.model) == ("B", "D")


FLAG_FIELDS = [
    ("OL", "on_mains"),
    ("OB", "on_battery"),
    ("LB", "low_battery"),
    ("RB", "replace_battery"),
    ("CHRG", "charging"),
    ("OVER", "overload"),
    ("BYPASS", "bypass"),
    ("OFF", "off"),
    ("FSD", "fsd"),
]


@pytest.mark.parametrize(("flag", "field"), FLAG_FIELDS)
def test_every_status_flag_sets_its_field_and_only_it(flag: str, field: str) -> None:
    result = status_from_variables("kiosk", {"ups.status": f"TRIM {flag} ALARM"})
    assert result.flags == ("TRIM", flag, "ALARM")
    for _, other in FLAG_FIELDS:
        assert getattr(result, other) is (other == field)


@pytest.mark.parametrize(
    "variable", ["battery.charge", "battery.runtime", "ups.load", "input.voltage", "output.voltage"]
)
@pytest.mark.parametrize(
    "text", ["abc", "", "1e3", "1,200.5", "12.", ".5", "0x10", "nan", "inf", "١٢"]
)
def test_a_number_that_does_not_parse_is_a_violation_naming_it(variable: str, text: str) -> None:
    with pytest.raises(ProtocolViolation, match=variable) as caught:
        status_from_variables("kiosk", {"ups.status": "OL", variable: text})
    assert caught.value.reason == "bad_number"


@pytest.mark.parametrize(
    ("variable", "text"),
    [
        ("battery.charge", "100.5"),
        ("battery.charge", "-1"),
        ("battery.runtime", "-5"),
        ("ups.load", "-0.1"),
        ("battery.runtime", "9" * 400),
    ],
)
def test_a_number_out_of_its_range_is_a_violation_naming_it(variable: str, text: str) -> None:
    with pytest.raises(ProtocolViolation, match=variable) as caught:
        status_from_variables("kiosk", {"ups.status": "OL", variable: text})
    assert caught.value.reason == "number_out_of_range"


def test_numbers_with_blanks_and_overloads_above_100_percent_are_read() -> None:
    result = status_from_variables("kiosk", {"ups.load": " 112.5 ", "battery.charge": "0"})
    assert result.load == 112.5
    assert result.battery_charge == 0.0


# --- assess -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "health", "reasons"),
    [
        ("OL", Health.OK, ()),
        ("OL CHRG", Health.OK, ()),
        ("OB DISCHRG", Health.DEGRADED, ("on_battery",)),
        ("OB LB", Health.FAULTY, ("low_battery",)),
        ("OL LB", Health.FAULTY, ("low_battery",)),
        ("OB FSD", Health.FAULTY, ("low_battery",)),
        ("OL RB", Health.DEGRADED, ("replace_battery",)),
        ("OL OVER", Health.DEGRADED, ("overload",)),
        ("OB RB OVER", Health.DEGRADED, ("on_battery", "replace_battery", "overload")),
        ("OL BYPASS", Health.DEGRADED, ("bypass",)),
        ("OL OFF", Health.FAULTY, ("ups_off",)),
        ("", Health.FAULTY, ("ups_status_unknown",)),
        ("WAIT", Health.FAULTY, ("ups_status_unknown",)),
        ("CHRG", Health.FAULTY, ("ups_status_unknown",)),
        ("LB", Health.FAULTY, ("ups_status_unknown", "low_battery")),
    ],
)
def test_assess(flags: str, health: Health, reasons: tuple[str, ...]) -> None:
    assessment = assess(status(flags))
    assert assessment.health is health
    assert assessment.reasons == reasons


def test_the_detail_says_what_is_left_in_the_battery() -> None:
    assessment = assess(status("OB", battery_charge="42", battery_runtime="600"))
    assert assessment.detail == "on battery, 42% charge, 600 s runtime"
    assert "waiting for the driver" in assess(status("WAIT")).detail


# --- events -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "events"),
    [
        ("OL", "OL", ()),
        ("OL", "OB", (UpsEvent.MAINS_LOST,)),
        ("OB", "OL", (UpsEvent.MAINS_RESTORED,)),
        ("OB", "OB LB", (UpsEvent.LOW_BATTERY,)),
        ("OB LB", "OL", (UpsEvent.MAINS_RESTORED, UpsEvent.BATTERY_RECOVERED)),
        ("OL", "OB LB", (UpsEvent.MAINS_LOST, UpsEvent.LOW_BATTERY)),
        ("OB", "OB FSD", (UpsEvent.LOW_BATTERY,)),
        ("OL LB", "OL", (UpsEvent.BATTERY_RECOVERED,)),
        ("OL", "OL RB", (UpsEvent.REPLACE_BATTERY,)),
        ("OL RB", "OL", ()),
        ("OL", "OL OVER", (UpsEvent.OVERLOAD,)),
        ("OL OVER", "OL", (UpsEvent.OVERLOAD_CLEARED,)),
        ("OL CHRG", "OL", ()),
        ("WAIT", "OB", (UpsEvent.MAINS_LOST,)),
        ("WAIT", "OL", ()),
        ("OB", "WAIT", ()),
        ("OL", "", ()),
    ],
)
def test_events_between(before: str, after: str, events: tuple[UpsEvent, ...]) -> None:
    assert events_between(status(before), status(after)) == events


@pytest.mark.parametrize(
    ("flags", "events"),
    [
        ("OL", ()),
        ("OB", (UpsEvent.MAINS_LOST,)),
        (
            "OB LB RB OVER",
            (
                UpsEvent.MAINS_LOST,
                UpsEvent.LOW_BATTERY,
                UpsEvent.REPLACE_BATTERY,
                UpsEvent.OVERLOAD,
            ),
        ),
        ("WAIT", ()),
    ],
)
def test_the_first_reading_reports_what_is_wrong_now(
    flags: str, events: tuple[UpsEvent, ...]
) -> None:
    assert events_between(None, status(flags)) == events


def test_numbers_alone_make_no_event() -> None:
    assert (
        events_between(status("OB", battery_charge="90"), status("OB", battery_charge="40")) == ()
    )


def test_event_values_are_stable_codes() -> None:
    assert [e.value for e in UpsEvent] == [
        "mains_lost",
        "mains_restored",
        "low_battery",
        "battery_recovered",
        "replace_battery",
        "overload",
        "overload_cleared",
    ]


def test_tracker_ends_an_outage_across_failed_and_unknown_readings() -> None:
    tracker = UpsEventTracker()
    readings = [status("OL"), status("OB"), None, status("WAIT"), status("OB"), status("OL")]
    assert [tracker.update(r) for r in readings] == [
        (),
        (UpsEvent.MAINS_LOST,),
        (),
        (),
        (),
        (UpsEvent.MAINS_RESTORED,),
    ]


# --- fuzz ---------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed_all(receiver: Receiver[object], chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            if receiver.feed(chunk) is not None:
                return
    except BridgeError:
        pass


@FUZZ
@given(st.sampled_from(sorted(RECEIVERS)), st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_raise_nothing_but_bridge_errors(receiver: str, chunks: list[bytes]) -> None:
    _feed_all(RECEIVERS[receiver](), chunks)


@FUZZ
@given(st.data())
def test_mutated_answers_raise_nothing_but_bridge_errors(data: st.DataObject) -> None:
    raw = bytearray(LIST_VAR)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        match data.draw(st.sampled_from(["replace", "insert", "delete"])):
            case "replace":
                raw[at] = data.draw(st.sampled_from(b'"\\ \n\r\x00\xffA1.-'))
            case "insert":
                raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
            case _:
                del raw[at]
    size = data.draw(st.integers(1, 50))
    chunks = [bytes(raw[i : i + size]) for i in range(0, len(raw), size)]
    _feed_all(VarListReceiver("kiosk"), chunks)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "ups.status",
                "battery.charge",
                "battery.runtime",
                "ups.load",
                "input.voltage",
                "output.voltage",
                "ups.mfr",
            ]
        ),
        st.text(max_size=12),
    )
)
def test_any_variables_give_a_status_or_a_violation(variables: Mapping[str, str]) -> None:
    try:
        result = status_from_variables("kiosk", variables)
    except ProtocolViolation:
        return
    assess(result)  # any status has a health
    assert events_between(result, result) == ()
    onsets = {
        UpsEvent.MAINS_LOST,
        UpsEvent.LOW_BATTERY,
        UpsEvent.REPLACE_BATTERY,
        UpsEvent.OVERLOAD,
    }
    assert set(events_between(None, result)) <= onsets


# --- driver configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "ups_name", "timeout_s", "field"),
    [
        ("/dev/ttyUSB0", "kiosk", 2.0, "url"),
        ("tcp://127.0.0.1", "kiosk", 2.0, "url"),
        ("tcp://127.0.0.1:3493", "kiosk@host", 2.0, "ups_name"),
        ("tcp://127.0.0.1:3493", "kiosk", 0.0, "timeout_s"),
        ("tcp://127.0.0.1:3493", "kiosk", float("nan"), "timeout_s"),
    ],
)
def test_a_driver_that_cannot_work_is_refused_naming_the_field(
    endpoint: str, ups_name: str, timeout_s: float, field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        NutUps("ups", endpoint, ups_name, timeout_s=timeout_s)
