"""A UPS read through NUT's ``upsd`` over TCP: a :class:`~firmware_bridge.watch.Device`.

One TCP connection is kept open between polls (upsd allows long-lived clients, and a reconnect
per poll would be a log line per poll on upsd's side). When it fails, the
:class:`~firmware_bridge.link.Connection` opens a new one on the next poll. A connection that
upsd closed while it sat idle (upsd restarted) fails on its first use; that one poll is retried
once on a fresh connection, so a restarted upsd costs no absent reading.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from firmware_bridge.errors import BridgeError, ConfigError, DeviceTimeout, DeviceUnavailable
from firmware_bridge.health import Assessment
from firmware_bridge.link import Connection, Endpoint
from firmware_bridge.nut import protocol
from firmware_bridge.nut.protocol import UpsEvent, UpsEventTracker, UpsStatus
from firmware_bridge.watch import DeviceWatch, Observation

# Link failures that mean "the kept-open connection was dead", worth one fresh try; a timeout is
# not among them: a upsd that does not answer would only double the wait.
_STALE_CONNECTION = frozenset({"disconnected", "io_error", "closed"})
_LOGOUT_TIMEOUT_S = 0.5


class NutUps:
    """One UPS served by ``upsd`` at ``endpoint`` (``tcp://host:port``) as ``ups_name``."""

    def __init__(
        self,
        name: str,
        endpoint: Endpoint | str,
        ups_name: str,
        *,
        timeout_s: float = 2.0,
    ) -> None:
        if isinstance(endpoint, str):
            endpoint = Endpoint(endpoint, connect_timeout_s=timeout_s)
        if endpoint.kind != "tcp":
            raise ConfigError(f"url: {endpoint.url!r}: upsd is reached as tcp://host:port")
        if not (0 < timeout_s <= 60) or math.isnan(timeout_s):
            raise ConfigError(f"timeout_s: {timeout_s} is not in (0, 60]")
        self._name = name
        self.ups_name = protocol.check_name(ups_name, "ups_name")
        self.timeout_s = timeout_s
        self._connection = Connection(endpoint)

    @property
    def name(self) -> str:
        return self._name

    @property
    def endpoint(self) -> Endpoint:
        return self._connection.endpoint

    @property
    def connects(self) -> int:
        """How many TCP connections were opened so far (one while upsd stays up)."""
        return self._connection.opens

    async def poll(self) -> UpsStatus:
        """``LIST VAR`` of the UPS, as a typed status."""
        reused = self._connection.connected
        try:
            variables = await self._list_var()
        except DeviceTimeout:
            raise
        except DeviceUnavailable as exc:
            if not (reused and exc.reason in _STALE_CONNECTION):
                raise
            variables = await self._list_var()
        return protocol.status_from_variables(self.ups_name, variables)

    async def _list_var(self) -> dict[str, str]:
        return await self._connection.exchange(
            protocol.list_var(self.ups_name),
            protocol.VarListReceiver(self.ups_name),
            self.timeout_s,
        )

    def assess(self, status: UpsStatus) -> Assessment:
        return protocol.assess(status)

    async def close(self) -> None:
        """Say LOGOUT if connected (best effort: upsd may be gone) and close the connection."""
        if self._connection.connected:
            # Closing anyway; a upsd that cannot take a LOGOUT drops the socket itself.
            with contextlib.suppress(BridgeError):
                await self._connection.exchange(
                    protocol.logout(), protocol.OkReceiver(), _LOGOUT_TIMEOUT_S
                )
        await self._connection.close()


@dataclass(frozen=True, slots=True)
class UpsEventSeen:
    """An event with the observation that showed it."""

    event: UpsEvent
    observation: Observation[UpsStatus]


async def ups_events(watch: DeviceWatch[UpsStatus]) -> AsyncGenerator[UpsEventSeen, None]:
    """The events of a watched UPS, in order, built on :meth:`DeviceWatch.changes`.

    Failed polls and readings without a known power source are skipped (see
    :class:`~firmware_bridge.nut.protocol.UpsEventTracker`). The device is closed when the
    generator is closed, as ``changes`` does: iterate it under ``contextlib.aclosing``.
    """
    tracker = UpsEventTracker()
    async for observation in watch.changes():
        for event in tracker.update(observation.status):
            yield UpsEventSeen(event, observation)
