"""The agent's configuration: one TOML file, validated once, then typed values only.

Example (every section but ``terminal`` may be left out)::

    [terminal]
    id = "zhujing-dqzx-01"          # also the certificate CN and the MQTT topic level
    site = "zhujing-dqzx"

    [broker]
    host = "127.0.0.1"
    port = 1883
    keepalive_s = 30                # the broker declares us lost after 1.5 x this
    session_expiry_s = 604800       # commands queued while away are kept this long

    [telemetry]
    interval_s = 15                 # one system sample every interval
    batch_size = 4                  # publish when this many samples are waiting ...
    max_batch_age_s = 60            # ... or when the oldest has waited this long

    [storage]
    state_dir = "/var/lib/kiosk-agent"
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from edge_agent.errors import AgentConfigError
from fleet_protocol.ids import SiteIdField, TerminalIdField
from fleet_protocol.settings import SettingsError, parse_toml

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Unknown keys are errors in config: a typo must not silently fall back to a default."""


class TerminalSettings(_Section, frozen=True, kw_only=True):
    id: TerminalIdField
    site: SiteIdField


class BrokerSettings(_Section, frozen=True, kw_only=True):
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)] = "127.0.0.1"
    port: Port = 1883
    keepalive_s: Annotated[int, msgspec.Meta(ge=2, le=300)] = 30
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=30 * 86400)] = 7 * 86400
    reconnect_min_s: Seconds = 1.0
    reconnect_max_s: Seconds = 60.0

    def __post_init__(self) -> None:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")


class TelemetrySettings(_Section, frozen=True, kw_only=True):
    interval_s: Seconds = 15.0
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 4
    max_batch_age_s: Seconds = 60.0
    #: In-memory backlog bound while the broker is unreachable; oldest batches go first.
    max_backlog_batches: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000


class StorageSettings(_Section, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/kiosk-agent"


class AgentConfig(_Section, frozen=True, kw_only=True):
    terminal: TerminalSettings
    broker: BrokerSettings = BrokerSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    storage: StorageSettings = StorageSettings()

    @property
    def state_dir(self) -> Path:
        return Path(self.storage.state_dir)


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
