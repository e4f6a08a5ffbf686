"""Properties of the contract over generated input.

The codec's promise: whatever bytes arrive, decode() returns a message of the requested type or
raises DecodeError, never anything else, so a server can count and drop bad payloads from a
misbehaving kiosk without catching broadly. Valid messages survive the wire exactly.
"""

from __future__ import annotations

import json
import string
from typing import Any, TypeAlias

import msgspec
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from fleet_protocol import (
    CHANNEL_TYPES,
    BundleRef,
    Channel,
    Command,
    CommandResult,
    DecodeError,
    Desired,
    Event,
    InvalidId,
    Message,
    Peripherals,
    PeripheralStatus,
    Reported,
    State,
    SystemSample,
    Telemetry,
    Topic,
    TopicError,
    command_id,
    command_name,
    decode,
    decode_for,
    encode,
    site_id,
    terminal_id,
)
from fleet_protocol.messages import (
    MAX_INTERFACES,
    CommandStatus,
    InterfaceKind,
    InterfaceSample,
    NetworkSample,
    OfflineReason,
    PeripheralState,
    PowerSample,
    Severity,
)
from fleet_protocol.topics import parse

Json: TypeAlias = bool | int | float | str | list["Json"] | dict[str, "Json"] | None

# Modest, so the whole file runs in a few seconds; no example database, nothing is written to
# disk. The fuzz properties do not shrink: what matters in their failure is the exception that
# escaped and the payload, and shrinking a payload drawn through a message strategy takes longer
# than the whole file. The round trip keeps shrinking, a minimal message is what explains it.
FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
)
ROUND_TRIP = settings(
    max_examples=40,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)

KINDS = list(CHANNEL_TYPES.values())
KIND_IDS = [kind.__name__ for kind in KINDS]
REASONS = {"too_large", "malformed", "schema"}


def _decodes_or_refuses(kind: type[Message], data: bytes) -> None:
    """decode() either returns a ``kind`` or raises DecodeError; anything else escapes."""
    try:
        message = decode(kind, data)
    except DecodeError as exc:
        reason = exc.reason
    else:
        assert isinstance(message, kind)
        return
    assert reason in REASONS


def _token(first: str, rest: str, min_rest: int, max_rest: int) -> st.SearchStrategy[str]:
    """One character of ``first`` then ``min_rest``-``max_rest`` of ``rest``.

    Much cheaper to generate than st.from_regex. Ids are passed through the package's own
    validators; every other token is checked by the decoder in the round-trip test.
    """
    return st.tuples(
        st.sampled_from(first), st.text(alphabet=rest, min_size=min_rest, max_size=max_rest)
    ).map("".join)


# --- valid messages --------------------------------------------------------------------------

CHINESE = "自助终端政务服务一网通办身份证读卡器打印机故障恢复，。：（）"

millis = st.integers(min_value=0, max_value=2**53)
seqs = st.integers(min_value=0, max_value=2**63 - 1)
percents = st.floats(min_value=0.0, max_value=100.0)
non_negative = st.floats(min_value=0.0, allow_infinity=False)
finite = st.floats(allow_nan=False, allow_infinity=False)
bounded = st.floats(min_value=-1e15, max_value=1e15)
durations = st.floats(min_value=0.0, max_value=1e15)
texts = st.text(max_size=60) | st.text(alphabet=CHINESE, max_size=60)
short_texts = st.text(max_size=200)
labels = st.text(min_size=1, max_size=64)
LOWER = string.ascii_lowercase
ALNUM = string.ascii_letters + string.digits
LOWER_DIGITS = LOWER + string.digits
kinds = _token(LOWER, LOWER_DIGITS + "_.-", 0, 63)
scalars = (
    st.text(max_size=30)
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | finite
    | st.booleans()
)
attributes = st.dictionaries(labels, scalars, max_size=6)
terminal_ids = _token(LOWER_DIGITS, LOWER_DIGITS + "-", 2, 62).map(terminal_id)
site_ids = _token(LOWER_DIGITS, LOWER_DIGITS + "-", 2, 62).map(site_id)
command_ids = _token(ALNUM, ALNUM + "_-", 7, 63).map(command_id)
command_names = _token(LOWER, LOWER_DIGITS + "-", 1, 31).map(command_name)
bundle_refs = st.builds(
    BundleRef,
    version=_token(ALNUM, ALNUM + "._+-", 0, 63),
    sha256=st.none() | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)

