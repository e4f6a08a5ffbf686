"""The kiosk/v1 topic tree: building, parsing and the subscription filters."""

from __future__ import annotations

import pytest

from fleet_protocol import Channel, ProtocolError, Topic, TopicError, command_name, terminal_id
from fleet_protocol.topics import (
    DOWNLINK,
    RETAINED,
    UPLINK,
    command_topic,
    fleet_filter,
    parse,
    shared_filter,
    topic,
)

KIOSK = terminal_id("kiosk-001")
REBOOT = command_name("reboot")

# Written out by hand from DESIGN.md so that a change to the tree shows up here.
EXPECTED_TOPICS = {
    Channel.STATE: "kiosk/v1/kiosk-001/state",
    Channel.TELEMETRY: "kiosk/v1/kiosk-001/telemetry",
    Channel.PERIPHERALS: "kiosk/v1/kiosk-001/peripherals",
    Channel.EVENTS: "kiosk/v1/kiosk-001/events",
    Channel.REPORTED: "kiosk/v1/kiosk-001/reported",
    Channel.DESIRED: "kiosk/v1/kiosk-001/desired",
    Channel.CMD: "kiosk/v1/kiosk-001/cmd/reboot",
    Channel.CMD_RESULT: "kiosk/v1/kiosk-001/cmd-result",
}


def test_every_channel_has_an_expected_topic() -> None:
    assert set(EXPECTED_TOPICS) == set(Channel)


def _build(channel: Channel) -> str:
    if channel is Channel.CMD:
        return command_topic(KIOSK, REBOOT)
    return topic(KIOSK, channel)


@pytest.mark.parametrize("channel", list(Channel), ids=[c.value for c in Channel])
def test_build_gives_the_designed_topic(channel: Channel) -> None:
    assert _build(channel) == EXPECTED_TOPICS[channel]


@pytest.mark.parametrize("channel", list(Channel), ids=[c.value for c in Channel])
def test_parse_inverts_build(channel: Channel) -> None:
    text = _build(channel)
    parsed = parse(text)
    command = REBOOT if channel is Channel.CMD else None
    assert parsed == Topic(KIOSK, channel, command)
    assert parsed.terminal == "kiosk-001"
    assert parsed.channel is channel
    assert parsed.command == command
    assert str(parsed) == text


def test_parse_keeps_the_terminal_and_the_command_name() -> None:
    parsed = parse("kiosk/v1/pd-zhangjiang-07/cmd/open-door")
    assert parsed == Topic(terminal_id("pd-zhangjiang-07"), Channel.CMD, command_name("open-door"))


BAD_TOPICS = {
    "empty": "",
    "wrong-prefix": "kiosk/v2/kiosk-001/state",
    "wrong-root": "kiosks/v1/kiosk-001/state",
    "upper-case-prefix": "KIOSK/v1/kiosk-001/state",
    "leading-slash": "/kiosk/v1/kiosk-001/state",
    "trailing-slash": "kiosk/v1/kiosk-001/state/",
    "shared-prefix": "$share/fleet/kiosk/v1/kiosk-001/state",
    "plus-as-terminal": "kiosk/v1/+/state",
    "hash-as-terminal": "kiosk/v1/#/state",
    "hash-as-tail": "kiosk/v1/kiosk-001/#",
    "prefix-only": "kiosk/v1",
    "no-channel": "kiosk/v1/kiosk-001",
    "empty-terminal": "kiosk/v1//state",
    "extra-level": "kiosk/v1/kiosk-001/state/extra",
    "two-extra-levels": "kiosk/v1/kiosk-001/cmd/reboot/now",
    "cmd-without-name": "kiosk/v1/kiosk-001/cmd",
    "cmd-empty-name": "kiosk/v1/kiosk-001/cmd/",
    "cmd-wildcard-name": "kiosk/v1/kiosk-001/cmd/+",
    "cmd-hash-name": "kiosk/v1/kiosk-001/cmd/#",
    "cmd-invalid-name": "kiosk/v1/kiosk-001/cmd/Reboot",
    "name-on-state": "kiosk/v1/kiosk-001/state/reboot",
    "name-on-cmd-result": "kiosk/v1/kiosk-001/cmd-result/reboot",
    "upper-case-terminal": "kiosk/v1/Kiosk-001/state",
    "short-terminal": "kiosk/v1/ab/state",
    "space-in-terminal": "kiosk/v1/kiosk 001/state",
    "newline-after-terminal": "kiosk/v1/kiosk-001\n/state",
    "chinese-terminal": "kiosk/v1/自助终端/state",
    "unknown-channel": "kiosk/v1/kiosk-001/logs",
    "upper-case-channel": "kiosk/v1/kiosk-001/STATE",
    "enum-member-name": "kiosk/v1/kiosk-001/CMD_RESULT",
    "trailing-newline": "kiosk/v1/kiosk-001/state\n",
}


