"""Adapter: the server's subscription to the fleet (the only fleet_server module importing aiomqtt).

Nothing is acknowledged before it is safe. The client acknowledges a delivery (PUBACK) only
when the caller says so, after the data is in InfluxDB or the registry; MQTT 5's Receive
Maximum then caps how many unacknowledged deliveries the broker sends us, which is what bounds
the incoming queue. A backlog stays in the broker's queue (sized for it in the broker config)
rather than in our memory, and whatever was in flight when the connection dropped is delivered
again on reconnect (a persistent session: fixed client id, ``clean_start=False``).

Receive Maximum alone is not enough: Mosquitto 2.0 (Debian 12's) ignores it when it drains a
session's queued backlog after a reconnect (measured: 2,574 of 3,000 queued deliveries pushed
at once to a client that allowed 50). So the client also stops *reading the socket* while its
incoming queue is above a high-water mark and resumes below a low-water mark: TCP flow control
then holds the rest in the broker. Memory stays bounded whatever the broker does.

The acknowledgement also tells how much of that window is in use (``window_used``, the share
of Receive Maximum unacknowledged): with all of it in use nothing more arrives until something
is acknowledged, so whoever holds deliveries back to batch them (``fleet_server.batcher``)
stores them before that, instead of waiting for more or for a timer.

aiomqtt exposes neither paho's manual acknowledgement nor a way to pause reading; both are
done here, in :class:`_FlowControlledClient`, and nowhere else. While reading is paused for
longer than the keep-alive (InfluxDB down for minutes), paho declares the link dead and the
client reconnects; the broker then redelivers what was never acknowledged, so nothing is lost.

Subscriptions:
- telemetry through a shared subscription (``$share/<group>/...``): with several server
  processes each message goes to one of them;
- state through a plain subscription: every process sees every terminal's presence, including
  the retained states when it (re)starts. Presence updates are idempotent (session ordering),
  so processing them in every process is safe.

A planned stop unsubscribes from the shared filters before it disconnects; see
:meth:`MqttIngest._leave_share_group`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_protocol.topics import Channel, fleet_filter, shared_filter
from fleet_server.config import BrokerSettings
from fleet_server.errors import ConfigError
from fleet_server.stopping import sleep_unless_stopped

RECONNECT_MIN_S = 0.5
#: One server connection, not thousands: it may retry often. Every second it is away after the
#: broker is back, agents hold their backlogs (no subscriber yet) and alerts wait.
RECONNECT_MAX_S = 10.0
#: How long a planned stop waits for the broker to confirm it left the share group.
LEAVE_TIMEOUT_S = 5.0
#: The channels subscribed through the share group (see ``_session``).
_SHARED = (Channel.TELEMETRY, Channel.EVENTS, Channel.CMD_RESULT)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message from the broker; call ``ack`` once it is safely stored."""

    topic: str
    payload: bytes
    ack: Callable[[], None]


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass(slots=True)
class _Window:
    """The deliveries of one connection handed out and not yet acknowledged."""

    maximum: int
    unacked: int = 0
    #: False once the connection is gone: an ack for the old link is moot (the broker
    #: redelivers after a reconnect).
    live: bool = True


class _Ack:
    """A delivery's acknowledgement (PUBACK): ``ack()``. ``ack.window_used()`` is the share of
    Receive Maximum that deliveries of this connection waiting for their ack take up now; at 1
    the broker sends nothing more."""

    __slots__ = ("_acked", "_mid", "_paho", "_qos", "_window")

    def __init__(self, paho: Any, mid: int, qos: int, window: _Window) -> None:
        self._paho = paho
        self._mid = mid
        self._qos = qos
        self._window = window
        self._acked = False
        if qos > 0:
            window.unacked += 1

    def __call__(self) -> None:
        if self._window.live and self._qos > 0:
            self._paho.ack(self._mid, self._qos)
            if not self._acked:
                self._acked = True
                self._window.unacked -= 1

    def window_used(self) -> float:
        window = self._window
        return window.unacked / window.maximum if window.live else 0.0


