"""The payload codec: typed messages to JSON bytes and back, strict, size-limited, and
forward compatible. A decode failure is always a DecodeError with a stable reason code."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from fleet_protocol import (
    CHANNEL_TYPES,
    MAX_PAYLOAD,
    BundleRef,
    Channel,
    Command,
    CommandResult,
    DecodeError,
    Desired,
    Event,
    Message,
    Peripherals,
    PeripheralStatus,
    ProtocolError,
    Reported,
    State,
    SystemSample,
    Telemetry,
    command_id,
    command_name,
    decode,
    decode_for,
    encode,
    site_id,
)
from fleet_protocol.messages import (
    MAX_INTERFACES,
    MAX_SAMPLES_PER_BATCH,
    InterfaceSample,
    NetworkSample,
    PowerSample,
)

NOW = 1_732_190_400_000  # 2024-11-21T12:00:00Z in ms

SAMPLE = SystemSample(
    seq=41,
    ts=NOW - 5_000,
    cpu_percent=12.5,
    memory_percent=43.2,
    memory_available=8_123_456_789,
    disk_percent=55.1,
    disk_free=123_456_789_012,
    uptime_s=86_400.25,
    net_bytes_sent=1_234_567,
    net_bytes_recv=9_876_543,
    load_1m=0.52,
    temperatures={"cpu": 47.5, "gpu": 51.0},
    on_ac=True,
    battery_percent=100.0,
    boot_ms=NOW - 86_400_250,
    reboot_count=3,
    clock_offset_ms=-1_250.5,
)

NETWORK = NetworkSample(
    seq=43,
    ts=NOW,
    interfaces=[
        InterfaceSample(
            name="enp3s0", kind="ethernet", up=True, bytes_sent=10, bytes_recv=20, errors=0
        ),
        InterfaceSample(name="wwan0", kind="cellular", up=False, bytes_sent=0, bytes_recv=5),
    ],
    broker_rtt_ms=38.5,
    dns_ok=True,
    dns_ms=12.25,
)

POWER = PowerSample(
    seq=44,
    ts=NOW,
    on_ac=True,
    battery_percent=97.0,
    ups_status="OL CHRG",
    ups_on_battery=False,
    ups_charge_percent=88.5,
    ups_runtime_s=1_800.0,
    supply_voltage=221.4,
    cabinet_door_open=False,
    cabinet_temperature=-3.5,
)

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

# One realistic message per channel, with optional fields filled in so the round trip
# exercises them.
EXAMPLES: dict[Channel, Message] = {
    Channel.STATE: State(
        online=True,
        session=17,
        ts=NOW,
        site=site_id("pd-zhangjiang-01"),
        agent_version="0.1.0",
    ),
    Channel.TELEMETRY: Telemetry(
        samples=[
            SAMPLE,
            msgspec.structs.replace(SAMPLE, seq=42, ts=NOW, cpu_percent=98.0),
            NETWORK,
            POWER,
        ],
        historical=True,
    ),
    Channel.PERIPHERALS: Peripherals(
        ts=NOW,
        peripherals=[
            PeripheralStatus(id="printer", role="receipt-printer", state="ok", since=NOW - 60_000),
            PeripheralStatus(
                id="idcard.reader",
                role="id_card",
                state="faulty",
                since=NOW - 1_000,
                reason="读卡器无响应 (no response on /dev/ttyUSB0)",
            ),
        ],
        changed=["idcard.reader"],
    ),
    Channel.EVENTS: Event(
        seq=7,
        ts=NOW,
        kind="staff.action",
        severity="warning",
        message="工作人员补充了打印纸，自助终端恢复服务",
        actor="张三",
        attributes={"paper_rolls": 2, "door": "前门", "ok": True, "weight_kg": 1.25},
    ),
    Channel.REPORTED: Reported(
        ts=NOW,
        config=BundleRef(version="2024.11.3", sha256=SHA),
        service_items=BundleRef(version="1.4.0+gov"),
        firmware={"printer": BundleRef(version="3.2.1", sha256=SHA)},
        agent_version="0.1.0",
    ),
    Channel.DESIRED: Desired(
        ts=NOW,
        config=BundleRef(version="2024.11.4", sha256=SHA),
        service_items=BundleRef(version="1.5.0"),
        firmware={"idcard.reader": BundleRef(version="v7")},
        rollout="浦东新区-第2波",
    ),
    Channel.CMD: Command(
        id=command_id("0f8fad5b-d9cb-469f-a165-70867728950e"),
        name=command_name("reboot"),
        issued_at=NOW,
        expires_at=NOW + 300_000,
        args={"delay_s": 30, "reason": "固件升级", "force": False, "grace": 0.5},
    ),
    Channel.CMD_RESULT: CommandResult(
        id=command_id("0f8fad5b-d9cb-469f-a165-70867728950e"),
        name=command_name("reboot"),
        status="failed",
        ts=NOW + 1_000,
        message="重启被拒绝：正在办理业务",
        output="session active\n业务进行中\n",
    ),
}


def _wire(message: Message) -> dict[str, Any]:
    """The JSON object ``message`` is sent as."""
    obj = json.loads(encode(message))
    assert isinstance(obj, dict)
    return obj


def _payload(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _base(kind: type[Message]) -> dict[str, Any]:
    """The wire object of the realistic example of ``kind``."""
    (channel,) = (c for c, k in CHANNEL_TYPES.items() if k is kind)
    return _wire(EXAMPLES[channel])


def _assert_decode_error(kind: type[Message], data: bytes, reason: str, **kw: int) -> None:
    with pytest.raises(DecodeError) as info:
        decode(kind, data, **kw)
    assert info.value.reason == reason, info.value


CHANNEL_IDS = [c.value for c in CHANNEL_TYPES]


def test_every_channel_has_a_message_type_and_an_example() -> None:
    assert set(CHANNEL_TYPES) == set(Channel)
    assert set(EXAMPLES) == set(Channel)
    for channel, message in EXAMPLES.items():
        assert type(message) is CHANNEL_TYPES[channel]


# --- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", list(CHANNEL_TYPES), ids=CHANNEL_IDS)
def test_round_trip(channel: Channel) -> None:
    message = EXAMPLES[channel]
    data = encode(message)
    assert isinstance(data, bytes)
    decoded = decode(CHANNEL_TYPES[channel], data)
    assert type(decoded) is type(message)
    assert decoded == message


@pytest.mark.parametrize("channel", list(CHANNEL_TYPES), ids=CHANNEL_IDS)
def test_decode_for_picks_the_type_of_the_channel(channel: Channel) -> None:
    message = EXAMPLES[channel]
    decoded = decode_for(channel, encode(message))
    assert type(decoded) is CHANNEL_TYPES[channel]
    assert decoded == message


def test_chinese_text_travels_as_utf8_and_comes_back_intact() -> None:
    event = Event(seq=1, ts=NOW, kind="fault", message="身份证读卡器故障，请联系工作人员")
    data = encode(event)
    assert "身份证读卡器故障".encode() in data
    decoded = decode(Event, data)
    assert decoded.message == "身份证读卡器故障，请联系工作人员"
    assert decoded == event


def test_a_message_of_the_longest_allowed_text_round_trips() -> None:
    event = Event(seq=1, ts=NOW, kind="fault", message="终" * 4000)
    assert decode(Event, encode(event)) == event


def test_decoded_messages_are_frozen() -> None:
    event = decode(Event, encode(EXAMPLES[Channel.EVENTS]))
    with pytest.raises(AttributeError):
        event.seq = 8  # type: ignore[misc]


# --- defaults are omitted from the wire --------------------------------------------------------


def test_defaults_are_omitted_from_the_wire() -> None:
    assert _wire(State(online=True, session=1, ts=NOW)) == {
        "online": True,
        "session": 1,
        "ts": NOW,
    }
    assert _wire(State(online=False, session=1, ts=NOW, reason="lost")) == {
        "online": False,
        "session": 1,
        "ts": NOW,
        "reason": "lost",
    }
    assert _wire(Event(seq=3, ts=NOW, kind="hotplug")) == {"seq": 3, "ts": NOW, "kind": "hotplug"}
    assert _wire(Reported(ts=NOW)) == {"ts": NOW}
    assert _wire(Desired(ts=NOW)) == {"ts": NOW}
    assert _wire(Peripherals(ts=NOW, peripherals=[])) == {"ts": NOW, "peripherals": []}
    assert _wire(BundleRef(version="1.0")) == {"version": "1.0"}
    assert _wire(
        Command(
            id=command_id("cmd-00000001"),
            name=command_name("reboot"),
            issued_at=NOW,
            expires_at=NOW + 1,
        )
    ) == {"id": "cmd-00000001", "name": "reboot", "issued_at": NOW, "expires_at": NOW + 1}
    assert _wire(
        CommandResult(
            id=command_id("cmd-00000001"), name=command_name("reboot"), status="ok", ts=NOW
        )
    ) == {"id": "cmd-00000001", "name": "reboot", "status": "ok", "ts": NOW}


def test_sample_defaults_are_omitted_but_the_sample_kind_is_sent() -> None:
    sample = SystemSample(
        seq=0,
        ts=NOW,
        cpu_percent=1.5,
        memory_percent=2.5,
        memory_available=3,
        disk_percent=4.5,
        disk_free=5,
        uptime_s=6.5,
        net_bytes_sent=7,
        net_bytes_recv=8,
    )
    assert _wire(Telemetry(samples=[sample])) == {
        "samples": [
            {
                "kind": "system",
                "seq": 0,
                "ts": NOW,
                "cpu_percent": 1.5,
                "memory_percent": 2.5,
                "memory_available": 3,
                "disk_percent": 4.5,
                "disk_free": 5,
                "uptime_s": 6.5,
                "net_bytes_sent": 7,
                "net_bytes_recv": 8,
            }
        ]
    }


def test_a_value_that_differs_from_its_default_is_sent() -> None:
    wire = _wire(Event(seq=3, ts=NOW, kind="fault", severity="critical", message="x"))
    assert wire["severity"] == "critical"
    assert wire["message"] == "x"


# --- forward compatibility: unknown fields are ignored ----------------------------------------


@pytest.mark.parametrize("channel", list(CHANNEL_TYPES), ids=CHANNEL_IDS)
def test_unknown_fields_are_ignored(channel: Channel) -> None:
    message = EXAMPLES[channel]
    wire = _wire(message)
    wire["added_in_v2"] = {"nested": [1, 2.5, None, "新字段"], "flag": True}
    wire["zz_last"] = None
    assert decode(CHANNEL_TYPES[channel], _payload(wire)) == message


def test_unknown_fields_inside_nested_records_are_ignored() -> None:
    telemetry = _wire(EXAMPLES[Channel.TELEMETRY])
    telemetry["samples"][0]["fan_rpm"] = 1200
    assert decode(Telemetry, _payload(telemetry)) == EXAMPLES[Channel.TELEMETRY]

    reported = _wire(EXAMPLES[Channel.REPORTED])
    reported["config"]["signed_by"] = "ops"
    reported["firmware"]["printer"]["size"] = 1024
    assert decode(Reported, _payload(reported)) == EXAMPLES[Channel.REPORTED]

    peripherals = _wire(EXAMPLES[Channel.PERIPHERALS])
    peripherals["peripherals"][1]["vendor"] = "华视"
    assert decode(Peripherals, _payload(peripherals)) == EXAMPLES[Channel.PERIPHERALS]


# --- schema errors ---------------------------------------------------------------------------


def _required_fields() -> list[tuple[type[Message], str]]:
    cases: list[tuple[type[Message], str]] = []
    for kind in CHANNEL_TYPES.values():
        for field in msgspec.structs.fields(kind):
            if field.required:
                cases.append((kind, field.encode_name))
    return cases


@pytest.mark.parametrize(
    ("kind", "field"), _required_fields(), ids=lambda v: v if isinstance(v, str) else v.__name__
)
def test_a_missing_required_field_is_a_schema_error(kind: type[Message], field: str) -> None:
    wire = _base(kind)
    del wire[field]
    _assert_decode_error(kind, _payload(wire), "schema")


def test_a_missing_required_field_inside_a_sample_is_a_schema_error() -> None:
    wire = _base(Telemetry)
    del wire["samples"][1]["disk_free"]
    _assert_decode_error(Telemetry, _payload(wire), "schema")


# (type, field, bad value): each a wrong JSON type, or a value of the right type out of range.
WRONG_VALUES: dict[str, tuple[type[Message], str, object]] = {
    "state-online-string": (State, "online", "yes"),
    "state-online-int": (State, "online", 1),
    "state-session-string": (State, "session", "17"),
    "state-session-negative": (State, "session", -1),
    "state-ts-float": (State, "ts", 1.5),
    "state-ts-negative": (State, "ts", -1),
    "state-ts-over-2^53": (State, "ts", 2**53 + 1),
    "state-reason-unknown": (State, "reason", "crashed"),
    "state-agent-version-too-long": (State, "agent_version", "v" * 201),
    "telemetry-samples-object": (Telemetry, "samples", {"seq": 1}),
    "telemetry-samples-null": (Telemetry, "samples", None),
    "telemetry-historical-string": (Telemetry, "historical", "no"),
    "peripherals-ts-string": (Peripherals, "ts", "2024-11-21"),
    "peripherals-list-of-strings": (Peripherals, "peripherals", ["printer"]),
    "peripherals-changed-bad-kind": (Peripherals, "changed", ["Printer"]),
    "peripherals-changed-257": (Peripherals, "changed", ["printer"] * 257),
    "event-seq-string": (Event, "seq", "7"),
    "event-seq-negative": (Event, "seq", -1),
    "event-seq-over-int64": (Event, "seq", 2**63),
    "event-kind-number": (Event, "kind", 5),
    "event-severity-unknown": (Event, "severity", "fatal"),
    "event-message-4001-chars": (Event, "message", "长" * 4001),
    "event-actor-201-chars": (Event, "actor", "a" * 201),
    "event-attributes-list": (Event, "attributes", [1, 2]),
    "event-attributes-nested": (Event, "attributes", {"a": {"b": 1}}),
    "event-attributes-null-value": (Event, "attributes", {"a": None}),
    "event-attributes-empty-key": (Event, "attributes", {"": 1}),
    "event-attributes-65-keys": (Event, "attributes", {f"k{i}": i for i in range(65)}),
    "event-historical-string": (Event, "historical", "yes"),
    "reported-firmware-list": (Reported, "firmware", ["printer"]),
    "reported-config-string": (Reported, "config", "1.0.0"),
    "desired-rollout-number": (Desired, "rollout", 2),
    "desired-rollout-201-chars": (Desired, "rollout", "r" * 201),
    "command-issued-negative": (Command, "issued_at", -5),
    "command-args-list": (Command, "args", ["--force"]),
    "result-status-unknown": (CommandResult, "status", "done"),
    "result-output-65537-chars": (CommandResult, "output", "x" * 65537),
    "result-ts-null": (CommandResult, "ts", None),
}


@pytest.mark.parametrize(("kind", "field", "value"), WRONG_VALUES.values(), ids=WRONG_VALUES.keys())
def test_a_wrong_type_or_out_of_range_value_is_a_schema_error(
    kind: type[Message], field: str, value: object
) -> None:
    wire = _base(kind)
    wire[field] = value
    _assert_decode_error(kind, _payload(wire), "schema")


SAMPLE_WRONG_VALUES: dict[str, tuple[str, object]] = {
    "cpu-101": ("cpu_percent", 101),
    "cpu-100.0001": ("cpu_percent", 100.0001),
    "cpu-negative": ("cpu_percent", -0.5),
    "cpu-string": ("cpu_percent", "12%"),
    "memory-101": ("memory_percent", 101.0),
    "disk-101": ("disk_percent", 101),
    "battery-100.5": ("battery_percent", 100.5),
    "seq-negative": ("seq", -1),
    "disk-free-negative": ("disk_free", -1),
    "uptime-negative": ("uptime_s", -0.1),
    "load-negative": ("load_1m", -1.0),
    "temperature-string": ("temperatures", {"cpu": "hot"}),
    "on-ac-string": ("on_ac", "yes"),
    "kind-unknown": ("kind", "disk"),
    "boot-ms-negative": ("boot_ms", -1),
    "boot-ms-float": ("boot_ms", 1.5),
    "reboot-count-negative": ("reboot_count", -1),
    "clock-offset-string": ("clock_offset_ms", "-1.2s"),
}


@pytest.mark.parametrize(
    ("field", "value"), SAMPLE_WRONG_VALUES.values(), ids=SAMPLE_WRONG_VALUES.keys()
)
def test_a_bad_sample_value_is_a_schema_error(field: str, value: object) -> None:
    wire = _base(Telemetry)
    wire["samples"][0][field] = value
    _assert_decode_error(Telemetry, _payload(wire), "schema")


@pytest.mark.parametrize("field", ["uptime_s", "load_1m", "cpu_percent"])
def test_a_number_beyond_float_range_is_a_schema_error(field: str) -> None:
    wire = _base(Telemetry)
    wire["samples"][0][field] = 123.0
    data = _payload(wire).replace(b"123.0", b"1e400")
    _assert_decode_error(Telemetry, data, "schema")


def test_a_temperature_beyond_float_range_is_a_schema_error() -> None:
    wire = _base(Telemetry)
    wire["samples"][0]["temperatures"] = {"cpu": 123.0}
    data = _payload(wire).replace(b"123.0", b"-1e400")
    _assert_decode_error(Telemetry, data, "schema")


def test_percentages_at_the_bounds_are_accepted() -> None:
    wire = _base(Telemetry)
    wire["samples"][0].update(cpu_percent=100, memory_percent=0, disk_percent=100.0)
    first = decode(Telemetry, _payload(wire)).samples[0]
    assert isinstance(first, SystemSample)
    assert first.cpu_percent == 100.0
    assert first.memory_percent == 0.0


def test_a_sample_of_an_older_agent_without_the_newer_fields_still_decodes() -> None:
    wire = _base(Telemetry)
    for name in ("boot_ms", "reboot_count", "clock_offset_ms"):
        del wire["samples"][0][name]
    decoded = decode(Telemetry, _payload(wire))
    first = decoded.samples[0]
    assert isinstance(first, SystemSample)
    assert (first.boot_ms, first.reboot_count, first.clock_offset_ms) == (None, None, None)


def test_one_batch_carries_system_network_and_power_samples_told_apart_by_kind() -> None:
    wire = _wire(EXAMPLES[Channel.TELEMETRY])
    assert [s["kind"] for s in wire["samples"]] == ["system", "system", "network", "power"]
    decoded = decode(Telemetry, encode(EXAMPLES[Channel.TELEMETRY]))
    assert [type(s) for s in decoded.samples] == [
        SystemSample,
        SystemSample,
        NetworkSample,
        PowerSample,
    ]
    assert decoded.samples[2] == NETWORK
    assert decoded.samples[3] == POWER


def test_network_and_power_defaults_are_omitted() -> None:
    assert _wire(Telemetry(samples=[NetworkSample(seq=1, ts=NOW)])) == {
        "samples": [{"kind": "network", "seq": 1, "ts": NOW}]
    }
    assert _wire(Telemetry(samples=[PowerSample(seq=2, ts=NOW)])) == {
        "samples": [{"kind": "power", "seq": 2, "ts": NOW}]
    }


# index in the example batch, field path inside the sample, bad value
NETWORK_POWER_WRONG_VALUES: dict[str, tuple[int, tuple[str | int, ...], object]] = {
    "iface-kind-unknown": (2, ("interfaces", 0, "kind"), "bluetooth"),
    "iface-name-empty": (2, ("interfaces", 0, "name"), ""),
    "iface-name-65": (2, ("interfaces", 0, "name"), "e" * 65),
    "iface-up-string": (2, ("interfaces", 0, "up"), "up"),
    "iface-bytes-negative": (2, ("interfaces", 0, "bytes_sent"), -1),
    "iface-errors-negative": (2, ("interfaces", 0, "errors"), -1),
    "iface-list-33": (
        2,
        ("interfaces",),
        [
            {"name": f"eth{i}", "kind": "ethernet", "up": True, "bytes_sent": 0, "bytes_recv": 0}
            for i in range(MAX_INTERFACES + 1)
        ],
    ),
    "iface-twice": (
        2,
        ("interfaces",),
        [
            {"name": "eth0", "kind": "ethernet", "up": True, "bytes_sent": 0, "bytes_recv": 0},
            {"name": "eth0", "kind": "wifi", "up": False, "bytes_sent": 1, "bytes_recv": 1},
        ],
    ),
    "rtt-negative": (2, ("broker_rtt_ms",), -0.5),
    "dns-ok-string": (2, ("dns_ok",), "yes"),
    "dns-ms-negative": (2, ("dns_ms",), -1.0),
    "power-battery-101": (3, ("battery_percent",), 101.0),
    "power-ups-charge-negative": (3, ("ups_charge_percent",), -1.0),
    "power-ups-status-201": (3, ("ups_status",), "O" * 201),
    "power-ups-status-number": (3, ("ups_status",), 1),
    "power-runtime-negative": (3, ("ups_runtime_s",), -1.0),
    "power-voltage-string": (3, ("supply_voltage",), "220V"),
    "power-door-string": (3, ("cabinet_door_open",), "open"),
    "power-seq-missing": (3, ("seq",), None),
}


@pytest.mark.parametrize(
    ("index", "path", "value"),
    NETWORK_POWER_WRONG_VALUES.values(),
    ids=NETWORK_POWER_WRONG_VALUES.keys(),
)
def test_a_bad_network_or_power_value_is_a_schema_error(
    index: int, path: tuple[str | int, ...], value: object
) -> None:
    wire = _base(Telemetry)
    target: Any = wire["samples"][index]
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    _assert_decode_error(Telemetry, _payload(wire), "schema")


@pytest.mark.parametrize(
    ("index", "field"),
    [(0, "clock_offset_ms"), (2, "broker_rtt_ms"), (3, "supply_voltage"), (3, "ups_runtime_s")],
)
def test_an_added_float_beyond_float_range_is_a_schema_error(index: int, field: str) -> None:
    wire = _base(Telemetry)
    wire["samples"][index][field] = 123.0
    data = _payload(wire).replace(b"123.0", b"1e400")
    _assert_decode_error(Telemetry, data, "schema")


def test_a_negative_clock_offset_is_a_kiosk_behind_the_server_and_travels() -> None:
    wire = _base(Telemetry)
    wire["samples"][0]["clock_offset_ms"] = -90_000
    decoded = decode(Telemetry, _payload(wire)).samples[0]
    assert isinstance(decoded, SystemSample)
    assert decoded.clock_offset_ms == -90_000.0


def test_an_event_replayed_from_the_outbox_says_so_and_a_live_one_sends_nothing_extra() -> None:
    live = Event(seq=3, ts=NOW, kind="hotplug")
    replayed = Event(seq=3, ts=NOW, kind="hotplug", historical=True)
    assert "historical" not in _wire(live)
    assert _wire(replayed)["historical"] is True
    assert decode(Event, encode(replayed)).historical is True
    assert decode(Event, b'{"seq":3,"ts":1,"kind":"hotplug"}').historical is False


# (type, path to the id, bad value)
BAD_IDS: dict[str, tuple[type[Message], tuple[str | int, ...], str]] = {
    "command-id-too-short": (Command, ("id",), "cmd-001"),
    "command-id-space": (Command, ("id",), "cmd 00000001"),
    "command-id-slash": (Command, ("id",), "cmd/00000001"),
    "command-id-trailing-newline": (Command, ("id",), "cmd-00000001\n"),
    "command-name-upper": (Command, ("name",), "Reboot"),
    "command-name-wildcard": (Command, ("name",), "+"),
    "command-name-trailing-newline": (Command, ("name",), "reboot\n"),
    "result-id-chinese": (CommandResult, ("id",), "命令编号一二三四"),
    "result-name-trailing-newline": (CommandResult, ("name",), "reboot\n"),
    "state-site-upper": (State, ("site",), "PD-Zhangjiang-01"),
    "state-site-hash": (State, ("site",), "pd#01"),
    "state-site-trailing-newline": (State, ("site",), "pd-zhangjiang-01\n"),
    "event-kind-upper": (Event, ("kind",), "Hotplug"),
    "event-kind-trailing-newline": (Event, ("kind",), "hotplug\n"),
    "peripheral-id-slash": (Peripherals, ("peripherals", 0, "id"), "printer/0"),
    "peripheral-role-trailing-newline": (Peripherals, ("peripherals", 0, "role"), "printer\n"),
    "bundle-sha256-upper": (Reported, ("config", "sha256"), SHA.upper()),
    "bundle-sha256-short": (Reported, ("config", "sha256"), SHA[:-1]),
    "bundle-sha256-trailing-newline": (Reported, ("config", "sha256"), SHA + "\n"),
    "bundle-version-leading-dot": (Desired, ("config", "version"), ".1.0"),
    "bundle-version-trailing-newline": (Desired, ("config", "version"), "1.0\n"),
}


@pytest.mark.parametrize(("kind", "path", "value"), BAD_IDS.values(), ids=BAD_IDS.keys())
def test_an_id_that_breaks_its_pattern_is_a_schema_error(
    kind: type[Message], path: tuple[str | int, ...], value: str
) -> None:
    wire = _base(kind)
    target: Any = wire
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    _assert_decode_error(kind, _payload(wire), "schema")


# --- cross-field rules -------------------------------------------------------------------------

STATE_RULE_BREAKS: dict[str, dict[str, object]] = {
    "online-with-reason": {"online": True, "session": 1, "ts": NOW, "reason": "lost"},
    "online-with-planned": {
        "online": True,
        "session": 1,
        "ts": NOW,
        "reason": "planned",
        "expected_back": NOW + 1,
    },
    "offline-without-reason": {"online": False, "session": 1, "ts": NOW},
    "planned-without-expected-back": {
        "online": False,
        "session": 1,
        "ts": NOW,
        "reason": "planned",
    },
    "expected-back-with-lost": {
        "online": False,
        "session": 1,
        "ts": NOW,
        "reason": "lost",
        "expected_back": NOW + 60_000,
    },
    "expected-back-online": {"online": True, "session": 1, "ts": NOW, "expected_back": NOW},
}


@pytest.mark.parametrize("wire", STATE_RULE_BREAKS.values(), ids=STATE_RULE_BREAKS.keys())
def test_a_state_that_breaks_a_cross_field_rule_is_a_schema_error(wire: dict[str, object]) -> None:
    _assert_decode_error(State, _payload(wire), "schema")


STATE_RULE_KEEPS: dict[str, dict[str, object]] = {
    "birth": {"online": True, "session": 1, "ts": NOW},
    "last-will": {"online": False, "session": 1, "ts": NOW, "reason": "lost"},
    "shutdown": {"online": False, "session": 1, "ts": NOW, "reason": "shutdown"},
    "planned": {
        "online": False,
        "session": 1,
        "ts": NOW,
        "reason": "planned",
        "expected_back": NOW + 3_600_000,
    },
}


@pytest.mark.parametrize("wire", STATE_RULE_KEEPS.values(), ids=STATE_RULE_KEEPS.keys())
def test_a_state_that_keeps_the_rules_decodes(wire: dict[str, object]) -> None:
    state = decode(State, _payload(wire))
    assert _wire(state) == wire


def test_constructing_a_state_that_breaks_a_rule_raises() -> None:
    with pytest.raises(ValueError, match="online"):
        State(online=True, session=1, ts=NOW, reason="lost")
    with pytest.raises(ValueError, match="says why"):
        State(online=False, session=1, ts=NOW)
    with pytest.raises(ValueError, match="expected_back"):
        State(online=False, session=1, ts=NOW, reason="planned")
    with pytest.raises(ValueError, match="expected_back"):
        State(online=False, session=1, ts=NOW, reason="shutdown", expected_back=NOW)


@pytest.mark.parametrize("expires_at", [NOW, NOW - 1, 0], ids=["equal", "one-ms-before", "zero"])
def test_a_command_that_expires_before_it_is_issued_is_a_schema_error(expires_at: int) -> None:
    wire = {"id": "cmd-00000001", "name": "reboot", "issued_at": NOW, "expires_at": expires_at}
    _assert_decode_error(Command, _payload(wire), "schema")


def test_constructing_a_command_that_expires_before_it_is_issued_raises() -> None:
    with pytest.raises(ValueError, match="expires_at"):
        Command(
            id=command_id("cmd-00000001"),
            name=command_name("reboot"),
            issued_at=NOW,
            expires_at=NOW,
        )


def test_command_expiry() -> None:
    command = Command(
        id=command_id("cmd-00000001"),
        name=command_name("reboot"),
        issued_at=NOW,
        expires_at=NOW + 300_000,
    )
    assert not command.expired(NOW)
    assert not command.expired(NOW + 299_999)
    assert command.expired(NOW + 300_000)
    assert command.expired(NOW + 300_001)
    assert command.expired(2**53)


def test_a_payload_of_another_channel_is_a_schema_error() -> None:
    # Reported and Desired need only "ts", so a state payload is (by forward compatibility)
    # a valid, empty Reported; every other type misses a required field.
    data = encode(EXAMPLES[Channel.STATE])
    for kind in (Telemetry, Peripherals, Event, Command, CommandResult):
        _assert_decode_error(kind, data, "schema")


@pytest.mark.parametrize("data", [b"[]", b"null", b"1", b'"state"', b"true"])
def test_a_json_value_that_is_not_an_object_is_a_schema_error(data: bytes) -> None:
    _assert_decode_error(State, data, "schema")


# --- telemetry batch size --------------------------------------------------------------------

_SMALL_SAMPLE = {
    "kind": "system",
    "seq": 0,
    "ts": 0,
    "cpu_percent": 0,
    "memory_percent": 0,
    "memory_available": 0,
    "disk_percent": 0,
    "disk_free": 0,
    "uptime_s": 0,
    "net_bytes_sent": 0,
    "net_bytes_recv": 0,
}


def test_a_telemetry_batch_without_samples_is_a_schema_error() -> None:
    _assert_decode_error(Telemetry, b'{"samples":[]}', "schema")
    _assert_decode_error(Telemetry, b'{"samples":[],"historical":true}', "schema")


def test_a_full_telemetry_batch_decodes() -> None:
    data = _payload({"samples": [_SMALL_SAMPLE] * MAX_SAMPLES_PER_BATCH})
    assert len(data) <= MAX_PAYLOAD
    assert len(decode(Telemetry, data).samples) == MAX_SAMPLES_PER_BATCH


def test_a_telemetry_batch_over_the_sample_limit_is_a_schema_error() -> None:
    data = _payload({"samples": [_SMALL_SAMPLE] * (MAX_SAMPLES_PER_BATCH + 1)})
    # Small enough that the size limit is not what refuses it.
    assert len(data) <= MAX_PAYLOAD
    _assert_decode_error(Telemetry, data, "schema")


# --- malformed payloads ----------------------------------------------------------------------

MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "text": b"kiosk-001 is online",
    "open-brace": b"{",
    "single-quotes": b"{'online': true, 'session': 1, 'ts': 1}",
    "trailing-comma": b'{"online":true,"session":1,"ts":1,}',
    "trailing-garbage": b'{"online":true,"session":1,"ts":1} {}',
    "nan": b'{"online":true,"session":NaN,"ts":1}',
    "unquoted-key": b'{online:true,"session":1,"ts":1}',
    "bare-invalid-utf8": b"\xff\xfe\xfd",
    "utf-16": '{"online":true}'.encode("utf-16"),
    "nul-byte": b'{"online":true,\x00"session":1,"ts":1}',
    "deep-nesting": b'{"online":true,"session":1,"ts":1,"x":'
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_payload_that_is_not_json_is_malformed(data: bytes) -> None:
    assert len(data) <= MAX_PAYLOAD
    _assert_decode_error(State, data, "malformed")


@pytest.mark.parametrize("channel", list(CHANNEL_TYPES), ids=CHANNEL_IDS)
def test_every_truncation_of_a_valid_payload_is_malformed(channel: Channel) -> None:
    data = encode(EXAMPLES[channel])
    for end in range(len(data)):
        with pytest.raises(DecodeError) as info:
            decode(CHANNEL_TYPES[channel], data[:end])
        assert info.value.reason == "malformed", (end, data[:end])


# Invalid UTF-8 in a string the decoder has to read: the text fields of each message.
INVALID_UTF8: dict[str, tuple[type[Message], bytes]] = {
    "event-message-ff": (Event, b'{"seq":1,"ts":1,"kind":"x","message":"\xff\xfe"}'),
    "event-message-cut-chinese": (Event, b'{"seq":1,"ts":1,"kind":"x","message":"ok \xe4\xb8"}'),
    "event-message-surrogate-bytes": (
        Event,
        b'{"seq":1,"ts":1,"kind":"x","message":"\xed\xa0\x80"}',
    ),
    "event-kind": (Event, b'{"seq":1,"ts":1,"kind":"\xc3"}'),
    "event-attribute-key": (Event, b'{"seq":1,"ts":1,"kind":"x","attributes":{"\xff":1}}'),
    "event-attribute-value": (Event, b'{"seq":1,"ts":1,"kind":"x","attributes":{"a":"\xff"}}'),
    "state-reason": (State, b'{"online":false,"session":1,"ts":1,"reason":"\xff"}'),
    "result-output": (
        CommandResult,
        b'{"id":"cmd-00000001","name":"reboot","status":"ok","ts":1,"output":"\x80"}',
    ),
    "gbk-chinese-message": (
        Event,
        '{"seq":1,"ts":1,"kind":"x","message":"自助终端"}'.encode("gbk"),
    ),
}


@pytest.mark.parametrize(("kind", "data"), INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_invalid_utf8_in_a_text_field_is_malformed(kind: type[Message], data: bytes) -> None:
    _assert_decode_error(kind, data, "malformed")


def test_an_escaped_lone_surrogate_is_malformed() -> None:
    _assert_decode_error(Event, b'{"seq":1,"ts":1,"kind":"x","message":"\\ud800"}', "malformed")


def test_an_escaped_surrogate_pair_is_one_character() -> None:
    event = decode(Event, b'{"seq":1,"ts":1,"kind":"x","message":"\\ud83d\\udda8"}')
    assert event.message == "\U0001f5a8"


# --- size limit ------------------------------------------------------------------------------


def _padded(message: Message, size: int) -> bytes:
    """The encoding of ``message`` padded with JSON whitespace to exactly ``size`` bytes."""
    data = encode(message)
    assert len(data) <= size
    return data + b" " * (size - len(data))


def test_a_payload_of_exactly_the_limit_decodes() -> None:
    message = EXAMPLES[Channel.EVENTS]
    assert decode(Event, _padded(message, MAX_PAYLOAD)) == message


def test_a_valid_payload_one_byte_over_the_limit_is_too_large() -> None:
    # Valid JSON: only the size check can refuse it.
    _assert_decode_error(Event, _padded(EXAMPLES[Channel.EVENTS], MAX_PAYLOAD + 1), "too_large")


def test_an_oversize_payload_is_refused_before_it_is_parsed() -> None:
    # Garbage would be "malformed" if it were parsed.
    _assert_decode_error(State, b"\xff" * (MAX_PAYLOAD + 1), "too_large")
    _assert_decode_error(State, b"[" * (10 * MAX_PAYLOAD), "too_large")


def test_a_custom_size_limit_is_honoured() -> None:
    message = EXAMPLES[Channel.CMD]
    data = encode(message)
    assert decode(Command, data, max_size=len(data)) == message
    _assert_decode_error(Command, data, "too_large", max_size=len(data) - 1)
    _assert_decode_error(Command, b"\xff" * 101, "too_large", max_size=100)
    with pytest.raises(DecodeError) as info:
        decode_for(Channel.CMD, data, max_size=10)
    assert info.value.reason == "too_large"


def test_a_custom_size_limit_may_be_above_the_default() -> None:
    message = EXAMPLES[Channel.EVENTS]
    data = _padded(message, MAX_PAYLOAD + 10)
    assert decode(Event, data, max_size=MAX_PAYLOAD + 10) == message


def test_encoding_an_oversize_message_raises_value_error() -> None:
    batch = Telemetry(
        samples=[
            msgspec.structs.replace(SAMPLE, seq=i, ts=NOW + i) for i in range(MAX_SAMPLES_PER_BATCH)
        ]
    )
    with pytest.raises(ValueError, match="Telemetry"):
        encode(batch)


def test_encoding_a_message_just_under_the_limit_works() -> None:
    result = CommandResult(
        id=command_id("cmd-00000001"),
        name=command_name("logs"),
        status="ok",
        ts=NOW,
        output="日志" * 30_000,  # 180,000 bytes of UTF-8
    )
    data = encode(result)
    assert len(data) <= MAX_PAYLOAD
    assert decode(CommandResult, data) == result


# --- the error itself --------------------------------------------------------------------------


def test_decode_error_carries_a_reason_and_a_detail() -> None:
    with pytest.raises(DecodeError) as info:
        decode(State, b'{"online":true,"session":-1,"ts":1}')
    error = info.value
    assert isinstance(error, ProtocolError)
    assert error.reason == "schema"
    assert "session" in error.detail
    assert str(error).startswith("schema: ")
