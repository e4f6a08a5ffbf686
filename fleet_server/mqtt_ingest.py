"""Adapter: the server's subscription to the fleet, an MQTT 5 client on asyncio's own TLS
transport (the packets are :mod:`fleet_server.mqtt_wire`; this module owns the connection).

A subscriber's whole job per message is: parse a PUBLISH, hand it over, send a PUBACK. General
clients spend most of the server's CPU on that (a properties object per PUBLISH, wrapper
objects, a queue, a socket write per PUBACK, a worker thread), so the server speaks MQTT
itself: one ``asyncio.Protocol`` per connection, the decoder fed straight from
``data_received``, and the acknowledgements of one event-loop turn written together.

Nothing is acknowledged before it is safe. A delivery's PUBACK is sent only when the caller
calls its ``ack``, after the data is in InfluxDB or the registry; MQTT 5's Receive Maximum
then caps how many unacknowledged deliveries the broker sends us, which is what bounds the
incoming queue. A backlog stays in the broker's queue (sized for it in the broker config)
rather than in our memory, and whatever was in flight when the connection dropped is delivered
again on reconnect (a persistent session: fixed client id, ``clean_start=False``, a Session
Expiry Interval). A redelivered message (DUP) is simply delivered again: storing is idempotent.

Receive Maximum alone is not enough: Mosquitto 2.0 before 2.0.13 ignores it when it drains a
session's queued backlog after a reconnect. So the connection also stops *reading the socket*
(``pause_reading``) while Receive Maximum deliveries wait in-process, and resumes below half of
that: TCP flow control then holds the rest in the broker. Memory stays bounded whatever the
broker does: at most Receive Maximum deliveries plus those of one received chunk are queued.
``MqttIngest.link_stats`` counts the pauses and the peak.

Deliveries reach the handler one at a time, in arrival order, from one task per connection;
the next one only after the handler returned.

The acknowledgement also tells the size of that window (``window``, Receive Maximum): once
that many deliveries wait for their ack nothing more arrives, so whoever holds deliveries back
to batch them (``fleet_server.batcher``) stores them in parts of it, instead of waiting for more
or for a timer.

Keep-alive (MQTT 5.0 §3.1.2.10): a PINGREQ goes out whenever either direction was quiet for
half the keep-alive (the broker's Server Keep Alive if it sets one). When the broker then sends
nothing at all for 1.5 keep-alives while we are reading, the link counts as dead (a half-open
TCP connection after a broker host or network failure) and is dropped; the session resumes on
the next connection. While reading is paused the broker's silence proves nothing and is not
held against it.

Every way a connection ends (refused CONNACK, DISCONNECT from the broker, lost or dead link,
malformed packet) ends the session with a log line naming the cause, and ``run`` connects
again after a capped, doubling delay.

Subscriptions:
- telemetry, events and command results through a shared subscription (``$share/<group>/...``):
  with several server processes each message goes to one of them;
- state and peripherals through plain subscriptions: every process sees every terminal's
  presence, including the retained states when it (re)starts. Presence updates are idempotent
  (session ordering), so processing them in every process is safe.

A planned stop unsubscribes from the shared filters before it disconnects; see
:meth:`MqttIngest._leave_share_group`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from fleet_protocol.topics import Channel, fleet_filter, shared_filter
from fleet_server.config import BrokerSettings
from fleet_server.errors import ConfigError, FleetServerError, MqttProtocolError
from fleet_server.mqtt_wire import (
    DISCONNECT,
    PINGREQ,
    ConnAck,
    Decoder,
    Disconnect,
    Packet,
    Publish,
    SubAck,
    UnsubAck,
    encode_connect,
    encode_puback,
    encode_subscribe,
    encode_unsubscribe,
    reason_name,
)
from fleet_server.stopping import sleep_unless_stopped

RECONNECT_MIN_S = 0.5
#: One server connection, not thousands: it may retry often. Every second it is away after the
#: broker is back, agents hold their backlogs (no subscriber yet) and alerts wait.
RECONNECT_MAX_S = 10.0
#: How long a planned stop waits for the broker to confirm it left the share group.
LEAVE_TIMEOUT_S = 5.0
#: TCP, TLS and CONNACK together; a broker slower than this is treated as unreachable.
CONNECT_TIMEOUT_S = 10.0
#: How long closing a connection may wait for the broker to close its side.
CLOSE_TIMEOUT_S = 2.0
#: Silence from the broker, in keep-alives, after which the link counts as dead (the broker
#: allows us the same, §3.1.2.10).
DEAD_AFTER_KEEPALIVES = 1.5
#: The channels subscribed through the share group (see ``_session``).
_SHARED = (Channel.TELEMETRY, Channel.EVENTS, Channel.CMD_RESULT)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message from the broker; call ``ack`` once it is safely stored."""

    topic: str
    payload: bytes
    ack: Callable[[], None]


