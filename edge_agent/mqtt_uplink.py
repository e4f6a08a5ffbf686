"""Adapter: the agent's connection to the fleet broker (the only module that imports aiomqtt).

One connection at a time, for as long as the agent runs:
- always TLS with the terminal's client certificate (the broker knows the terminal by it). The
  TLS context is built afresh for every connection, so a renewed identity is used at the next
  connect; a refused certificate (revoked, expired) is a failed connection like any other:
  logged with the broker's reason, then retried with backoff;
- every connection takes the next session number; the birth (retained) and the last will carry
  it, so a late will of an earlier connection is recognisably stale;
- ``clean_start=False`` with a session expiry and a QoS 1 subscription to this terminal's
  ``cmd/+``, so commands the server sent while we were away are delivered when we are back;
  they are handed on undecoded (``on_command``): the command runner judges them;
- reconnects with capped exponential backoff and full jitter;
- ``request_reconnect()`` ends the connection normally (a DISCONNECT, no will, no "shutdown"
  state) and connects again at once, keeping the outbox: how a renewed certificate is put to
  use without waiting for the next network failure;
- everything else it publishes comes from the on-disk outbox (:mod:`edge_agent.store`), oldest
  first. What was waiting when the connection came up is the backlog: paced to
  ``replay_rate`` messages a second and marked historical. A message leaves the outbox only when
  the broker's PUBACK says it went somewhere. MQTT 5 brokers answer "No matching subscribers"
  (0x10) when nobody subscribes; Mosquitto 2.0 does not restore shared subscriptions from its
  persistence file, so right after a broker restart, until the fleet server has subscribed
  again, telemetry would otherwise be acknowledged and dropped. Such a message stays at the head
  of the outbox and is offered again a little later. A refusal (reason >= 0x80, e.g. not
  authorised) is logged and dropped: retrying it would block everything behind it;
- ``announce_planned()`` publishes the retained state "planned" with the expected return time
  before a reboot someone asked for; the state at stop is then "planned" as well;
- on stop, the outbox is flushed (bounded in time; the rest stays on disk), a retained
  "shutdown" (or "planned") state is published and the connection is closed with a normal
  DISCONNECT, so the broker does not send the will;
- ``cut_link()`` drops the connection without DISCONNECT, for fault injection in ``fleet-sim``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTT_ERR_SUCCESS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.backoff import backoff_delays
from edge_agent.config import BrokerSettings, TlsSettings
from edge_agent.errors import IdentityError
from edge_agent.identity import BrokerTlsContext, broker_context, describe_tls_failure
from edge_agent.outbox import ReplayPace, Stored, as_historical
from edge_agent.stopping import sleep_unless_stopped
from edge_agent.store import Outbox
from fleet_protocol.codec import encode
from fleet_protocol.errors import TopicError
from fleet_protocol.ids import SiteId, TerminalId
from fleet_protocol.messages import State
from fleet_protocol.topics import Channel, parse, topic

FLUSH_ON_STOP_S = 5.0
NO_MATCHING_SUBSCRIBERS = 0x10
FIRST_FAILURE = 0x80
#: How long an undeliverable message waits before it is offered again (doubling up to max).
UNDELIVERED_RETRY_MIN_S = 0.5
UNDELIVERED_RETRY_MAX_S = 15.0
#: Messages read from the outbox at a time.
OUTBOX_BATCH = 64
REPLAY_BURST = 20


@dataclass(frozen=True, slots=True)
class IncomingCommand:
    """A message on one of this terminal's ``cmd/{name}`` topics, not yet decoded."""

    name: str
    payload: bytes
    correlation: bytes | None


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

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        # aiomqtt ignores a connection that ends before CONNACK and waits out its whole
        # timeout; a broker refusing our certificate ends it exactly there. Fail at once.
        if not self._connected.done():
            self._connected.set_exception(
                aiomqtt.MqttError("the broker closed the connection before accepting it")
            )
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # aiomqtt's housekeeping task runs paho's loop_misc once a second. paho 2.2 does not
        # note the time of a write that empties its queue, so right after disconnect() it may
        # take a keep-alive ping for overdue and close the socket before the DISCONNECT went
        # out: the broker then publishes the will ("lost") instead of our "shutdown" or
        # "planned" (56 of 5,000 simulated kiosks at one stop). Nothing needs housekeeping now.
        misc = self._misc_task
        if misc is not None and not misc.done():
            misc.cancel()
        try:
            await super().__aexit__(exc_type, exc, tb)
        finally:
            # aiomqtt leaves the error of a connection lost under it unread in this future
            # when the context exits early (the agent cancelled: a fleet-sim power cut), and
            # asyncio then logs "Future exception was never retrieved" when it is collected.
            # The loss itself was already handled (the uplink reconnects); read it here.
            lost = self._disconnected
            if lost.done() and not lost.cancelled():
                lost.exception()

    async def publish_acked(
        self, topic: str, payload: bytes, *, retain: bool, correlation: bytes | None = None
    ) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0 = delivered)."""
        props = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
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

    def cut(self) -> None:
        """Drop the TCP connection without a DISCONNECT, as a power cut or a dead link does.

        The broker sees the connection end without DISCONNECT and publishes the last will.
        """
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):  # already gone
                sock.shutdown(socket.SHUT_RDWR)


class MqttUplink:
    def __init__(
        self,
        terminal: TerminalId,
        site: SiteId,
        broker: BrokerSettings,
        tls: TlsSettings,
        *,
        server_name: str | None = None,
        outbox: Outbox,
        next_session: Callable[[], Awaitable[int]],
        now_ms: Callable[[], int],
        agent_version: str,
        logger: logging.Logger,
        on_command: Callable[[IncomingCommand], None] | None = None,
        replay_rate: float = 50.0,
    ) -> None:
        self._terminal = terminal
        self._site = site
        self._broker = broker
        self._tls = tls
        self._server_name = server_name or broker.host
        self._outbox = outbox
        self._next_session = next_session
        self._now_ms = now_ms
        self._agent_version = agent_version
        self._log = logger
        self._on_command = on_command
        self._replay_rate = replay_rate
        self._state_topic = topic(terminal, Channel.STATE)
        self._cmd_filter = f"{topic(terminal, Channel.CMD_RESULT)[: -len('cmd-result')]}cmd/+"
        self.connected = asyncio.Event()
        self._reconnect = asyncio.Event()
        self._client_now: _PubackClient | None = None
        self._planned_back_ms: int | None = None
        self.session: int | None = None
        self.connects = 0
        self.refused = 0
        #: Wall-clock ms since when connected (or disconnected); None before the first attempt.
        self.since_ms: int | None = None
        #: Publish-to-PUBACK time of the last message, ms.
        self.rtt_ms: float | None = None
        self.replayed = 0

    def request_reconnect(self) -> None:
        """End the current connection normally and connect again at once (e.g. after renewal).

        Nothing queued is lost: the outbox stays, the next connection publishes it. Without a
        connection, the next attempt uses the new identity anyway.
        """
        self._reconnect.set()
        self._outbox.wake()

    def cut_link(self) -> None:
        """Drop the connection the way a failing network does (no DISCONNECT; the broker sends
        the will). The uplink reconnects as after any loss. For fault injection."""
        if self._client_now is not None:
            self._client_now.cut()

    async def announce_planned(self, expected_back_ms: int) -> bool:
        """Publish the retained state "planned" before a reboot or restart; True if it reached
        the broker. The final state at stop is then "planned" too, not "shutdown", so the
        server raises no offline alert for a reboot someone asked for."""
        self._planned_back_ms = expected_back_ms
        client, session = self._client_now, self.session
        if client is None or session is None:
            return False
        try:
            await client.publish_acked(
                self._state_topic, encode(self._planned_state(session)), retain=True
            )
        except aiomqtt.MqttError as exc:
            self._log.warning("could not announce the planned restart: %s", exc)
            return False
        return True

    def cancel_planned(self) -> None:
        """The planned reboot did not happen: connect again, so a new birth (with a new session,
        which the server cannot take for a stale one) replaces the retained "planned"."""
        if self._planned_back_ms is None:
            return
        self._planned_back_ms = None
        self.request_reconnect()

    def _planned_state(self, session: int) -> State:
        return State(
            online=False,
            session=session,
            ts=self._now_ms(),
            reason="planned",
            expected_back=self._planned_back_ms,
        )

    async def run(self, stopping: asyncio.Event) -> None:
        delays = backoff_delays(self._broker.reconnect_min_s, self._broker.reconnect_max_s)
        self.since_ms = self._now_ms()
        while not stopping.is_set():
            # A request made before this attempt is met by it: it uses the identity file as
            # it is now.
            self._reconnect.clear()
            if await self._attempt(stopping):
                if stopping.is_set() or not self._reconnect.is_set():
                    return
                self._log.info("reconnecting to use the renewed certificate")
                continue
            if self.connects:  # after a working connection, start the backoff from the bottom
                delays = backoff_delays(self._broker.reconnect_min_s, self._broker.reconnect_max_s)
                self.connects = 0
            delay = next(delays)
            self._log.info("reconnecting in %.1f s", delay)
            await sleep_unless_stopped(stopping, delay)

    async def _attempt(self, stopping: asyncio.Event) -> bool:
        """One connection, from TLS set-up to its end; False if it failed."""
        try:
            tls = await asyncio.to_thread(broker_context, self._tls, self._server_name)
        except IdentityError as exc:
            # The agent checked the identity at start; this is a file changed since. Keep
            # trying: a fixed file (or a renewal) heals it without a restart.
            self._log.error("cannot connect: %s", exc)
            return False
        session = await self._next_session()
        ended_normally = False
        try:
            await self._connected_session(session, tls, stopping)
            ended_normally = True
        except* (aiomqtt.MqttError, _LinkLost) as group:
            self._log_failure(tls, group.exceptions)
        finally:
            if self.connected.is_set():
                self.since_ms = self._now_ms()
            self.connected.clear()
            self._client_now = None
        return ended_normally

    def _log_failure(self, tls: BrokerTlsContext, errors: Sequence[BaseException]) -> None:
        where = f"{self._broker.host}:{self._broker.port}"
        if tls.failure is not None:
            # The MQTT library reports a TLS alert as a lost connection or a timeout; the
            # alert itself is what tells the operator to re-enrol.
            self._log.error("broker %s: %s", where, describe_tls_failure(tls.failure))
            return
        self._log.warning(
            "broker %s: not connected (%s)",
            where,
            "; ".join(str(e) or type(e).__name__ for e in errors),
        )

    def _client(self, session: int, tls: BrokerTlsContext) -> _PubackClient:
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
            tls_context=tls,
        )

    async def _connected_session(
        self, session: int, tls: BrokerTlsContext, stopping: asyncio.Event
    ) -> None:
        async with self._client(session, tls) as client:
            self._client_now = client
            # With clean_start=False the broker keeps this subscription for the session's
            # expiry, and queues commands for us meanwhile; subscribing again is harmless and
            # covers a session that expired.
            await client.subscribe(self._cmd_filter, qos=1)
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
            self.since_ms = self._now_ms()
            self.connected.set()
            self._log.info(
                "connected to %s:%d as %s (session %d)",
                self._broker.host,
                self._broker.port,
                self._terminal,
                session,
            )
            # What is waiting now is the backlog: history, also when it goes out at stop.
            live_from = await self._outbox.newest_id()
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(self._watch_link(client), name="uplink-watch")
                await self._pump(client, stopping, live_from)
                if self._reconnect.is_set() and not stopping.is_set():
                    # A normal DISCONNECT (leaving the context) keeps the will unsent; the
                    # next birth replaces this one at once.
                    watcher.cancel()
                    return
                await self._flush(client, live_from)
                final = (
                    self._planned_state(session)
                    if self._planned_back_ms is not None
                    else State(online=False, session=session, ts=self._now_ms(), reason="shutdown")
                )
                await client.publish_acked(self._state_topic, encode(final), retain=True)
                watcher.cancel()
            self._log.info("published %s state; disconnecting", final.reason)

    async def _watch_link(self, client: _PubackClient) -> None:
        # Iterating messages is how aiomqtt reports a dropped connection while we are idle;
        # it is also where commands arrive.
        async for message in client.messages:
            self._dispatch(message)
        raise _LinkLost("message stream ended")

    def _dispatch(self, message: aiomqtt.Message) -> None:
        try:
            where = parse(str(message.topic))
        except TopicError:
            self._log.warning("ignored a message on unexpected topic %s", message.topic)
            return
        if where.command is None or where.terminal != self._terminal:
            return
        payload = message.payload if isinstance(message.payload, bytes) else b""
        correlation = getattr(message.properties, "CorrelationData", None)
        if self._on_command is not None:
            self._on_command(
                IncomingCommand(
                    name=where.command,
                    payload=payload,
                    correlation=correlation if isinstance(correlation, bytes) else None,
                )
            )

    async def _pump(self, client: _PubackClient, stopping: asyncio.Event, live_from: int) -> None:
        """Publish the outbox in order: the backlog (ids up to ``live_from``) paced and marked
        historical, then live."""
        loop = asyncio.get_running_loop()
        pace = ReplayPace(self._replay_rate, REPLAY_BURST, loop.time())
        retry = UNDELIVERED_RETRY_MIN_S
        while not (stopping.is_set() or self._reconnect.is_set()):
            batch = await self._outbox.head(OUTBOX_BATCH)
            if not batch:
                await self._outbox.changed()
                continue
            sent: list[int] = []
            undelivered: Stored | None = None
            try:
                for stored in batch:
                    if stopping.is_set() or self._reconnect.is_set():
                        break
                    backlog = stored.id <= live_from
                    if backlog:
                        wait = pace.wait_s(loop.time())
                        if wait > 0:
                            await self._pause(stopping, wait)
                            if stopping.is_set() or self._reconnect.is_set():
                                break
                    if not await self._offer(client, stored, historical=backlog):
                        undelivered = stored
                        break
                    sent.append(stored.id)
                    self.replayed += backlog
            finally:
                # Also when the link drops mid-batch: what was acknowledged is not sent again.
                await self._outbox.delete(sent)
            if undelivered is None:
                retry = UNDELIVERED_RETRY_MIN_S
                continue
            self._log.info(
                "no subscriber for %s yet; offering it again in %.1f s",
                undelivered.message.topic,
                retry,
            )
            await self._pause(stopping, retry)
            retry = min(UNDELIVERED_RETRY_MAX_S, retry * 2)

    async def _pause(self, stopping: asyncio.Event, seconds: float) -> None:
        """Sleep, cut short by a stop or a reconnect request."""
        waits = [
            asyncio.create_task(stopping.wait(), name="uplink-pause-stop"),
            asyncio.create_task(self._reconnect.wait(), name="uplink-pause-reconnect"),
        ]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _offer(self, client: _PubackClient, stored: Stored, *, historical: bool) -> bool:
        """Publish one message; True if it may leave the outbox."""
        item = stored.message
        payload = as_historical(stored) if historical else item.payload
        started = time.perf_counter()
        reason = await client.publish_acked(
            item.topic, payload, retain=item.retain, correlation=item.correlation
        )
        self.rtt_ms = (time.perf_counter() - started) * 1000
        if reason == NO_MATCHING_SUBSCRIBERS and not item.retain:
            return False  # a retained message is stored by the broker all the same
        if reason >= FIRST_FAILURE:
            self.refused += 1
            self._log.error(
                "broker refused a message on %s (reason 0x%02x); dropped", item.topic, reason
            )
        return True

    async def _flush(self, client: _PubackClient, live_from: int) -> None:
        """At stop: publish what is waiting, for a few seconds at most; the rest stays on disk.

        Not paced, but what was backlog is still marked historical."""
        try:
            async with asyncio.timeout(FLUSH_ON_STOP_S):
                while batch := await self._outbox.head(OUTBOX_BATCH):
                    sent: list[int] = []
                    try:
                        for stored in batch:
                            backlog = stored.id <= live_from
                            if not await self._offer(client, stored, historical=backlog):
                                return  # nobody to take it now; it stays for the next run
                            sent.append(stored.id)
                            self.replayed += backlog
                    finally:
                        await self._outbox.delete(sent)
        except TimeoutError:
            pass
        finally:
            if self._outbox:
                self._log.info("stopping with %d messages kept for the next run", len(self._outbox))
