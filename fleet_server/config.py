"""The fleet server's configuration: one TOML file, validated once, then typed values only.

Example (only ``[influx] url`` and ``[registry] path`` have no useful default)::

    [broker]                       # the broker's service listener (mutual TLS)
    host = "127.0.0.1"
    port = 8884
    client_id = "fleet-server-1"   # unique per server process; its session survives restarts
    receive_maximum = 1000         # unacknowledged deliveries in flight: the ingest queue bound
    ca_file = "/var/lib/kiosk-fleet/pki/ca.pem"              # verifies the broker
    cert_file = "/var/lib/kiosk-fleet/pki/fleet-server.pem"  # our identity (service CA)
    key_file = "/var/lib/kiosk-fleet/pki/fleet-server.key"

    [influx]
    url = "http://127.0.0.1:8086"
    database = "kiosk"
    batch_points = 5000            # write when this many points wait ...
    flush_interval_s = 1.0         # ... or this long after the first, whichever first
    slow_write_s = 5.0             # a write slower than this is abandoned and spooled
    spool_max_mb = 1024            # on-disk spool for when InfluxDB is down or slow; when
                                   # full, deliveries are held in the broker (never dropped)
    # spool_path = "/var/lib/fleet-server/spool-fleet-server-1.sqlite3"
                                   # default: next to the registry, one per broker client_id

    [ingest]
    max_ahead_s = 600              # samples stamped further ahead of server time are
    max_behind_s = 691200          # quarantined, as are older ones (agent outbox: 7 days + 1)
    flood_per_minute = 600         # more messages a minute flag a terminal as flooding

    [registry]
    path = "/var/lib/fleet-server/registry.sqlite3"

    [api]
    host = "127.0.0.1"
    port = 8700

    [enrolment]                    # optional: enrol and renew terminals over HTTPS
    pki_dir = "/var/lib/kiosk-fleet/pki"   # made by `fleetctl ca init`
    host = "0.0.0.0"
    port = 8701
    public_url = "https://fleet.example.gov.cn:8701"  # as kiosks reach it (for renewals)
    upkeep_s = 60                  # revoke renewed-away certificates, keep the CRL fresh

    [mail]                         # optional: alert e-mails to site owners and district ops
    smtp_host = "smtp.example.gov.cn"
    smtp_port = 587
    security = "starttls"          # "starttls", "tls" or "none"
    # username = "fleet"; password_file = "/etc/fleet-server/smtp-password"
    from_address = "fleet@example.gov.cn"
    from_name = "政务服务自助终端运维"
    outbox_path = "/var/lib/fleet-server/mail.sqlite3"   # default: next to the registry;
                                   # server processes may share it (each mail goes out once)
    ack_url = "https://fleet.example.gov.cn:8700"     # acknowledge links point here
    ack_secret_file = "/etc/fleet-server/ack-secret"  # 16+ bytes, the same in every process

    [alerts]
    after_opening_s = 900          # down at night, still down this long after opening: alert
    peripheral_grace_s = 300
    remind_every_s = 14400
    escalate_after_s = 7200
    district_percent = 10          # ops get a district alert when this share of the
    district_min_down = 3          # district's terminals (and at least this many) are down
    stale_after_s = 180            # connected but silent: stale (no alert) ...
    heartbeat_timeout_s = 300      # ... and offline after this (a will that never came)
    planned_margin_s = 300         # a planned reboot not back by its time + this: offline
    [alerts.district_ops]
    "金山区" = ["ops@jinshan.example.gov.cn"]

    [[sites]]                      # placement of sites until the registry import arrives
    id = "zhujing-dqzx"
    name = "朱泾镇党群服务中心"
    town = "朱泾镇"
    district = "金山区"
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from fleet_protocol.ids import SiteIdField
from fleet_protocol.settings import SettingsError, parse_toml
from fleet_server.errors import ConfigError

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Unknown keys are errors: a typo must not silently fall back to a default."""


FilePath = Annotated[str, msgspec.Meta(min_length=1)]


class BrokerSettings(_Section, frozen=True, kw_only=True):
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)] = "127.0.0.1"
    port: Port = 8884
    ca_file: FilePath
    cert_file: FilePath
    key_file: FilePath
    client_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}\Z")] = "fleet-server-1"
    keepalive_s: Annotated[int, msgspec.Meta(ge=2, le=300)] = 30
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=30 * 86400)] = 86400
    #: Deliveries the broker may have in flight to this process, unacknowledged until their
    #: points are in InfluxDB. 1000 drained a backlog about 15 % faster than 200 here (bigger
    #: writes, and the window no longer runs dry while writes are out); above about 1,650
    #: a write is capped by ``[influx] batch_points`` and more window only queues deliveries
    #: (`bench/bench_ingest_throughput.py --receive-maximum`).
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1000
    share_group: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_-]{1,32}\Z")] = "fleet"