Handler = Callable[[Delivery], Awaitable[None]]


class _SessionEnded(FleetServerError):
    """The connection to the broker ended or could not be made; ``run`` connects again."""


@dataclass(slots=True)
class LinkStats:
    """What the subscription did since the process started (all connections)."""

    #: Connections the broker accepted (CONNACK with success).
    connections: int = 0
    #: Times reading stopped because Receive Maximum deliveries waited in-process.
    pauses: int = 0
    #: The most deliveries ever waiting in-process for the handler at once.
    peak: int = 0
    #: PINGREQs sent on quiet links.
    pings: int = 0


class _Ack:
    """A delivery's acknowledgement (PUBACK): ``ack()``; calling it again does nothing, and
    neither does an ack for QoS 0 or for a connection that is gone (the broker redelivers what
    the old connection left unacknowledged). ``ack.window()`` is the connection's Receive
    Maximum: with that many deliveries waiting for their ack the broker sends nothing more."""

    __slots__ = ("_link", "_packet_id")

    def __init__(self, link: _Link, packet_id: int) -> None:
        self._link = link
        self._packet_id = packet_id  # 0: nothing (more) to acknowledge

    def __call__(self) -> None:
        packet_id = self._packet_id
        if packet_id:
            self._packet_id = 0
            self._link.acknowledge(packet_id)

    def window(self) -> int:
        return self._link.receive_maximum


