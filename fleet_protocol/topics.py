"""The MQTT topic tree, terminal first so one ACL pattern isolates each terminal.

kiosk/v1/{terminal}/state | telemetry | peripherals | events | reported   terminal -> server
kiosk/v1/{terminal}/desired | cmd/{name}                                  server -> terminal
kiosk/v1/{terminal}/cmd-result                                            terminal -> server
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from fleet_protocol.errors import InvalidId, TopicError
from fleet_protocol.ids import CommandName, TerminalId, command_name, terminal_id

PREFIX: Final = "kiosk/v1"
SHARE_GROUP: Final = "fleet"


class Channel(enum.StrEnum):
    STATE = "state"
    TELEMETRY = "telemetry"
    PERIPHERALS = "peripherals"
    EVENTS = "events"
    REPORTED = "reported"
    DESIRED = "desired"
    CMD = "cmd"
    CMD_RESULT = "cmd-result"


#: Channels a terminal publishes on (the ACL lets it write these, and only for itself).
UPLINK: Final = frozenset(
    {
        Channel.STATE,
        Channel.TELEMETRY,
        Channel.PERIPHERALS,
        Channel.EVENTS,
        Channel.REPORTED,
        Channel.CMD_RESULT,
    }
)
#: Channels the server publishes to a terminal.
DOWNLINK: Final = frozenset({Channel.DESIRED, Channel.CMD})
#: Channels whose messages are retained by the broker.
RETAINED: Final = frozenset({Channel.STATE, Channel.PERIPHERALS, Channel.REPORTED, Channel.DESIRED})


@dataclass(frozen=True, slots=True)
class Topic:
    """One concrete topic of the tree; ``command`` is set exactly for ``Channel.CMD``."""

    terminal: TerminalId
    channel: Channel
    command: CommandName | None = None

    def __post_init__(self) -> None:
        if (self.channel is Channel.CMD) != (self.command is not None):
            raise TopicError("a command name goes with the cmd channel and only with it")
        try:
            terminal_id(self.terminal)
            if self.command is not None:
                command_name(self.command)
        except InvalidId as exc:
            raise TopicError(str(exc)) from exc

    def __str__(self) -> str:
        base = f"{PREFIX}/{self.terminal}/{self.channel.value}"
        return f"{base}/{self.command}" if self.command is not None else base


def topic(terminal: TerminalId, channel: Channel) -> str:
    """The topic of ``channel`` for ``terminal`` (not for commands: see :func:`command_topic`)."""
    return str(Topic(terminal, channel))


def command_topic(terminal: TerminalId, name: CommandName) -> str:
    return str(Topic(terminal, Channel.CMD, name))


def parse(value: str) -> Topic:
    """Parse a concrete topic of the tree; anything else raises :class:`TopicError`."""
    parts = value.split("/")
    if len(parts) not in (4, 5) or f"{parts[0]}/{parts[1]}" != PREFIX:
        raise TopicError(f"not a {PREFIX} topic: {value!r}")
    try:
        terminal = terminal_id(parts[2])
        channel = Channel(parts[3])
    except (InvalidId, ValueError) as exc:
        raise TopicError(f"bad topic {value!r}: {exc}") from exc
    if channel is Channel.CMD:
        if len(parts) != 5:
            raise TopicError(f"a cmd topic names the command: {value!r}")
        try:
            return Topic(terminal, channel, command_name(parts[4]))
        except InvalidId as exc:
            raise TopicError(f"bad topic {value!r}: {exc}") from exc
    if len(parts) != 4:
        raise TopicError(f"unexpected levels after {channel.value}: {value!r}")
    return Topic(terminal, channel)


def fleet_filter(channel: Channel) -> str:
    """The filter matching ``channel`` of every terminal."""
    suffix = "/+" if channel is Channel.CMD else ""
    return f"{PREFIX}/+/{channel.value}{suffix}"


def shared_filter(channel: Channel, group: str = SHARE_GROUP) -> str:
    """MQTT 5 shared subscription: each message goes to one server process of the group."""
    return f"$share/{group}/{fleet_filter(channel)}"
