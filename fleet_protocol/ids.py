"""Identifiers as validated value types.

A terminal id is also the CN of the terminal's certificate and a level of every MQTT topic, so
it must never carry an MQTT wildcard, a separator, upper case or whitespace: one lower-case
token, 3 to 63 characters. Site ids follow the same rule (they appear in tags and e-mails);
command ids are opaque tokens chosen by the server.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, NewType

import msgspec

from fleet_protocol.errors import InvalidId

TERMINAL_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{2,62}\Z"
SITE_ID_PATTERN: Final = TERMINAL_ID_PATTERN
COMMAND_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{7,63}\Z"
COMMAND_NAME_PATTERN: Final = r"^[a-z][a-z0-9-]{1,31}\Z"

TerminalId = NewType("TerminalId", str)
SiteId = NewType("SiteId", str)
CommandId = NewType("CommandId", str)
CommandName = NewType("CommandName", str)

# Field types for message schemas: the decoder enforces the same rule as the parse functions.
# Patterns end in \Z, not $: msgspec searches, and "$" would accept a trailing newline.
TerminalIdField = Annotated[TerminalId, msgspec.Meta(pattern=TERMINAL_ID_PATTERN)]
SiteIdField = Annotated[SiteId, msgspec.Meta(pattern=SITE_ID_PATTERN)]
CommandIdField = Annotated[CommandId, msgspec.Meta(pattern=COMMAND_ID_PATTERN)]
CommandNameField = Annotated[CommandName, msgspec.Meta(pattern=COMMAND_NAME_PATTERN)]

_TERMINAL_RE: Final = re.compile(TERMINAL_ID_PATTERN)
_COMMAND_ID_RE: Final = re.compile(COMMAND_ID_PATTERN)
_COMMAND_NAME_RE: Final = re.compile(COMMAND_NAME_PATTERN)


def _check(kind: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str):
        raise InvalidId(f"{kind} must be a string, got {type(value).__name__}")
    # fullmatch, not match: "$" would accept a trailing newline.
    if pattern.fullmatch(value) is None:
        raise InvalidId(f"{kind} {value!r} is not valid: {rule}")
    return value


ID_RULE: Final = "3-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
COMMAND_ID_RULE: Final = "8-64 letters, digits, '_' or '-'"


def terminal_id(value: object) -> TerminalId:
    """Validate a terminal id (also the certificate CN and a topic level)."""
    return TerminalId(_check("terminal id", value, _TERMINAL_RE, ID_RULE))


def site_id(value: object) -> SiteId:
    """Validate a site id."""
    return SiteId(_check("site id", value, _TERMINAL_RE, ID_RULE))


def command_id(value: object) -> CommandId:
    """Validate a command id (8-64 characters of letters, digits, '_' and '-')."""
    return CommandId(_check("command id", value, _COMMAND_ID_RE, COMMAND_ID_RULE))


def command_name(value: object) -> CommandName:
    """Validate a command name (the last topic level of cmd/{name})."""
    return CommandName(
        _check("command name", value, _COMMAND_NAME_RE, "2-32 characters of a-z, 0-9 and '-'")
    )
