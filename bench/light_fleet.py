"""``light_fleet``: many kiosks on one asyncio loop, speaking exactly the agent's MQTT, no more.

A load generator for the fleet-size bench. ``fleet-sim`` runs the full agent per kiosk
(outbox in SQLite, journal, sampling, aiomqtt/paho), which costs so much CPU that on a 2-core
machine the simulators saturate at a few thousand kiosks, long before the fleet server. Here
each kiosk is one TLS connection, a few dozen bytes of state and one timer, and on the wire it
is what the agent (``edge_agent.mqtt_uplink`` on paho-mqtt) sends, byte for byte:

- mutual TLS with the kiosk's own certificate from ``--tls-dir`` (``DIR/ca.pem``,
  ``DIR/{terminal}.pem``: key, then chain, as ``fleetctl``/``bench_fleet_size.provision``
  write them), a fresh context per connection, TLS 1.2 at least, the broker's name checked;
- MQTT 5 CONNECT: client id = terminal id, ``clean_start=False``, keep-alive ``--keepalive``,
  the Session Expiry Interval (``--session-expiry``, the agent's 7 days) as its only property,
  and the last will: the retained QoS 1 ``state`` {"online": false, "reason": "lost"} of this
  connection's session number, without will properties;
- then, as the agent, SUBSCRIBE to its ``cmd/+`` at QoS 1, the retained QoS 1 birth ``state``
  (online, session, site, agent version) and, once each is acknowledged, telemetry: every
  ``--interval`` s one QoS 1 message with that interval's system, network and power samples
  (the agent with ``--batch-size 3``), built with ``fleet_protocol``'s types and encoder. The
  three share the tick's timestamp (never going backwards, +1 ms at least, as the agent's
  ``MonotonicStamp``) and each kind counts its own ``seq`` from 1; the readings are a random
  walk like ``fleet-sim``'s simulated PC (ethernet up, 4G down, no UPS);
- PINGREQ as paho sends it (nothing sent or received for a keep-alive; no PINGRESP by the next
  one drops the link); PUBACKs are read for the broker's round trip (the next network sample's
  ``broker_rtt_ms``), and a telemetry PUBACK missing for ``max(10, keep-alive)`` s drops the
  link as the agent's timeout does; commands (QoS 1 PUBLISH on ``cmd/+``) are acknowledged and
  otherwise ignored;
- on SIGTERM/SIGINT, as the agent at stop: the retained "shutdown" ``state`` (acknowledged, or
  a few seconds at most), then DISCONNECT (no will); the process exits within seconds.

What it leaves out: no outbox (samples due while disconnected are not kept: the next sample
after a reconnect shows the gap in ``seq``), no events, peripherals, commands run or clock
check (``clock_offset_ms`` is 0). A lost connection is retried with the agent's backoff (1 to
60 s, full jitter). Session numbers start at ``--first-session`` (a fresh agent's 1) and grow
by one per connection; nothing is persisted, so a second run against the same server must
start above the first's numbers (the server takes a birth of the same session as a repeat).

Connections are spread over time: ``--connect-rate`` a second with jitter, at most
``--connecting`` handshakes in flight, so the broker's listen backlog (100) is not overrun.
The first telemetry of each connection comes at a random phase within the interval, so the
load is even. Prints one line when every kiosk is connected (and again if it recovers from
losses), a status line every ``--status-every`` s when something changed, and counts at exit.

    python bench/light_fleet.py --terminals 2000 --prefix fs01 --site s-001 --site s-002 \\
        --broker-port 8883 --tls-dir DIR [--interval 10] [--connect-rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import random
import signal
import socket
import ssl
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any, Final

from fleet_protocol.codec import encode
from fleet_protocol.errors import InvalidId
from fleet_protocol.ids import site_id, terminal_id
from fleet_protocol.messages import (
    InterfaceSample,
    NetworkSample,
    PowerSample,
    Sample,
    State,
    SystemSample,
    Telemetry,
)
from fleet_protocol.topics import Channel, topic
from fleet_server.mqtt_wire import (
    DISCONNECT,
    PINGREQ,
    Will,
    encode_connect,
    encode_puback,
    encode_subscribe,
    encode_utf8,
    encode_varint,
    reason_name,
)

GIB: Final = 1024**3
#: The agent's defaults (edge_agent.config.BrokerSettings).
KEEPALIVE_S: Final = 30
SESSION_EXPIRY_S: Final = 7 * 86400
RECONNECT_MIN_S: Final = 1.0
RECONNECT_MAX_S: Final = 60.0
#: How long the shutdown state may wait for its PUBACK at stop, and the whole stop at most.
STOP_ACK_S: Final = 5.0
STOP_S: Final = 15.0
#: Largest packet accepted from the broker (it only sends acknowledgements and commands).
MAX_PACKET: Final = 1024 * 1024

# MQTT 5 packet types (§2.1.2) and the fixed-header first bytes this client sends.
_T_CONNACK: Final = 2
_T_PUBLISH: Final = 3
_T_PUBACK: Final = 4
_T_SUBACK: Final = 9
_T_PINGRESP: Final = 13
_T_DISCONNECT: Final = 14
_CONNECT: Final = 0x10
_PUBLISH_QOS1: Final = 0x32
_RETAIN: Final = 0x01
_P_SESSION_EXPIRY: Final = 0x11
NO_MATCHING_SUBSCRIBERS: Final = 0x10
FIRST_FAILURE: Final = 0x80

#: Bytes read at a time: one TLS record at most.
READ_SIZE: Final = 16 * 1024

#: A resolved broker address: (family, sockaddr).
Address = tuple[socket.AddressFamily, tuple[Any, ...]]
_Watch = Callable[[int, Callable[[asyncio.Future[None]], None], asyncio.Future[None]], None]
_Unwatch = Callable[[int], bool]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def agent_version() -> str:
    """What the agent puts in its birth (edge_agent.app.agent_version)."""
    try:
        return version("kiosk-fleet")
    except PackageNotFoundError:
        return "0+unknown"


# --- encoders (what fleet_server.mqtt_wire, a subscriber's codec, does not have) ----------


def agent_connect(
    client_id: str, keepalive_s: int, session_expiry_s: int, state_topic: str, will: State
) -> bytes:
    """CONNECT as paho-mqtt 2 sends the agent's: the Session Expiry Interval its only property,
    the retained QoS 1 "lost" state as its will, no user name or password."""
    return encode_connect(
        client_id,
        clean_start=False,
        keepalive_s=keepalive_s,
        session_expiry_s=session_expiry_s,
        receive_maximum=None,
        maximum_packet_size=None,
        will=Will(state_topic, encode(will)),
    )


def encode_publish(topic_bytes: bytes, packet_id: int, payload: bytes, *, retain: bool) -> bytes:
    """PUBLISH (§3.3) at QoS 1, without properties; ``topic_bytes`` already a UTF-8 string
    field (:func:`topic_field`)."""
    body_len = len(topic_bytes) + 3 + len(payload)
    first = _PUBLISH_QOS1 | (_RETAIN if retain else 0)
    return b"".join(
        (
            bytes((first,)),
            encode_varint(body_len),
            topic_bytes,
            packet_id.to_bytes(2, "big"),
            b"\x00",
            payload,
        )
    )


def topic_field(name: str) -> bytes:
    return encode_utf8(name)


# --- the simulated PC ----------------------------------------------------------------------


class Machine:
    """A kiosk PC like fleet-sim's: 8 GiB RAM, 128 GiB disk, a random walk per reading."""

    __slots__ = ("booted_ms", "cpu", "disk", "mem", "recv", "sent")

    def __init__(self, rng: random.Random, now_ms: int) -> None:
        self.cpu = rng.uniform(5, 30)
        self.mem = rng.uniform(30, 60)
        self.disk = rng.uniform(20, 70)
        self.sent = rng.randrange(10**6, 10**9)
        self.recv = rng.randrange(10**6, 10**9)
        self.booted_ms = now_ms - int(rng.uniform(600, 30 * 86400) * 1000)

    def samples(self, rng: random.Random, seq: int, ts: int, rtt_ms: float | None) -> list[Sample]:
        """One interval's system, network and power samples, numbered ``seq`` each."""
        self.cpu = min(100.0, max(0.0, self.cpu + rng.uniform(-8, 8)))
        self.mem = min(100.0, max(0.0, self.mem + rng.uniform(-2, 2)))
        self.disk = min(99.0, self.disk + rng.uniform(0, 0.01))
        self.sent += rng.randrange(1_000, 200_000)
        self.recv += rng.randrange(5_000, 2_000_000)
        return [
            SystemSample(
                seq=seq,
                ts=ts,
                cpu_percent=self.cpu,
                memory_percent=self.mem,
                memory_available=int(8 * GIB * (1 - self.mem / 100)),
                disk_percent=self.disk,
                disk_free=int(128 * GIB * (1 - self.disk / 100)),
                uptime_s=max(0.0, (ts - self.booted_ms) / 1000),
                net_bytes_sent=self.sent,
                net_bytes_recv=self.recv,
                load_1m=self.cpu / 25,
                temperatures={"coretemp/Package id 0": 40 + self.cpu / 3},
                boot_ms=self.booted_ms,
                reboot_count=0,
                clock_offset_ms=0.0,
            ),
            NetworkSample(
                seq=seq,
                ts=ts,
                interfaces=[
                    InterfaceSample(
                        name="enp1s0",
                        kind="ethernet",
                        up=True,
                        bytes_sent=self.sent,
                        bytes_recv=self.recv,
                        errors=0,
                    ),
                    InterfaceSample(
                        name="wwan0", kind="cellular", up=False, bytes_sent=0, bytes_recv=0
                    ),
                ],
                broker_rtt_ms=rtt_ms,
            ),
            PowerSample(seq=seq, ts=ts),
        ]


