"""The ESC/POS printer driver: status by ``DLE EOT``, tickets that are refused when they
cannot come out, and a second look after printing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from firmware_bridge.errors import BridgeError, ConfigError, RequestRefused
from firmware_bridge.escpos.protocol import (
    ERROR_CAUSE_QUERY,
    OFFLINE_CAUSE_QUERY,
    PRINTER_QUERY,
    ROLL_PAPER_QUERY,
    PrinterStatus,
    ReplyReceiver,
    StatusQuery,
    assess,
    code_page_named,
    encode_ticket,
    self_test_ticket,
)
from firmware_bridge.health import Assessment, Health
from firmware_bridge.link import Connection, Endpoint
from firmware_bridge.watch import assessment_of_error

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class PrintResult:
    """What happened to one ticket.

    The bytes were sent; ``status_after`` is the printer's status read right after (``None``
    when it could not be read, ``assessment_after`` then says why). A faulty status after
    printing — paper out, cover opened — means the ticket may be incomplete.
    """

    bytes_sent: int
    replaced: int
    """Characters the code page could not carry, printed as ``?``."""
    status_before: PrinterStatus
    status_after: PrinterStatus | None
    assessment_after: Assessment

    @property
    def confirmed(self) -> bool:
        """The printer still reported itself able to print after the ticket."""
        return self.assessment_after.health in (Health.OK, Health.DEGRADED)


class EscPosPrinter:
    """An ESC/POS printer on a serial port, pty or ``socket://`` URL; a ``watch.Device``.

    Each poll sends ``DLE EOT 1..4`` one request at a time, each with ``timeout_s``. The link
    opens on first use and again after any failure, so an unplugged printer that comes back is
    picked up by the next poll.
    """

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        *,
        code_page: str = "gb18030",
        timeout_s: float = 1.0,
    ) -> None:
        if not name.strip():
            raise ConfigError("name: a printer needs a name")
        if not (0 < timeout_s <= 60) or math.isnan(timeout_s):
            raise ConfigError(f"timeout_s: {timeout_s} is not in (0, 60]")
        self._name = name
        self._code_page = code_page_named(code_page).name
        self._timeout_s = timeout_s
        self.endpoint = endpoint
        self._connection = Connection(endpoint)

    @property
    def name(self) -> str:
        return self._name

    @property
    def code_page(self) -> str:
        return self._code_page

    @property
    def connection(self) -> Connection:
        return self._connection

    async def _ask(self, query: StatusQuery[R]) -> R:
        return await self._connection.exchange(query.request, ReplyReceiver(query), self._timeout_s)

    async def poll(self) -> PrinterStatus:
        # One exchange per request: an extra byte is caught at the request that caused it, and
        # printers that drop real-time requests arriving back to back still answer.
        return PrinterStatus.from_replies(
            await self._ask(PRINTER_QUERY),
            await self._ask(OFFLINE_CAUSE_QUERY),
            await self._ask(ERROR_CAUSE_QUERY),
            await self._ask(ROLL_PAPER_QUERY),
        )

    def assess(self, status: PrinterStatus) -> Assessment:
        return assess(status)

    async def print_ticket(self, lines: Sequence[str], *, cut: bool = True) -> PrintResult:
        """Print ``lines`` if the printer can, then read its status again.

        Raises ``RequestRefused`` with the status's first reason (``paper_out``,
        ``cover_open``, ``offline``, …) when it cannot print, and ``DeviceUnavailable`` /
        ``ProtocolViolation`` when its status cannot be read; nothing is sent then.
        """
        before = await self.poll()
        health = assess(before)
        if health.health is Health.FAULTY:
            raise RequestRefused(
                f"{self._name}: not printing: {health.detail}", reason=health.reasons[0]
            )
        ticket = encode_ticket(lines, self._code_page, cut=cut)
        await self._connection.send(ticket.data, self._send_timeout_s(len(ticket.data)))
        after: PrinterStatus | None
        try:
            after = await self.poll()
        except BridgeError as exc:
            # The ticket is out of our hands; what matters now is reporting what was seen.
            after, assessment = None, assessment_of_error(exc)
        else:
            assessment = assess(after)
        return PrintResult(len(ticket.data), ticket.replaced, before, after, assessment)

    async def print_test_ticket(self, terminal_name: str, now_text: str) -> PrintResult:
        """The test ticket of :func:`~firmware_bridge.escpos.protocol.self_test_ticket`."""
        return await self.print_ticket(self_test_ticket(terminal_name, now_text, self._code_page))

    def _send_timeout_s(self, size: int) -> float:
        # Serial lines are slow (a 600-byte ticket takes 0.6 s at 9600 baud); allow the wire time
        # twice over on top of the request timeout.
        return self._timeout_s + 2 * size * self.endpoint.character_time_s

    async def close(self) -> None:
        await self._connection.close()