OFFLINE_REASONS: list[OfflineReason] = ["lost", "shutdown", "planned"]
PERIPHERAL_STATES: list[PeripheralState] = ["ok", "degraded", "faulty", "absent"]
SEVERITIES: list[Severity] = ["info", "warning", "error", "critical"]
COMMAND_STATUSES: list[CommandStatus] = ["ok", "failed", "rejected", "expired", "duplicate"]


@st.composite
def states(draw: st.DrawFn) -> State:
    online = draw(st.booleans())
    reason = None if online else draw(st.sampled_from(OFFLINE_REASONS))
    return State(
        online=online,
        session=draw(seqs),
        ts=draw(millis),
        reason=reason,
        expected_back=draw(millis) if reason == "planned" else None,
        site=draw(st.none() | site_ids),
        agent_version=draw(st.none() | short_texts),
    )


system_samples = st.builds(
    SystemSample,
    seq=seqs,
    ts=millis,
    cpu_percent=percents,
    memory_percent=percents,
    memory_available=seqs,
    disk_percent=percents,
    disk_free=seqs,
    uptime_s=non_negative,
    net_bytes_sent=seqs,
    net_bytes_recv=seqs,
    load_1m=st.none() | non_negative,
    temperatures=st.dictionaries(labels, finite, max_size=4),
    on_ac=st.none() | st.booleans(),
    battery_percent=st.none() | percents,
    boot_ms=st.none() | millis,
    reboot_count=st.none() | seqs,
    clock_offset_ms=st.none() | bounded,
)

INTERFACE_KINDS: list[InterfaceKind] = ["ethernet", "wifi", "cellular", "other"]
interface_samples = st.builds(
    InterfaceSample,
    name=labels,
    kind=st.sampled_from(INTERFACE_KINDS),
    up=st.booleans(),
    bytes_sent=seqs,
    bytes_recv=seqs,
    errors=st.none() | seqs,
)

network_samples = st.builds(
    NetworkSample,
    seq=seqs,
    ts=millis,
    interfaces=st.lists(
        interface_samples, max_size=min(4, MAX_INTERFACES), unique_by=lambda i: i.name
    ),
    broker_rtt_ms=st.none() | durations,
    dns_ok=st.none() | st.booleans(),
    dns_ms=st.none() | durations,
)

power_samples = st.builds(
    PowerSample,
    seq=seqs,
    ts=millis,
    on_ac=st.none() | st.booleans(),
    battery_percent=st.none() | percents,
    ups_status=st.none() | short_texts,
    ups_on_battery=st.none() | st.booleans(),
    ups_charge_percent=st.none() | percents,
    ups_runtime_s=st.none() | durations,
    supply_voltage=st.none() | bounded,
    cabinet_door_open=st.none() | st.booleans(),
    cabinet_temperature=st.none() | bounded,
)

telemetry = st.builds(
    Telemetry,
    samples=st.lists(system_samples | network_samples | power_samples, min_size=1, max_size=4),
    historical=st.booleans(),
)

peripherals = st.builds(
    Peripherals,
    ts=millis,
    peripherals=st.lists(
        st.builds(
            PeripheralStatus,
            id=kinds,
            role=kinds,
            state=st.sampled_from(PERIPHERAL_STATES),
            since=millis,
            reason=texts,
        ),
        max_size=4,
    ),
    changed=st.lists(kinds, max_size=4),
)

