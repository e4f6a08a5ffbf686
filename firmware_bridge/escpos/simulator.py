"""A simulated ESC/POS receipt printer, for tests, the demo and the fleet simulator.

:class:`SimulatedPrinterCore` is the printer without I/O: bytes in, answer bytes out, plus the
paper it printed. It reads the subset of ESC/POS that kiosks send (``ESC @``, ``ESC t``,
``ESC d``, ``FS &``, ``FS .``, ``GS V``, ``LF``, text in GB18030 or a single-byte page) and
answers ``DLE EOT 1..4`` from :class:`PrinterState`. It is deliberately strict — power-on
modes after ``ESC @`` are plain (no Chinese mode, page 0), a cut in the middle of a line is
ignored as on a real printer, and anything it does not understand is recorded in
``anomalies`` — so a wrong encoder shows up as garbled tickets or anomalies rather than
passing. Its command bytes and code-table numbers are written out here on purpose instead of
imported from :mod:`.protocol`: a mistake there must not be mirrored here.

:class:`SimulatedPrinter` serves a core on a pty (with a stable symlink, like udev's
``/dev/serial/by-id`` names) or on a loopback TCP port (``socket://``), and can be unplugged and
plugged back in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import ClassVar, Final, Literal, Protocol

_READ_SIZE: Final = 4096

# Epson's ESC t numbers, written out independently of protocol.CODE_PAGES (see module doc).
_CODE_TABLES: Final[Mapping[int, str]] = MappingProxyType(
    {
        0: "cp437",
        2: "cp850",
        3: "cp860",
        4: "cp863",
        5: "cp865",
        16: "cp1252",
        17: "cp866",
        18: "cp852",
        19: "cp858",
    }
)

Cut = Literal["partial", "full"]
_CUTS: Final[Mapping[int, Cut]] = MappingProxyType(
    {0: "full", 48: "full", 65: "full", 1: "partial", 49: "partial", 66: "partial"}
)
_PREFIXES: Final[Mapping[int, str]] = MappingProxyType(
    {0x10: "DLE", 0x1B: "ESC", 0x1C: "FS", 0x1D: "GS"}
)


@dataclass
class PrinterState:
    """What the simulated printer's sensors say; tests and the demo change it freely."""

    paper_near_end: bool = False
    paper_out: bool = False
    cover_open: bool = False
    cutter_error: bool = False
    recoverable_error: bool = False
    unrecoverable_error: bool = False
    auto_recoverable_error: bool = False
    offline: bool = False
    """Offline for no reported cause (the other conditions take it offline by themselves)."""
    feed_button: bool = False
    drawer_pin3_high: bool = False
    silent: bool = False
    """Present but deaf: reads and drops everything, answers nothing."""
    paper_left_tickets: int | None = None
    """Tickets left on the roll; at 0 the paper runs out (``None``: endless roll)."""
    single_bit_sensors: bool = False
    """Report near-end / paper-out with one bit of each pair only, as some printers do."""
    broken_fixed_bits: bool = False
    """Answer status requests with bytes whose fixed bits are wrong."""
    extra_reply_bytes: bytes = b""
    """Appended to every status answer (an over-long answer)."""

    @property
    def any_error(self) -> bool:
        return (
            self.cutter_error
            or self.recoverable_error
            or self.unrecoverable_error
            or self.auto_recoverable_error
        )

    @property
    def online(self) -> bool:
        return not (
            self.offline or self.paper_out or self.cover_open or self.feed_button or self.any_error
        )

    def status_byte(self, n: int) -> int:
        """The answer to ``DLE EOT n`` (1..4)."""
        byte = 0x12  # bit 1 and bit 4 are fixed on
        flags: tuple[tuple[bool, int], ...]
        if n == 1:
            flags = (
                (self.drawer_pin3_high, 0x04),
                (not self.online, 0x08),
                # Errors that wait for the cause to be removed (and DLE ENQ) to go online.
                (self.recoverable_error or self.cutter_error, 0x20),
                (self.feed_button, 0x40),
            )
        elif n == 2:
            flags = (
                (self.cover_open, 0x04),
                (self.feed_button, 0x08),
                (self.paper_out, 0x20),
                (self.any_error, 0x40),
            )
        elif n == 3:
            flags = (
                (self.recoverable_error, 0x04),
                (self.cutter_error, 0x08),
                (self.unrecoverable_error, 0x20),
                (self.auto_recoverable_error, 0x40),
            )
        else:
            flags = (
                (self.paper_near_end or self.paper_out, 0x04 if self.single_bit_sensors else 0x0C),
                (self.paper_out, 0x40 if self.single_bit_sensors else 0x60),
            )
        for on, mask in flags:
            if on:
                byte |= mask
        if self.broken_fixed_bits:
            byte ^= 0x81
        return byte