class InfluxSettings(_Section, frozen=True, kw_only=True):
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://")]
    database: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "kiosk"
    token: str | None = None
    #: A batch is written when it holds this many points, ``flush_interval_s`` after its first
    #: point, or at once when a quarter of the broker's Receive Maximum waits for
    #: acknowledgement (`fleet_server.batcher`), whichever comes first. With the defaults, a
    #: backlog drains in batches of a quarter of the window (250 messages, about 3,000 points
    #: of fleet-sim's telemetry), under ``batch_points``: larger windows stop paying off there.
    batch_points: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 5000
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    slow_write_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    spool_path: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    spool_max_mb: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] = 1024.0

    @property
    def spool_max_bytes(self) -> int:
        return max(1, int(self.spool_max_mb * 1024 * 1024))


#: The agent's outbox keeps a sample for 7 days at most (edge_agent ``[outbox] max_age_days``);
#: a day more covers a backlog that is still being replayed when it expires.
DEFAULT_MAX_BEHIND_S = 8 * 86400


class IngestSettings(_Section, frozen=True, kw_only=True):
    """Sanity bounds on what terminals send (see `fleet_server.ingest`)."""

    max_ahead_s: Annotated[float, msgspec.Meta(ge=0, le=366 * 86400)] = 600.0
    max_behind_s: Annotated[float, msgspec.Meta(gt=0, le=3660 * 86400)] = DEFAULT_MAX_BEHIND_S
    flood_per_minute: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 600


class RegistrySettings(_Section, frozen=True, kw_only=True):
    path: Annotated[str, msgspec.Meta(min_length=1)]


class ApiSettings(_Section, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8700


class EnrolmentSettings(_Section, frozen=True, kw_only=True):
    pki_dir: FilePath
    host: str = "127.0.0.1"
    port: Port = 8701
    public_url: Annotated[str, msgspec.Meta(pattern=r"^https://[^/]+")]
    upkeep_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0


class SiteSettings(_Section, frozen=True, kw_only=True):
    id: SiteIdField
    name: Name
    town: Name
    district: Name


Seconds = Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)]
Email = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\Z")]


class MailSettings(_Section, frozen=True, kw_only=True):
    smtp_host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    smtp_port: Port = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password_file: FilePath | None = None
    from_address: Email
    from_name: Name = "政务服务自助终端运维"
    timeout_s: Seconds = 30.0
    outbox_path: FilePath | None = None
    ack_url: Annotated[str, msgspec.Meta(pattern=r"^https?://")] | None = None
    ack_secret_file: FilePath | None = None

    def __post_init__(self) -> None:
        if (self.ack_url is None) != (self.ack_secret_file is None):
            raise ValueError("ack_url and ack_secret_file go together")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")


class AlertsSettings(_Section, frozen=True, kw_only=True):
    after_opening_s: Seconds = 900.0
    peripheral_grace_s: Seconds = 300.0
    district_grace_s: Seconds = 300.0
    remind_every_s: Seconds = 4 * 3600.0
    escalate_after_s: Seconds = 2 * 3600.0
    district_percent: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    district_min_down: Annotated[int, msgspec.Meta(ge=1)] = 3
    stale_after_s: Seconds = 180.0
    heartbeat_timeout_s: Seconds = 300.0
    planned_margin_s: Seconds = 300.0
    flap_window_s: Seconds = 600.0
    flap_threshold: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 4
    flap_quiet_s: Seconds = 600.0
    tick_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    district_ops: dict[str, list[Email]] = {}

    def __post_init__(self) -> None:
        if self.stale_after_s >= self.heartbeat_timeout_s:
            raise ValueError("stale_after_s must be below heartbeat_timeout_s")


class ServerConfig(_Section, frozen=True, kw_only=True):
    influx: InfluxSettings
    registry: RegistrySettings
    broker: BrokerSettings
    ingest: IngestSettings = IngestSettings()
    api: ApiSettings = ApiSettings()
    enrolment: EnrolmentSettings | None = None
    mail: MailSettings | None = None
    alerts: AlertsSettings = AlertsSettings()
    sites: list[SiteSettings] = []

    def __post_init__(self) -> None:
        ids = [s.id for s in self.sites]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"site ids listed twice: {', '.join(duplicates)}")

    @property
    def registry_path(self) -> Path:
        return Path(self.registry.path)

    @property
    def spool_path(self) -> Path:
        """``[influx] spool_path``, else next to the registry, named after the client id:
        server processes may share a registry, never a spool."""
        if self.influx.spool_path is not None:
            return Path(self.influx.spool_path)
        return self.registry_path.parent / f"spool-{self.broker.client_id}.sqlite3"

    @property
    def mail_outbox_path(self) -> Path:
        if self.mail is not None and self.mail.outbox_path is not None:
            return Path(self.mail.outbox_path)
        return self.registry_path.parent / "mail.sqlite3"


def parse_config(data: bytes, source: str) -> ServerConfig:
    try:
        return parse_toml(ServerConfig, data, source)
    except SettingsError as exc:
        raise ConfigError(str(exc)) from exc


def load_config(path: Path) -> ServerConfig:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    return parse_config(data, str(path))
