"""Mosquitto 2.0 configuration, rendered from typed settings by pure functions.

:class:`BrokerSettings` validates itself on construction and :func:`render_broker_config`
turns it into the text of ``mosquitto.conf``. Nothing here touches the file system; the stack
launcher writes the text and starts ``mosquitto -c``.

The limits are deliberate, and each is explained again in a comment in the generated file:

``max_queued_messages`` 1,000,000 and ``max_queued_bytes`` 512 MiB
    Mosquitto's default of 1000 queued messages per client silently drops QoS 0 messages and
    caps the queued QoS 1 messages of a subscriber that falls behind; under load that lost up
    to 13% of telemetry. The fleet server's ingest subscription receives every terminal's
    telemetry, so it is exactly that subscriber. The message count is therefore set out of the
    way and memory is bounded by bytes instead. Both limits are per client; only the ingest
    subscribers ever queue much, the terminals' own queues hold a few commands.
``max_inflight_messages`` 100
    The default of 20 unacknowledged QoS 1 messages per client throttles the ingest path to one
    window of 20 per round trip; 100 keeps it busy. MQTT 5 clients may lower it further with
    their Receive Maximum.
``queue_qos0_messages false``
    QoS 0 is not queued for disconnected persistent sessions: nothing in the contract uses QoS 0
    for data that must survive a disconnect, and such messages would only eat the byte budget.
``max_packet_size`` 1 MiB
    Above the codec's limit (:data:`fleet_protocol.codec.MAX_PAYLOAD`, 256 KiB), so an oversize
    message still reaches the fleet server, which counts it against its sender; a broker limit
    at or below the codec's would make such messages vanish, unexplained, at the broker.
``max_keepalive`` 300
    A client asking for a longer keep-alive is told to use 300 s, so a dead connection is
    noticed within minutes. Terminals use 30 s (see DESIGN.md).
``persistent_client_expiration`` 14d
    Sessions of terminals that were removed or re-imaged with a new id do not pile up forever.
``set_tcp_nodelay true``
    Small MQTT packets (acks, state changes, commands) are sent at once instead of waiting for
    Nagle's algorithm.

For now there is one plain listener on a loopback address with anonymous access; the TLS
listener with client certificates and the ACL arrive in a later change, in
:func:`_listener_lines` and :func:`_access_lines`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleet_protocol.codec import MAX_PAYLOAD
from provisioning.errors import InvalidSettings

MIB: Final = 1024 * 1024

#: Largest packet MQTT can express at all (the remaining-length field's maximum).
MQTT_MAX_PACKET: Final = 268_435_455

_EXPIRATION = re.compile(r"[1-9][0-9]*[hdwmy]")
_UNSAFE_IN_VALUE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """Everything that goes into ``mosquitto.conf``; invalid combinations raise on construction.

    ``run_as_user`` is the ``user`` option: when Mosquitto is started as root it switches to this
    user, which must be able to write ``data_dir`` and ``log_file``. ``None`` leaves the option
    out (Mosquitto then switches to ``mosquitto``, and does nothing when not started as root).
    """

    host: str = "127.0.0.1"
    port: int
    data_dir: Path
    log_file: Path
    run_as_user: str | None = None
    max_queued_messages: int = 1_000_000
    max_queued_bytes: int = 512 * MIB
    max_inflight_messages: int = 100
    max_packet_size: int = 1 * MIB
    max_keepalive: int = 300
    persistent_client_expiration: str = "14d"
    autosave_interval: int = 60

    def __post_init__(self) -> None:
        _check_loopback(self.host)
        if not 1 <= self.port <= 65535:
            raise InvalidSettings(f"broker port {self.port} is not in 1..65535")
        for name, path in (("data_dir", self.data_dir), ("log_file", self.log_file)):
            if not path.is_absolute():
                raise InvalidSettings(f"broker {name} must be an absolute path, got {path}")
            _check_value(name, str(path))
        if self.run_as_user is not None and (
            not self.run_as_user or re.search(r"\s", self.run_as_user)
        ):
            raise InvalidSettings(f"broker run_as_user {self.run_as_user!r} is not a user name")
        # Zero means "no limit" to Mosquitto; every limit here is meant to bound something.
        for name, value in (
            ("max_queued_messages", self.max_queued_messages),
            ("max_queued_bytes", self.max_queued_bytes),
            ("max_inflight_messages", self.max_inflight_messages),
        ):
            if value < 1:
                raise InvalidSettings(f"broker {name} must be at least 1, got {value}")
        if not MAX_PAYLOAD < self.max_packet_size <= MQTT_MAX_PACKET:
            raise InvalidSettings(
                f"broker max_packet_size {self.max_packet_size} must be above the codec's "
                f"MAX_PAYLOAD ({MAX_PAYLOAD}) so oversize messages reach the server and are "
                f"counted there, and at most {MQTT_MAX_PACKET}"
            )
        if self.max_queued_bytes < self.max_packet_size:
            raise InvalidSettings(
                f"broker max_queued_bytes {self.max_queued_bytes} cannot hold one packet of "
                f"max_packet_size {self.max_packet_size}"
            )
        if not 10 <= self.max_keepalive <= 65535:
            raise InvalidSettings(f"broker max_keepalive {self.max_keepalive} is not in 10..65535")
        if not _EXPIRATION.fullmatch(self.persistent_client_expiration):
            raise InvalidSettings(
                f"broker persistent_client_expiration {self.persistent_client_expiration!r} "
                "must be a number followed by h, d, w, m or y (e.g. 14d)"
            )
        if self.autosave_interval < 0:
            raise InvalidSettings(
                f"broker autosave_interval must not be negative, got {self.autosave_interval}"
            )


def render_broker_config(settings: BrokerSettings) -> str:
    """The text of ``mosquitto.conf`` for ``settings`` (Mosquitto 2.0 syntax)."""
    sections = (
        _header_lines(),
        _process_lines(settings),
        _persistence_lines(settings),
        _limit_lines(settings),
        _logging_lines(settings),
        _access_lines(),
        _listener_lines(settings),
    )
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"


def _header_lines() -> list[str]:
    return [
        "# Mosquitto 2.0 configuration for the kiosk fleet.",
        "# Generated by provisioning.broker_config; edits are overwritten by `fleetctl stack up`.",
    ]


def _process_lines(settings: BrokerSettings) -> list[str]:
    if settings.run_as_user is None:
        return []
    return [
        "# When started as root, run as this user (it owns the data dir and the log).",
        f"user {settings.run_as_user}",
    ]


def _persistence_lines(settings: BrokerSettings) -> list[str]:
    return [
        "# Retained state/desired topics and queued commands survive a broker restart.",
        "persistence true",
        f"persistence_location {settings.data_dir}",
        "persistence_file mosquitto.db",
        "# Seconds between saves; the database is also saved on a clean shutdown (SIGTERM).",
        f"autosave_interval {settings.autosave_interval}",
        "# Sessions of removed or re-imaged terminals expire instead of accumulating forever.",
        f"persistent_client_expiration {settings.persistent_client_expiration}",
    ]


def _limit_lines(settings: BrokerSettings) -> list[str]:
    return [
        "# The default of 1000 queued messages per client silently drops QoS 0 and caps queued",
        "# QoS 1 for a slow subscriber (up to 13% telemetry loss measured under load). The fleet",
        "# server's ingest subscription receives every terminal's telemetry, so the count is set",
        "# out of the way and memory is bounded by max_queued_bytes (per client) instead.",
        f"max_queued_messages {settings.max_queued_messages}",
        f"max_queued_bytes {settings.max_queued_bytes}",
        "# Do not queue QoS 0 for disconnected sessions; nothing that must survive uses QoS 0.",
        "queue_qos0_messages false",
        "# Unacknowledged QoS 1 messages in flight per client (default 20): throughput of the",
        "# ingest path. MQTT 5 clients can lower it with their Receive Maximum.",
        f"max_inflight_messages {settings.max_inflight_messages}",
        f"# Above the codec's {MAX_PAYLOAD}-byte payload limit (fleet_protocol.codec.MAX_PAYLOAD)",
        "# so an oversize message reaches the server and is counted against its sender there.",
        f"max_packet_size {settings.max_packet_size}",
        "# Clients asking for a longer keep-alive are told to use this many seconds.",
        f"max_keepalive {settings.max_keepalive}",
        "# Send small packets (acks, commands, state) at once rather than after Nagle's delay.",
        "set_tcp_nodelay true",
    ]


def _logging_lines(settings: BrokerSettings) -> list[str]:
    return [
        f"log_dest file {settings.log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "connection_messages true",
    ]


def _access_lines() -> list[str]:
    return [
        "per_listener_settings false",
        "# Anonymous access on a loopback-only listener until the TLS listener with client",
        "# certificates (use_identity_as_username) and the per-terminal ACL arrive.",
        "allow_anonymous true",
    ]


def _listener_lines(settings: BrokerSettings) -> list[str]:
    return [
        "# Plain MQTT on a loopback address only.",
        f"listener {settings.port} {settings.host}",
    ]


def _check_loopback(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise InvalidSettings(f"broker host must be an IP address, got {host!r}") from exc
    if not address.is_loopback:
        raise InvalidSettings(
            f"broker host {host} is not a loopback address; the plain listener is for local "
            "use only until the TLS listener exists"
        )


def _check_value(name: str, value: str) -> None:
    if _UNSAFE_IN_VALUE.search(value):
        raise InvalidSettings(f"broker {name} contains a control character: {value!r}")
