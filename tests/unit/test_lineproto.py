"""Line protocol encoding, byte by byte. The rules themselves were established against a real
InfluxDB 1.6.7 (see the module docstring); tests/integration/test_influx_roundtrip.py keeps
checking them against the server."""

from __future__ import annotations

import dataclasses
import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_protocol.messages import (
    InterfaceSample,
    NetworkSample,
    PowerSample,
    Sample,
    SystemSample,
)
from fleet_server.errors import FleetServerError
from fleet_server.lineproto import (
    MAX_KEY_BYTES,
    MAX_TS_MS,
    MIN_TS_MS,
    FieldValue,
    LineProtocolError,
    Point,
    encode_point,
    encode_points,
)
from fleet_server.telemetry_lines import TerminalLines, sample_points


def line(
    measurement: str = "m",
    tags: dict[str, str] | None = None,
    fields: dict[str, FieldValue] | None = None,
    ts_ms: int = 1_700_000_000_123,
) -> bytes:
    return encode_point(Point(measurement, tags or {}, fields or {"f": 1.0}, ts_ms))


# --- the shape of a line ------------------------------------------------------------------


def test_minimal_point() -> None:
    assert line() == b"m f=1.0 1700000000123"


def test_full_point() -> None:
    point = Point(
        "system",
        {"terminal": "sj-0001", "site": "朱泾镇党群服务中心"},
        {"cpu_percent": 12.5, "seq": 42, "on_ac": True, "note": "ok"},
        1_700_000_000_123,
    )
    assert (
        encode_point(point)
        == (
            "system,site=朱泾镇党群服务中心,terminal=sj-0001 "
            'cpu_percent=12.5,seq=42i,on_ac=true,note="ok" 1700000000123'
        ).encode()
    )


def test_encode_points_separates_lines_with_newlines() -> None:
    points = [Point("m", {}, {"f": 1}, 1), Point("n", {}, {"g": 2}, 2)]
    assert encode_points(points) == b"m f=1i 1\nn g=2i 2"
    assert encode_points(iter(points)) == b"m f=1i 1\nn g=2i 2"
    assert encode_points([]) == b""


def test_tags_are_sorted_by_key_in_code_point_order() -> None:
    tags = {"z": "1", "a": "2", "M": "3", "朱": "4", "_": "5", "a0": "6"}
    assert line(tags=tags) == "m,M=3,_=5,a=2,a0=6,z=1,朱=4 f=1.0 1700000000123".encode()


def test_fields_keep_the_order_given() -> None:
    assert line(fields={"z": 1, "a": 2}) == b"m z=1i,a=2i 1700000000123"


def test_empty_tag_value_is_omitted() -> None:
    assert line(tags={"a": "", "b": "x", "c": ""}) == b"m,b=x f=1.0 1700000000123"


# --- escaping -----------------------------------------------------------------------------


def test_measurement_escapes_comma_and_space_only() -> None:
    assert line(measurement='a b,c=d"e') == b'a\\ b\\,c=d"e f=1.0 1700000000123'


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        ("a b", b"a\\ b"),
        ("a,b", b"a\\,b"),
        ("a=b", b"a\\=b"),
        (" ,=", b"\\ \\,\\="),
        ('a"b', b'a"b'),
        ("a'b", b"a'b"),
        ("#a", b"#a"),
        ("a\\b", b"a\\b"),  # the backslash itself is never escaped
        ("\\\\a", b"\\\\a"),
        ("a\\,b", b"a\\\\,b"),  # tags carry backslash-comma: the server unescapes "\," only
        ("a\\ b", b"a\\\\ b"),
        ("a\\=b", b"a\\\\=b"),
        ("朱泾镇 党群服务中心", "朱泾镇\\ 党群服务中心".encode()),
        ("a\u3000b", "a\u3000b".encode()),  # ideographic space is text, not a separator
    ],
)
def test_tag_key_and_value_escape_comma_equals_space(raw: str, wire: bytes) -> None:
    assert line(tags={"t": raw}) == b"m,t=" + wire + b" f=1.0 1700000000123"
    assert line(tags={raw: "v"}) == b"m," + wire + b"=v f=1.0 1700000000123"


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        ("a b", b"a\\ b"),
        ("a,b", b"a\\,b"),
        ("a=b", b"a\\=b"),
        ('a"b', b'a"b'),
        ("a\\b", b"a\\b"),
        ("温度", "温度".encode()),
    ],
)
def test_field_key_escapes_comma_equals_space(raw: str, wire: bytes) -> None:
    assert line(fields={raw: 1}) == b"m " + wire + b"=1i 1700000000123"


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        ("", b'""'),
        ("plain", b'"plain"'),
        ('say "hi"', b'"say \\"hi\\""'),
        ("C:\\kiosk\\", b'"C:\\\\kiosk\\\\"'),
        ('\\"', b'"\\\\\\""'),
        ("a, b=c", b'"a, b=c"'),
        ("line1\nline2", b'"line1\nline2"'),  # carried verbatim inside the quotes
        ("tab\tcr\rnul\x00", b'"tab\tcr\rnul\x00"'),
        ("#not a comment", b'"#not a comment"'),
        ("朱泾镇 党群服务中心", '"朱泾镇 党群服务中心"'.encode()),
    ],
)
def test_string_field_is_quoted_with_quote_and_backslash_escaped(raw: str, wire: bytes) -> None:
    assert line(fields={"s": raw}) == b"m s=" + wire + b" 1700000000123"


