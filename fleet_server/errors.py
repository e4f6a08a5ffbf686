"""The fleet server's exception tree.

FleetServerError
├── ConfigError            the operator's config is wrong (names file and field)
├── StoreError             the time-series store
│   ├── InfluxUnavailable  not reachable, timed out or 5xx: the write may be retried
│   └── InfluxRejected     4xx: the data or query itself is wrong, retrying will not help
├── RegistryError          the registry database
└── MqttProtocolError      the broker sent bytes that are not valid MQTT 5 (its fault, not ours)
"""

from __future__ import annotations


class FleetServerError(Exception):
    """Base of every error raised by fleet_server."""


class ConfigError(FleetServerError):
    """A configuration file that cannot be used; the message names the file and field."""


class StoreError(FleetServerError):
    """The time-series store failed."""


class InfluxUnavailable(StoreError):
    """InfluxDB could not be reached or failed on its side; retry later."""


class InfluxRejected(StoreError):
    """InfluxDB refused the request as invalid; retrying the same request will not help."""


class RegistryError(FleetServerError):
    """The registry database failed."""


class MqttProtocolError(FleetServerError):
    """The broker sent something MQTT 5.0 does not allow (malformed or unexpected packet); the
    connection cannot be trusted any more and is dropped. The message names the problem."""
