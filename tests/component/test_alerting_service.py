"""The alerting service on a real registry and a real mail outbox, with an injected clock.

Two services share one registry file, as two server processes would: both are fed every
state message (the state subscription is not shared); one decides, and each e-mail is
queued once. The SMTP side is a recording sender: the real SMTP path has its own tests.
"""

from __future__ import annotations

import asyncio
import logging
from email.message import EmailMessage
from pathlib import Path

import pytest

from fleet_protocol.ids import TerminalId, site_id
from fleet_protocol.messages import State
from fleet_protocol.sites import Interval, OpeningHours, Owner, Schedule, Site, SiteKind
from fleet_server.alerting import AlertingService, AlertingSettings
from fleet_server.errors import RegistryError
from fleet_server.mail_outbox import MailOutbox
from fleet_server.mailer import Mailer
from fleet_server.presence_table import MINUTE, SECOND
from fleet_server.registry import Registry

# Monday 2026-11-23 10:00 in Shanghai (02:00 UTC): inside the office hours below.
MONDAY_10 = 1_795_399_200_000
OFFICE = OpeningHours(
    **{d: (Interval.parse("08:30-17:00"),) for d in ("mon", "tue", "wed", "thu", "fri")}
)
SITE = Site(
    id=site_id("zhujing-dqzx"),
    name="朱泾镇党群服务中心",
    district="金山区",
    town="朱泾镇",
    kind=SiteKind.PARTY_MASS_CENTRE,
    address="人民路1号",
    owners=(Owner(name="王磊", email="wang.lei@zhujing.example.gov.cn"),),
    schedule=Schedule(hours=OFFICE),
    grace_s=120,
)
KIOSK = TerminalId("zhujing-dqzx-01")
log = logging.getLogger("test-alerting")


class Recorder:
    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []

    async def send(self, message: EmailMessage) -> None:
        self.sent.append(message)


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def birth(session: int, ts: int) -> State:
    return State(online=True, session=session, ts=ts, site=SITE.id)


def lost(session: int, ts: int) -> State:
    return State(online=False, session=session, ts=ts, reason="lost")


@pytest.mark.asyncio
async def test_two_processes_one_offline_mail_after_grace_and_one_recovery(
    tmp_path: Path,
) -> None:
    clock = Clock(MONDAY_10)
    registry_file = tmp_path / "registry.sqlite3"
    recorder = Recorder()
    async with (
        Registry(registry_file) as registry_a,
        Registry(registry_file) as registry_b,
        MailOutbox(tmp_path / "mail.sqlite3") as outbox,
    ):
        await registry_a.migrate()
        await registry_a.import_sites([SITE])
        await registry_a.apply_state(KIOSK, birth(1, clock.ms), clock.ms)
        mailer = Mailer(outbox, recorder, clock, log)
        settings = AlertingSettings(mail_domain="fleet.example.gov.cn")
        services = [
            AlertingService(registry_a, settings, mailer, holder="a", log=log, clock=clock),
            AlertingService(registry_b, settings, mailer, holder="b", log=log, clock=clock),
        ]

        async def step(seconds: int) -> None:
            for _ in range(seconds):
                clock.ms += SECOND
                for service in services:
                    await service.step_once()
            await mailer.deliver_due()

        for service in services:
            service.state(KIOSK, birth(1, clock.ms), clock.ms)
        await step(5)
        assert [s.counters.leading for s in services] == [True, False]

        # The socket drops silently: the broker's will arrives, seen by both processes.
        for service in services:
            service.state(KIOSK, lost(1, clock.ms), clock.ms)
        await step(100)
        assert recorder.sent == [], "nothing before the grace period (120 s) has passed"
        await step(30)
        [offline] = recorder.sent
        assert "离线" in str(offline["Subject"])
        assert "zhujing-dqzx-01" in str(offline["Subject"])
        assert offline["To"].addresses[0].addr_spec == "wang.lei@zhujing.example.gov.cn"

        # The leader dies; the other process takes over once the lease lapses.
        services[0].counters.leading = False
        leader_gone = services.pop(0)
        del leader_gone
        await step(20)
        assert services[0].counters.leading
        assert len(recorder.sent) == 1, "taking over sends nothing again"

        back = clock.ms
        services[0].state(KIOSK, birth(2, back), back)
        await step(3)
        assert len(recorder.sent) == 2
        recovery = recorder.sent[1]
        assert "恢复" in str(recovery["Subject"]) or "back" in str(recovery["Subject"]).lower()
        log_entries = await registry_b.alert_log()
        assert [e.action for e in reversed(log_entries)] == ["sent", "resolved"]
        [view] = await registry_b.terminals()
        assert view.presence == "online"


