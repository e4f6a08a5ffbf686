"""The mail worker: delivers what the outbox holds, retrying until the mail server takes it.

- ``enqueue`` returns once the message is stored; a key already stored is not stored again.
- ``run`` sends every due message, then sleeps until the next one is due, an ``enqueue`` in
  this process wakes it, or ``idle_poll_s`` passes (other processes share the outbox).
- A temporary failure is retried with capped, jittered exponential backoff; after
  ``give_up_after_s`` the message is marked failed. A refusal marks it failed at once.
- Delivery is at least once: a worker that dies after the server accepted a message but before
  recording it leaves the message to be sent again when its lease runs out. The Message-ID is
  the same, so mail clients can tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address, AddressHeader
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Protocol

from fleet_server.mail_message import (
    DeliveryError,
    DeliveryRefused,
    MessageError,
    OutboxError,
)
from fleet_server.mail_outbox import MailOutbox, OutboxEntry


class MailSender(Protocol):
    async def send(self, message: EmailMessage) -> None:
        """Deliver ``message``; DeliveryRefused if it never can be, DeliveryError to retry."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_delay_s: float = 10.0
    max_delay_s: float = 600.0
    give_up_after_s: float = 3 * 24 * 3600.0
    jitter: float = 0.2
    """Each delay is shortened by a random part of up to this fraction, so that workers and
    messages that failed together do not retry together."""
    lease_s: float = 120.0
    """How long a claimed message is ours; longer than one SMTP conversation can take."""
    idle_poll_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.first_delay_s <= self.max_delay_s:
            raise ValueError("retry delays must satisfy 0 < first_delay_s <= max_delay_s")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1): {self.jitter}")
        if min(self.give_up_after_s, self.lease_s, self.idle_poll_s) <= 0:
            raise ValueError("give_up_after_s, lease_s and idle_poll_s must be positive")


def retry_delay_s(policy: RetryPolicy, failures: int, spread: float) -> float:
    """The wait after the ``failures``-th failed attempt in a row; ``spread`` in [0, 1) picks
    the jitter."""
    doubled = policy.first_delay_s * 2.0 ** min(max(failures - 1, 0), 40)
    return min(policy.max_delay_s, doubled) * (1.0 - policy.jitter * spread)


@dataclass(slots=True)
class MailCounters:
    sent: int = 0
    failed: int = 0
    retried: int = 0


class Mailer:
    def __init__(
        self,
        outbox: MailOutbox,
        sender: MailSender,
        clock: Callable[[], int],
        log: logging.Logger,
        *,
        policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``clock`` gives wall-clock ms since the epoch (it is compared across processes)."""
        self._outbox = outbox
        self._sender = sender
        self._clock = clock
        self._log = log
        self._policy = policy or RetryPolicy()
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not a secret
        self._worker = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._wake = asyncio.Event()
        self.counters = MailCounters()

    async def enqueue(self, key: str, message: EmailMessage) -> bool:
        """Store ``message`` under ``key`` for delivery; False if ``key`` was already stored."""
        recipients = [a.addr_spec for h in ("To", "Cc") for a in _addresses(message, h)]
        if not recipients:
            raise MessageError(f"mail {key} has no recipients")
        added = await self._outbox.add(
            key,
            message.as_bytes(policy=policy.SMTP),
            subject=str(message["Subject"] or ""),
            recipients=", ".join(recipients),
            now_ms=self._clock(),
        )
        if added:
            self._log.info("mail %s queued for %s", key, ", ".join(recipients))
            self._wake.set()
        else:
            self._log.debug("mail %s was already queued", key)
        return added

    async def deliver_due(self, stopping: asyncio.Event | None = None) -> int:
        """Try every message that is due now, one at a time; returns how many were tried."""
        tried = 0
        lease_ms = round(self._policy.lease_s * 1000)
        while stopping is None or not stopping.is_set():
            entry = await self._outbox.claim(self._clock(), lease_ms, self._worker)
            if entry is None:
                break
            await self._deliver(entry)
            tried += 1
        return tried

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver until ``stopping`` is set; a message being sent then is finished first."""
        self._log.info("mailer %s started", self._worker)
        while not stopping.is_set():
            self._wake.clear()
            wait_s = self._policy.idle_poll_s
            try:
                await self.deliver_due(stopping)
                due = await self._outbox.next_due_ms()
            except OutboxError as exc:
                self._log.error("mail outbox failed: %s; trying again in %.0f s", exc, wait_s)
            else:
                if due is not None:
                    wait_s = min(wait_s, max(0.0, (due - self._clock()) / 1000))
            await _wait_either(self._wake, stopping, wait_s)
        self._log.info("mailer %s stopped", self._worker)

    async def _deliver(self, entry: OutboxEntry) -> None:
        message = BytesParser(EmailMessage, policy=policy.SMTP).parsebytes(entry.message)
        try:
            await self._sender.send(message)
        except DeliveryRefused as exc:
            await self._fail(entry, f"refused: {exc}")
        except DeliveryError as exc:
            await self._retry_or_give_up(entry, str(exc))
        except Exception as exc:  # noqa: BLE001 -- a bug of ours must not stop every alert mail
            self._log.exception("mail %s: unexpected error while sending", entry.key)
            await self._retry_or_give_up(entry, f"internal error: {exc!r}")
        else:
            self.counters.sent += 1
            self._log.info("mail %s sent to %s", entry.key, entry.recipients)
            if not await self._outbox.finish(entry.id, self._worker, "sent", self._clock(), None):
                self._lost_lease(entry)

    async def _retry_or_give_up(self, entry: OutboxEntry, error: str) -> None:
        now = self._clock()
        if now - entry.created_ms >= self._policy.give_up_after_s * 1000:
            await self._fail(entry, f"gave up after {entry.attempts} attempts: {error}")
            return
        delay_s = retry_delay_s(self._policy, entry.attempts, self._rng.random())
        self.counters.retried += 1
        self._log.warning(
            "mail %s not delivered (attempt %d): %s; retrying in %.0f s",
            entry.key,
            entry.attempts,
            error,
            delay_s,
        )
        next_ms = now + max(1, round(delay_s * 1000))
        if not await self._outbox.retry_later(entry.id, self._worker, next_ms, error):
            self._lost_lease(entry)

    async def _fail(self, entry: OutboxEntry, why: str) -> None:
        self.counters.failed += 1
        self._log.error("mail %s to %s failed: %s", entry.key, entry.recipients, why)
        if not await self._outbox.finish(entry.id, self._worker, "failed", self._clock(), why):
            self._lost_lease(entry)

    def _lost_lease(self, entry: OutboxEntry) -> None:
        self._log.warning(
            "mail %s: lease ran out during the attempt; another worker may try it again",
            entry.key,
        )


def _addresses(message: EmailMessage, header: str) -> tuple[Address, ...]:
    value = message[header]
    return value.addresses if isinstance(value, AddressHeader) else ()


async def _wait_either(event: asyncio.Event, stopping: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` or ``stopping`` is set, or ``timeout_s`` passed."""
    if event.is_set() or stopping.is_set():
        return
    waits = {
        asyncio.create_task(event.wait(), name="mailer-wake"),
        asyncio.create_task(stopping.wait(), name="mailer-stop"),
    }
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits)