# --- field value types --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, b"0i"),
        (-7, b"-7i"),
        (2**63 - 1, b"9223372036854775807i"),
        (-(2**63), b"-9223372036854775808i"),
        (True, b"true"),
        (False, b"false"),
        (1.0, b"1.0"),
        (float(1), b"1.0"),
        (0.1, b"0.1"),
        (-2.5, b"-2.5"),
        (-0.0, b"-0.0"),
        (1e16, b"1e+16"),
        (1e-05, b"1e-05"),
        (5e-324, b"5e-324"),
        (1.7976931348623157e308, b"1.7976931348623157e+308"),
        (0.1 + 0.2, b"0.30000000000000004"),
    ],
)
def test_number_and_bool_formatting(value: FieldValue, wire: bytes) -> None:
    assert line(fields={"v": value}) == b"m v=" + wire + b" 1700000000123"


def test_timestamps_span_influxdbs_range() -> None:
    assert line(ts_ms=0) == b"m f=1.0 0"
    assert line(ts_ms=-1) == b"m f=1.0 -1"
    assert line(ts_ms=MAX_TS_MS) == b"m f=1.0 9223372036854"
    assert line(ts_ms=MIN_TS_MS) == b"m f=1.0 -9223372036854"


def test_longest_series_key_the_server_takes() -> None:
    # "m,t=" + value + "#!~#" + "f" is exactly MAX_KEY_BYTES.
    value = "x" * (MAX_KEY_BYTES - len("m,t=") - len("#!~#") - len("f"))
    assert line(tags={"t": value}).startswith(b"m,t=xxx")
    with pytest.raises(LineProtocolError, match="65536 bytes"):
        line(tags={"t": value + "x"})


