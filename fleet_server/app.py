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
import logging
from pathlib import Path

from fleet_protocol.enrolment import RENEW_PATH
from fleet_server.api import make_app, serve
from fleet_server.batcher import PointBatcher
from fleet_server.config import ServerConfig
from fleet_server.enrolment_api import (
    make_enrolment_app,
    pki_upkeep,
    serve_enrolment,
    tls_context,
)
from fleet_server.errors import ConfigError, InfluxUnavailable
from fleet_server.influx import InfluxDB
from fleet_server.ingest import Ingest, IngestLimits
from fleet_server.metrics import ClockFaultView, IngestStats, SpoolView
from fleet_server.mqtt_ingest import MqttIngest
from fleet_server.registry import Registry, SiteRecord
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
    ):
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
        ingest = Ingest(
            registry,
            batcher,
            log,
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
            make_app(registry, stats, mqtt.connected.is_set), config.api.host, config.api.port
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
                if authority is not None and config.enrolment is not None:
                    tg.create_task(
                        pki_upkeep(authority, config.enrolment.upkeep_s, stopping),
                        name="pki-upkeep",
                    )
        finally:
            if stop_enrolment is not None:
                await stop_enrolment()
            await stop_api()


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
    while True:
        await sleep_unless_stopped(stopping, LAST_SEEN_EVERY_S)
        seen, ingest.last_seen = ingest.last_seen, {}
        await registry.touch(seen)
        if stopping.is_set():
            return
