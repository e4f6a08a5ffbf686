"""Adapter: the agent's connection to the fleet broker (the only module that imports aiomqtt).

One connection at a time, for as long as the agent runs:
- every connection takes the next session number; the birth (retained) and the last will carry
  it, so a late will of an earlier connection is recognisably stale;
- ``clean_start=False`` with a session expiry, so what the server queued while we were away is
  delivered when we are back;
- reconnects with capped exponential backoff and full jitter;
- on stop, the backlog is flushed (bounded in time), a retained "shutdown" state is published
  and the connection is closed with a normal DISCONNECT, so the broker does not send the will.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.backlog import Backlog
from edge_agent.backoff import backoff_delays
from edge_agent.config import BrokerSettings
from fleet_protocol.codec import encode
from fleet_protocol.ids import SiteId, TerminalId
from fleet_protocol.messages import State
from fleet_protocol.topics import Channel, topic

FLUSH_ON_STOP_S = 5.0


class _LinkLost(Exception):
    """The watcher saw the connection go away."""


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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay)

    def _client(self, session: int) -> aiomqtt.Client:
        will = State(online=False, session=session, ts=self._now_ms(), reason="lost")
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._broker.session_expiry_s
        return aiomqtt.Client(
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
            await client.publish(self._state_topic, encode(birth), qos=1, retain=True)
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
                await client.publish(self._state_topic, encode(final), qos=1, retain=True)
                watcher.cancel()
            self._log.info("published shutdown state; disconnecting")

    async def _watch_link(self, client: aiomqtt.Client) -> None:
        # Iterating messages is how aiomqtt reports a dropped connection while we are idle.
        async for _ in client.messages:
            pass
        raise _LinkLost("message stream ended")

    async def _pump(self, client: aiomqtt.Client, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            item = self._backlog.peek()
            if item is None:
                await self._backlog.changed()
                continue
            await client.publish(item.topic, item.payload, qos=1, retain=item.retain)
            self._backlog.done(item)

    async def _flush(self, client: aiomqtt.Client) -> None:
        try:
            async with asyncio.timeout(FLUSH_ON_STOP_S):
                while (item := self._backlog.peek()) is not None:
                    await client.publish(item.topic, item.payload, qos=1, retain=item.retain)
                    self._backlog.done(item)
        except TimeoutError:
            self._log.warning("stopping with %d messages unsent", len(self._backlog))
