"""Adapter: the agent's connection to the fleet broker (the only module that imports aiomqtt).

One connection at a time, for as long as the agent runs:
- every connection takes the next session number; the birth (retained) and the last will carry
  it, so a late will of an earlier connection is recognisably stale;
- ``clean_start=False`` with a session expiry, so what the server queued while we were away is
  delivered when we are back;
- reconnects with capped exponential backoff and full jitter;
- on stop, the backlog is flushed (bounded in time), a retained "shutdown" state is published
  and the connection is closed with a normal DISCONNECT, so the broker does not send the will;
- a message leaves the backlog only when the broker's PUBACK says it went somewhere. MQTT 5
  brokers answer "No matching subscribers" (0x10) when nobody subscribes; Mosquitto 2.0 does
  not restore shared subscriptions from its persistence file, so right after a broker restart,
  until the fleet server has subscribed again, telemetry would otherwise be acknowledged and
  dropped. Such a message stays at the head of the backlog and is offered again a little
  later. A refusal (reason >= 0x80, e.g. not authorised) is logged and dropped: retrying it
  would block everything behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTT_ERR_SUCCESS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.backlog import Backlog, Outgoing
from edge_agent.backoff import backoff_delays
from edge_agent.config import BrokerSettings
from edge_agent.stopping import sleep_unless_stopped
from fleet_protocol.codec import encode
from fleet_protocol.ids import SiteId, TerminalId
from fleet_protocol.messages import State
from fleet_protocol.topics import Channel, topic

FLUSH_ON_STOP_S = 5.0
NO_MATCHING_SUBSCRIBERS = 0x10
FIRST_FAILURE = 0x80
#: How long an undeliverable message waits before it is offered again (doubling up to max).
UNDELIVERED_RETRY_MIN_S = 0.5
UNDELIVERED_RETRY_MAX_S = 15.0


class _LinkLost(Exception):
    """The watcher saw the connection go away."""


class _PubackClient(aiomqtt.Client):
    """aiomqtt's client, also telling what the broker's PUBACK said (aiomqtt drops it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: dict[int, asyncio.Future[int]] = {}

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        waiter = self._waiting.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(int(reason_code.value))
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(self, topic: str, payload: bytes, *, retain: bool) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0 = delivered)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        # PUBACK is read on this event loop, so it cannot arrive before the waiter exists.
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[info.mid] = waiter
        try:
            async with asyncio.timeout(self.timeout):
                return await waiter
        except TimeoutError as exc:
            raise aiomqtt.MqttError("no PUBACK within the timeout") from exc
        finally:
            self._waiting.pop(info.mid, None)


class MqttUplink:
    def __init__(
        self,
        terminal: TerminalId,
        site: SiteId,
        broker: BrokerSettings,
        *,
        backlog: Backlog,
        next_session: Callable[[], Awaitable[int]],
        now_ms: Callable[[], int],
        agent_version: str,
        logger: logging.Logger,
    ) -> None:
        self._terminal = terminal
        self._site = site
        self._broker = broker
        self._backlog = backlog
        self._next_session = next_session
        self._now_ms = now_ms
        self._agent_version = agent_version
        self._log = logger
        self._state_topic = topic(terminal, Channel.STATE)
        self.connected = asyncio.Event()
        self.session: int | None = None
        self.connects = 0
        self.refused = 0

    async def run(self, stopping: asyncio.Event) -> None:
        delays = backoff_delays(self._broker.reconnect_min_s, self._broker.reconnect_max_s)
        while not stopping.is_set():
            session = await self._next_session()
            try:
                await self._connected_session(session, stopping)
            except* (aiomqtt.MqttError, _LinkLost) as group:
                self._log.warning(
                    "broker %s:%d: not connected (%s)",
                    self._broker.host,
                    self._broker.port,
                    "; ".join(str(e) or type(e).__name__ for e in group.exceptions),
                )
            else:
                return
            finally:
                self.connected.clear()
            if self.connects:  # after a working connection, start the backoff from the bottom
                delays = backoff_delays(self._broker.reconnect_min_s, self._broker.reconnect_max_s)
                self.connects = 0
            delay = next(delays)
            self._log.info("reconnecting in %.1f s", delay)
            await sleep_unless_stopped(stopping, delay)

    def _client(self, session: int) -> _PubackClient:
        will = State(online=False, session=session, ts=self._now_ms(), reason="lost")
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._broker.session_expiry_s
        return _PubackClient(
            self._broker.host,
            self._broker.port,
            identifier=self._terminal,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(self._state_topic, encode(will), qos=1, retain=True),
            clean_start=False,
            keepalive=self._broker.keepalive_s,
            properties=props,
            timeout=max(10.0, self._broker.keepalive_s),
        )

    async def _connected_session(self, session: int, stopping: asyncio.Event) -> None:
        async with self._client(session) as client:
            birth = State(
                online=True,
                session=session,
                ts=self._now_ms(),
                site=self._site,
                agent_version=self._agent_version,
            )
            await client.publish_acked(self._state_topic, encode(birth), retain=True)
            self.session = session
            self.connects += 1
            self.connected.set()
            self._log.info(
                "connected to %s:%d as %s (session %d)",
                self._broker.host,
                self._broker.port,
                self._terminal,
                session,
            )
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(self._watch_link(client), name="uplink-watch")
                await self._pump(client, stopping)
                await self._flush(client)
                final = State(online=False, session=session, ts=self._now_ms(), reason="shutdown")
                await client.publish_acked(self._state_topic, encode(final), retain=True)
                watcher.cancel()
            self._log.info("published shutdown state; disconnecting")

    async def _watch_link(self, client: _PubackClient) -> None:
        # Iterating messages is how aiomqtt reports a dropped connection while we are idle.
        async for _ in client.messages:
            pass
        raise _LinkLost("message stream ended")

    async def _pump(self, client: _PubackClient, stopping: asyncio.Event) -> None:
        retry = UNDELIVERED_RETRY_MIN_S
        while not stopping.is_set():
            item = self._backlog.peek()
            if item is None:
                await self._backlog.changed()
                continue
            if await self._offer(client, item):
                retry = UNDELIVERED_RETRY_MIN_S
                continue
            self._log.info(
                "no subscriber for %s yet; offering it again in %.1f s", item.topic, retry
            )
            await sleep_unless_stopped(stopping, retry)
            retry = min(UNDELIVERED_RETRY_MAX_S, retry * 2)

    async def _offer(self, client: _PubackClient, item: Outgoing) -> bool:
        """Publish the backlog's head; True if it left the backlog."""
        reason = await client.publish_acked(item.topic, item.payload, retain=item.retain)
        if reason == NO_MATCHING_SUBSCRIBERS and not item.retain:
            return False  # a retained message is stored by the broker all the same
        if reason >= FIRST_FAILURE:
            self.refused += 1
            self._log.error(
                "broker refused a message on %s (reason 0x%02x); dropped", item.topic, reason
            )
        self._backlog.done(item)
        return True

    async def _flush(self, client: _PubackClient) -> None:
        try:
            async with asyncio.timeout(FLUSH_ON_STOP_S):
                while (item := self._backlog.peek()) is not None:
                    if not await self._offer(client, item):
                        break  # nobody to take it now; it stays for the next run
        except TimeoutError:
            pass
        if self._backlog:
            self._log.warning("stopping with %d messages unsent", len(self._backlog))