class _FlowQueue(asyncio.Queue[aiomqtt.Message]):
    """The client's incoming queue, telling its owner when to stop and resume reading."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.high = 0
        self.low = 0
        self.on_high: Callable[[], None] | None = None
        self.on_low: Callable[[], None] | None = None
        self.peak = 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        super().put_nowait(item)
        size = self.qsize()
        self.peak = max(self.peak, size)
        if size >= self.high and self.on_high is not None:
            self.on_high()

    def get_nowait(self) -> aiomqtt.Message:
        item = super().get_nowait()
        if self.qsize() <= self.low and self.on_low is not None:
            self.on_low()
        return item


class _FlowControlledClient(aiomqtt.Client):
    """aiomqtt's client, reading the socket only while its incoming queue has room."""

    def __init__(self, *args: Any, high_water: int, **kwargs: Any) -> None:
        super().__init__(*args, queue_type=_FlowQueue, **kwargs)
        self._client.manual_ack_set(True)
        self._fd = -1
        self._reading = False
        self.pauses = 0
        queue = self.flow_queue
        queue.high = high_water
        queue.low = high_water // 2
        queue.on_high = self._pause_reading
        queue.on_low = self._resume_reading

    @property
    def flow_queue(self) -> _FlowQueue:
        queue = self._queue
        assert isinstance(queue, _FlowQueue)
        return queue

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        # Called from the thread that runs paho's connect(): hand over to the event loop.
        def opened() -> None:
            self._fd = sock.fileno()
            self._resume_reading()
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(opened)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        self._pause_reading(counted=False)
        self._fd = -1
        if self._misc_task is not None and not self._misc_task.done():
            self._loop.call_soon_threadsafe(self._misc_task.cancel)

    def _read_socket(self) -> None:
        try:
            self._client.loop_read()
            # A TLS socket may hold decoded bytes that select() will not report again.
            sock = self._client.socket()
            while self._reading and sock is not None and getattr(sock, "pending", int)() > 0:
                self._client.loop_read()
        except (OSError, ValueError) as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def _pause_reading(self, *, counted: bool = True) -> None:
        if self._reading and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._reading = False
            self.pauses += int(counted)

    def _resume_reading(self) -> None:
        if not self._reading and self._fd >= 0:
            self._loop.add_reader(self._fd, self._read_socket)
            self._reading = True
            # Bytes TLS decoded before the pause are not announced by select() again.
            sock = self._client.socket()
            if sock is not None and getattr(sock, "pending", int)() > 0:
                self._loop.call_soon(self._read_socket)


class MqttIngest:
    def __init__(self, settings: BrokerSettings, logger: logging.Logger) -> None:
        self._settings = settings
        self._log = logger
        self.connected = asyncio.Event()
        self._tls_context()  # unusable TLS files stop the server at start, naming them

    def _client(self) -> _FlowControlledClient:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._settings.session_expiry_s
        props.ReceiveMaximum = self._settings.receive_maximum
        return _FlowControlledClient(
            self._settings.host,
            self._settings.port,
            identifier=self._settings.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            keepalive=self._settings.keepalive_s,
            properties=props,
            high_water=self._settings.receive_maximum,
            tls_context=self._tls_context(),
        )

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
            except* aiomqtt.MqttError as group:
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

    async def _session(self, handle: Handler, stopping: asyncio.Event) -> None:
        async with self._client() as client:
            paho = client._client  # noqa: SLF001 - manual acknowledgement, see module docstring
            window = _Window(self._settings.receive_maximum)

            def acker(mid: int, qos: int) -> Callable[[], None]:
                return _Ack(paho, mid, qos, window)

            group = self._settings.share_group
            try:
                async with asyncio.TaskGroup() as tg:
                    # Read before subscribing: a resumed session's backlog starts flowing right
                    # after CONNACK, and the SUBACK queues behind it.
                    reader = tg.create_task(self._read(client, handle, acker), name="ingest-read")
                    await client.subscribe(
                        [
                            (fleet_filter(Channel.STATE), 1),
                            (shared_filter(Channel.TELEMETRY, group), 1),
                            # Retained like state: every server process keeps the snapshot.
                            (fleet_filter(Channel.PERIPHERALS), 1),
                            (shared_filter(Channel.EVENTS, group), 1),
                            (shared_filter(Channel.CMD_RESULT, group), 1),
                        ]
                    )
                    self.connected.set()
                    self._log.info(
                        "subscribed at %s:%d as %s",
                        self._settings.host,
                        self._settings.port,
                        self._settings.client_id,
                    )
                    await stopping.wait()
                    await self._leave_share_group(client, group)
                    reader.cancel()
            finally:
                window.live = False
                self.connected.clear()

    async def _leave_share_group(self, client: aiomqtt.Client, group: str) -> None:
        """A planned stop leaves the shared subscriptions first. The session outlives the
        connection (so a restarted process gets what was sent to it meanwhile), and Mosquitto
        keeps handing a disconnected session its turn of every shared message: without this,
        a process stopped for good would take its share of the fleet's telemetry with it,
        queued for a client that never returns, until the session expires."""
        shared = [shared_filter(c, group) for c in _SHARED]
        try:
            await client.unsubscribe(shared, timeout=LEAVE_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            self._log.warning("could not leave share group %s before stopping: %s", group, exc)

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
