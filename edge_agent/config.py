"""The agent's configuration: one TOML file, validated once, then typed values only.

Example (``terminal`` and ``tls`` are required; every other section may be left out)::

    [terminal]
    id = "zhujing-dqzx-01"          # also the certificate CN and the MQTT topic level
    site = "zhujing-dqzx"

    [broker]
    host = "fleet.example.gov.cn"
    port = 8883                     # TLS only: the broker knows a terminal by its certificate
    keepalive_s = 30                # the broker declares us lost after 1.5 x this
    session_expiry_s = 604800       # commands queued while away are kept this long

    [tls]
    ca_file = "/var/lib/kiosk-agent/tls/ca.pem"              # the fleet CA
    identity_file = "/var/lib/kiosk-agent/tls/identity.pem"  # key, then certificate chain; 0600
    # server_name = "broker.fleet.internal"  # name in the broker's certificate (default: host)

    [enrolment]                     # written by `kiosk-agent enroll`
    renew_url = "https://fleet.example.gov.cn:8701/enroll/v1/renew"   # empty: never renew
    retry_s = 600                   # after a failed renewal
    reconnect_after_renew = true    # reconnect at once with the new certificate

    [telemetry]
    interval_s = 15                 # one system sample every interval
    batch_size = 4                  # publish when this many samples are waiting ...
    max_batch_age_s = 60            # ... or when the oldest has waited this long

    [storage]
    state_dir = "/var/lib/kiosk-agent"

    [outbox]                        # everything sent waits here, on disk, until acknowledged
    max_mb = 64                     # when full: oldest telemetry first, staff actions last
    max_age_days = 7
    replay_rate = 50                # backlog messages a second after the link returns

    [peripherals]
    profile = "comprehensive"       # or "zone24", or a profile file
    overrides = "/etc/kiosk-agent/peripherals.toml"
    debounce_s = 3

    [clock]
    max_offset_s = 30               # a clock further off than this is reported as a fault

    [status_page]                   # for village staff, on the kiosk's screen and the site LAN
    listen = ["127.0.0.1", "192.168.1.20"]     # never 0.0.0.0
    port = 8080
    server_names = ["kiosk-01.local"]          # extra names the page may be reached by

    [[status_page.staff]]           # `kiosk-agent hash-passcode` makes the hash
    name = "王芳"
    passcode_hash = "scrypt$16384$8$1$..."

    [system_commands]               # argv lists, run without a shell
    reboot = ["systemctl", "reboot"]
    restart_app = ["systemctl", "restart", "kiosk-app.service"]
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from edge_agent.errors import AgentConfigError
from edge_agent.outbox import OutboxLimits
from edge_agent.status_page.staff import StatusPageSettings
from edge_agent.system_commands import SystemCommandSettings
from fleet_protocol.ids import SiteIdField, TerminalIdField
from fleet_protocol.settings import SettingsError, parse_toml

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
FilePath = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
HostName = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]

MQTTS_PORT = 8883


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Unknown keys are errors in config: a typo must not silently fall back to a default."""


class TerminalSettings(_Section, frozen=True, kw_only=True):
    id: TerminalIdField
    site: SiteIdField


class BrokerSettings(_Section, frozen=True, kw_only=True):
    host: HostName = "127.0.0.1"
    port: Port = MQTTS_PORT
    keepalive_s: Annotated[int, msgspec.Meta(ge=2, le=300)] = 30
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=30 * 86400)] = 7 * 86400
    reconnect_min_s: Seconds = 1.0
    reconnect_max_s: Seconds = 60.0

    def __post_init__(self) -> None:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")


class TlsSettings(_Section, frozen=True, kw_only=True):
    """Mutual TLS to the broker. There is no plain-text mode: the certificate is the identity."""

    ca_file: FilePath
    #: One PEM file, private key first, then the certificate chain: renewal replaces key and
    #: certificate together with one rename, so they can never be out of step.
    identity_file: FilePath
    #: The name the broker's certificate must carry, when it differs from ``broker.host``
    #: (e.g. the kiosk reaches the broker by IP address through a VPN).
    server_name: Annotated[str, msgspec.Meta(max_length=253)] = ""

    @property
    def ca_path(self) -> Path:
        return Path(self.ca_file)

    @property
    def identity_path(self) -> Path:
        return Path(self.identity_file)


class EnrolmentSettings(_Section, frozen=True, kw_only=True):
    #: Where the certificate is renewed over mutual TLS; empty: it is never renewed.
    renew_url: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    retry_s: Seconds = 600.0
    reconnect_after_renew: bool = True

    def __post_init__(self) -> None:
        if self.renew_url:
            url = urllib.parse.urlsplit(self.renew_url)
            if url.scheme != "https" or not url.hostname:
                raise ValueError("renew_url must be an https:// URL with a host, or empty")


