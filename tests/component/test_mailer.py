"""The mailer over a real outbox file, with a fake mail server whose answers the test scripts:
retries and their spacing, giving up, refusals, idempotent enqueue, and several workers
sharing one outbox."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from fleet_protocol import terminal_id
from fleet_server.mail_message import (
    DeliveryDeferred,
    DeliveryRefused,
    Envelope,
    Mailbox,
    MessageError,
    Site,
    TerminalOffline,
    compose,
)
from fleet_server.mail_outbox import MailOutbox
from fleet_server.mailer import Mailer, RetryPolicy, retry_delay_s

pytestmark = pytest.mark.asyncio

T0 = 1_795_241_100_000
SECOND = 1000
DAY = 86_400 * SECOND
LOG = logging.getLogger("test-mailer")
NO_JITTER = RetryPolicy(jitter=0.0)


class Clock:
    """Wall-clock ms that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class FakeSender:
    """A mail server: ``down`` defers everything; ``answers`` (None = accept) go first."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.down = False
        self.answers: list[Exception | None] = []
        self.delivered: list[EmailMessage] = []
        self.attempts = 0
        self._delay_s = delay_s

    async def send(self, message: EmailMessage) -> None:
        self.attempts += 1
        await asyncio.sleep(self._delay_s)
        answer = self.answers.pop(0) if self.answers else None
        if answer is None and self.down:
            answer = DeliveryDeferred("connection refused")
        if answer is not None:
            raise answer
        self.delivered.append(message)

    def keys(self) -> list[str]:
        return [str(m["Message-ID"]) for m in self.delivered]


def alert(key: str, *, to: tuple[Mailbox, ...] | None = None) -> EmailMessage:
    envelope = Envelope(
        key,
        Mailbox("运维", "noreply@fleet.example.cn"),
        to if to is not None else (Mailbox("王主任", "wang@zhujing.example.cn"),),
        "fleet.example.cn",
        T0,
    )
    site = Site("朱泾镇党群服务中心", "金山区", "朱泾镇")
    return compose(TerminalOffline(site, terminal_id("zhujing-dqzx-01"), T0), envelope)


async def test_enqueue_is_durable_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    async with MailOutbox(path) as outbox:
        mailer = Mailer(outbox, FakeSender(), Clock(), LOG)
        assert await mailer.enqueue("decision-1", alert("decision-1")) is True
        assert await mailer.enqueue("decision-1", alert("decision-1")) is False

    # Another server process enqueuing the same decision, on the same file.
    async with MailOutbox(path) as outbox:
        mailer = Mailer(outbox, FakeSender(), Clock(), LOG)
        assert await mailer.enqueue("decision-1", alert("decision-1")) is False
        counts = await outbox.counts()
        assert (counts.queued, counts.sent, counts.failed) == (1, 0, 0)
        entry = await outbox.entry("decision-1")
        assert entry is not None
        assert entry.recipients == "wang@zhujing.example.cn"
        assert entry.subject.startswith("【离线】朱泾镇党群服务中心")


async def test_a_message_is_sent_as_composed(tmp_path: Path) -> None:
    sender = FakeSender()
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, Clock(), LOG)
        original = alert("decision-1")
        await mailer.enqueue("decision-1", original)
        assert await mailer.deliver_due() == 1
        assert await mailer.deliver_due() == 0

        [delivered] = sender.delivered
        assert delivered["Message-ID"] == "<alert.decision-1@fleet.example.cn>"
        assert delivered["Subject"] == original["Subject"]
        assert delivered.get_content() == original.get_content()
        entry = await outbox.entry("decision-1")
        assert entry is not None
        assert (entry.state, entry.attempts, entry.done_ms) == ("sent", 1, T0)
        assert (mailer.counters.sent, mailer.counters.retried, mailer.counters.failed) == (1, 0, 0)


async def test_enqueue_refuses_a_message_without_recipients(tmp_path: Path) -> None:
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, FakeSender(), Clock(), LOG)
        message = alert("decision-1")
        del message["To"]
        with pytest.raises(MessageError, match="no recipients"):
            await mailer.enqueue("decision-1", message)


async def test_temporary_failures_back_off_doubling_up_to_ten_minutes(tmp_path: Path) -> None:
    sender, clock = FakeSender(), Clock()
    sender.down = True
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, clock, LOG, policy=NO_JITTER)
        await mailer.enqueue("decision-1", alert("decision-1"))
        delays = []
        for _ in range(9):
            assert await mailer.deliver_due() == 1
            due = await outbox.next_due_ms()
            assert due is not None
            delays.append((due - clock.now) // SECOND)
            clock.now = due - 1
            assert await mailer.deliver_due() == 0  # not a moment early
            clock.now = due
        assert delays == [10, 20, 40, 80, 160, 320, 600, 600, 600]
        entry = await outbox.entry("decision-1")
        assert entry is not None
        assert (entry.state, entry.attempts, entry.last_error) == (
            "queued",
            9,
            "connection refused",
        )
        assert (mailer.counters.retried, mailer.counters.sent) == (9, 0)


async def test_jitter_shortens_delays_by_at_most_its_fraction(tmp_path: Path) -> None:
    policy = RetryPolicy()  # 10 s doubling, 20 % jitter
    assert retry_delay_s(policy, 1, 0.0) == 10.0
    assert 8.0 < retry_delay_s(policy, 1, 0.999) <= 10.0
    assert retry_delay_s(policy, 30, 0.0) == 600.0

    sender, clock = FakeSender(), Clock()
    sender.down = True
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, clock, LOG, rng=random.Random(7))
        for n in range(20):
            await mailer.enqueue(f"decision-{n}", alert(f"decision-{n}"))
        assert await mailer.deliver_due() == 20
        dues = []
        for n in range(20):
            entry = await outbox.entry(f"decision-{n}")
            assert entry is not None
            dues.append(entry.next_attempt_ms - T0)
        assert all(8 * SECOND <= d <= 10 * SECOND for d in dues)
        assert len(set(dues)) > 10  # spread out, not retrying in lockstep


async def test_after_days_of_failures_the_message_is_marked_failed(tmp_path: Path) -> None:
    assert RetryPolicy().give_up_after_s == 3 * 86_400
    sender, clock = FakeSender(), Clock()
    sender.down = True
    policy = RetryPolicy(jitter=0.0, give_up_after_s=3600)  # an hour: fewer steps to walk
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, clock, LOG, policy=policy)
        await mailer.enqueue("decision-1", alert("decision-1"))
        while (due := await outbox.next_due_ms()) is not None:
            clock.now = due
            await mailer.deliver_due()
        entry = await outbox.entry("decision-1")
        assert entry is not None
        assert entry.state == "failed"
        assert entry.last_error == "gave up after 12 attempts: connection refused"
        # Attempts at 0, 10, 30, 70, 150, 310, 630 s, then every 600 s: the one at 3630 s is
        # the first past the hour.
        assert entry.done_ms == T0 + 3630 * SECOND
        assert sender.attempts == entry.attempts == 12
        assert (mailer.counters.failed, mailer.counters.retried) == (1, 11)


async def test_a_refused_recipient_fails_at_once_without_retries(tmp_path: Path) -> None:
    sender, clock = FakeSender(), Clock()
    sender.answers = [DeliveryRefused("550 5.1.1 no such user")]
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, clock, LOG)
        await mailer.enqueue("decision-1", alert("decision-1"))
        assert await mailer.deliver_due() == 1
        clock.now += 4 * DAY
        assert await mailer.deliver_due() == 0
        assert await outbox.next_due_ms() is None
        entry = await outbox.entry("decision-1")
        assert entry is not None
        assert (entry.state, entry.attempts) == ("failed", 1)
        assert entry.last_error == "refused: 550 5.1.1 no such user"
        assert sender.attempts == 1
        assert (mailer.counters.failed, mailer.counters.retried) == (1, 0)


async def test_a_message_goes_through_once_the_server_takes_it(tmp_path: Path) -> None:
    sender, clock = FakeSender(), Clock()
    sender.answers = [DeliveryDeferred("421 try later"), DeliveryDeferred("timed out")]
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, clock, LOG, policy=NO_JITTER)
        await mailer.enqueue("decision-1", alert("decision-1"))
        for _ in range(3):
            clock.now = await outbox.next_due_ms() or clock.now
            await mailer.deliver_due()
        entry = await outbox.entry("decision-1")
        assert entry is not None
        assert (entry.state, entry.attempts, entry.done_ms) == ("sent", 3, T0 + 30 * SECOND)
        assert len(sender.delivered) == 1
        assert (mailer.counters.sent, mailer.counters.retried) == (1, 2)


async def test_an_unexpected_error_is_retried_and_the_next_message_still_goes(
    tmp_path: Path,
) -> None:
    sender, clock = FakeSender(), Clock()
    sender.answers = [RuntimeError("a bug in the adapter")]
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, clock, LOG, policy=NO_JITTER)
        await mailer.enqueue("decision-1", alert("decision-1"))
        await mailer.enqueue("decision-2", alert("decision-2"))
        assert await mailer.deliver_due() == 2
        assert sender.keys() == ["<alert.decision-2@fleet.example.cn>"]
        entry = await outbox.entry("decision-1")
        assert entry is not None
        assert entry.state == "queued"
        assert entry.last_error == "internal error: RuntimeError('a bug in the adapter')"
        clock.now = entry.next_attempt_ms
        assert await mailer.deliver_due() == 1
        assert len(sender.delivered) == 2


async def test_two_workers_on_one_outbox_send_each_message_once(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    clock = Clock()
    first, second = FakeSender(delay_s=0.002), FakeSender(delay_s=0.002)
    async with MailOutbox(path) as outbox_a, MailOutbox(path) as outbox_b:
        mailer_a = Mailer(outbox_a, first, clock, LOG)
        mailer_b = Mailer(outbox_b, second, clock, LOG)
        keys = [f"decision-{n}" for n in range(30)]
        for key in keys:
            # Both processes decide the same alerts; each is stored once.
            await asyncio.gather(
                mailer_a.enqueue(key, alert(key)), mailer_b.enqueue(key, alert(key))
            )
        tried = await asyncio.gather(mailer_a.deliver_due(), mailer_b.deliver_due())
        assert sum(tried) == 30
        assert min(tried) > 0  # both took part
        delivered = first.keys() + second.keys()
        assert sorted(delivered) == sorted(f"<alert.{k}@fleet.example.cn>" for k in keys)
        assert (await outbox_a.counts()).sent == 30


async def test_a_crashed_workers_message_is_taken_over_when_its_lease_ends(tmp_path: Path) -> None:
    clock, sender = Clock(), FakeSender()
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, clock, LOG)
        await mailer.enqueue("decision-1", alert("decision-1"))
        # Another process claims it, then dies without a word.
        claimed = await outbox.claim(clock.now, 120 * SECOND, "crashed-worker")
        assert claimed is not None
        assert await mailer.deliver_due() == 0
        clock.now += 119 * SECOND
        assert await mailer.deliver_due() == 0
        assert await outbox.next_due_ms() == T0 + 120 * SECOND
        clock.now += SECOND
        assert await mailer.deliver_due() == 1
        assert len(sender.delivered) == 1
        # The dead worker's late word changes nothing.
        assert not await outbox.finish(claimed.id, "crashed-worker", "failed", clock.now, "x")
        entry = await outbox.entry("decision-1")
        assert entry is not None
        assert (entry.state, entry.attempts) == ("sent", 2)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_run_wakes_at_once_on_enqueue_and_stops_promptly(tmp_path: Path) -> None:
    sender = FakeSender()
    stopping = asyncio.Event()
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, wall_ms, LOG, policy=RetryPolicy(idle_poll_s=60))
        task = asyncio.create_task(mailer.run(stopping), name="mailer")
        await asyncio.sleep(0.05)  # idle now, for up to a minute
        started = time.monotonic()
        await mailer.enqueue("decision-1", alert("decision-1"))
        async with asyncio.timeout(5):
            while not sender.delivered:
                await asyncio.sleep(0.005)
        assert time.monotonic() - started < 1.0
        stopping.set()
        async with asyncio.timeout(1):
            await task


async def test_run_retries_on_its_own_after_the_backoff(tmp_path: Path) -> None:
    sender = FakeSender()
    sender.answers = [DeliveryDeferred("connection refused")] * 3
    stopping = asyncio.Event()
    policy = RetryPolicy(first_delay_s=0.02, max_delay_s=0.05, idle_poll_s=60)
    async with MailOutbox(tmp_path / "outbox.sqlite3") as outbox:
        mailer = Mailer(outbox, sender, wall_ms, LOG, policy=policy)
        await mailer.enqueue("decision-1", alert("decision-1"))
        task = asyncio.create_task(mailer.run(stopping), name="mailer")
        async with asyncio.timeout(5):
            while not sender.delivered:
                await asyncio.sleep(0.005)
        stopping.set()
        await task
        assert sender.attempts == 4
        assert (mailer.counters.sent, mailer.counters.retried) == (1, 3)
