"""The one exception tree of firmware_bridge.

    BridgeError
    ├── ConfigError              a profile or device setting that cannot work (our side)
    ├── DeviceUnavailable        the device is not reachable: port missing, connection refused
    │    │                       or closed; the device is reported *absent*
    │    └── DeviceTimeout       it did not answer a request within its timeout
    ├── ProtocolViolation        it answered with bytes that break its protocol: short,
    │                            over-long, bad checksum, undefined status bits; *faulty*
    ├── RequestRefused           it understood the request and refused it (a Modbus exception
    │                            response, a NUT ``ERR``); the link itself is fine
    └── ChannelBusy              a power-cycle of that channel is already running (local refusal)

``DeviceUnavailable``, ``DeviceTimeout``, ``ProtocolViolation`` and ``RequestRefused`` are the
peer's fault; ``ConfigError`` and ``ChannelBusy`` are ours. Every error carries ``reason``: a
short, stable code for counters and for the agent's plain-language texts. Errors of pyserial,
pymodbus and the socket layer are translated at the module that uses that library
(``raise ... from exc``), so nothing else escapes a driver.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error raised by firmware_bridge."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(BridgeError, ValueError):
    """A device profile or setting that cannot work; the message names the field."""

    reason = "config"


class DeviceUnavailable(BridgeError):
    """The device cannot be reached; it is reported absent with this reason."""

    reason = "unreachable"


class DeviceTimeout(DeviceUnavailable):
    """The device did not answer a request within the request timeout."""

    reason = "no_answer"


class ProtocolViolation(BridgeError):
    """The device answered with bytes its protocol does not allow; it is reported faulty."""

    reason = "malformed"


class RequestRefused(BridgeError):
    """The device understood a request and refused it; the link is still good."""

    reason = "refused"


class ChannelBusy(BridgeError):
    """A power-cycle of that channel is already running; a second one is refused, not queued."""

    reason = "busy"