class TelemetrySettings(_Section, frozen=True, kw_only=True):
    interval_s: Seconds = 15.0
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 4
    max_batch_age_s: Seconds = 60.0


class OutboxSettings(_Section, frozen=True, kw_only=True):
    """The on-disk outbox (see edge_agent/outbox.py for what is given up first when full)."""

    #: The agent's database; empty: ``agent.db`` in the state directory.
    path: str = ""
    max_mb: Annotated[float, msgspec.Meta(gt=0, le=4096)] = 64.0
    max_age_days: Annotated[float, msgspec.Meta(gt=0, le=365)] = 7.0
    #: Backlog messages a second after the link returns; live messages are not paced.
    replay_rate: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = 50.0
    #: "normal": survives the agent being killed; "full": also the last second of a power cut.
    synchronous: Literal["normal", "full"] = "normal"

    @property
    def limits(self) -> OutboxLimits:
        return OutboxLimits(
            max_bytes=int(self.max_mb * 1024 * 1024),
            max_age_ms=int(self.max_age_days * 86_400_000),
        )


class PeripheralSettings(_Section, frozen=True, kw_only=True):
    #: A built-in profile (``comprehensive``, ``zone24``) or a profile file; empty: none.
    profile: str = ""
    #: This kiosk's overrides of the profile (ports, absent devices); see `kiosk-bridge`.
    overrides: str = ""
    #: A changed state must hold this long before it is reported (a loose cable flaps).
    debounce_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 3.0
    #: USB hotplug through udev; off (USB-only peripherals are then reported as not
    #: watched); or simulated, every USB peripheral of the profile plugged in (demos, tests).
    usb: Literal["udev", "off", "simulated"] = "udev"


class ClockSettings(_Section, frozen=True, kw_only=True):
    #: A kiosk clock further off than this from the fleet server's is reported as a fault.
    max_offset_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 30.0
    check_interval_s: Annotated[float, msgspec.Meta(ge=10, le=86400)] = 600.0
    #: The fleet server's time endpoint; empty: derived from ``enrolment.renew_url``.
    reference_url: Annotated[str, msgspec.Meta(max_length=2048)] = ""


class StorageSettings(_Section, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/kiosk-agent"


class AgentConfig(_Section, frozen=True, kw_only=True):
    terminal: TerminalSettings
    tls: TlsSettings
    broker: BrokerSettings = BrokerSettings()
    enrolment: EnrolmentSettings = EnrolmentSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    storage: StorageSettings = StorageSettings()
    outbox: OutboxSettings = OutboxSettings()
    peripherals: PeripheralSettings = PeripheralSettings()
    clock: ClockSettings = ClockSettings()
    #: What "reboot" and "restart the kiosk application" run (never a shell).
    system_commands: SystemCommandSettings = SystemCommandSettings()
    #: The local page for village staff (listens on 127.0.0.1 and the configured LAN only).
    status_page: StatusPageSettings = StatusPageSettings()

    @property
    def state_dir(self) -> Path:
        return Path(self.storage.state_dir)

    @property
    def database_path(self) -> Path:
        return Path(self.outbox.path) if self.outbox.path else self.state_dir / "agent.db"

    @property
    def broker_server_name(self) -> str:
        """The name the broker's certificate is checked against."""
        return self.tls.server_name or self.broker.host


def parse_config(data: bytes, source: str) -> AgentConfig:
    try:
        return parse_toml(AgentConfig, data, source)
    except SettingsError as exc:
        raise AgentConfigError(str(exc)) from exc


def load_config(path: Path) -> AgentConfig:
    """Read and validate the config file at ``path``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgentConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    return parse_config(data, str(path))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string with ensure_ascii off is also a valid TOML basic string (same escapes).
    return json.dumps(str(value), ensure_ascii=False)


def render_config(config: AgentConfig) -> str:
    """``config`` as TOML text that :func:`parse_config` reads back to an equal record.

    Every setting is written out, defaults included, so the file shows an operator what the
    agent will do without looking up the defaults.
    """
    lines = ["# kiosk-agent configuration; `kiosk-agent check-config` validates it.", ""]
    for section, fields in msgspec.structs.asdict(config).items():
        lines.append(f"[{section}]")
        tables: list[tuple[str, msgspec.Struct]] = []
        for name, value in msgspec.structs.asdict(fields).items():
            if isinstance(value, list | tuple) and value and isinstance(value[0], msgspec.Struct):
                tables += [(name, v) for v in value]  # arrays of tables go after the keys
                continue
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
        for name, table in tables:
            lines.append(f"[[{section}.{name}]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in msgspec.structs.asdict(table).items()]
            lines.append("")
    return "\n".join(lines)
