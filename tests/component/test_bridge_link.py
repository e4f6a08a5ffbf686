"""The link to a device over the operating system's real byte streams: a pty (what a USB-serial
adapter looks like), pyserial's socket:// URL and plain TCP. What a driver relies on: an answer
is assembled from chunks, a silent device times out within the request deadline, a device that
goes away is reported with a reason a person can act on, and the next request reopens it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import time
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from firmware_bridge.errors import (
    ConfigError,
    DeviceTimeout,
    DeviceUnavailable,
    ProtocolViolation,
)
from firmware_bridge.link import Connection, Endpoint, Link


class Line:
    """Receiver: an answer is one line ending in LF; a NUL byte breaks the protocol."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> bytes | None:
        self.buffer += data
        if b"\0" in self.buffer:
            raise ProtocolViolation("NUL in a line", reason="nul")
        line, sep, _ = self.buffer.partition(b"\n")
        return line if sep else None


class Pty:
    def __init__(self) -> None:
        self.master, slave = pty.openpty()
        tty.setraw(self.master)
        self.path = os.ttyname(slave)
        os.close(slave)

    async def read(self, n: int, timeout_s: float = 2.0) -> bytes:
        """What the driver wrote, read from the device's side without blocking the loop."""
        deadline = time.monotonic() + timeout_s
        os.set_blocking(self.master, False)
        out = b""
        while len(out) < n and time.monotonic() < deadline:
            try:
                out += os.read(self.master, n - len(out))
            except (BlockingIOError, OSError):
                await asyncio.sleep(0.01)
        return out


@pytest.fixture
def device_pty() -> Iterator[Pty]:
    p = Pty()
    yield p
    with contextlib.suppress(OSError):
        os.close(p.master)


@pytest_asyncio.fixture
async def upper_server() -> AsyncIterator[tuple[asyncio.Server, int]]:
    """A TCP device that answers each line with the line in upper case, in two chunks."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                answer = line.upper()
                writer.write(answer[:2])
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(answer[2:])
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield server, port
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("scheme", ["socket", "tcp"])
async def test_answer_assembled_from_chunks(
    upper_server: tuple[asyncio.Server, int], scheme: str
) -> None:
    _, port = upper_server
    link = await Link.open(Endpoint(f"{scheme}://127.0.0.1:{port}"))
    try:
        assert await link.exchange(b"status?\n", Line(), 1.0) == b"STATUS?"
        assert await link.exchange(b"again\n", Line(), 1.0) == b"AGAIN"
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_pty_request_and_answer(device_pty: Pty) -> None:
    link = await Link.open(Endpoint(device_pty.path, baudrate=115200))
    try:
        exchange = asyncio.create_task(link.exchange(b"\x10\x04\x01", Line(), 2.0))
        assert await device_pty.read(3) == b"\x10\x04\x01"
        os.write(device_pty.master, b"ok\n")
        assert await exchange == b"ok"
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_silent_device_times_out_within_the_deadline_and_closes(device_pty: Pty) -> None:
    link = await Link.open(Endpoint(device_pty.path))
    started = time.monotonic()
    with pytest.raises(DeviceTimeout) as caught:
        await link.exchange(b"hello\n", Line(), 0.3)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.5
    assert caught.value.reason == "no_answer"
    assert link.closed


@pytest.mark.asyncio
async def test_bad_bytes_close_the_link_so_they_cannot_leak_into_the_next_answer(
    device_pty: Pty,
) -> None:
    conn = Connection(Endpoint(device_pty.path))
    first = asyncio.create_task(conn.exchange(b"a\n", Line(), 2.0))
    await device_pty.read(2)
    os.write(device_pty.master, b"x\0")
    with pytest.raises(ProtocolViolation):
        await first
    assert not conn.connected
    second = asyncio.create_task(conn.exchange(b"b\n", Line(), 2.0))
    await device_pty.read(2)
    os.write(device_pty.master, b"fine\n")
    assert await second == b"fine"
    assert conn.opens == 2
    await conn.close()


@pytest.mark.asyncio
async def test_device_closing_the_connection_is_reported_as_disconnected() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        link = await Link.open(Endpoint(f"tcp://127.0.0.1:{port}"))
        with pytest.raises(DeviceUnavailable) as caught:
            await link.exchange(b"status?\n", Line(), 2.0)
        assert caught.value.reason == "disconnected"
        assert link.closed
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("/dev/serial/by-id/usb-no-such-printer", "port_missing"),
        ("tcp://127.0.0.1:1", "connection_refused"),
        ("socket://127.0.0.1:1", "connection_refused"),
    ],
)
async def test_missing_device_is_unavailable_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(DeviceUnavailable) as caught:
        await Link.open(Endpoint(url))
    assert caught.value.reason == reason
    assert url in str(caught.value)


@pytest.mark.asyncio
async def test_connection_reopens_when_the_device_comes_back(tmp_path: Path) -> None:
    # A stable path (like udev's /dev/serial/by-id) that points at a new pty after a replug.
    path = tmp_path / "usb-printer"
    conn = Connection(Endpoint(str(path)))
    with pytest.raises(DeviceUnavailable) as caught:
        await conn.exchange(b"?\n", Line(), 0.5)
    assert caught.value.reason == "port_missing"

    device = Pty()
    path.symlink_to(device.path)
    try:
        answer = asyncio.create_task(conn.exchange(b"?\n", Line(), 2.0))
        await device.read(2)
        os.write(device.master, b"back\n")
        assert await answer == b"back"
    finally:
        os.close(device.master)
    # Unplugged: the pty's other end is gone, so the next exchange fails and closes the link.
    with pytest.raises(DeviceUnavailable):
        await conn.exchange(b"?\n", Line(), 0.5)
    assert not conn.connected
    await conn.close()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"url": ""}, "url"),
        ({"url": "ttyS1"}, "url"),
        ({"url": "tcp://127.0.0.1"}, "url"),
        ({"url": "/dev/ttyS1", "baudrate": 12345}, "baudrate"),
        ({"url": "/dev/ttyS1", "bytesize": 6}, "bytesize"),
        ({"url": "/dev/ttyS1", "parity": "X"}, "parity"),
        ({"url": "/dev/ttyS1", "stopbits": 3}, "stopbits"),
        ({"url": "/dev/ttyS1", "connect_timeout_s": 0}, "connect_timeout_s"),
    ],
)
def test_endpoint_names_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        Endpoint(**kwargs)  # type: ignore[arg-type]


def test_character_time_follows_the_serial_settings() -> None:
    assert Endpoint("/dev/ttyS1", baudrate=9600).character_time_s == pytest.approx(10 / 9600)
    assert Endpoint("/dev/ttyS1", baudrate=9600, parity="E", stopbits=2).character_time_s == (
        pytest.approx(12 / 9600)
    )
