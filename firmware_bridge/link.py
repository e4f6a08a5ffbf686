"""The byte stream to a device: the one module that imports pyserial-asyncio.

A device is reached by URL:

* a serial port by path (``/dev/ttyUSB0``, ``/dev/ttyS1``, a pty such as ``/dev/pts/7``) or any
  pyserial URL (``socket://127.0.0.1:5020``, ``rfc2217://…``) — serial settings apply;
* a plain TCP service as ``tcp://host:port`` (NUT's ``upsd``).

:class:`Link` carries request/answer exchanges. The protocol cores decide when an answer is
complete (:class:`Receiver`); the link enforces the per-request deadline and translates every
OS, pyserial and asyncio error into :mod:`firmware_bridge.errors`. A failed exchange closes the
link, so stale bytes of a half-read answer can never be taken for the next one; the next request
opens it again, which is also how a device that was unplugged and comes back is recovered.
"""

from __future__ import annotations

import asyncio
import errno
import math
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import serial
import serial_asyncio_fast

from firmware_bridge.errors import (
    ConfigError,
    DeviceTimeout,
    DeviceUnavailable,
    RequestRefused,
)

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")

Parity = Literal["N", "E", "O"]
_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
_READ_SIZE = 4096


class Receiver(Protocol[T_co]):
    """A protocol core's view of one answer: fed bytes until it returns the decoded result.

    ``feed`` returns ``None`` while it needs more bytes and raises ``ProtocolViolation`` for
    bytes its protocol does not allow, including bytes past the end of the answer.
    """

    def feed(self, data: bytes) -> T_co | None: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a device is and how to talk to it; validated on construction."""

    url: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: Parity = "N"
    stopbits: int = 1
    connect_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.url or self.url != self.url.strip():
            raise ConfigError(f"url: {self.url!r} is not a device path or URL")
        if self.kind == "tcp":
            parts = urlsplit(self.url)
            if not parts.hostname or parts.port is None:
                raise ConfigError(f"url: {self.url!r} needs tcp://host:port")
        elif not (self.url.startswith("/") or "://" in self.url):
            raise ConfigError(f"url: {self.url!r} is neither a device path nor a URL")
        if self.baudrate not in serial.Serial.BAUDRATES:
            raise ConfigError(f"baudrate: {self.baudrate} is not a standard rate")
        if self.bytesize not in (7, 8):
            raise ConfigError(f"bytesize: {self.bytesize} must be 7 or 8")
        if self.parity not in _PARITY:
            raise ConfigError(f"parity: {self.parity!r} must be N, E or O")
        if self.stopbits not in (1, 2):
            raise ConfigError(f"stopbits: {self.stopbits} must be 1 or 2")
        if not (0 < self.connect_timeout_s <= 60) or math.isnan(self.connect_timeout_s):
            raise ConfigError(f"connect_timeout_s: {self.connect_timeout_s} is not in (0, 60]")

    @property
    def kind(self) -> Literal["serial", "tcp"]:
        return "tcp" if self.url.startswith("tcp://") else "serial"

    @property
    def character_time_s(self) -> float:
        """Time on the wire of one character (start, data, parity, stop bits)."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate


class Link:
    """One open byte stream to one device; exchanges on it run one at a time."""

    def __init__(
        self, endpoint: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.endpoint = endpoint
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, endpoint: Endpoint) -> Link:
        try:
            async with asyncio.timeout(endpoint.connect_timeout_s):
                if endpoint.kind == "tcp":
                    parts = urlsplit(endpoint.url)
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                else:
                    reader, writer = await serial_asyncio_fast.open_serial_connection(
                        url=endpoint.url,
                        baudrate=endpoint.baudrate,
                        bytesize=endpoint.bytesize,
                        parity=_PARITY[endpoint.parity],
                        stopbits=endpoint.stopbits,
                    )
        except TimeoutError as exc:
            raise DeviceUnavailable(
                f"{endpoint.url}: no connection within {endpoint.connect_timeout_s:g} s",
                reason="connect_timeout",
            ) from exc
        except (OSError, serial.SerialException, ValueError) as exc:
            raise DeviceUnavailable(
                f"{endpoint.url}: cannot open: {exc}", reason=_open_reason(exc)
            ) from exc
        return cls(endpoint, reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed

    async def exchange(self, request: bytes, receiver: Receiver[T], timeout_s: float) -> T:
        """Send ``request`` (may be empty) and read until ``receiver`` has its answer.

        Raises ``DeviceTimeout`` when the answer is not complete within ``timeout_s``,
        ``DeviceUnavailable`` when the stream ends or fails, and whatever the receiver raises
        for bad bytes. Any failure closes the link.
        """
        if self._closed:
            raise DeviceUnavailable(f"{self.endpoint.url}: link is closed", reason="closed")
        async with self._lock:
            try:
                async with asyncio.timeout(timeout_s):
                    return await self._exchange(request, receiver)
            except TimeoutError as exc:
                await self._abort()
                raise DeviceTimeout(
                    f"{self.endpoint.url}: no complete answer within {timeout_s:g} s"
                ) from exc
            except (OSError, serial.SerialException) as exc:
                await self._abort()
                raise DeviceUnavailable(f"{self.endpoint.url}: {exc}", reason="io_error") from exc
            except RequestRefused:
                # A whole answer was read (an exception response, an ERR line): the stream is
                # still in step, so the link stays open.
                raise
            except BaseException:
                await self._abort()
                raise

    async def _exchange(self, request: bytes, receiver: Receiver[T]) -> T:
        if request:
            self._writer.write(request)
            await self._writer.drain()
        while True:
            data = await self._reader.read(_READ_SIZE)
            if not data:
                raise DeviceUnavailable(
                    f"{self.endpoint.url}: the device closed the connection",
                    reason="disconnected",
                )
            result = receiver.feed(data)
            if result is not None:
                return result

    async def send(self, data: bytes, timeout_s: float) -> None:
        """Send bytes that have no answer (a ticket to print)."""
        if self._closed:
            raise DeviceUnavailable(f"{self.endpoint.url}: link is closed", reason="closed")
        async with self._lock:
            try:
                async with asyncio.timeout(timeout_s):
                    self._writer.write(data)
                    await self._writer.drain()
            except TimeoutError as exc:
                await self._abort()
                raise DeviceTimeout(
                    f"{self.endpoint.url}: could not send {len(data)} bytes in {timeout_s:g} s",
                    reason="send_timeout",
                ) from exc
            except (OSError, serial.SerialException) as exc:
                await self._abort()
                raise DeviceUnavailable(f"{self.endpoint.url}: {exc}", reason="io_error") from exc

    async def close(self) -> None:
        await self._abort()

    async def _abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()
        except (OSError, serial.SerialException, TimeoutError):
            # The device is gone or wedged; the descriptor is released either way.
            pass


def _open_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    err = getattr(exc, "errno", None)
    if err in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return "port_missing"
    if err in (errno.EACCES, errno.EPERM):
        return "permission_denied"
    if err == errno.EBUSY:
        return "port_busy"
    if "could not open port" in str(exc) and "No such file" in str(exc):
        return "port_missing"
    return "open_failed"


class Connection:
    """A link that opens on first use and again after a failure closed it.

    Drivers hold one of these per device: an unplugged device fails its exchange, the link is
    closed, and the next exchange tries to open it again — so a device that comes back is
    picked up by the next poll without a separate reconnect loop.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._link: Link | None = None
        self._opening = asyncio.Lock()
        self.opens = 0

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.closed

    async def link(self) -> Link:
        async with self._opening:
            if self._link is None or self._link.closed:
                self._link = await Link.open(self.endpoint)
                self.opens += 1
            return self._link

    async def exchange(self, request: bytes, receiver: Receiver[T], timeout_s: float) -> T:
        link = await self.link()
        return await link.exchange(request, receiver, timeout_s)

    async def send(self, data: bytes, timeout_s: float) -> None:
        link = await self.link()
        await link.send(data, timeout_s)

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close()
            self._link = None
