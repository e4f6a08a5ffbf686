"""ESC/POS receipt printers as bytes: real-time status in, tickets out (sans-IO).

Status is read with the four real-time requests ``DLE EOT n`` (``10 04 n``). Each is answered
with exactly one byte whose bits 0, 1, 4 and 7 are fixed at 0, 1, 1, 0 — that is how a status
byte is told apart from anything else on the line, so a byte that breaks them is a protocol
violation, not a status. The bit meanings follow the Epson ESC/POS reference:

======  ============================================================================
n = 1   printer: bit 2 drawer kick-out connector pin 3 high, bit 3 offline,
        bit 5 waiting for online recovery, bit 6 paper feed button pressed
n = 2   offline cause: bit 2 cover open, bit 3 paper being fed by the feed button,
        bit 5 printing stopped by paper end, bit 6 an error occurred
n = 3   error cause: bit 2 recoverable (mechanical) error, bit 3 autocutter error,
        bit 5 unrecoverable error, bit 6 automatically recoverable error (head too hot)
n = 4   roll paper sensor: bits 2+3 paper near end, bits 5+6 paper out
======  ============================================================================

Each request is one exchange (:class:`StatusQuery` + :class:`ReplyReceiver`), so an over-long
answer is pinned on the request that caused it; :class:`StatusReceiver` takes all four answers
when the four requests go out in one write (:data:`ALL_STATUS_REQUESTS`).

Tickets are ``ESC @``, the code page (Chinese mode ``FS &`` for GB18030/GBK, otherwise ``FS .``
and ``ESC t n``), one ``LF`` per line, ``ESC d n`` to bring the last line past the cutter, and
``GS V 1`` (partial cut). Text that the code page cannot carry becomes ``?`` and is counted.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Generic, TypeVar

from firmware_bridge.errors import ConfigError, ProtocolViolation
from firmware_bridge.health import OK, Assessment, Health

R_co = TypeVar("R_co", covariant=True)

# --- control codes and commands -----------------------------------------------------------

LF: Final = 0x0A
DLE: Final = 0x10
EOT: Final = 0x04
ESC: Final = 0x1B
FS: Final = 0x1C
GS: Final = 0x1D

INITIALIZE: Final = bytes((ESC, 0x40))
"""ESC @ — clear the print buffer and return to the power-on modes."""
CHINESE_MODE_ON: Final = bytes((FS, 0x26))
"""FS & — bytes from 0x81 up start a GB double-byte (or GB18030 four-byte) character."""
CHINESE_MODE_OFF: Final = bytes((FS, 0x2E))
"""FS . — every byte is one character of the table chosen with ESC t."""
SELECT_CODE_TABLE: Final = bytes((ESC, 0x74))
"""ESC t n — the single-byte character table (code page)."""
PRINT_AND_FEED_LINES: Final = bytes((ESC, 0x64))
"""ESC d n — print the buffer and feed n lines."""
CUT_PAPER: Final = bytes((GS, 0x56))
"""GS V m — cut; m = 1 is a partial cut (one point left uncut), m = 0 a full cut."""
PARTIAL_CUT: Final = 1
REAL_TIME_STATUS: Final = bytes((DLE, EOT))
"""DLE EOT n — answered at once with one status byte, even while offline."""

TICKET_FEED_LINES: Final = 4
"""Blank lines after the text: on common 58/80 mm mechanisms the cutter sits about three lines
above the print head, so without them the last line would be cut through."""

STATUS_REPLY_SIZE: Final = 1

_FIXED_MASK: Final = 0b1001_0011
_FIXED_VALUE: Final = 0b0001_0010


# --- real-time status ---------------------------------------------------------------------


class StatusRequest(enum.IntEnum):
    """The ``n`` of ``DLE EOT n``."""

    PRINTER = 1
    OFFLINE_CAUSE = 2
    ERROR_CAUSE = 3
    ROLL_PAPER = 4

    @property
    def request(self) -> bytes:
        return REAL_TIME_STATUS + bytes((self.value,))


@dataclass(frozen=True, slots=True)
class PrinterReply:
    """Answer to ``DLE EOT 1``."""

    drawer_pin3_high: bool
    offline: bool
    waiting_online_recovery: bool
    feed_button_pressed: bool


@dataclass(frozen=True, slots=True)
class OfflineCauseReply:
    """Answer to ``DLE EOT 2``: why the printer is offline."""

    cover_open: bool
    feeding_by_button: bool
    stopped_by_paper_end: bool
    error: bool


@dataclass(frozen=True, slots=True)
class ErrorCauseReply:
    """Answer to ``DLE EOT 3``: which error."""

    recoverable_error: bool
    """Mechanical error such as a jam; printing resumes after the cause is removed."""
    cutter_error: bool
    unrecoverable_error: bool
    auto_recoverable_error: bool
    """Printing paused until the head has cooled down; clears by itself."""


@dataclass(frozen=True, slots=True)
class RollPaperReply:
    """Answer to ``DLE EOT 4``."""

    near_end: bool
    paper_out: bool


def _bit(byte: int, n: int) -> bool:
    return bool(byte >> n & 1)


def _check(request: StatusRequest, byte: int) -> None:
    if byte & _FIXED_MASK != _FIXED_VALUE:
        raise ProtocolViolation(
            f"DLE EOT {request.value} answered 0x{byte:02x}: bits 0, 1, 4, 7 must read 0, 1, 1, 0",
            reason="bad_fixed_bits",
        )


def decode_printer(byte: int) -> PrinterReply:
    _check(StatusRequest.PRINTER, byte)
    return PrinterReply(
        drawer_pin3_high=_bit(byte, 2),
        offline=_bit(byte, 3),
        waiting_online_recovery=_bit(byte, 5),
        feed_button_pressed=_bit(byte, 6),
    )


def decode_offline_cause(byte: int) -> OfflineCauseReply:
    _check(StatusRequest.OFFLINE_CAUSE, byte)
    return OfflineCauseReply(
        cover_open=_bit(byte, 2),
        feeding_by_button=_bit(byte, 3),
        stopped_by_paper_end=_bit(byte, 5),
        error=_bit(byte, 6),
    )


def decode_error_cause(byte: int) -> ErrorCauseReply:
    _check(StatusRequest.ERROR_CAUSE, byte)
    return ErrorCauseReply(
        recoverable_error=_bit(byte, 2),
        cutter_error=_bit(byte, 3),
        unrecoverable_error=_bit(byte, 5),
        auto_recoverable_error=_bit(byte, 6),
    )


def decode_roll_paper(byte: int) -> RollPaperReply:
    """Decode ``DLE EOT 4``.

    The spec sets both bits of a pair together, but some printers (and Citizen's documentation)
    set only one of them. Either bit of a pair counts: a kiosk that believes a half-reported
    paper-out stops taking print jobs for a roll that may still have paper, which staff see and
    fix; one that ignores it prints a citizen's receipt into nothing, which nobody sees.
    """
    _check(StatusRequest.ROLL_PAPER, byte)
    return RollPaperReply(
        near_end=bool(byte & 0b0000_1100),
        paper_out=bool(byte & 0b0110_0000),
    )


@dataclass(frozen=True, slots=True)
class StatusQuery(Generic[R_co]):
    """One real-time request and the decoder of its one-byte answer."""

    number: StatusRequest
    decode: Callable[[int], R_co]

    @property
    def request(self) -> bytes:
        return self.number.request


PRINTER_QUERY: Final = StatusQuery(StatusRequest.PRINTER, decode_printer)
OFFLINE_CAUSE_QUERY: Final = StatusQuery(StatusRequest.OFFLINE_CAUSE, decode_offline_cause)
ERROR_CAUSE_QUERY: Final = StatusQuery(StatusRequest.ERROR_CAUSE, decode_error_cause)
ROLL_PAPER_QUERY: Final = StatusQuery(StatusRequest.ROLL_PAPER, decode_roll_paper)

ALL_STATUS_REQUESTS: Final = b"".join(r.request for r in StatusRequest)
"""The four requests in one write, for :class:`StatusReceiver`."""


class ReplyReceiver(Generic[R_co]):
    """Receives the one-byte answer to one :class:`StatusQuery` (a ``link.Receiver``).

    Nothing yet is ``None`` (the link's deadline turns a missing answer into a timeout); more
    than one byte is ``ProtocolViolation(reason="overlong")``.
    """

    def __init__(self, query: StatusQuery[R_co]) -> None:
        self._query = query
        self._done = False

    def feed(self, data: bytes) -> R_co | None:
        if not data:
            return None
        if self._done or len(data) > STATUS_REPLY_SIZE:
            raise ProtocolViolation(
                f"DLE EOT {self._query.number.value} answered more than one byte: {data.hex(' ')}",
                reason="overlong",
            )
        self._done = True
        return self._query.decode(data[0])


@dataclass(frozen=True, slots=True)
class PrinterStatus:
    """What the four status answers say, merged.

    ``paper_out`` is the roll sensor's paper-end or printing stopped by a paper end (``DLE EOT
    2`` bit 5), whichever the printer reports; ``online`` is the inverse of ``DLE EOT 1`` bit 3.
    """

    online: bool = True
    cover_open: bool = False
    paper_near_end: bool = False
    paper_out: bool = False
    cutter_error: bool = False
    unrecoverable_error: bool = False
    recoverable_error: bool = False
    auto_recoverable_error: bool = False
    error: bool = False
    """``DLE EOT 2`` bit 6: some error occurred (normally one of the three error bits with it)."""
    feed_button: bool = False
    """The feed button is pressed or paper is being fed by it (offline while it lasts)."""
    waiting_online_recovery: bool = False
    drawer_pin3_high: bool = False
    """Pin 3 of the drawer kick-out connector; open/closed depends on how the drawer is wired."""

    @classmethod
    def from_replies(
        cls,
        printer: PrinterReply,
        offline: OfflineCauseReply,
        error: ErrorCauseReply,
        paper: RollPaperReply,
    ) -> PrinterStatus:
        return cls(
            online=not printer.offline,
            cover_open=offline.cover_open,
            paper_near_end=paper.near_end,
            paper_out=paper.paper_out or offline.stopped_by_paper_end,
            cutter_error=error.cutter_error,
            unrecoverable_error=error.unrecoverable_error,
            recoverable_error=error.recoverable_error,
            auto_recoverable_error=error.auto_recoverable_error,
            error=offline.error,
            feed_button=printer.feed_button_pressed or offline.feeding_by_button,
            waiting_online_recovery=printer.waiting_online_recovery,
            drawer_pin3_high=printer.drawer_pin3_high,
        )

    @classmethod
    def decode(cls, replies: bytes) -> PrinterStatus:
        """From the four answer bytes of ``DLE EOT 1..4`` in order."""
        if len(replies) != len(StatusRequest):
            raise ProtocolViolation(
                f"expected {len(StatusRequest)} status bytes, got {len(replies)}",
                reason="overlong" if len(replies) > len(StatusRequest) else "short",
            )
        return cls.from_replies(
            decode_printer(replies[0]),
            decode_offline_cause(replies[1]),
            decode_error_cause(replies[2]),
            decode_roll_paper(replies[3]),
        )


class StatusReceiver:
    """Receives the answers to :data:`ALL_STATUS_REQUESTS`: four bytes, checked as they come."""

    def __init__(self) -> None:
        self._got = bytearray()
        self._done = False

    def feed(self, data: bytes) -> PrinterStatus | None:
        if (self._done and data) or len(self._got) + len(data) > len(StatusRequest):
            raise ProtocolViolation(
                f"more than {len(StatusRequest)} bytes for four status requests: "
                f"{(bytes(self._got) + data).hex(' ')}",
                reason="overlong",
            )
        for byte in data:
            _check(StatusRequest(len(self._got) + 1), byte)
            self._got.append(byte)
        if len(self._got) < len(StatusRequest):
            return None
        self._done = True
        return PrinterStatus.decode(bytes(self._got))


_WHY: Final[Mapping[str, str]] = MappingProxyType(
    {
        "paper_out": "paper out",
        "cover_open": "cover open",
        "cutter_error": "autocutter error (jammed or blocked cutter)",
        "unrecoverable_error": "unrecoverable error: needs service",
        "recoverable_error": "mechanical error (paper jam?), printing stopped",
        "unspecified_error": "the printer reports an error without saying which",
        "offline": "offline",
        "paper_near_end": "paper near its end",
        "auto_recoverable_error": "print head too hot, printing paused",
        "feed_button": "paper is being fed with the feed button",
    }
)


def assess(status: PrinterStatus) -> Assessment:
    """Health of a printer from its status, with stable reason codes.

    Faulty (cannot print a ticket now): ``paper_out``, ``cover_open``, ``cutter_error``,
    ``unrecoverable_error``, ``recoverable_error``, ``unspecified_error``, ``offline`` (only when
    nothing else explains it). Degraded: ``paper_near_end``, ``auto_recoverable_error``,
    ``feed_button`` (it prints again by itself).
    """
    faults: list[str] = []
    if status.paper_out:
        faults.append("paper_out")
    if status.cover_open:
        faults.append("cover_open")
    if status.cutter_error:
        faults.append("cutter_error")
    if status.unrecoverable_error:
        faults.append("unrecoverable_error")
    if status.recoverable_error:
        faults.append("recoverable_error")
    explained_error = (
        status.cutter_error
        or status.unrecoverable_error
        or status.recoverable_error
        or status.auto_recoverable_error
    )
    if status.error and not explained_error:
        faults.append("unspecified_error")
    warnings: list[str] = []
    if status.auto_recoverable_error:
        warnings.append("auto_recoverable_error")
    if status.feed_button:
        warnings.append("feed_button")
    if status.paper_near_end:
        warnings.append("paper_near_end")
    # Offline is a consequence; it is its own reason only when no other condition explains it.
    if (
        not status.online
        and not faults
        and not (status.auto_recoverable_error or status.feed_button)
    ):
        faults.append("offline")
    if faults:
        return Assessment(Health.FAULTY, tuple(faults), "; ".join(_WHY[r] for r in faults))
    if warnings:
        return Assessment(Health.DEGRADED, tuple(warnings), "; ".join(_WHY[r] for r in warnings))
    return OK


# --- tickets ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodePage:
    """A character encoding the printer can be switched to."""

    name: str
    codec: str
    table: int | None
    """``n`` of ``ESC t n``; ``None`` for the double-byte Chinese mode (``FS &``)."""

    @property
    def chinese(self) -> bool:
        return self.table is None


# Table numbers as in Epson's ESC t list; Chinese printers follow it for these pages.
CODE_PAGES: Final[Mapping[str, CodePage]] = MappingProxyType(
    {
        page.name: page
        for page in (
            CodePage("gb18030", "gb18030", None),
            CodePage("gbk", "gbk", None),
            CodePage("cp437", "cp437", 0),
            CodePage("cp850", "cp850", 2),
            CodePage("cp860", "cp860", 3),
            CodePage("cp863", "cp863", 4),
            CodePage("cp865", "cp865", 5),
            CodePage("cp1252", "cp1252", 16),
            CodePage("cp866", "cp866", 17),
            CodePage("cp852", "cp852", 18),
            CodePage("cp858", "cp858", 19),
        )
    }
)


def code_page_named(name: str) -> CodePage:
    """The code page called ``name`` (case-insensitive); ``ConfigError`` naming the field."""
    page = CODE_PAGES.get(name.strip().lower())
    if page is None:
        raise ConfigError(
            f"code_page: {name!r} is not one of {', '.join(CODE_PAGES)}",
            reason="unknown_code_page",
        )
    return page


@dataclass(frozen=True, slots=True)
class EncodedTicket:
    """The bytes of one ticket and how much of its text the code page could not carry."""

    data: bytes
    code_page: str
    lines: int
    replaced: int
    """Characters printed as ``?``: not in the code page, or control characters (which would
    otherwise reach the printer as commands)."""


def encode_text(text: str, page: CodePage) -> tuple[bytes, int]:
    """``text`` in ``page``, each character it cannot carry as ``?``; with their count."""
    out = bytearray()
    replaced = 0
    for char in text:
        if unicodedata.category(char) == "Cc":
            out += b"?"
            replaced += 1
            continue
        try:
            out += char.encode(page.codec)
        except UnicodeEncodeError:
            out += b"?"
            replaced += 1
    return bytes(out), replaced


def encode_ticket(lines: Sequence[str], code_page: str, *, cut: bool = True) -> EncodedTicket:
    """The bytes that print ``lines`` (one string is split at newlines) and cut the paper.

    Never fails on text: what the code page cannot carry becomes ``?`` and is counted in
    ``replaced``. An unknown code page is a ``ConfigError``.
    """
    page = code_page_named(code_page)
    if isinstance(lines, str):
        lines = lines.split("\n")
    out = bytearray(INITIALIZE)
    if page.table is None:
        out += CHINESE_MODE_ON
    else:
        out += CHINESE_MODE_OFF + SELECT_CODE_TABLE + bytes((page.table,))
    replaced = 0
    for line in lines:
        data, bad = encode_text(line, page)
        out += data
        out.append(LF)
        replaced += bad
    out += PRINT_AND_FEED_LINES + bytes((TICKET_FEED_LINES,))
    if cut:
        out += CUT_PAPER + bytes((PARTIAL_CUT,))
    return EncodedTicket(bytes(out), page.name, len(lines), replaced)


COMMON_HANZI: Final = (
    "一网通办 政务服务 自助终端",
    "身份证 社保 医保 公积金 户籍",
    "缴费 取号 预约 办理 窗口 谢谢",
)
"""常用汉字 of the kiosk's own tickets, in lines that fit a 58 mm roll (32 columns, a hanzi takes
two): a font that lacks them is useless here."""

RULER: Final = "0123456789" * 3 + "01"
"""32 columns, the width of a 58 mm roll in the standard font."""


def self_test_ticket(terminal_name: str, now_text: str, code_page: str = "gb18030") -> list[str]:
    """The lines of a test ticket: Chinese first, the terminal, the time, a font check.

    For a single-byte code page the font check is the upper half of that page (0x80–0xFF), so
    staff can compare it with the page's chart and see whether the printer's table matches.
    """
    page = code_page_named(code_page)
    if page.chinese:
        return [
            "打印测试 / Print test",
            f"终端 Terminal: {terminal_name}",
            f"时间 Time: {now_text}",
            f"代码页 Code page: {page.name} (FS &)",
            "字形检查 Font check:",
            *COMMON_HANZI,
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            "abcdefghijklmnopqrstuvwxyz",
            RULER,
            "以上汉字清晰完整，打印机即正常。",
        ]
    upper = []
    for byte in range(0x80, 0x100):
        try:
            char = bytes((byte,)).decode(page.codec)
        except UnicodeDecodeError:  # a hole in the page (cp1252 has a few)
            continue
        if unicodedata.category(char) != "Cc":
            upper.append(char)
    half = "".join(upper)
    return [
        "Print test",
        f"Terminal: {terminal_name}",
        f"Time: {now_text}",
        f"Code page: {page.name} (ESC t {page.table})",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "abcdefghijklmnopqrstuvwxyz",
        RULER,
        *(half[i : i + 32] for i in range(0, len(half), 32)),
    ]