class _Link(asyncio.Protocol):
    """One connection to the broker: decodes what arrives, queues deliveries for the
    handler's task, sends our packets (coalesced per event-loop turn), keeps the link alive.

    When the connection ends, for whatever reason, ``error`` says why, ``closed`` is set,
    queued deliveries are dropped (they were not acknowledged: the broker redelivers them)
    and everyone waiting on the link is woken."""

    def __init__(self, receive_maximum: int, stats: LinkStats) -> None:
        self._loop = asyncio.get_running_loop()
        self._decoder = Decoder()
        self._transport: asyncio.Transport | None = None
        self._stats = stats
        self._maximum = receive_maximum
        self._low = receive_maximum // 2
        self._paused = False
        #: QoS 1 deliveries handed out and not acknowledged yet.
        self._unacked = 0
        self.deliveries: deque[Delivery] = deque()
        self._arrival: asyncio.Future[None] | None = None
        self.connack: asyncio.Future[ConnAck | None] = self._loop.create_future()
        self._replies: dict[int, asyncio.Future[SubAck | UnsubAck | None]] = {}
        self._packet_id = 0
        self._out = bytearray()
        self._flush_due = False
        self._last_sent = self._last_received = self._loop.time()
        self._keepalive_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.live = True
        #: The link ended (``error`` says why); the transport may still be closing.
        self.closed = asyncio.Event()
        #: The transport is closed.
        self._gone = asyncio.Event()
        self.error = _SessionEnded("connection closed")

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone.set()
        self._end(f"connection lost: {exc}" if exc else "connection closed by the broker", exc)

    def data_received(self, data: bytes) -> None:
        if not self.live:
            return  # what arrives while a closed link shuts down TLS is not for us any more
        self._last_received = self._loop.time()
        try:
            packets = self._decoder.feed(data)
            if not self.connack.done():
                packets = self._accept_connack(packets)
        except MqttProtocolError as exc:
            self._end(f"protocol error: {exc}", exc)
            return
        deliveries = self.deliveries
        for packet in packets:
            if type(packet) is Publish:
                if packet.qos == 1:
                    self._unacked += 1
                    ack = _Ack(self, packet.packet_id)
                elif packet.qos == 0:
                    ack = _Ack(self, 0)
                else:
                    # §3.8.3.1: the broker must not exceed the granted QoS, and we ask for 1.
                    self._end("protocol error: QoS 2 delivery on a QoS 1 subscription")
                    return
                deliveries.append(Delivery(packet.topic, packet.payload, ack))
            elif not self._control(packet):
                return
        queued = len(deliveries)
        if queued:
            self._stats.peak = max(self._stats.peak, queued)
            if queued >= self._maximum and not self._paused and self._transport is not None:
                self._transport.pause_reading()
                self._paused = True
                self._stats.pauses += 1
            self._wake()

    # --- what the session does with the link --------------------------------------------

    def take(self) -> Delivery:
        """The next delivery (the caller checked there is one); resumes reading once the
        queue is down to half of Receive Maximum."""
        delivery = self.deliveries.popleft()
        if self._paused and len(self.deliveries) <= self._low and self.live:
            self._paused = False
            # Time spent not reading is not the broker's silence.
            self._last_received = self._loop.time()
            assert self._transport is not None
            self._transport.resume_reading()
        return delivery

    def arrival(self) -> asyncio.Future[None]:
        """Done when deliveries arrive or the link ends."""
        self._arrival = self._loop.create_future()
        return self._arrival

    def start_keepalive(self, keepalive_s: int) -> None:
        """Keep the link alive and watched from now on (0: no keep-alive, §3.1.2.10)."""
        if keepalive_s:
            self._keepalive_s = float(keepalive_s)
            self._timer = self._loop.call_later(keepalive_s / 2, self._tick)

    async def request(self, packet: Callable[[int], bytes]) -> SubAck | UnsubAck:
        """Send ``packet(packet_id)`` (SUBSCRIBE or UNSUBSCRIBE) and wait for its answer;
        ``error`` if the link ends first."""
        self._packet_id = self._packet_id % 0xFFFF + 1
        packet_id = self._packet_id
        reply: asyncio.Future[SubAck | UnsubAck | None] = self._loop.create_future()
        self._replies[packet_id] = reply
        try:
            self.send(packet(packet_id))
            answer = await reply
        finally:
            del self._replies[packet_id]
        if answer is None:
            raise self.error
        return answer

    def acknowledge(self, packet_id: int) -> None:
        if self.live:
            self._unacked -= 1
            self.send(encode_puback(packet_id))

    @property
    def receive_maximum(self) -> int:
        return self._maximum

    def send(self, packet: bytes) -> None:
        """Queue ``packet``; everything queued in one event-loop turn goes out in one write."""
        self._out += packet
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    async def close(self) -> None:
        """End the link: DISCONNECT (reason 0x00: the session stays, §3.14.4) if it is still
        up, then close it and wait until the transport is gone (the broker closes its side on
        DISCONNECT), aborting it if that takes longer than ``CLOSE_TIMEOUT_S``."""
        if self.live and self._transport is not None:
            self.send(DISCONNECT)
            self._flush()
            self._transport.close()  # writes what is buffered before closing
        self._end("closed by us")
        if self._transport is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._gone.wait()
            except TimeoutError:
                self._transport.abort()

    # --- inside -------------------------------------------------------------------------

    def _accept_connack(self, packets: list[Packet]) -> list[Packet]:
        # §3.2: the first packet from the server is CONNACK.
        if not packets:
            return packets
        first = packets[0]
        if not isinstance(first, ConnAck):
            raise MqttProtocolError(f"{type(first).__name__} before CONNACK (§3.2)")
        self.connack.set_result(first)
        return packets[1:]

    def _control(self, packet: Packet) -> bool:
        """Handle a packet other than PUBLISH; False if it ended the connection."""
        if isinstance(packet, SubAck | UnsubAck):
            reply = self._replies.get(packet.packet_id)
            if reply is not None and not reply.done():
                reply.set_result(packet)
        elif isinstance(packet, Disconnect):
            why = f": {packet.reason_string}" if packet.reason_string else ""
            self._end(f"broker disconnected us: {reason_name(packet.reason_code)}{why}")
            return False
        elif isinstance(packet, ConnAck):
            self._end("protocol error: a second CONNACK (§3.2)")
            return False
        # PINGRESP: its arrival (data_received) is all that matters.
        return True

    def _flush(self) -> None:
        self._flush_due = False
        if self._out and self.live and self._transport is not None:
            # bytes(): the transport may keep the object it is given until it is sent.
            self._transport.write(bytes(self._out))
            self._last_sent = self._loop.time()
        self._out.clear()

    def _tick(self) -> None:
        now = self._loop.time()
        keepalive = self._keepalive_s
        silent = now - self._last_received
        if not self._paused and silent > keepalive * DEAD_AFTER_KEEPALIVES:
            self._end(f"nothing from the broker for {silent:.1f} s (keep-alive {keepalive:g} s)")
            return
        if now - self._last_sent >= keepalive / 2 or silent >= keepalive / 2:
            self.send(PINGREQ)
            self._stats.pings += 1
        self._timer = self._loop.call_later(keepalive / 2, self._tick)

    def _wake(self) -> None:
        arrival = self._arrival
        if arrival is not None:
            self._arrival = None
            if not arrival.done():
                arrival.set_result(None)

    def _end(self, reason: str, cause: BaseException | None = None) -> None:
        if not self.live:
            return
        self.live = False
        self.error = _SessionEnded(reason)
        self.error.__cause__ = cause
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        self.deliveries.clear()
        self._wake()
        if not self.connack.done():
            self.connack.set_result(None)
        for reply in self._replies.values():
            if not reply.done():
                reply.set_result(None)
        self.closed.set()


