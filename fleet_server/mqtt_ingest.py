"""Adapter: the server's subscription to the fleet (the only fleet_server module importing aiomqtt).

Nothing is acknowledged before it is safe. The client acknowledges a delivery (PUBACK) only
when the caller says so, after the data is in InfluxDB or the registry; MQTT 5's Receive
Maximum then caps how many unacknowledged deliveries the broker sends us, which is what bounds
the incoming queue. A backlog stays in the broker's queue (sized for it in the broker config)
rather than in our memory, and whatever was in flight when the connection dropped is delivered
again on reconnect (a persistent session: fixed client id, ``clean_start=False``).

aiomqtt does not expose paho's manual acknowledgement; it is switched on here, on the wrapped
paho client, and nowhere else.

Subscriptions:
- telemetry through a shared subscription (``$share/<group>/...``): with several server
  processes each message goes to one of them;
- state through a plain subscription: every process sees every terminal's presence, including
  the retained states when it (re)starts. Presence updates are idempotent (session ordering),
  so processing them in every process is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_protocol.topics import Channel, fleet_filter, shared_filter
from fleet_server.config import BrokerSettings

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message from the broker; call ``ack`` once it is safely stored."""

    topic: str
    payload: bytes
    ack: Callable[[], None]


Handler = Callable[[Delivery], Awaitable[None]]


class MqttIngest:
    def __init__(self, settings: BrokerSettings, logger: logging.Logger) -> None:
        self._settings = settings
        self._log = logger
        self.connected = asyncio.Event()

    def _client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._settings.session_expiry_s
        props.ReceiveMaximum = self._settings.receive_maximum
        client = aiomqtt.Client(
            self._settings.host,
            self._settings.port,
            identifier=self._settings.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            keepalive=self._settings.keepalive_s,
            properties=props,
            # QoS 1 is bounded by Receive Maximum; this only bounds stray QoS 0 publishes.
            max_queued_incoming_messages=2 * self._settings.receive_maximum,
        )
        client._client.manual_ack_set(True)  # noqa: SLF001 - see module docstring
        return client

    async def run(self, handle: Handler, stopping: asyncio.Event) -> None:
        """Deliver messages to ``handle`` until ``stopping``; reconnects on its own."""
        delay = RECONNECT_MIN_S
        while not stopping.is_set():
            try:
                await self._session(handle, stopping)
            except* aiomqtt.MqttError as group:
                self._log.warning(
                    "broker %s:%d: %s; retrying in %.1f s",
                    self._settings.host,
                    self._settings.port,
                    "; ".join(str(e) for e in group.exceptions),
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
            else:
                delay = RECONNECT_MIN_S

    async def _session(self, handle: Handler, stopping: asyncio.Event) -> None:
        async with self._client() as client:
            paho = client._client  # noqa: SLF001 - manual acknowledgement, see module docstring
            live = True

            def acker(mid: int, qos: int) -> Callable[[], None]:
                def ack() -> None:
                    # After a reconnect the broker redelivers; an ack for the old link is moot.
                    if live and qos > 0:
                        paho.ack(mid, qos)

                return ack

            group = self._settings.share_group
            await client.subscribe(
                [
                    (fleet_filter(Channel.STATE), 1),
                    (shared_filter(Channel.TELEMETRY, group), 1),
                ]
            )
            self.connected.set()
            self._log.info(
                "subscribed at %s:%d as %s",
                self._settings.host,
                self._settings.port,
                self._settings.client_id,
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    reader = tg.create_task(self._read(client, handle, acker), name="ingest-read")
                    await stopping.wait()
                    reader.cancel()
            finally:
                live = False
                self.connected.clear()

    async def _read(
        self,
        client: aiomqtt.Client,
        handle: Handler,
        acker: Callable[[int, int], Callable[[], None]],
    ) -> None:
        async for message in client.messages:
            payload = message.payload
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            await handle(Delivery(message.topic.value, data, acker(message.mid, message.qos)))
