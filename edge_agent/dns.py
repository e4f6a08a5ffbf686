"""Adapter: does the broker's host name resolve, and how long does it take (system resolver).

A village network whose DNS is broken looks, from the kiosk, like a fleet server that is down;
this check tells the two apart on the status page and in telemetry.

The system resolver (``getaddrinfo``) blocks and cannot be cancelled: after the timeout it
still waits for its own (up to ~30 s with several name servers). So each lookup runs in its own
daemon thread, not in the worker threads shared with psutil and the outbox, and cannot hold up
the agent's exit; and a :class:`DnsProbe` never has more than one lookup running: while one
still hangs, the next check reports a failure without starting another.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Final, NamedTuple

DEFAULT_TIMEOUT_S: Final = 5.0


class Resolution(NamedTuple):
    ok: bool
    #: How long the lookup took (or how long it has been waiting, when it timed out), ms.
    ms: float


def is_address(host: str) -> bool:
    """Whether ``host`` is an IP literal (nothing to resolve)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def system_lookup(host: str, port: int) -> object:
    """The system resolver (blocking): raises OSError or UnicodeError when ``host`` does not
    resolve."""
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)


class DnsProbe:
    """Resolves one host name on demand; one probe per agent (no state shared between them).

    ``lookup`` is the blocking resolver, run in a thread of its own (swapped in tests).
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        lookup: Callable[[str, int], object] = system_lookup,
    ) -> None:
        self._host = host
        self._port = port
        self._timeout_s = timeout_s
        self._lookup = lookup
        self._pending: asyncio.Future[object] | None = None
        self._pending_since = 0.0

    async def resolve(self) -> Resolution | None:
        """The outcome of one lookup, or None when the host is an IP address (no lookup)."""
        if is_address(self._host):
            return None
        loop = asyncio.get_running_loop()
        if self._pending is not None and not self._pending.done():
            return Resolution(False, _ms_since(self._pending_since))
        started = time.monotonic()
        lookup: asyncio.Future[object] = loop.create_future()
        # The outcome of a lookup nobody waits for any more is of no interest; retrieve it so
        # asyncio does not log it as an exception never retrieved.
        lookup.add_done_callback(_forget)
        threading.Thread(
            target=_run_lookup,
            args=(self._lookup, self._host, self._port, loop, lookup),
            name=f"dns-lookup-{self._host}"[:64],
            daemon=True,
        ).start()
        self._pending, self._pending_since = lookup, started
        try:
            async with asyncio.timeout(self._timeout_s):  # not wait_for: see stopping.py
                await asyncio.shield(lookup)
        except (OSError, UnicodeError, TimeoutError):
            # gaierror is an OSError; an unencodable name is a UnicodeError.
            return Resolution(False, _ms_since(started))
        return Resolution(True, _ms_since(started))


def _run_lookup(
    lookup: Callable[[str, int], object],
    host: str,
    port: int,
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[object],
) -> None:
    try:
        result = lookup(host, port)
    except Exception as exc:  # noqa: BLE001 - handed to the awaiting task, which decides
        _deliver(loop, future, None, exc)
    else:
        _deliver(loop, future, result, None)


def _deliver(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[object],
    result: object,
    exc: Exception | None,
) -> None:
    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    # The agent may have stopped while the resolver hung: nobody is left to tell.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000.0


def _forget(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()
