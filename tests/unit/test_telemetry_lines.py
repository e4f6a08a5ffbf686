"""Ingest's hot path (`TerminalLines`) writes exactly what the checked model (`sample_points`
through `Point`) writes, and refuses exactly what it refuses, for generated telemetry as the
server gets it (encoded and decoded by the protocol codec): hostile interface and sensor
names, odd tag values, extreme numbers and text included."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol.codec import decode, encode
from fleet_protocol.messages import (
    InterfaceSample,
    NetworkSample,
    PowerSample,
    Sample,
    SystemSample,
    Telemetry,
)
from fleet_server import telemetry_lines
from fleet_server.lineproto import LineProtocolError, encode_point
from fleet_server.telemetry_lines import TerminalLines, sample_points

TS = 1_732_190_395_000

# Mostly plain values, sometimes the awkward ones line protocol escapes or refuses.
names = st.one_of(
    st.sampled_from(["eth0", "wlan0", "cpu", "主板", "a b", "a,b", "a=b", "a\\b", "x\\"]),
    st.text(min_size=0, max_size=12),
)
# Within the schema's bounds: the codec refuses anything else before ingest sees it.
floats = st.floats(allow_nan=False, allow_infinity=False)
percents = st.one_of(st.floats(0.0, 100.0), st.sampled_from([0.0, 100.0, 1e-300]))
measures = st.floats(-1e15, 1e15)
durations = st.floats(0.0, 1e15)
positive = st.floats(0.0, allow_infinity=False)
counts = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 2**63 - 1]))
maybe = st.none
timestamps = st.one_of(st.integers(0, 2**53), st.sampled_from([0, 2**53, TS]))
labels = names.filter(lambda name: 0 < len(name) <= 64)

system_samples = st.builds(
    SystemSample,
    seq=counts,
    ts=timestamps,
    cpu_percent=percents,
    memory_percent=percents,
    memory_available=counts,
    disk_percent=percents,
    disk_free=counts,
    uptime_s=positive,
    net_bytes_sent=counts,
    net_bytes_recv=counts,
    load_1m=maybe() | positive,
    temperatures=st.dictionaries(labels, floats, max_size=4),
    on_ac=maybe() | st.booleans(),
    battery_percent=maybe() | percents,
    boot_ms=maybe() | timestamps,
    reboot_count=maybe() | counts,
    clock_offset_ms=maybe() | measures,
)
interfaces = st.builds(
    InterfaceSample,
    name=labels,
    kind=st.sampled_from(["ethernet", "wifi", "cellular", "other"]),
    up=st.booleans(),
    bytes_sent=counts,
    bytes_recv=counts,
    errors=maybe() | counts,
)
network_samples = st.builds(
    NetworkSample,
    seq=counts,
    ts=timestamps,
    interfaces=st.lists(interfaces, max_size=3, unique_by=lambda i: i.name),
    broker_rtt_ms=maybe() | durations,
    dns_ok=maybe() | st.booleans(),
    dns_ms=maybe() | durations,
)
power_samples = st.builds(
    PowerSample,
    seq=counts,
    ts=timestamps,
    on_ac=maybe() | st.booleans(),
    battery_percent=maybe() | percents,
    ups_status=maybe() | st.text(max_size=20),
    ups_on_battery=maybe() | st.booleans(),
    ups_charge_percent=maybe() | percents,
    ups_runtime_s=maybe() | durations,
    supply_voltage=maybe() | measures,
    cabinet_door_open=maybe() | st.booleans(),
    cabinet_temperature=maybe() | measures,
)
samples = st.one_of(system_samples, network_samples, power_samples)
placements = st.fixed_dictionaries(
    {"terminal": st.sampled_from(["sj-0001", "pd-zj-12"])},
    optional={"site": names, "town": st.sampled_from(["朱泾镇", "张江 镇"]), "district": names},
)


def model(sample: Sample, tags: dict[str, str], historical: bool) -> list[bytes] | str:
    try:
        return [encode_point(p) for p in sample_points(sample, tags, historical)]
    except LineProtocolError:
        return "refused"


def fast(sample: Sample, tags: dict[str, str], historical: bool) -> list[bytes] | str:
    out: list[str] = []
    try:
        TerminalLines(tags).lines(sample, historical, out)
    except LineProtocolError:
        return "refused"
    return [line.encode() for line in out]


@settings(max_examples=400, deadline=None)
@given(sample=samples, tags=placements, historical=st.booleans())
def test_the_hot_path_writes_and_refuses_exactly_what_the_model_does(
    sample: Sample, tags: dict[str, str], historical: bool
) -> None:
    [received] = decode(Telemetry, encode(Telemetry(samples=[sample]))).samples
    assert fast(received, tags, historical) == model(received, tags, historical)


def test_a_schema_integer_not_bounded_to_int64_is_refused_at_import() -> None:
    class Unbounded(msgspec.Struct):
        count: int

    with pytest.raises(TypeError, match="int64"):
        telemetry_lines._Table("m", Unbounded, ("count",))


def test_series_keys_are_reused_and_a_bad_name_is_refused_every_time() -> None:
    writer = TerminalLines({"terminal": "sj-0001", "site": "zhujing-dqzx"})
    good = NetworkSample(
        seq=1,
        ts=TS,
        interfaces=[
            InterfaceSample(name="eth0", kind="ethernet", up=True, bytes_sent=1, bytes_recv=2)
        ],
    )
    bad = NetworkSample(
        seq=2,
        ts=TS,
        interfaces=[
            InterfaceSample(name="eth\n0", kind="ethernet", up=True, bytes_sent=1, bytes_recv=2)
        ],
    )
    for _ in range(2):
        out: list[str] = []
        writer.lines(good, False, out)
        assert out == [
            "network,iface=eth0,kind=ethernet,site=zhujing-dqzx,terminal=sj-0001 "
            f"bytes_sent=1i,bytes_recv=2i,up=true,seq=1i,historical=false {TS}"
        ]
        with pytest.raises(LineProtocolError, match="control character"):
            writer.lines(bad, False, [])