events = st.builds(
    Event,
    seq=seqs,
    ts=millis,
    kind=kinds,
    severity=st.sampled_from(SEVERITIES),
    message=texts,
    actor=st.none() | short_texts,
    attributes=attributes,
    historical=st.booleans(),
)

reported = st.builds(
    Reported,
    ts=millis,
    config=st.none() | bundle_refs,
    service_items=st.none() | bundle_refs,
    firmware=st.dictionaries(kinds, bundle_refs, max_size=3),
    agent_version=st.none() | short_texts,
)

desired = st.builds(
    Desired,
    ts=millis,
    config=st.none() | bundle_refs,
    service_items=st.none() | bundle_refs,
    firmware=st.dictionaries(kinds, bundle_refs, max_size=3),
    rollout=st.none() | short_texts,
)


@st.composite
def commands(draw: st.DrawFn) -> Command:
    issued_at = draw(st.integers(min_value=0, max_value=2**53 - 1))
    return Command(
        id=draw(command_ids),
        name=draw(command_names),
        issued_at=issued_at,
        expires_at=draw(st.integers(min_value=issued_at + 1, max_value=2**53)),
        args=draw(attributes),
    )


command_results = st.builds(
    CommandResult,
    id=command_ids,
    name=command_names,
    status=st.sampled_from(COMMAND_STATUSES),
    ts=millis,
    message=texts,
    output=st.text(max_size=300),
)

VALID: dict[type[Message], st.SearchStrategy[Message]] = {
    State: states(),
    Telemetry: telemetry,
    Peripherals: peripherals,
    Event: events,
    Reported: reported,
    Desired: desired,
    Command: commands(),
    CommandResult: command_results,
}


def test_there_is_a_strategy_for_every_message_type() -> None:
    assert set(VALID) == set(KINDS)


@pytest.mark.parametrize("channel", list(CHANNEL_TYPES), ids=[c.value for c in CHANNEL_TYPES])
@ROUND_TRIP
@given(data=st.data())
def test_valid_messages_round_trip_exactly(channel: Channel, data: st.DataObject) -> None:
    kind = CHANNEL_TYPES[channel]
    message = data.draw(VALID[kind])
    wire = encode(message)
    decoded = decode(kind, wire)
    assert type(decoded) is kind
    assert decoded == message
    # Byte equality as well: == would not tell True from 1 in an attribute.
    assert encode(decoded) == wire
    assert decode_for(channel, wire) == message


# --- decode never raises anything but DecodeError --------------------------------------------

json_scalars: st.SearchStrategy[Json] = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values: st.SearchStrategy[Json] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=8,
)