async def _deliver(link: _Link, handle: Handler) -> None:
    """The connection's one consumer: deliveries to ``handle`` one by one, in order."""
    deliveries = link.deliveries
    while True:
        if deliveries:
            await handle(link.take())
        else:
            await link.arrival()


class MqttIngest:
    def __init__(self, settings: BrokerSettings, logger: logging.Logger) -> None:
        self._settings = settings
        self._log = logger
        self.connected = asyncio.Event()
        self.link_stats = LinkStats()
        self._tls_context()  # unusable TLS files stop the server at start, naming them

    def _tls_context(self) -> ssl.SSLContext:
        """Mutual TLS to the broker's service listener; files are read at every connect."""
        s = self._settings
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s.ca_file)
            context.load_cert_chain(s.cert_file, s.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"[broker] TLS files ca_file={s.ca_file}, cert_file={s.cert_file}, "
                f"key_file={s.key_file} cannot be used: {exc}"
            ) from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    async def run(self, handle: Handler, stopping: asyncio.Event) -> None:
        """Deliver messages to ``handle`` until ``stopping``; reconnects on its own."""
        delay = RECONNECT_MIN_S
        while not stopping.is_set():
            try:
                await self._session(handle, stopping)
            except* _SessionEnded as group:
                self._log.warning(
                    "broker %s:%d: %s; retrying in %.1f s",
                    self._settings.host,
                    self._settings.port,
                    "; ".join(str(e) for e in group.exceptions),
                    delay,
                )
                await sleep_unless_stopped(stopping, delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
            else:
                delay = RECONNECT_MIN_S

    async def _connect(self) -> _Link:
        """A connection the broker accepted (CONNACK 0x00), with keep-alive running."""
        s = self._settings
        loop = asyncio.get_running_loop()
        link: _Link | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, link = await loop.create_connection(
                    lambda: _Link(s.receive_maximum, self.link_stats),
                    s.host,
                    s.port,
                    ssl=self._tls_context(),
                    server_hostname=s.host,
                )
                link.send(
                    encode_connect(
                        s.client_id,
                        clean_start=False,
                        keepalive_s=s.keepalive_s,
                        session_expiry_s=s.session_expiry_s,
                        receive_maximum=s.receive_maximum,
                    )
                )
                connack = await link.connack
        except OSError as exc:  # refused, unreachable, TLS failure, timeout
            if link is not None:
                await link.close()
            raise _SessionEnded(f"cannot connect: {exc or type(exc).__name__}") from exc
        except BaseException:
            if link is not None:
                await link.close()
            raise
        if connack is None:
            await link.close()
            raise link.error
        if connack.reason_code >= 0x80:
            await link.close()
            why = f": {connack.reason_string}" if connack.reason_string else ""
            raise _SessionEnded(f"connection refused: {reason_name(connack.reason_code)}{why}")
        if not connack.session_present:
            self._log.info("broker holds no session for %s: starting a new one", s.client_id)
        # §3.2.2.3.14: the broker's Server Keep Alive, when set, replaces ours.
        keepalive = (
            s.keepalive_s if connack.server_keep_alive is None else connack.server_keep_alive
        )
        link.start_keepalive(keepalive)
        self.link_stats.connections += 1
        return link

    async def _session(self, handle: Handler, stopping: asyncio.Event) -> None:
        link = await self._connect()
        group = self._settings.share_group
        filters = [
            (fleet_filter(Channel.STATE), 1),
            (shared_filter(Channel.TELEMETRY, group), 1),
            # Retained like state: every server process keeps the snapshot.
            (fleet_filter(Channel.PERIPHERALS), 1),
            (shared_filter(Channel.EVENTS, group), 1),
            (shared_filter(Channel.CMD_RESULT, group), 1),
        ]
        try:
            async with asyncio.TaskGroup() as tg:
                # Deliver before subscribing: a resumed session's backlog starts flowing right
                # after CONNACK, and the SUBACK queues behind it.
                deliver = tg.create_task(_deliver(link, handle), name="ingest-deliver")
                reply = await link.request(lambda packet_id: encode_subscribe(packet_id, filters))
                refused = [
                    f"{f} ({reason_name(code)})"
                    for (f, _), code in zip(filters, reply.reason_codes, strict=False)
                    if code >= 0x80
                ]
                if refused:
                    raise _SessionEnded(f"subscription refused: {', '.join(refused)}")
                self.connected.set()
                self._log.info(
                    "subscribed at %s:%d as %s",
                    self._settings.host,
                    self._settings.port,
                    self._settings.client_id,
                )
                gone = tg.create_task(link.closed.wait(), name="ingest-link")
                stop = tg.create_task(stopping.wait(), name="ingest-stopping")
                await asyncio.wait((gone, stop), return_when=asyncio.FIRST_COMPLETED)
                if not link.live and not stopping.is_set():
                    raise link.error
                if link.live:
                    await self._leave_share_group(link, group)
                for task in (deliver, gone, stop):
                    task.cancel()
        finally:
            self.connected.clear()
            await link.close()

    async def _leave_share_group(self, link: _Link, group: str) -> None:
        """A planned stop leaves the shared subscriptions first. The session outlives the
        connection (so a restarted process gets what was sent to it meanwhile), and Mosquitto
        keeps handing a disconnected session its turn of every shared message: without this,
        a process stopped for good would take its share of the fleet's telemetry with it,
        queued for a client that never returns, until the session expires."""
        shared = [shared_filter(c, group) for c in _SHARED]
        try:
            async with asyncio.timeout(LEAVE_TIMEOUT_S):
                reply = await link.request(lambda packet_id: encode_unsubscribe(packet_id, shared))
        except (TimeoutError, _SessionEnded) as exc:
            self._log.warning(
                "could not leave share group %s before stopping: %s",
                group,
                exc or f"no UNSUBACK within {LEAVE_TIMEOUT_S:g} s",
            )
            return
        refused = [reason_name(code) for code in reply.reason_codes if code >= 0x80]
        if refused:
            self._log.warning("broker refused to leave share group %s: %s", group, refused)
