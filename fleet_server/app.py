"""The fleet server process: wiring. Every task is named and owned by one TaskGroup.

- ``ingest``: the broker subscription, feeding :class:`~fleet_server.ingest.Ingest`;
- ``batcher``: batched writes to InfluxDB, acknowledging deliveries once stored, through the
  on-disk spool (``[influx] spool_path``) while InfluxDB is down or slow;
- ``last-seen``: records when each terminal was last heard from in the registry;
- ``pki-upkeep`` (with ``[enrolment]``): CRL freshness and revocation after renewal grace.

With ``[enrolment]`` the server also serves enrolment and renewal over HTTPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

from fleet_protocol.enrolment import RENEW_PATH
from fleet_server.alert_policy import AlertSettings
from fleet_server.alerting import AlertingCounters, AlertingService, AlertingSettings, wall_ms
from fleet_server.api import make_app, serve
from fleet_server.batcher import PointBatcher
from fleet_server.config import ServerConfig
from fleet_server.enrolment_api import (
    make_enrolment_app,
    pki_upkeep,
    serve_enrolment,
    tls_context,
)
from fleet_server.errors import ConfigError, InfluxUnavailable, RegistryError
from fleet_server.influx import InfluxDB
from fleet_server.ingest import Ingest, IngestLimits
from fleet_server.mail_message import Mailbox
from fleet_server.mail_outbox import MailOutbox
from fleet_server.mailer import Mailer
from fleet_server.metrics import AlertingView, ClockFaultView, IngestStats, SpoolView
from fleet_server.mqtt_ingest import MqttIngest
from fleet_server.presence_table import PresenceSettings
from fleet_server.registry import Registry, SiteRecord
from fleet_server.smtp import SmtpSender, SmtpSettings
from fleet_server.spool import Spool
from fleet_server.stopping import sleep_unless_stopped
from provisioning.authority import FleetAuthority
from provisioning.errors import ProvisioningError

LAST_SEEN_EVERY_S = 2.0

log = logging.getLogger("fleet-server")


async def migrate(config: ServerConfig) -> tuple[int, int]:
    async with Registry(config.registry_path) as registry:
        return await registry.migrate()


async def run(config: ServerConfig, stopping: asyncio.Event) -> None:
    async with (
        Registry(config.registry_path) as registry,
        InfluxDB(
            config.influx.url,
            config.influx.database,
            token=config.influx.token,
            timeout_s=config.influx.timeout_s,
        ) as influx,
        Spool(config.spool_path, config.influx.spool_max_bytes) as spool,
        contextlib.AsyncExitStack() as mail_stack,
    ):
        mailer = await _mailer(config, mail_stack)
        await registry.migrate()
        if not await _ensure_database(influx, stopping):
            return
        await registry.put_sites(SiteRecord(s.id, s.name, s.town, s.district) for s in config.sites)
        batcher = PointBatcher(
            influx.write,
            spool,
            config.influx.batch_points,
            config.influx.flush_interval_s,
            log,
            slow_write_s=config.influx.slow_write_s,
        )
        limits = config.ingest
        alerting = AlertingService(
            registry,
            await _alerting_settings(config),
            mailer,
            holder=config.broker.client_id,
            log=logging.getLogger("fleet-server.alerts"),
        )
        ingest = Ingest(
            registry,
            batcher,
            log,
            watcher=alerting,
            limits=IngestLimits(
                max_ahead_ms=int(limits.max_ahead_s * 1000),
                max_behind_ms=int(limits.max_behind_s * 1000),
                flood_per_minute=limits.flood_per_minute,
            ),
        )
        mqtt = MqttIngest(config.broker, log)

        def stats() -> IngestStats:
            return _stats(ingest, batcher, spool, mqtt.connected.is_set())

        authority = await _open_authority(config)
        stop_api = await serve(
            make_app(
                registry,
                stats,
                mqtt.connected.is_set,
                terminal_states=lambda: alerting.counters.statuses,
                mail_counters=(lambda: dataclasses.asdict(mailer.counters)) if mailer else None,
                alerting=lambda: _alerting_view(alerting.counters),
                ack_secret=await _ack_secret(config),
            ),
            config.api.host,
            config.api.port,
        )
        log.info("ops API on http://%s:%d", config.api.host, config.api.port)
        stop_enrolment = None
        try:
            if authority is not None and config.enrolment is not None:
                e = config.enrolment
                stop_enrolment = await serve_enrolment(
                    make_enrolment_app(authority, e.public_url.rstrip("/") + RENEW_PATH),
                    e.host,
                    e.port,
                    tls_context(authority.layout.root),
                )
                log.info("enrolment on https://%s:%d", e.host, e.port)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(mqtt.run(ingest.handle, stopping), name="ingest")
                tg.create_task(batcher.run(stopping), name="batcher")
                tg.create_task(_last_seen(registry, ingest, stopping), name="last-seen")
                tg.create_task(alerting.run(stopping), name="alerting")
                if mailer is not None:
                    tg.create_task(mailer.run(stopping), name="mailer")
                if authority is not None and config.enrolment is not None:
                    tg.create_task(
                        pki_upkeep(authority, config.enrolment.upkeep_s, stopping),
                        name="pki-upkeep",
                    )
        finally:
            if stop_enrolment is not None:
                await stop_enrolment()
            await stop_api()


def _alerting_view(c: AlertingCounters) -> AlertingView:
    return AlertingView(
        leading=c.leading,
        decisions=c.decisions,
        mails_queued=c.mails_queued,
        inputs_dropped=c.inputs_dropped,
        registry_errors=c.registry_errors,
    )


def _stats(ingest: Ingest, batcher: PointBatcher, spool: Spool, connected: bool) -> IngestStats:
    rejected: dict[str, dict[str, int]] = {}
    for (terminal, reason), n in ingest.rejected.items():
        rejected.setdefault(terminal, {})[reason] = n
    quarantined: dict[str, dict[str, int]] = {}
    for (terminal, why), n in ingest.quarantined.items():
        quarantined.setdefault(terminal, {})[why] = n
    c = batcher.counters
    depth = spool.depth
    return IngestStats(
        received={str(k): v for k, v in ingest.received.items()},
        rejected=rejected,
        points_written=c.points_written,
        batches_written=c.batches_written,
        write_retries=c.write_retries,
        points_rejected=c.points_rejected,
        broker_connected=connected,
        slow_writes=c.slow_writes,
        spool=SpoolView(
            batches=depth.batches,
            points=depth.points,
            bytes=depth.bytes,
            max_bytes=spool.max_bytes,
            holding=batcher.holding,
            batches_spooled=c.batches_spooled,
            points_spooled=c.points_spooled,
            batches_replayed=c.batches_replayed,
            points_replayed=c.points_replayed,
            errors=c.spool_errors,
        ),
        quarantined=quarantined,
        clock_faults={
            str(t): ClockFaultView(
                first_ms=f.first_ms, last_ms=f.last_ms, offset_ms=f.offset_ms, count=f.count
            )
            for t, f in ingest.clock_faults.items()
        },
        flooding=sorted(ingest.flooding()),
    )


async def _mailer(config: ServerConfig, stack: contextlib.AsyncExitStack) -> Mailer | None:
    m = config.mail
    if m is None:
        log.info("no [mail] section: alerts are decided and recorded, but not e-mailed")
        return None
    password = None
    if m.password_file is not None:
        password = (await _read_secret(m.password_file, "[mail] password_file")).decode().strip()
    sender = SmtpSender(
        SmtpSettings(
            host=m.smtp_host,
            port=m.smtp_port,
            mail_from=m.from_address,
            security=m.security,
            username=m.username,
            password=password,
            timeout_s=m.timeout_s,
        ),
        logging.getLogger("fleet-server.mail"),
    )
    outbox = await stack.enter_async_context(MailOutbox(config.mail_outbox_path))
    return Mailer(outbox, sender, wall_ms, logging.getLogger("fleet-server.mail"))


async def _ack_secret(config: ServerConfig) -> bytes | None:
    m = config.mail
    if m is None or m.ack_secret_file is None:
        return None
    secret = (await _read_secret(m.ack_secret_file, "[mail] ack_secret_file")).strip()
    if len(secret) < 16:
        raise ConfigError(f"[mail] ack_secret_file {m.ack_secret_file}: needs 16 bytes or more")
    return secret


async def _read_secret(path: str, what: str) -> bytes:
    try:
        return await asyncio.to_thread(Path(path).read_bytes)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it: {exc.strerror}") from exc


async def _alerting_settings(config: ServerConfig) -> AlertingSettings:
    a, m = config.alerts, config.mail

    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    return AlertingSettings(
        presence=PresenceSettings(
            stale_after_ms=ms(a.stale_after_s),
            heartbeat_timeout_ms=ms(a.heartbeat_timeout_s),
            planned_margin_ms=ms(a.planned_margin_s),
            flap_window_ms=ms(a.flap_window_s),
            flap_threshold=a.flap_threshold,
            flap_quiet_ms=ms(a.flap_quiet_s),
        ),
        alerts=AlertSettings(
            after_opening_ms=ms(a.after_opening_s),
            peripheral_grace_ms=ms(a.peripheral_grace_s),
            district_grace_ms=ms(a.district_grace_s),
            remind_every_ms=ms(a.remind_every_s),
            escalate_after_ms=ms(a.escalate_after_s),
            district_percent=a.district_percent,
            district_min_down=a.district_min_down,
        ),
        district_ops={d: tuple(addresses) for d, addresses in a.district_ops.items()},
        sender=Mailbox(m.from_name, m.from_address) if m else AlertingSettings().sender,
        mail_domain=m.from_address.rpartition("@")[2] if m else "localhost.localdomain",
        ack_base_url=m.ack_url if m else None,
        ack_secret=await _ack_secret(config),
        tick_s=a.tick_s,
    )


async def _open_authority(config: ServerConfig) -> FleetAuthority | None:
    if config.enrolment is None:
        return None
    try:
        return await asyncio.to_thread(FleetAuthority.open, Path(config.enrolment.pki_dir))
    except ProvisioningError as exc:
        raise ConfigError(f"[enrolment] pki_dir {config.enrolment.pki_dir}: {exc}") from exc


async def _ensure_database(influx: InfluxDB, stopping: asyncio.Event) -> bool:
    """Create the database if needed, waiting for InfluxDB to come up; False if stopped."""
    delay = 0.5
    while not stopping.is_set():
        try:
            await influx.ensure_database()
        except InfluxUnavailable as exc:
            log.warning("InfluxDB not reachable yet (%s); retrying in %.1f s", exc, delay)
            await sleep_unless_stopped(stopping, delay)
            delay = min(30.0, delay * 2)
        else:
            return True
    return False


async def _last_seen(registry: Registry, ingest: Ingest, stopping: asyncio.Event) -> None:
    """Write the times terminals were last heard to the registry every few seconds; what a
    failed write did not store is merged into the next (a busy registry stops nothing)."""
    failing = False
    while True:
        await sleep_unless_stopped(stopping, LAST_SEEN_EVERY_S)
        seen, ingest.last_seen = ingest.last_seen, {}
        try:
            await registry.touch(seen)
        except RegistryError as exc:
            for terminal, at in seen.items():
                ingest.last_seen[terminal] = max(at, ingest.last_seen.get(terminal, at))
            if not failing:
                log.warning("last-seen times not stored: %s; trying again", exc)
            failing = True
            if stopping.is_set():
                return  # a few seconds of last-seen times; the next start hears them anew
            continue
        if failing:
            log.info("last-seen times stored again")
        failing = False
        if stopping.is_set():
            return