@pytest.mark.asyncio
async def test_a_drop_at_night_mails_only_fifteen_minutes_after_opening(tmp_path: Path) -> None:
    night = MONDAY_10 - 12 * 60 * MINUTE  # Sunday 22:00
    clock = Clock(night)
    recorder = Recorder()
    async with (
        Registry(tmp_path / "registry.sqlite3") as registry,
        MailOutbox(tmp_path / "mail.sqlite3") as outbox,
    ):
        await registry.migrate()
        await registry.import_sites([SITE])
        await registry.apply_state(KIOSK, birth(1, night), night)
        mailer = Mailer(outbox, recorder, clock, log)
        service = AlertingService(
            registry, AlertingSettings(), mailer, holder="a", log=log, clock=clock
        )
        service.state(KIOSK, birth(1, night), night)
        await service.step_once()
        service.state(KIOSK, lost(1, night + SECOND), night + SECOND)
        opening = MONDAY_10 - 90 * MINUTE  # 08:30
        for to in (opening, opening + 14 * MINUTE):
            clock.ms = to
            await service.step_once()
            await mailer.deliver_due()
            assert recorder.sent == []
        clock.ms = opening + 15 * MINUTE + SECOND
        await service.step_once()
        await mailer.deliver_due()
        assert len(recorder.sent) == 1


@pytest.mark.asyncio
async def test_a_registry_failing_when_the_grace_ends_delays_the_mail_but_loses_it_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry fails for a few ticks just as the grace period ends (locked past its busy
    timeout by another process, a full disk). The server keeps running, and the offline
    decision the engines made in a tick whose save failed is stored and mailed with the next
    save: the engines have moved on by then and would not make it again."""
    clock = Clock(MONDAY_10)
    recorder = Recorder()
    async with (
        Registry(tmp_path / "registry.sqlite3") as registry,
        MailOutbox(tmp_path / "mail.sqlite3") as outbox,
    ):
        await registry.migrate()
        await registry.import_sites([SITE])
        await registry.apply_state(KIOSK, birth(1, clock.ms), clock.ms)
        mailer = Mailer(outbox, recorder, clock, log)
        settings = AlertingSettings(mail_domain="fleet.example.gov.cn", tick_s=0.01)
        service = AlertingService(registry, settings, mailer, holder="a", log=log, clock=clock)
        service.state(KIOSK, birth(1, clock.ms), clock.ms)
        await service.step_once()
        service.state(KIOSK, lost(1, clock.ms), clock.ms)
        await service.step_once()

        save = registry.save_engines
        failed = 0

        async def failing_save(*args: object, **kwargs: object) -> list[str]:
            nonlocal failed
            if failed < 5:
                failed += 1
                raise RegistryError("registry: cannot save the alerting state: disk I/O error")
            return await save(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(registry, "save_engines", failing_save)
        clock.ms += 121 * SECOND  # the grace period (120 s) is over
        stopping = asyncio.Event()
        running = asyncio.create_task(service.run(stopping))
        try:
            async with asyncio.timeout(10):
                while not recorder.sent:
                    assert not running.done(), "the alerting loop stopped"
                    await mailer.deliver_due()
                    await asyncio.sleep(0.02)
        finally:
            stopping.set()
            await running
        assert (failed, service.counters.registry_errors) == (5, 5)
        [offline] = recorder.sent
        assert "离线" in str(offline["Subject"])
        assert [e.action for e in await registry.alert_log()] == ["sent"]