def _dumps(value: object, *, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode()


def _field_names(kind: type[Message]) -> list[str]:
    return [field.encode_name for field in msgspec.structs.fields(kind)]


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@FUZZ
@given(data=st.binary(max_size=400))
def test_decode_of_random_bytes_raises_only_decode_error(kind: type[Message], data: bytes) -> None:
    _decodes_or_refuses(kind, data)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@FUZZ
@given(value=json_values, ascii_only=st.booleans())
def test_decode_of_random_json_raises_only_decode_error(
    kind: type[Message], value: Json, ascii_only: bool
) -> None:
    _decodes_or_refuses(kind, _dumps(value, ascii_only=ascii_only))


# Objects keyed by the real field names reach the schema checks, not just the parser.
FIELD_OBJECTS = {
    kind: st.dictionaries(
        st.sampled_from([*_field_names(kind), "kind", "samples", "extra"]), json_values, max_size=6
    )
    for kind in KINDS
}


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@FUZZ
@given(data=st.data(), ascii_only=st.booleans())
def test_decode_of_random_objects_with_the_field_names_raises_only_decode_error(
    kind: type[Message], data: st.DataObject, ascii_only: bool
) -> None:
    value = data.draw(FIELD_OBJECTS[kind])
    _decodes_or_refuses(kind, _dumps(value, ascii_only=ascii_only))


# Bytes that are likely to matter in JSON: structure, escapes, broken UTF-8, numbers at edges.
INTERESTING = [
    b'"',
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"true",
    b"-1",
    b"1e400",
    b"9223372036854775808",
    b"\xff",
    b"\xe4\xb8",
    b"\xed\xa0\x80",
    b"\\ud800",
    b"\\u0000",
    b"\n",
    b',"x":1',
]


@st.composite
def mutations(draw: st.DrawFn, payload: bytes) -> bytes:
    buf = bytearray(payload)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "replace"]))
        at = draw(st.integers(min_value=0, max_value=max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del buf[at : at + draw(st.integers(min_value=1, max_value=8))]
        else:
            end = at + draw(st.integers(min_value=0, max_value=8))
            buf[at:end] = draw(st.sampled_from(INTERESTING))
    return bytes(buf)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@FUZZ
@given(data=st.data())
def test_decode_of_a_mutated_valid_payload_raises_only_decode_error(
    kind: type[Message], data: st.DataObject
) -> None:
    payload = encode(data.draw(VALID[kind]))
    _decodes_or_refuses(kind, data.draw(mutations(payload)))


Path: TypeAlias = tuple[str | int, ...]


def _paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every key and index inside a decoded JSON value, outermost first."""
    found: list[Path] = []
    if isinstance(value, dict):
        for key, child in value.items():
            found.append((*prefix, key))
            found.extend(_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.append((*prefix, index))
            found.extend(_paths(child, (*prefix, index)))
    return found


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@FUZZ
@given(data=st.data(), replacement=json_values)
def test_decode_with_one_field_replaced_raises_only_decode_error(
    kind: type[Message], data: st.DataObject, replacement: Json
) -> None:
    wire = json.loads(encode(data.draw(VALID[kind])))
    # Any present key or index at any depth, or a top-level field the encoder left out.
    paths = _paths(wire) + [(name,) for name in _field_names(kind) if name not in wire]
    path = data.draw(st.sampled_from(paths))
    target = wire
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = replacement
    _decodes_or_refuses(kind, _dumps(wire, ascii_only=False))


# --- ids and topics ------------------------------------------------------------------------

ID_CHARS = string.ascii_lowercase + string.digits + "-"


@FUZZ
@given(value=st.text(max_size=70) | terminal_ids | st.text(ID_CHARS, max_size=70))
def test_terminal_id_accepts_exactly_the_designed_alphabet(value: str) -> None:
    expected = 3 <= len(value) <= 63 and set(value) <= set(ID_CHARS) and value[0] != "-"
    try:
        result = terminal_id(value)
    except InvalidId:
        assert not expected
    else:
        assert expected
        assert result == value


SEGMENTS = st.sampled_from(
    [
        "kiosk",
        "v1",
        "kiosk-001",
        "Kiosk-001",
        "state",
        "cmd",
        "cmd-result",
        "reboot",
        "+",
        "#",
        "",
        "$share",
    ]
) | st.text(max_size=8)


@FUZZ
@given(
    text=st.text(max_size=60)
    | st.lists(SEGMENTS, max_size=7).map("/".join)
    | st.lists(SEGMENTS, max_size=4).map(lambda parts: "kiosk/v1/" + "/".join(parts))
)
def test_parse_of_random_text_raises_only_topic_error_or_round_trips(text: str) -> None:
    try:
        parsed = parse(text)
    except TopicError:
        return
    assert isinstance(parsed, Topic)
    assert str(parsed) == text


@FUZZ
@given(
    terminal=terminal_ids,
    channel=st.sampled_from(list(Channel)),
    name=command_names,
)
def test_every_topic_of_valid_ids_parses_back(terminal: str, channel: Channel, name: str) -> None:
    built = Topic(
        terminal_id(terminal),
        channel,
        command_name(name) if channel is Channel.CMD else None,
    )
    assert parse(str(built)) == built
