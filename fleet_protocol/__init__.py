"""The contract between kiosks and the fleet server: ids, topics, messages and their codec.

Pure: no I/O, no event loop. Everything here can be tested byte by byte.
"""

from fleet_protocol.codec import CHANNEL_TYPES, MAX_PAYLOAD, decode, decode_for, encode
from fleet_protocol.errors import (
    DecodeError,
    InvalidId,
    PayloadTooLarge,
    ProtocolError,
    TopicError,
)
from fleet_protocol.ids import (
    CommandId,
    CommandName,
    SiteId,
    TerminalId,
    command_id,
    command_name,
    site_id,
    terminal_id,
)
from fleet_protocol.messages import (
    BundleRef,
    Command,
    CommandResult,
    Desired,
    Event,
    InterfaceSample,
    Message,
    NetworkSample,
    Peripherals,
    PeripheralStatus,
    PowerSample,
    Reported,
    Sample,
    State,
    SystemSample,
    Telemetry,
)
from fleet_protocol.topics import Channel, Topic

__all__ = [
    "CHANNEL_TYPES",
    "MAX_PAYLOAD",
    "BundleRef",
    "Channel",
    "Command",
    "CommandId",
    "CommandName",
    "CommandResult",
    "DecodeError",
    "Desired",
    "Event",
    "InterfaceSample",
    "InvalidId",
    "Message",
    "NetworkSample",
    "PayloadTooLarge",
    "PeripheralStatus",
    "Peripherals",
    "PowerSample",
    "ProtocolError",
    "Reported",
    "Sample",
    "SiteId",
    "State",
    "SystemSample",
    "Telemetry",
    "TerminalId",
    "Topic",
    "TopicError",
    "command_id",
    "command_name",
    "decode",
    "decode_for",
    "encode",
    "site_id",
    "terminal_id",
]
