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
    window of 20 per round trip; 100 keeps it busy. An MQTT 5 client's Receive Maximum replaces
    it for that client, higher or lower (Mosquitto's ``property__process_connect``): the fleet
    server asks for its ``[broker] receive_maximum``, 1000 by default.
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

Access: there is no plain listener and no anonymous access. Two TLS listeners, each trusting
one CA (see :mod:`provisioning.pki`):

terminal listener (``host:port``)
    ``require_certificate`` with the fleet CA and its CRL; ``use_identity_as_username``, so the
    certificate's CN (the terminal id) is the identity the ACL sees, whatever username the
    client sends; ``use_username_as_clientid``, so no client can take over another terminal's
    session by choosing its client id.
service listener (``service_host:service_port``)
    ``require_certificate`` with the service CA only, so no terminal certificate opens a session
    here. Client ids are free: several fleet-server processes share the ingest, and fleetctl
    cuts a revoked terminal's open session off by taking its client id over (see
    :mod:`provisioning.broker_control`).

The ACL (:func:`render_acl`) gives each terminal its own topics through ``pattern`` lines on
``%u`` and the fleet server the whole tree; a revoked terminal gets a ``topic deny #`` of its
own, which Mosquitto applies to sessions that are already open when it rereads the ACL on
SIGHUP (it does not re-check open sessions against a reloaded CRL).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleet_protocol.codec import MAX_PAYLOAD
from fleet_protocol.ids import terminal_id
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
    service_host: str = "127.0.0.1"
    service_port: int
    data_dir: Path
    log_file: Path
    ca_file: Path
    service_ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path
    acl_file: Path
    run_as_user: str | None = None
    max_queued_messages: int = 1_000_000
    max_queued_bytes: int = 512 * MIB
    max_inflight_messages: int = 100
    max_packet_size: int = 1 * MIB
    max_keepalive: int = 300
    persistent_client_expiration: str = "14d"
    autosave_interval: int = 60

    def __post_init__(self) -> None:
        self._check_listeners()
        self._check_limits()

    def _check_listeners(self) -> None:
        for name, host in (("host", self.host), ("service_host", self.service_host)):
            _check_address(name, host)
        for name, port in (("port", self.port), ("service_port", self.service_port)):
            if not 1 <= port <= 65535:
                raise InvalidSettings(f"broker {name} {port} is not in 1..65535")
        if (self.host, self.port) == (self.service_host, self.service_port):
            raise InvalidSettings("the terminal and service listeners need different ports")
        for name, path in (
            ("data_dir", self.data_dir),
            ("log_file", self.log_file),
            ("ca_file", self.ca_file),
            ("service_ca_file", self.service_ca_file),
            ("cert_file", self.cert_file),
            ("key_file", self.key_file),
            ("crl_file", self.crl_file),
            ("acl_file", self.acl_file),
        ):
            if not path.is_absolute():
                raise InvalidSettings(f"broker {name} must be an absolute path, got {path}")
            _check_value(name, str(path))

    def _check_limits(self) -> None:
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
        _access_lines(settings),
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


def _access_lines(settings: BrokerSettings) -> list[str]:
    return [
        "# One ACL for every listener; nobody connects without a client certificate.",
        "per_listener_settings false",
        "allow_anonymous false",
        "# Per-terminal patterns, the fleet server's access and denials of revoked terminals;",
        "# reread on SIGHUP and applied to sessions that are already open.",
        f"acl_file {settings.acl_file}",
    ]


def _listener_lines(settings: BrokerSettings) -> list[str]:
    return [
        "# Terminals: TLS with a fleet CA client certificate, checked against the CRL (reread",
        "# on SIGHUP). The CN is the identity and the client id, so a terminal can neither",
        "# act as another nor take another's session over by choosing its client id.",
        f"listener {settings.port} {settings.host}",
        "tls_version tlsv1.2",
        f"cafile {settings.ca_file}",
        f"certfile {settings.cert_file}",
        f"keyfile {settings.key_file}",
        f"crlfile {settings.crl_file}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "",
        "# The fleet's own services: TLS with a service CA client certificate only, so no",
        "# terminal certificate opens a session here. Client ids are free (several",
        "# fleet-server processes; fleetctl takes a revoked terminal's session over).",
        f"listener {settings.service_port} {settings.service_host}",
        "tls_version tlsv1.2",
        f"cafile {settings.service_ca_file}",
        f"certfile {settings.cert_file}",
        f"keyfile {settings.key_file}",
        "require_certificate true",
        "use_identity_as_username true",
    ]


#: What each terminal may do on its own topics (DESIGN.md, "MQTT contract").
TERMINAL_WRITES: Final = ("state", "telemetry", "peripherals", "events", "reported", "cmd-result")
TERMINAL_READS: Final = ("desired", "cmd/#")


def render_acl(denied: Iterable[str], *, server_identity: str = "fleet.server") -> str:
    """The broker's ACL file: ``denied`` terminals lose all access, open sessions included."""
    lines = [
        "# Mosquitto ACL for the kiosk fleet. Generated by provisioning.authority; rewritten",
        "# on every revocation, so edits here are lost.",
        "",
        "# The fleet server reads telemetry, state and results and writes desired and cmd.",
        f"user {server_identity}",
        "topic readwrite kiosk/v1/#",
    ]
    for name in denied:
        # A user's own deny is checked before the patterns below.
        lines += ["", "# revoked", f"user {terminal_id(name)}", "topic deny #"]
    lines += ["", "# Every terminal, on its own topics only (%u is its certificate's CN)."]
    lines += [f"pattern write kiosk/v1/%u/{channel}" for channel in TERMINAL_WRITES]
    lines += [f"pattern read kiosk/v1/%u/{channel}" for channel in TERMINAL_READS]
    return "\n".join(lines) + "\n"


def _check_address(name: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise InvalidSettings(f"broker {name} must be an IP address, got {host!r}") from exc


def _check_value(name: str, value: str) -> None:
    if _UNSAFE_IN_VALUE.search(value):
        raise InvalidSettings(f"broker {name} contains a control character: {value!r}")
