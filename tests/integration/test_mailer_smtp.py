"""The mailer against a real SMTP server: the project's aiosmtpd sink, started in the test on a
free loopback port. Alerts arrive readable, survive the server being down and the mailer being
restarted, are never duplicated, and a refused recipient is not retried."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import ClassVar

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from fleet_protocol import terminal_id
from fleet_server.mail_message import (
    DeliveryDeferred,
    DeliveryRefused,
    Mailbox,
    Site,
    TerminalOffline,
    compose,
)
from fleet_server.mail_message import Envelope as MailEnvelope
from fleet_server.mail_outbox import MailOutbox
from fleet_server.mailer import Mailer, RetryPolicy
from fleet_server.smtp import SmtpSender, SmtpSettings
from provisioning.smtp_sink import SERVER_NAME, MaildirSink
from tests.integration.fleet import free_port

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

LOG = logging.getLogger("test-mailer-smtp")
OWNER = Mailbox("王主任", "wang@zhujing.example.cn")
NOBODY = "nobody@zhujing.example.cn"
BUSY = "busy@zhujing.example.cn"
FAST = RetryPolicy(first_delay_s=0.05, max_delay_s=0.2, idle_poll_s=30)


class Sink(MaildirSink):
    """The project's sink, refusing some recipients the way a real server does."""

    refusals: ClassVar[dict[str, str]] = {
        NOBODY: "550 5.1.1 <nobody@zhujing.example.cn>: Recipient address rejected",
        BUSY: "450 4.2.1 Mailbox busy, try again later",
    }

    def __init__(self, maildir: Path) -> None:
        super().__init__(maildir)
        self.rcpt_tries: list[str] = []

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        del server, session, rcpt_options
        self.rcpt_tries.append(address)
        if address in self.refusals:
            return self.refusals[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"


@contextlib.asynccontextmanager
async def smtp_server(port: int, maildir: Path) -> AsyncIterator[Sink]:
    maildir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    sink = Sink(maildir)
    server = await loop.create_server(
        lambda: SMTP(sink, hostname=SERVER_NAME, enable_SMTPUTF8=True, loop=loop),
        host="127.0.0.1",
        port=port,
    )
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()


def sender(port: int, security: str = "none") -> SmtpSender:
    settings = SmtpSettings(
        host="127.0.0.1",
        port=port,
        mail_from="bounces@fleet.example.cn",
        security=security,  # type: ignore[arg-type]
        timeout_s=5,
        local_hostname="fleet-test",
    )
    return SmtpSender(settings, LOG)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def alert(key: str, *to: Mailbox) -> EmailMessage:
    envelope = MailEnvelope(
        key,
        Mailbox("金山区政务自助终端运维", "noreply@fleet.example.cn"),
        to or (OWNER,),
        "fleet.example.cn",
        wall_ms(),
    )
    site = Site("朱泾镇党群服务中心", "金山区", "朱泾镇")
    offline_since = wall_ms() - 5 * 60_000
    return compose(TerminalOffline(site, terminal_id("zhujing-dqzx-01"), offline_since), envelope)


def received(maildir: Path) -> list[EmailMessage]:
    """Every message the sink stored, oldest first (envelope headers included)."""
    parser = BytesParser(EmailMessage, policy=policy.default)
    if not maildir.exists():
        return []
    return [parser.parsebytes(p.read_bytes()) for p in sorted(maildir.glob("*.eml"))]


async def until(check: Callable[[], object], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(mailer: Mailer) -> AsyncIterator[Mailer]:
    stopping = asyncio.Event()
    task = asyncio.create_task(mailer.run(stopping), name="mailer")
    try:
        yield mailer
    finally:
        stopping.set()
        async with asyncio.timeout(10):
            await task


async def test_an_alert_arrives_with_its_headers_and_readable_chinese(tmp_path: Path) -> None:
    port, maildir = free_port(), tmp_path / "maildir"
    async with (
        smtp_server(port, maildir),
        MailOutbox(tmp_path / "outbox.sqlite3") as outbox,
        running(Mailer(outbox, sender(port), wall_ms, LOG, policy=FAST)) as mailer,
    ):
        original = alert("decision-1")
        await mailer.enqueue("decision-1", original)
        await until(lambda: mailer.counters.sent == 1)
        entry = await outbox.entry("decision-1")

    [message] = received(maildir)
    assert message["X-Envelope-From"] == "<bounces@fleet.example.cn>"
    assert message["X-Envelope-To"] == "<wang@zhujing.example.cn>"
    assert message["Subject"] == (
        "【离线】朱泾镇党群服务中心 zhujing-dqzx-01 终端离线 / Terminal offline"
    )
    assert message["From"].addresses[0].display_name == "金山区政务自助终端运维"
    assert message["To"].addresses[0].display_name == "王主任"
    assert message["Message-ID"] == "<alert.decision-1@fleet.example.cn>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Date"] == original["Date"]
    text = message.get_content()
    assert "朱泾镇党群服务中心（金山区 朱泾镇）的自助终端 zhujing-dqzx-01" in text
    assert "went offline at" in text
    assert entry is not None
    assert (entry.state, entry.attempts) == ("sent", 1)
    assert mailer.counters.sent == 1


async def test_alerts_queued_while_the_server_is_down_arrive_once_it_is_back(
    tmp_path: Path,
) -> None:
    port, maildir = free_port(), tmp_path / "maildir"
    async with (
        MailOutbox(tmp_path / "outbox.sqlite3") as outbox,
        running(Mailer(outbox, sender(port), wall_ms, LOG, policy=FAST)) as mailer,
    ):
        assert await mailer.enqueue("decision-1", alert("decision-1"))
        assert await mailer.enqueue("decision-2", alert("decision-2"))
        await until(lambda: mailer.counters.retried >= 4)  # both tried, refused, tried again
        assert not await mailer.enqueue("decision-1", alert("decision-1"))  # a retried decision

        async with smtp_server(port, maildir):
            await until(lambda: mailer.counters.sent == 2)
            await asyncio.sleep(0.5)  # time enough for any duplicate to show up

    ids = sorted(str(m["Message-ID"]) for m in received(maildir))
    assert ids == [
        "<alert.decision-1@fleet.example.cn>",
        "<alert.decision-2@fleet.example.cn>",
    ]
    assert mailer.counters.failed == 0


async def test_a_refused_recipient_is_failed_without_retries(tmp_path: Path) -> None:
    port, maildir = free_port(), tmp_path / "maildir"
    async with (
        smtp_server(port, maildir) as sink,
        MailOutbox(tmp_path / "outbox.sqlite3") as outbox,
        running(Mailer(outbox, sender(port), wall_ms, LOG, policy=FAST)) as mailer,
    ):
        await mailer.enqueue("decision-bad", alert("decision-bad", Mailbox("无此人", NOBODY)))
        await mailer.enqueue("decision-good", alert("decision-good"))
        await until(lambda: mailer.counters.sent == 1 and mailer.counters.failed == 1)
        await asyncio.sleep(0.5)  # several backoff periods: nothing is retried
        bad = await outbox.entry("decision-bad")

    assert bad is not None
    assert (bad.state, bad.attempts) == ("failed", 1)
    assert bad.last_error is not None
    assert "550 5.1.1" in bad.last_error
    assert sink.rcpt_tries.count(NOBODY) == 1
    assert mailer.counters.retried == 0
    assert [str(m["Message-ID"]) for m in received(maildir)] == [
        "<alert.decision-good@fleet.example.cn>"
    ]


async def test_the_outbox_survives_a_mailer_restart(tmp_path: Path) -> None:
    port, maildir, path = free_port(), tmp_path / "maildir", tmp_path / "outbox.sqlite3"
    # The first server process queues the alert, fails to reach the mail server, and stops.
    async with (
        MailOutbox(path) as outbox,
        running(Mailer(outbox, sender(port), wall_ms, LOG, policy=FAST)) as first,
    ):
        await first.enqueue("decision-1", alert("decision-1"))
        await until(lambda: first.counters.retried >= 1)
    assert received(maildir) == []

    # The next one, on the same file, delivers it.
    async with (
        smtp_server(port, maildir),
        MailOutbox(path) as outbox,
        running(Mailer(outbox, sender(port), wall_ms, LOG, policy=FAST)) as second,
    ):
        await until(lambda: second.counters.sent == 1)
        await asyncio.sleep(0.3)
        entry = await outbox.entry("decision-1")

    assert [str(m["Message-ID"]) for m in received(maildir)] == [
        "<alert.decision-1@fleet.example.cn>"
    ]
    assert entry is not None
    assert entry.state == "sent"
    assert entry.attempts >= 2


async def test_the_sender_tells_temporary_from_permanent_failures(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(DeliveryDeferred, match="cannot deliver"):
        await sender(port).send(alert("decision-1"))  # nothing listening
    async with smtp_server(port, tmp_path / "maildir"):
        with pytest.raises(DeliveryRefused, match=r"550 5\.1\.1"):
            await sender(port).send(alert("decision-1", Mailbox("无此人", NOBODY)))
        with pytest.raises(DeliveryDeferred, match=r"450 4\.2\.1"):
            await sender(port).send(alert("decision-1", Mailbox("忙", BUSY)))
        # STARTTLS required but this server offers none: a setup problem, retried.
        with pytest.raises(DeliveryDeferred):
            await sender(port, security="starttls").send(alert("decision-1"))
    assert received(tmp_path / "maildir") == []