@dataclass(frozen=True, slots=True)
class PrintedTicket:
    """One ticket as it came out of the printer."""

    lines: tuple[str, ...]
    cut: Cut

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class _Modes:
    chinese: bool = False
    table: int = 0


class SimulatedPrinterCore:
    """The printer without I/O: :meth:`feed` takes bytes and returns the answer bytes."""

    def __init__(
        self, state: PrinterState | None = None, *, chinese_codec: str = "gb18030"
    ) -> None:
        self.state = state if state is not None else PrinterState()
        self.chinese_codec = chinese_codec
        """The printer's Chinese font encoding (what ``FS &`` mode reads)."""
        self.printed: list[PrintedTicket] = []
        self.anomalies: list[str] = []
        """What a real printer would print as garbage or ignore; empty for a good encoder."""
        self.lost_bytes = 0
        """Printing bytes that arrived while the printer could not print, and were dropped."""
        self.status_requests = 0
        self._modes = _Modes()
        self._pending = bytearray()
        self._line: list[str] = []
        self._lines: list[str] = []

    @property
    def tickets(self) -> list[str]:
        """The text of each printed and cut ticket, oldest first."""
        return [t.text for t in self.printed]

    @property
    def uncut_lines(self) -> tuple[str, ...]:
        """Lines printed since the last cut."""
        return tuple(self._lines)

    def new_connection(self) -> None:
        """A new host connection: a half-received command of the old one is dropped."""
        self._pending.clear()

    def feed(self, data: bytes) -> bytes:
        """Process bytes from the host; return the printer's answers to them."""
        if self.state.silent:
            self._pending.clear()
            return b""
        self._pending += data
        answer = bytearray()
        pos = 0
        while pos < len(self._pending):
            used = self._step(pos, answer)
            if used == 0:  # an incomplete command or character: wait for more bytes
                break
            pos += used
        del self._pending[:pos]
        return bytes(answer)

    # One command or character at ``pos``; returns the bytes it used (0: need more).
    def _step(self, pos: int, answer: bytearray) -> int:
        byte = self._pending[pos]
        if byte in _PREFIXES:
            return self._command(pos, answer)
        if self._modes.chinese and byte >= 0x80:
            return self._double_byte(pos)
        self._single_byte(byte)
        return 1

    def _command(self, pos: int, answer: bytearray) -> int:
        buf = self._pending
        if len(buf) - pos < 2:
            return 0
        key = (buf[pos], buf[pos + 1])
        handler = self._COMMANDS.get(key)
        if handler is None:
            self.anomalies.append(f"unknown command {_PREFIXES[key[0]]} 0x{key[1]:02x}")
            return 2
        return handler(self, pos, answer)

    def _param(self, pos: int, index: int) -> int | None:
        """Byte ``index`` of the command at ``pos`` (0 is the prefix), if it has arrived."""
        at = pos + index
        return self._pending[at] if at < len(self._pending) else None

    def _status(self, pos: int, answer: bytearray) -> int:  # DLE EOT n
        n = self._param(pos, 2)
        if n is None:
            return 0
        if 1 <= n <= 4:
            self.status_requests += 1
            answer.append(self.state.status_byte(n))
            answer += self.state.extra_reply_bytes
        else:
            self.anomalies.append(f"DLE EOT {n}: no such status")
        return 3

    def _initialize(self, pos: int, answer: bytearray) -> int:  # ESC @
        if self._line:
            self.anomalies.append("ESC @ discarded an unfinished line")
        self._line.clear()
        self._modes = _Modes()
        return 2

    def _select_table(self, pos: int, answer: bytearray) -> int:  # ESC t n
        n = self._param(pos, 2)
        if n is None:
            return 0
        if n in _CODE_TABLES:
            self._modes.table = n
        else:
            self.anomalies.append(f"ESC t {n}: no such code table")
        return 3

    def _feed_lines(self, pos: int, answer: bytearray) -> int:  # ESC d n
        if self._param(pos, 2) is None:
            return 0
        if self._line and self._printable(3):
            self._print_line()
        return 3

    def _chinese_on(self, pos: int, answer: bytearray) -> int:  # FS &
        self._modes.chinese = True
        return 2

    def _chinese_off(self, pos: int, answer: bytearray) -> int:  # FS .
        self._modes.chinese = False
        return 2

    def _cut_paper(self, pos: int, answer: bytearray) -> int:  # GS V m, GS V m n
        m = self._param(pos, 2)
        if m is None:
            return 0
        size = 4 if m in (65, 66) else 3
        if size == 4 and self._param(pos, 3) is None:
            return 0
        kind = _CUTS.get(m)
        if kind is None:
            self.anomalies.append(f"GS V {m}: no such cut")
        else:
            self._cut(kind, size)
        return size

    _COMMANDS: ClassVar[
        Mapping[tuple[int, int], Callable[[SimulatedPrinterCore, int, bytearray], int]]
    ] = MappingProxyType(
        {
            (0x10, 0x04): _status,
            (0x1B, 0x40): _initialize,
            (0x1B, 0x74): _select_table,
            (0x1B, 0x64): _feed_lines,
            (0x1C, 0x26): _chinese_on,
            (0x1C, 0x2E): _chinese_off,
            (0x1D, 0x56): _cut_paper,
        }
    )

    def _single_byte(self, byte: int) -> None:
        if byte == 0x0A:
            self._print_line()
        elif byte == 0x0D:  # carriage return: ignored while auto line feed is off
            pass
        elif byte < 0x20 or byte == 0x7F:
            self.anomalies.append(f"control byte 0x{byte:02x} in text")
        else:
            self._text(bytes((byte,)), _CODE_TABLES[self._modes.table])

    def _double_byte(self, pos: int) -> int:
        lead = self._pending[pos]
        if lead in (0x80, 0xFF):
            self.anomalies.append(f"0x{lead:02x} cannot start a Chinese character")
            self._text(b"?", "ascii")
            return 1
        second = self._param(pos, 1)
        if second is None:
            return 0
        size = 4 if 0x30 <= second <= 0x39 else 2
        if size == 2 and not (0x40 <= second <= 0xFE and second != 0x7F):
            self.anomalies.append(f"0x{lead:02x} 0x{second:02x} is not a Chinese character")
            self._text(b"?", "ascii")
            return 1
        if self._param(pos, size - 1) is None:
            return 0
        self._text(bytes(self._pending[pos : pos + size]), self.chinese_codec)
        return size

    def _text(self, data: bytes, codec: str) -> None:
        if not self._printable(len(data)):
            return
        try:
            self._line.append(data.decode(codec))
        except UnicodeDecodeError:
            self.anomalies.append(f"{data.hex(' ')} is not text in {codec}")
            self._line.append("\ufffd")

    def _printable(self, size: int) -> bool:
        if self.state.online or (self.state.auto_recoverable_error or self.state.feed_button):
            return True
        self.lost_bytes += size
        return False

    def _print_line(self) -> None:
        if self._printable(1):
            self._lines.append("".join(self._line))
        self._line.clear()

    def _cut(self, kind: Cut, size: int) -> None:
        if not self._printable(size):
            return
        if self._line:
            # GS V acts only at the beginning of a line; elsewhere a printer ignores it.
            self.anomalies.append("GS V in the middle of a line was ignored")
            return
        self.printed.append(PrintedTicket(tuple(self._lines), kind))
        self._lines.clear()
        left = self.state.paper_left_tickets
        if left is not None:
            self.state.paper_left_tickets = max(0, left - 1)
            if left <= 1:
                self.state.paper_out = True