# --- one connection ------------------------------------------------------------------------


class _Ended(enum.Enum):
    FAILED = "failed"  # never got as far as the birth being acknowledged
    LOST = "lost"  # a working connection was lost
    STOPPED = "stopped"  # the fleet stops: said goodbye


class _ConnectFailed(Exception):
    """A connection that did not get as far as the birth being acknowledged."""


class _Link:
    """One TLS connection: a non-blocking ``ssl.SSLSocket`` read from the event loop's reader
    callback, the broker's bytes split into packets for the kiosk.

    Not an asyncio transport: asyncio's TLS layer (``sslproto``) does its buffering in Python,
    several times the CPU of the TLS work itself for messages this small, and keeps a 256 KiB
    read buffer per connection. Here OpenSSL reads and writes the socket itself."""

    def __init__(self, kiosk: Kiosk) -> None:
        self._kiosk = kiosk
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        #: What the socket would not take yet, in order; each retried as it was (TLS wants
        #: the same bytes again after "want write").
        self._out: deque[bytes] = deque()
        self._sock: ssl.SSLSocket | None = None
        self._fd = -1
        self.closed: asyncio.Future[None] = self._loop.create_future()

    async def open(self, address: Address, context: ssl.SSLContext, server_name: str) -> None:
        """TCP connect and TLS handshake; then reading starts."""
        family, sockaddr = address
        raw = socket.socket(family, socket.SOCK_STREAM)
        try:
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._loop.sock_connect(raw, sockaddr)
            sock = context.wrap_socket(
                raw, server_hostname=server_name, do_handshake_on_connect=False
            )
        except BaseException:
            raw.close()
            raise
        self._sock = sock
        self._fd = sock.fileno()
        try:
            while True:
                try:
                    sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._ready(self._loop.add_reader, self._loop.remove_reader)
                except ssl.SSLWantWriteError:
                    await self._ready(self._loop.add_writer, self._loop.remove_writer)
        except BaseException:
            self._shut()
            raise
        self._loop.add_reader(self._fd, self._readable)

    async def _ready(self, add: _Watch, remove: _Unwatch) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        add(self._fd, _wake, ready)
        try:
            await ready
        finally:
            remove(self._fd)

    def _readable(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError:
                self.abort()
                return
            if not data:
                self.abort()  # the broker closed the connection
                return
            self._received(data)
            # Bytes OpenSSL decrypted already are not the socket's any more: epoll would not
            # say they are there.
            if self._sock is not sock or not sock.pending():
                return

    def _received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while (n := len(buf)) >= 2:
            length = 0
            shift = 0
            at = 1
            while True:
                if at >= n:
                    return
                digit = buf[at]
                at += 1
                length |= (digit & 0x7F) << shift
                if not digit & 0x80:
                    break
                shift += 7
                if shift > 21:
                    self._broken("a Remaining Length longer than 4 bytes")
                    return
            stop = at + length
            if stop > MAX_PACKET:
                self._broken(f"a packet of {stop} bytes")
                return
            if stop > n:
                return
            first = buf[0]
            body = bytes(buf[at:stop])
            del buf[:stop]
            self._kiosk.packet(self, first, body)
            if self._sock is None:
                return

    def _broken(self, what: str) -> None:
        self._kiosk.fleet.count("protocol error from the broker: " + what)
        self.abort()

    def write(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._out:
            self._out.append(data)
            return
        try:
            sent = sock.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            sent = 0
        except OSError:
            self.abort()
            return
        if sent < len(data):
            self._out.append(data[sent:] if sent else data)
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        sock = self._sock
        out = self._out
        while sock is not None and out:
            chunk = out[0]
            try:
                sent = sock.send(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            except OSError:
                self.abort()
                return
            if sent < len(chunk):
                out[0] = chunk[sent:]
                return
            out.popleft()
        if sock is not None:
            self._loop.remove_writer(self._fd)

    def abort(self) -> None:
        """Close the socket now: without a DISCONNECT before, the broker sends the will."""
        if self._sock is None:
            return
        self._shut()
        if not self.closed.done():
            self.closed.set_result(None)
        self._kiosk.link_lost(self)

    def _shut(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(self._fd)
        if self._out:
            self._loop.remove_writer(self._fd)
            self._out.clear()
        sock.close()


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


# --- one kiosk -----------------------------------------------------------------------------


def backoff_delays(minimum: float, maximum: float, rng: random.Random) -> Iterator[float]:
    """The agent's reconnect delays (edge_agent.backoff): full jitter, cap doubling."""
    cap = minimum
    while True:
        yield rng.uniform(minimum / 2, cap)
        cap = min(maximum, cap * 2)


class Kiosk:
    """One terminal through its connections, until the fleet stops."""

    def __init__(self, fleet: Fleet, terminal: str, site: str) -> None:
        self.fleet = fleet
        self.id = terminal
        self.site = site_id(site)
        self._state_topic = topic(terminal_id(terminal), Channel.STATE)
        self._state_field = topic_field(self._state_topic)
        self._telemetry_field = topic_field(topic(terminal_id(terminal), Channel.TELEMETRY))
        self._cmd_filter = f"{self._state_topic[: -len('state')]}cmd/+"
        self._machine = Machine(fleet.rng, wall_ms())
        self._seq = 0
        self._last_ts = 0
        self._sessions = 0
        self.session: int | None = None
        self.task: asyncio.Task[None] | None = None
        self._link: _Link | None = None
        self._pid = 0
        #: What the broker has not acknowledged yet: packet id -> loop time sent.
        self._inflight: dict[int, float] = {}
        #: Waiters for the PUBACK of the birth or the shutdown state, by packet id.
        self._acks: dict[int, asyncio.Future[int]] = {}
        #: Waiter for CONNACK / SUBACK: (packet type, body).
        self._control: asyncio.Future[tuple[int, bytes]] | None = None
        #: Set when the steady phase ends: True for a stop, False for a lost link.
        self._ended: asyncio.Future[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._next_sample = 0.0
        self._last_out = 0.0
        self._last_in = 0.0
        self._ping_at: float | None = None
        self._rtt_ms: float | None = None
        self.online = False

    # --- life -----------------------------------------------------------------------------

    async def live(self) -> None:
        fleet = self.fleet
        delays = backoff_delays(fleet.reconnect_min_s, fleet.reconnect_max_s, fleet.rng)
        while not fleet.stopped():
            await fleet.pace()
            if fleet.stopped():
                return
            ended = await self._connection()
            if ended is _Ended.STOPPED or fleet.stopped():
                return
            if ended is _Ended.LOST:
                # After a working connection the backoff starts from the bottom again.
                delays = backoff_delays(fleet.reconnect_min_s, fleet.reconnect_max_s, fleet.rng)
            await asyncio.sleep(next(delays))

    def stop(self) -> None:
        """The fleet stops: a connected kiosk says goodbye, any other just ends."""
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result(True)
        elif self.task is not None:
            self.task.cancel()

    async def _connection(self) -> _Ended:
        """One connection, from TCP to its end."""
        fleet = self.fleet
        link = _Link(self)
        self._link = link
        self._inflight.clear()
        self._pid = 0
        self._ping_at = None
        try:
            await self._open(link)
        except (_ConnectFailed, OSError, TimeoutError, ConnectionError) as exc:
            fleet.count(_failure(exc))
            link.abort()
            self._drop_waiters()
            self._link = None
            return _Ended.FAILED
        except asyncio.CancelledError:
            link.abort()
            self._link = None
            raise
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[bool] = loop.create_future()
        self._ended = ended
        self.online = True
        fleet.connected(self)
        now = loop.time()
        self._next_sample = now + fleet.rng.uniform(0, fleet.interval_s)
        self._schedule(now)
        try:
            stopping = await ended
        finally:
            self._ended = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.online = False
        if not stopping:
            fleet.disconnected(self)
            self._link = None
            return _Ended.LOST
        await self._goodbye(link)
        fleet.disconnected(self, stopped=True)
        self._link = None
        return _Ended.STOPPED

    async def _open(self, link: _Link) -> None:
        """TCP, TLS, CONNECT/CONNACK, SUBSCRIBE/SUBACK, birth/PUBACK: as the agent connects."""
        fleet = self.fleet
        loop = asyncio.get_running_loop()
        self._sessions += 1
        session = fleet.first_session + self._sessions - 1
        async with fleet.handshakes, asyncio.timeout(fleet.connect_timeout_s):
            await link.open(fleet.address, fleet.tls_context(self.id), fleet.server_name)
        async with asyncio.timeout(fleet.connect_timeout_s):
            will = State(online=False, session=session, ts=wall_ms(), reason="lost")
            self._control = loop.create_future()
            self._send(
                link,
                agent_connect(
                    self.id, fleet.keepalive_s, fleet.session_expiry_s, self._state_topic, will
                ),
            )
            kind, body = await self._control
            if kind != _T_CONNACK or len(body) < 2:
                raise _ConnectFailed(f"expected CONNACK, got packet type {kind}")
            if body[1] >= FIRST_FAILURE:
                raise _ConnectFailed(f"CONNACK {reason_name(body[1])}")
            self._control = loop.create_future()
            self._send(link, encode_subscribe(self._next_pid(), [(self._cmd_filter, 1)]))
            kind, body = await self._control
            self._control = None
            if kind != _T_SUBACK:
                raise _ConnectFailed(f"expected SUBACK, got packet type {kind}")
            if len(body) < 4 or body[-1] >= FIRST_FAILURE:
                fleet.count(f"SUBACK {reason_name(body[-1]) if body else '(empty)'}")
            birth = State(
                online=True,
                session=session,
                ts=wall_ms(),
                site=self.site,
                agent_version=fleet.agent_version,
            )
            reason = await self._publish_acked(link, self._state_field, encode(birth))
            if reason >= FIRST_FAILURE:
                raise _ConnectFailed(f"birth refused: {reason_name(reason)}")
        self.session = session

    async def _publish_acked(self, link: _Link, topic_bytes: bytes, payload: bytes) -> int:
        """A retained QoS 1 state; its PUBACK reason code."""
        pid = self._next_pid()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[pid] = waiter
        try:
            self._send(link, encode_publish(topic_bytes, pid, payload, retain=True))
            return await waiter
        finally:
            self._acks.pop(pid, None)

    async def _goodbye(self, link: _Link) -> None:
        """At stop, as the agent: the retained "shutdown" state, then DISCONNECT (no will)."""
        assert self.session is not None
        final = State(online=False, session=self.session, ts=wall_ms(), reason="shutdown")
        try:
            async with asyncio.timeout(STOP_ACK_S):
                reason = await self._publish_acked(link, self._state_field, encode(final))
            if reason >= FIRST_FAILURE:
                self.fleet.count(f"shutdown state refused: {reason_name(reason)}")
        except (TimeoutError, ConnectionError):
            self.fleet.count("shutdown state not acknowledged")
        self._send(link, DISCONNECT)
        # The broker closes the connection after a DISCONNECT. Closing first could reset it
        # (RST) with the DISCONNECT still unread, and the broker would send the will.
        try:
            async with asyncio.timeout(2.0):
                await link.closed
        except TimeoutError:
            self.fleet.count("the broker did not close after DISCONNECT")
        finally:
            link.abort()

    # --- the steady phase: telemetry and keep-alive, on a timer -----------------------------

    def _schedule(self, now: float) -> None:
        keepalive = self.fleet.keepalive_s
        due = min(self._next_sample, min(self._last_out, self._last_in) + keepalive)
        self._timer = asyncio.get_running_loop().call_at(max(due, now), self._tick)

    def _tick(self) -> None:
        self._timer = None
        link = self._link
        if link is None or self._ended is None or self._ended.done():
            return
        fleet = self.fleet
        now = asyncio.get_running_loop().time()
        if now >= self._next_sample:
            if self._inflight and now - min(self._inflight.values()) > fleet.ack_timeout_s:
                fleet.count("no PUBACK within the timeout (link dropped)")
                link.abort()
                return
            self._telemetry(link)
            self._next_sample = max(self._next_sample + fleet.interval_s, now)
        # paho's keep-alive: a PINGREQ when nothing went out or came in for a keep-alive;
        # still no PINGRESP when that happens again, the link is dead.
        keepalive = fleet.keepalive_s
        if now - self._last_out >= keepalive or now - self._last_in >= keepalive:
            if self._ping_at is not None:
                fleet.count("no PINGRESP within the keep-alive (link dropped)")
                link.abort()
                return
            self._send(link, PINGREQ)
            self._ping_at = now
            self._last_in = now
        self._schedule(now)

    def _telemetry(self, link: _Link) -> None:
        self._seq += 1
        self._last_ts = max(self._last_ts + 1, wall_ms())
        fleet = self.fleet
        samples = self._machine.samples(fleet.rng, self._seq, self._last_ts, self._rtt_ms)
        pid = self._next_pid()
        payload = encode(Telemetry(samples=samples))
        self._inflight[pid] = asyncio.get_running_loop().time()
        self._send(link, encode_publish(self._telemetry_field, pid, payload, retain=False))
        fleet.sent += 1

    # --- packets ---------------------------------------------------------------------------

    def _next_pid(self) -> int:
        pid = self._pid % 0xFFFF + 1
        while pid in self._inflight or pid in self._acks:
            pid = pid % 0xFFFF + 1
        self._pid = pid
        return pid

    def _send(self, link: _Link, data: bytes) -> None:
        link.write(data)
        self._last_out = asyncio.get_running_loop().time()

    def packet(self, link: _Link, first: int, body: bytes) -> None:
        """A packet from the broker on ``link``."""
        if link is not self._link:
            return
        kind = first >> 4
        now = asyncio.get_running_loop().time()
        self._last_in = now
        if kind == _T_PUBACK and len(body) >= 2:
            pid = (body[0] << 8) | body[1]
            reason = body[2] if len(body) > 2 else 0
            sent = self._inflight.pop(pid, None)
            if sent is not None:
                self._rtt_ms = (now - sent) * 1000
                self.fleet.acked(reason)
            waiter = self._acks.get(pid)
            if waiter is not None and not waiter.done():
                waiter.set_result(reason)
        elif kind == _T_PINGRESP:
            self._ping_at = None
        elif kind in (_T_CONNACK, _T_SUBACK):
            control = self._control
            if control is not None and not control.done():
                control.set_result((kind, body))
        elif kind == _T_PUBLISH:
            self.fleet.commands += 1
            if (first >> 1) & 3 == 1 and len(body) >= 2:
                at = 2 + ((body[0] << 8) | body[1])
                if len(body) >= at + 2:
                    self._send(link, encode_puback((body[at] << 8) | body[at + 1]))
        elif kind == _T_DISCONNECT:
            reason = body[0] if body else 0
            self.fleet.count(f"DISCONNECT from the broker: {reason_name(reason)}")

    def link_lost(self, link: _Link) -> None:
        if link is not self._link:
            return
        self._drop_waiters()
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result(False)

    def _drop_waiters(self) -> None:
        lost = ConnectionResetError("connection closed by the broker")
        control = self._control
        if control is not None and not control.done():
            control.set_exception(lost)
        self._control = None
        for waiter in self._acks.values():
            if not waiter.done():
                waiter.set_exception(lost)


def _failure(exc: BaseException) -> str:
    """A connect failure, as a short reason to count."""
    if isinstance(exc, _ConnectFailed):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "connect timeout"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# --- the fleet -----------------------------------------------------------------------------


class Fleet:
    """Every kiosk of this process, the connect pacing and the counts."""

    def __init__(self, args: argparse.Namespace, rng: random.Random) -> None:
        self.rng = rng
        self.host: str = args.broker_host
        self.port: int = args.broker_port
        #: The broker's address, resolved once (:meth:`resolve`).
        self.address: Address = (socket.AF_INET, (self.host, self.port))
        self.server_name: str = args.broker_server_name or args.broker_host
        self.tls_dir: Path = args.tls_dir
        self.keepalive_s: int = args.keepalive
        self.session_expiry_s: int = args.session_expiry
        self.interval_s: float = args.interval
        self.first_session: int = args.first_session
        self.connect_timeout_s = max(10.0, float(args.keepalive))
        self.ack_timeout_s = max(10.0, float(args.keepalive))
        self.reconnect_min_s = RECONNECT_MIN_S
        self.reconnect_max_s = RECONNECT_MAX_S
        self.agent_version = agent_version()
        self._rate: float = args.connect_rate
        self.handshakes = asyncio.Semaphore(args.connecting)
        self._next_slot = 0.0
        self._stopping = False
        sites = args.site or [f"{args.prefix}-site"]
        self.kiosks = [
            Kiosk(self, f"{args.prefix}-{i:04d}", sites[(i - 1) % len(sites)])
            for i in range(1, args.terminals + 1)
        ]
        self.started = time.monotonic()
        self.online = 0
        self.connects = 0
        self.disconnects = 0
        self.failures: Counter[str] = Counter()
        self.sent = 0
        self.acks: Counter[int] = Counter()
        self.commands = 0
        self._all_once = False
        self._all_now = False

    async def resolve(self) -> None:
        loop = asyncio.get_running_loop()
        found = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = found[0]
        self.address = (family, sockaddr)

    def tls_context(self, terminal: str) -> ssl.SSLContext:
        """A fresh context per connection, as the agent's ``broker_context``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cafile=self.tls_dir / "ca.pem")
        context.load_cert_chain(self.tls_dir / f"{terminal}.pem")
        return context

    async def pace(self) -> None:
        """Wait for this kiosk's turn to connect: ``--connect-rate`` a second, jittered."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        step = 1.0 / self._rate
        slot = max(now, self._next_slot)
        self._next_slot = slot + step
        delay = slot - now + self.rng.uniform(0, step)
        if delay > 0:
            await asyncio.sleep(delay)

    def count(self, failure: str) -> None:
        self.failures[failure] += 1

    def acked(self, reason: int) -> None:
        self.acks[reason] += 1

    def connected(self, _kiosk: Kiosk) -> None:
        self.online += 1
        self.connects += 1
        if self.online == len(self.kiosks) and not self._all_now:
            self._all_now = True
            again = " again" if self._all_once else ""
            self._all_once = True
            print(
                f"light-fleet: all {len(self.kiosks)} kiosks connected{again} after "
                f"{time.monotonic() - self.started:.1f} s; {self.counts()}",
                flush=True,
            )

    def disconnected(self, _kiosk: Kiosk, *, stopped: bool = False) -> None:
        self.online -= 1
        self._all_now = False
        if not stopped:
            self.disconnects += 1

    def counts(self) -> str:
        failures = sum(self.failures.values())
        top = ", ".join(f"{n} {what}" for what, n in self.failures.most_common(4))
        no_subscriber = self.acks[NO_MATCHING_SUBSCRIBERS]
        refused = sum(n for reason, n in self.acks.items() if reason >= FIRST_FAILURE)
        return (
            f"{self.online}/{len(self.kiosks)} online, {self.connects} connects, connect "
            f"failures and errors {failures}{f' ({top})' if top else ''}, disconnects "
            f"{self.disconnects}; telemetry sent {self.sent}, acknowledged "
            f"{sum(self.acks.values())} ({no_subscriber} no subscriber, {refused} refused)"
            + (f"; {self.commands} commands ignored" if self.commands else "")
        )

    def stopped(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        self._stopping = True
        for kiosk in self.kiosks:
            kiosk.stop()


async def _status(fleet: Fleet, every_s: float) -> None:
    last = ""
    while True:
        await asyncio.sleep(every_s)
        # Only what changes by itself matters: telemetry counts always do.
        now = f"{fleet.online} {fleet.connects} {fleet.disconnects} {sum(fleet.failures.values())}"
        if now != last:
            print(f"light-fleet: {fleet.counts()}", flush=True)
            last = now


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(stopping.set)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    fleet = Fleet(args, random.Random(args.seed))
    try:
        try:
            await fleet.resolve()
        except OSError as exc:
            print(f"light_fleet: error: broker {fleet.host}: {exc}", file=sys.stderr)
            return 2
        for kiosk in fleet.kiosks:
            kiosk.task = asyncio.create_task(kiosk.live(), name=f"kiosk:{kiosk.id}")
        status = asyncio.create_task(_status(fleet, args.status_every), name="status")
        print(
            f"light-fleet: {len(fleet.kiosks)} kiosks connecting to {fleet.host}:{fleet.port}, "
            f"{args.connect_rate:g}/s; telemetry every {fleet.interval_s:g} s",
            flush=True,
        )
        await stopping.wait()
        online = fleet.online
        started = time.monotonic()
        fleet.stop()
        tasks = [k.task for k in fleet.kiosks if k.task is not None]
        _, pending = await asyncio.wait(tasks, timeout=STOP_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        status.cancel()
        print(
            f"light-fleet: stopped {online} connected kiosks in "
            f"{time.monotonic() - started:.1f} s ({len(pending)} cut short); {fleet.counts()}",
            flush=True,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="light_fleet",
        description="Many light kiosks in one process: the agent's MQTT, no agent (bench load).",
    )
    p.add_argument("--terminals", type=int, default=10, help="how many kiosks (10)")
    p.add_argument("--prefix", default="sim", help="terminal ids are PREFIX-0001, ...")
    p.add_argument(
        "--site",
        action="append",
        default=[],
        help="site id to spread the kiosks over, in turn (repeat; default PREFIX-site)",
    )
    p.add_argument("--broker-host", default="127.0.0.1")
    p.add_argument("--broker-port", type=int, default=8883)
    p.add_argument("--broker-server-name", default="", help="name in the broker's certificate")
    p.add_argument(
        "--tls-dir",
        type=Path,
        required=True,
        help="DIR/ca.pem (fleet CA) and DIR/TERMINAL_ID.pem (key + certificate) per kiosk",
    )
    p.add_argument("--keepalive", type=int, default=KEEPALIVE_S, help="MQTT keep-alive, s (30)")
    p.add_argument(
        "--session-expiry", type=int, default=SESSION_EXPIRY_S, help="s (the agent's 7 days)"
    )
    p.add_argument("--interval", type=float, default=10.0, help="s between telemetry (10)")
    p.add_argument("--connect-rate", type=float, default=100.0, help="connects a second (100)")
    p.add_argument("--connecting", type=int, default=32, help="handshakes at once, at most (32)")
    p.add_argument("--first-session", type=int, default=1, help="first session number (1)")
    p.add_argument("--status-every", type=float, default=60.0, help="s between status lines")
    p.add_argument("--seed", type=int, default=None, help="random seed of the readings")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.terminals < 1 or args.connecting < 1 or args.first_session < 0:
        parser.error("--terminals and --connecting at least 1, --first-session at least 0")
    if args.interval <= 0 or args.connect_rate <= 0 or args.status_every <= 0:
        parser.error("--interval, --connect-rate and --status-every must be positive")
    if not 2 <= args.keepalive <= 0xFFFF:
        parser.error("--keepalive from 2 to 65535")
    try:
        for i in (1, args.terminals):
            terminal_id(f"{args.prefix}-{i:04d}")
        for s in args.site:
            site_id(s)
    except InvalidId as exc:
        parser.error(str(exc))
    args.tls_dir = args.tls_dir.absolute()
    missing = [
        name
        for name in [
            "ca.pem",
            *(f"{args.prefix}-{i:04d}.pem" for i in range(1, args.terminals + 1)),
        ]
        if not (args.tls_dir / name).is_file()
    ]
    if missing:
        print(
            f"light_fleet: error: {len(missing)} files missing in {args.tls_dir}, e.g. "
            f"{missing[0]}",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