@pytest.mark.parametrize("text", BAD_TOPICS.values(), ids=BAD_TOPICS.keys())
def test_parse_refuses_anything_outside_the_tree(text: str) -> None:
    with pytest.raises(TopicError):
        parse(text)


def test_topic_error_is_a_protocol_error_and_a_value_error() -> None:
    with pytest.raises(ProtocolError):
        parse("kiosk/v1/+/state")
    with pytest.raises(ValueError, match="kiosk/v1"):
        parse("other/v1/kiosk-001/state")


@pytest.mark.parametrize(
    "channel", sorted(set(Channel) - {Channel.CMD}), ids=lambda c: str(c.value)
)
def test_a_command_name_only_goes_with_the_cmd_channel(channel: Channel) -> None:
    with pytest.raises(TopicError):
        Topic(KIOSK, channel, REBOOT)


def test_the_cmd_channel_needs_a_command_name() -> None:
    with pytest.raises(TopicError):
        Topic(KIOSK, Channel.CMD)


def test_topics_are_values() -> None:
    assert Topic(KIOSK, Channel.STATE) == Topic(terminal_id("kiosk-001"), Channel.STATE)
    assert hash(Topic(KIOSK, Channel.STATE)) == hash(Topic(KIOSK, Channel.STATE))
    assert Topic(KIOSK, Channel.STATE) != Topic(KIOSK, Channel.EVENTS)


def test_fleet_filter_matches_one_channel_of_every_terminal() -> None:
    assert fleet_filter(Channel.TELEMETRY) == "kiosk/v1/+/telemetry"
    assert fleet_filter(Channel.STATE) == "kiosk/v1/+/state"
    assert fleet_filter(Channel.CMD_RESULT) == "kiosk/v1/+/cmd-result"


def test_fleet_filter_for_commands_matches_every_command_name() -> None:
    assert fleet_filter(Channel.CMD) == "kiosk/v1/+/cmd/+"


def test_shared_filter_is_an_mqtt5_shared_subscription_of_the_fleet_group() -> None:
    assert shared_filter(Channel.TELEMETRY) == "$share/fleet/kiosk/v1/+/telemetry"
    assert shared_filter(Channel.EVENTS, group="ingest") == "$share/ingest/kiosk/v1/+/events"


def test_direction_and_retention_of_channels_follow_the_design() -> None:
    uplink = {
        Channel.STATE,
        Channel.TELEMETRY,
        Channel.PERIPHERALS,
        Channel.EVENTS,
        Channel.REPORTED,
        Channel.CMD_RESULT,
    }
    assert uplink == UPLINK
    assert {Channel.DESIRED, Channel.CMD} == DOWNLINK
    assert not UPLINK & DOWNLINK
    assert set(Channel) == UPLINK | DOWNLINK
    assert {Channel.STATE, Channel.PERIPHERALS, Channel.REPORTED, Channel.DESIRED} == RETAINED