# --- serving a core -----------------------------------------------------------------------


class _Port(Protocol):
    @property
    def url(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _PtyPort:
    """A pty whose slave is reached through a stable symlink; the core serves the master."""

    def __init__(self, core: SimulatedPrinterCore, link_path: Path) -> None:
        self._core = core
        self._link_path = link_path
        self._master: int | None = None
        self._slave: int | None = None

    @property
    def url(self) -> str:
        return str(self._link_path)

    async def start(self) -> None:
        master, slave = os.openpty()
        # Raw, so no echo and no line editing mangle binary ESC/POS; the simulator keeps the
        # slave open so the master never reads EIO while no host has the port open.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        temporary = self._link_path.with_name(f".{self._link_path.name}.new")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        temporary.symlink_to(os.ttyname(slave))
        temporary.replace(self._link_path)  # atomic: a host never sees the name missing here
        asyncio.get_running_loop().add_reader(master, self._readable)

    def _readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the pty is going away; stop() removes the reader
            return
        answer = self._core.feed(data)
        # When nobody reads the port and its buffer is full, the answer is lost, as a real
        # printer's would be.
        if answer:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                os.write(self._master, answer)

    async def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._link_path.unlink()
        if self._master is not None:
            asyncio.get_running_loop().remove_reader(self._master)
            os.close(self._master)
            self._master = None
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None
        self._core.new_connection()


class _TcpPort:
    """A loopback TCP server (``socket://``); the same port again after a restart."""

    def __init__(self, core: SimulatedPrinterCore, host: str) -> None:
        self._core = core
        self._host = host
        self._port = 0
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def url(self) -> str:
        return f"socket://{self._host}:{self._port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        self._core.new_connection()
        try:
            while data := await reader.read(_READ_SIZE):
                answer = self._core.feed(data)
                if answer:
                    writer.write(answer)
                    await writer.drain()
        except ConnectionError:
            pass  # the host went away; nothing to answer
        finally:
            self._clients.pop(task, None)
            writer.close()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        clients = list(self._clients.items())
        for _, writer in clients:
            writer.transport.abort()
        if clients:
            await asyncio.wait([task for task, _ in clients], timeout=2.0)
        await self._server.wait_closed()
        self._server = None


class SimulatedPrinter:
    """A :class:`SimulatedPrinterCore` served on a pty or a loopback socket.

    Use :meth:`on_pty` or :meth:`on_socket`; :attr:`url` is what a driver's ``Endpoint`` takes.
    :meth:`unplug` makes the device disappear (port closed, symlink removed), :meth:`replug`
    brings it back at the same URL with the same state and paper.
    """

    def __init__(self, core: SimulatedPrinterCore, port: _Port) -> None:
        self.core = core
        self._port = port
        self._plugged = False

    @classmethod
    async def on_pty(
        cls, link_path: str | os.PathLike[str], *, core: SimulatedPrinterCore | None = None
    ) -> SimulatedPrinter:
        core = core or SimulatedPrinterCore()
        printer = cls(core, _PtyPort(core, Path(link_path)))
        await printer.replug()
        return printer

    @classmethod
    async def on_socket(
        cls, *, core: SimulatedPrinterCore | None = None, host: str = "127.0.0.1"
    ) -> SimulatedPrinter:
        core = core or SimulatedPrinterCore()
        printer = cls(core, _TcpPort(core, host))
        await printer.replug()
        return printer

    @property
    def url(self) -> str:
        return self._port.url

    @property
    def state(self) -> PrinterState:
        return self.core.state

    @property
    def tickets(self) -> list[str]:
        return self.core.tickets

    @property
    def plugged(self) -> bool:
        return self._plugged

    async def unplug(self) -> None:
        if self._plugged:
            self._plugged = False
            await self._port.stop()

    async def replug(self) -> None:
        if not self._plugged:
            await self._port.start()
            self._plugged = True

    async def close(self) -> None:
        await self.unplug()

    async def __aenter__(self) -> SimulatedPrinter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
