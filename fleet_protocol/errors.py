"""The one exception tree of the contract package.

    ProtocolError
    ├── InvalidId          an id that DESIGN.md's rules do not allow
    ├── TopicError         a topic outside the kiosk/v1 tree
    ├── DecodeError        a payload that is not a valid message (the peer's fault)
    │    .reason           a short, stable code for counters: too_large, malformed, schema
    └── PayloadTooLarge    a message of ours that would not fit the wire (our fault)

Decoding and parsing fail with one of these and nothing else, so a caller can count and drop
bad input without catching broadly. Building a message whose fields contradict each other
(``State``, ``Command``) raises ``ValueError`` from the constructor, as a programming error.
"""

from __future__ import annotations

from typing import Literal

DecodeReason = Literal["too_large", "malformed", "schema"]


class ProtocolError(Exception):
    """Base of every error raised by fleet_protocol."""


class InvalidId(ProtocolError, ValueError):
    """An identifier that does not follow the id rules."""


class TopicError(ProtocolError, ValueError):
    """A topic that is not part of the kiosk/v1 tree, or not the one expected."""


class DecodeError(ProtocolError):
    """A payload that could not be decoded into the expected message."""

    def __init__(self, reason: DecodeReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DecodeReason = reason
        self.detail = detail


class PayloadTooLarge(ProtocolError, ValueError):
    """A message we built is over the size limit; split it before encoding."""
