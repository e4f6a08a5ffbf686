"""The one codec: typed message to JSON bytes and back, with a size limit.

Decoding never raises anything but :class:`~fleet_protocol.errors.DecodeError`, whatever the
bytes: callers count ``exc.reason`` and drop the message.
"""

from __future__ import annotations

from typing import Final, TypeVar

import msgspec

from fleet_protocol.errors import DecodeError, PayloadTooLarge
from fleet_protocol.messages import (
    Command,
    CommandResult,
    Desired,
    Event,
    Message,
    Peripherals,
    Reported,
    State,
    Telemetry,
)
from fleet_protocol.topics import Channel

#: Largest payload accepted. The broker's own limit is set above this so an oversize message
#: still reaches the server and is counted against its sender instead of vanishing.
MAX_PAYLOAD: Final = 256 * 1024

M = TypeVar("M", bound=Message)

CHANNEL_TYPES: Final[dict[Channel, type[Message]]] = {
    Channel.STATE: State,
    Channel.TELEMETRY: Telemetry,
    Channel.PERIPHERALS: Peripherals,
    Channel.EVENTS: Event,
    Channel.REPORTED: Reported,
    Channel.DESIRED: Desired,
    Channel.CMD: Command,
    Channel.CMD_RESULT: CommandResult,
}

_encoder: Final = msgspec.json.Encoder()
_decoders: dict[type[Message], msgspec.json.Decoder[Message]] = {}


def encode(message: Message) -> bytes:
    """Serialise ``message``; a message too large for the wire raises :class:`PayloadTooLarge`."""
    data = _encoder.encode(message)
    if len(data) > MAX_PAYLOAD:
        raise PayloadTooLarge(
            f"{type(message).__name__} is {len(data)} bytes, over the limit of {MAX_PAYLOAD}"
        )
    return data


def decode(kind: type[M], data: bytes, *, max_size: int = MAX_PAYLOAD) -> M:
    """Decode ``data`` as a ``kind`` message or raise :class:`DecodeError`."""
    if len(data) > max_size:
        raise DecodeError("too_large", f"{len(data)} bytes, limit {max_size}")
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        message = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError("schema", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise DecodeError("malformed", str(exc)) from exc
    # msgspec raises Python's own error for invalid UTF-8 inside a string it has to read.
    except UnicodeDecodeError as exc:
        raise DecodeError("malformed", f"invalid UTF-8 at byte {exc.start}") from exc
    # RecursionError: msgspec bounds nesting itself, but keep the promise whatever the version.
    except RecursionError as exc:
        raise DecodeError("malformed", "nested too deeply") from exc
    if not isinstance(message, kind):  # pragma: no cover - the decoder guarantees it
        raise DecodeError("schema", f"expected {kind.__name__}")
    return message


def decode_for(channel: Channel, data: bytes, *, max_size: int = MAX_PAYLOAD) -> Message:
    """Decode a payload received on ``channel``."""
    return decode(CHANNEL_TYPES[channel], data, max_size=max_size)