def test_key_length_counts_escaped_utf8_bytes() -> None:
    room = MAX_KEY_BYTES - len("m,t=") - len("#!~#") - len("f")
    line(tags={"t": "朱" * (room // 3)})
    with pytest.raises(LineProtocolError, match="more than InfluxDB's 65535"):
        line(tags={"t": "朱" * (room // 3 + 1)})
    line(tags={"t": "x " * (room // 3)})  # "x\ " is three bytes on the wire
    with pytest.raises(LineProtocolError, match="more than InfluxDB's 65535"):
        line(tags={"t": "x " * (room // 3 + 1)})


# --- the record ---------------------------------------------------------------------------


def test_point_is_frozen_and_owns_copies_of_its_mappings() -> None:
    tags = {"terminal": "sj-0001"}
    fields: dict[str, FieldValue] = {"f": 1}
    point = Point("m", tags, fields, 5)
    tags["terminal"] = "changed"
    fields["g"] = 2
    with pytest.raises(TypeError):
        point.tags["x"] = "y"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.ts_ms = 6  # type: ignore[misc]
    assert encode_point(point) == b"m,terminal=sj-0001 f=1i 5"
    assert dict(point.tags) == {"terminal": "sj-0001"}


def test_points_compare_by_content() -> None:
    assert Point("m", {"a": "1"}, {"f": 1}, 5) == Point("m", {"a": "1"}, {"f": 1}, 5)
    assert Point("m", {"a": "1"}, {"f": 1}, 5) != Point("m", {"a": "1"}, {"f": 1}, 6)
    assert "_line" not in repr(Point("m", {}, {"f": 1}, 5))


def test_replace_checks_the_new_point() -> None:
    point = Point("m", {}, {"f": 1}, 5)
    assert encode_point(dataclasses.replace(point, ts_ms=6)) == b"m f=1i 6"
    with pytest.raises(LineProtocolError):
        dataclasses.replace(point, measurement="")


def test_error_is_a_value_error_in_the_servers_tree() -> None:
    assert issubclass(LineProtocolError, ValueError)
    assert issubclass(LineProtocolError, FleetServerError)


# --- what cannot be carried ---------------------------------------------------------------

CONTROL_CHARS = ["\n", "\r", "\t", "\x00", "\x1f", "\x7f", "\x85", "\x9f"]


def test_no_fields() -> None:
    with pytest.raises(LineProtocolError, match="at least one field"):
        Point("m", {"t": "x"}, {}, 1)


@pytest.mark.parametrize(
    ("measurement", "tags", "fields", "message"),
    [
        ("", {}, {"f": 1}, "empty measurement"),
        ("m", {"": "x"}, {"f": 1}, "empty tag key"),
        ("m", {"": ""}, {"f": 1}, "empty tag key"),
        ("m", {}, {"": 1}, "empty field key"),
    ],
)
def test_empty_names(
    measurement: str, tags: dict[str, str], fields: dict[str, FieldValue], message: str
) -> None:
    with pytest.raises(LineProtocolError, match=message):
        Point(measurement, tags, fields, 1)


@pytest.mark.parametrize("char", CONTROL_CHARS)
def test_control_characters_in_names_and_tag_values(char: str) -> None:
    text = f"a{char}b"
    with pytest.raises(LineProtocolError, match="control character"):
        Point(text, {}, {"f": 1}, 1)
    with pytest.raises(LineProtocolError, match="control character"):
        Point("m", {text: "v"}, {"f": 1}, 1)
    with pytest.raises(LineProtocolError, match="control character"):
        Point("m", {"t": text}, {"f": 1}, 1)
    with pytest.raises(LineProtocolError, match="control character"):
        Point("m", {}, {text: 1}, 1)


def test_measurement_starting_with_hash_would_be_a_comment() -> None:
    with pytest.raises(LineProtocolError, match="comment"):
        Point("#m", {}, {"f": 1}, 1)
    assert line(measurement="m#") == b"m# f=1.0 1700000000123"
    assert line(measurement=" #m") == b"\\ #m f=1.0 1700000000123"


@pytest.mark.parametrize(
    ("measurement", "tags", "fields"),
    [
        ("m\\", {}, {"f": 1}),
        ("m", {"t\\": "v"}, {"f": 1}),
        ("m", {"t": "v\\"}, {"f": 1}),
        ("m", {"t": "\\"}, {"f": 1}),
        ("m", {}, {"f\\": 1}),
    ],
)
def test_trailing_backslash_would_escape_the_separator(
    measurement: str, tags: dict[str, str], fields: dict[str, FieldValue]
) -> None:
    with pytest.raises(LineProtocolError, match="ends with a backslash"):
        Point(measurement, tags, fields, 1)


@pytest.mark.parametrize("pair", ["\\,", "\\=", "\\ ", '\\"'])
def test_backslash_pairs_the_server_unescapes_in_measurements_and_field_keys(pair: str) -> None:
    with pytest.raises(LineProtocolError, match="unescapes"):
        Point(f"a{pair}b", {}, {"f": 1}, 1)
    with pytest.raises(LineProtocolError, match="unescapes"):
        Point("m", {}, {f"a{pair}b": 1}, 1)
    # ... while tags carry them exactly.
    Point("m", {f"a{pair}b": f"a{pair}b"}, {"f": 1}, 1)


@pytest.mark.parametrize(
    ("tags", "fields"), [({"time": "x"}, {"f": 1}), ({}, {"time": 1}), ({}, {"time": 1, "f": 2})]
)
def test_time_is_reserved_as_a_key(tags: dict[str, str], fields: dict[str, FieldValue]) -> None:
    with pytest.raises(LineProtocolError, match="'time' is reserved"):
        Point("m", tags, fields, 1)
    assert line(measurement="time", tags={"Time": "x"}, fields={"TIME": 1}) == (
        b"time,Time=x TIME=1i 1700000000123"
    )


def test_same_key_as_tag_and_field() -> None:
    with pytest.raises(LineProtocolError, match="both a tag and a field"):
        Point("m", {"x": "1"}, {"x": 2}, 1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats(value: float) -> None:
    with pytest.raises(LineProtocolError, match="no NaN or infinity"):
        Point("m", {}, {"f": value}, 1)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_integers_outside_int64(value: int) -> None:
    with pytest.raises(LineProtocolError, match="outside int64"):
        Point("m", {}, {"f": value}, 1)


@pytest.mark.parametrize("value", [None, b"bytes", [1], {"a": 1}, 1j])
def test_unsupported_field_types(value: object) -> None:
    with pytest.raises(LineProtocolError, match="must be float, int, bool or str"):
        Point("m", {}, {"f": value}, 1)  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("measurement", "tags", "fields"),
    [
        (1, {}, {"f": 1}),
        ("m", {1: "v"}, {"f": 1}),
        ("m", {"t": 1}, {"f": 1}),
        ("m", {"t": None}, {"f": 1}),
        ("m", {}, {1: 1}),
    ],
)
def test_non_str_names_and_tag_values(measurement: object, tags: object, fields: object) -> None:
    with pytest.raises(LineProtocolError, match="must be a str"):
        Point(measurement, tags, fields, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("ts_ms", [MAX_TS_MS + 1, MIN_TS_MS - 1, 2**63])
def test_timestamp_outside_influxdbs_range(ts_ms: int) -> None:
    with pytest.raises(LineProtocolError, match="outside InfluxDB's range"):
        Point("m", {}, {"f": 1}, ts_ms)


@pytest.mark.parametrize("ts_ms", [True, 1.5, "1", None])
def test_timestamp_must_be_an_int(ts_ms: object) -> None:
    with pytest.raises(LineProtocolError, match="ts_ms must be an int"):
        Point("m", {}, {"f": 1}, ts_ms)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("measurement", "tags", "fields"),
    [
        ("m\ud800", {}, {"f": 1}),
        ("m", {"t": "\udfff"}, {"f": 1}),
        ("m", {}, {"f\ud83d": 1}),
        ("m", {}, {"s": "half an emoji \ud83d"}),
    ],
)
def test_lone_surrogates_are_not_utf8(
    measurement: str, tags: dict[str, str], fields: dict[str, FieldValue]
) -> None:
    with pytest.raises(LineProtocolError, match="lone surrogate"):
        Point(measurement, tags, fields, 1)


def test_messages_name_the_measurement_and_key_and_stay_short() -> None:
    with pytest.raises(LineProtocolError) as caught:
        Point("system", {"site": "x" * 10_000 + "\\"}, {"f": 1}, 1)
    message = str(caught.value)
    assert "measurement 'system'" in message
    assert "tag 'site'" in message
    assert "10001 chars" in message
    assert len(message) < 400


# --- properties ---------------------------------------------------------------------------


@given(
    measurement=st.text(max_size=8),
    tag_key=st.text(max_size=8),
    tag_value=st.text(max_size=8),
    field_key=st.text(max_size=8),
)
def test_names_and_tags_either_encode_to_one_line_or_are_refused(
    measurement: str, tag_key: str, tag_value: str, field_key: str
) -> None:
    try:
        point = Point(measurement, {tag_key: tag_value}, {field_key: 1}, 1)
    except LineProtocolError:
        return
    encoded = encode_point(point)
    assert b"\n" not in encoded
    assert b"\r" not in encoded
    assert not encoded.startswith(b"#")
    assert encoded.endswith(b"=1i 1")


@given(value=st.text())
def test_any_unicode_text_is_a_string_field(value: str) -> None:
    encoded = encode_point(Point("m", {}, {"s": value}, 1))
    quoted = encoded[len(b'm s="') : -len(b'" 1')]
    assert re.sub(rb"\\(.)", rb"\1", quoted, flags=re.DOTALL) == value.encode()
    assert re.search(rb'(?<!\\)"', quoted.replace(b"\\\\", b"")) is None


# --- samples as points (fleet_server.telemetry_lines) -----------------------------------

TAGS = {"terminal": "sj-0001", "site": "zhujing-dqzx", "town": "朱泾镇", "district": "金山区"}
TS = 1_732_190_395_000


def _lines(sample: Sample, historical: bool = False) -> list[bytes]:
    model = [encode_point(p) for p in sample_points(sample, TAGS, historical)]
    fast: list[str] = []
    TerminalLines(TAGS).lines(sample, historical, fast)
    assert [line.encode() for line in fast] == model  # ingest's hot path writes the same
    return model


def test_network_sample_is_one_point_per_interface_and_one_for_the_link() -> None:
    sample = NetworkSample(
        seq=9,
        ts=TS,
        interfaces=[
            InterfaceSample(
                name="enp3s0", kind="ethernet", up=True, bytes_sent=10, bytes_recv=20, errors=2
            ),
            InterfaceSample(name="wwan0", kind="cellular", up=False, bytes_sent=0, bytes_recv=5),
        ],
        broker_rtt_ms=38.5,
        dns_ok=False,
        dns_ms=5000.0,
    )
    tags = "district=金山区,site=zhujing-dqzx,terminal=sj-0001,town=朱泾镇"
    assert _lines(sample) == [
        (
            f"network,district=金山区,iface=enp3s0,kind=ethernet,site=zhujing-dqzx,"
            f"terminal=sj-0001,town=朱泾镇 "
            f"bytes_sent=10i,bytes_recv=20i,up=true,errors=2i,seq=9i,historical=false {TS}"
        ).encode(),
        (
            f"network,district=金山区,iface=wwan0,kind=cellular,site=zhujing-dqzx,"
            f"terminal=sj-0001,town=朱泾镇 "
            f"bytes_sent=0i,bytes_recv=5i,up=false,seq=9i,historical=false {TS}"
        ).encode(),
        (
            f"link,{tags} broker_rtt_ms=38.5,dns_ok=false,dns_ms=5000.0,seq=9i,historical=false "
            f"{TS}"
        ).encode(),
    ]


def test_network_sample_without_link_measurements_has_no_link_point() -> None:
    sample = NetworkSample(
        seq=1,
        ts=TS,
        interfaces=[
            InterfaceSample(name="wlan0", kind="wifi", up=True, bytes_sent=1, bytes_recv=2)
        ],
    )
    points = sample_points(sample, TAGS, True)
    assert [p.measurement for p in points] == ["network"]
    assert points[0].fields["historical"] is True
    assert sample_points(NetworkSample(seq=2, ts=TS), TAGS, False) == []


def test_power_sample_is_one_point_with_what_the_kiosk_has() -> None:
    full = PowerSample(
        seq=5,
        ts=TS,
        on_ac=True,
        battery_percent=97.0,
        ups_status="OL CHRG",
        ups_on_battery=False,
        ups_charge_percent=88.5,
        ups_runtime_s=1800.0,
        supply_voltage=221.4,
        cabinet_door_open=True,
        cabinet_temperature=-3.5,
    )
    tags = "district=金山区,site=zhujing-dqzx,terminal=sj-0001,town=朱泾镇"
    assert _lines(full, historical=True) == [
        (
            f"power,{tags} seq=5i,on_ac=true,battery_percent=97.0,"
            f'ups_status="OL CHRG",ups_on_battery=false,ups_charge_percent=88.5,'
            f"ups_runtime_s=1800.0,supply_voltage=221.4,cabinet_door_open=true,"
            f"cabinet_temperature=-3.5,historical=true {TS}"
        ).encode()
    ]
    assert _lines(PowerSample(seq=6, ts=TS)) == [
        f"power,{tags} seq=6i,historical=false {TS}".encode()
    ]


def test_system_sample_carries_boot_reboots_and_clock_offset_when_sent() -> None:
    base = SystemSample(
        seq=1,
        ts=TS,
        cpu_percent=1.5,
        memory_percent=2.5,
        memory_available=3,
        disk_percent=4.5,
        disk_free=5,
        uptime_s=6.5,
        net_bytes_sent=7,
        net_bytes_recv=8,
    )
    [old] = sample_points(base, TAGS, False)
    assert not {"boot_ms", "reboot_count", "clock_offset_ms"} & set(old.fields)
    newer = msgspec.structs.replace(
        base, boot_ms=TS - 3_600_000, reboot_count=2, clock_offset_ms=-1250.5
    )
    [point] = sample_points(newer, TAGS, False)
    assert (point.measurement, point.ts_ms, dict(point.tags)) == ("system", TS, TAGS)
    assert point.fields["boot_ms"] == TS - 3_600_000
    assert point.fields["reboot_count"] == 2
    assert point.fields["clock_offset_ms"] == -1250.5
