"""The agent: wires the collectors to the uplink. No global state, so many can share a process.

Tasks (all named, all owned by one TaskGroup, all ended through ``stopping``):
- ``telemetry``: one system reading per interval, batched into the backlog;
- ``uplink``: the broker connection, publishing the backlog in order;
- ``renewal`` (only with ``enrolment.renew_url``): renews the certificate when two thirds of
  its lifetime have passed, then has the uplink reconnect with it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Final

from edge_agent.backlog import Backlog, Outgoing
from edge_agent.config import AgentConfig
from edge_agent.enrolment_client import renew
from edge_agent.errors import AgentError
from edge_agent.identity import Identity, load_identity, new_key, read_ca, store_identity
from edge_agent.mqtt_uplink import MqttUplink
from edge_agent.session import next_session
from edge_agent.stopping import sleep_unless_stopped
from edge_agent.telemetry import (
    BatchBuilder,
    MonotonicStamp,
    SystemSource,
    encode_batches,
    to_sample,
)
from fleet_protocol.messages import Telemetry
from fleet_protocol.topics import Channel, topic

#: Longest single sleep before renewal: a kiosk's clock is often wrong after a power cut and
#: set right later by NTP, so the time left is measured again at least this often.
RENEWAL_RECHECK_S: Final = 3600.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def agent_version() -> str:
    try:
        return version("kiosk-fleet")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        system: SystemSource,
        *,
        now_ms: Callable[[], int] = wall_ms,
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self._system = system
        self._now_ms = now_ms
        self._log = logger or logging.getLogger(f"kiosk-agent.{config.terminal.id}")
        self.backlog = Backlog(config.telemetry.max_backlog_batches)
        self._stamp = MonotonicStamp(now_ms)
        tcfg = config.telemetry
        self._batches = BatchBuilder(tcfg.batch_size, int(tcfg.max_batch_age_s * 1000))
        self._telemetry_topic = topic(config.terminal.id, Channel.TELEMETRY)
        self.uplink = MqttUplink(
            config.terminal.id,
            config.terminal.site,
            config.broker,
            config.tls,
            server_name=config.broker_server_name,
            backlog=self.backlog,
            next_session=self._next_session,
            now_ms=now_ms,
            agent_version=agent_version(),
            logger=self._log,
        )

    async def _next_session(self) -> int:
        return await asyncio.to_thread(next_session, self.config.state_dir)

    async def run(self, stopping: asyncio.Event) -> None:
        """Run until ``stopping`` is set, then shut down gracefully."""
        # The uplink stops only after the collectors have put their last partial batch in the
        # backlog, so the final flush includes it.
        uplink_stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            telemetry = tg.create_task(
                self._telemetry(stopping), name=f"telemetry:{self.config.terminal.id}"
            )
            tg.create_task(
                self.uplink.run(uplink_stopping), name=f"uplink:{self.config.terminal.id}"
            )
            renewal = None
            if self.config.enrolment.renew_url:
                renewal = tg.create_task(
                    self._renewal(stopping), name=f"renewal:{self.config.terminal.id}"
                )
            await stopping.wait()
            if renewal is not None:
                # A request in flight would hold the shutdown for its whole timeout; the
                # identity file is replaced atomically, so stopping mid-way leaves the old one.
                renewal.cancel()
            await telemetry
            uplink_stopping.set()
            self.backlog.wake()

    async def _telemetry(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.telemetry.interval_s
        next_tick = loop.time()
        while not stopping.is_set():
            reading = await self._system.read()
            seq, ts = self._stamp.next()
            batch = self._batches.add(to_sample(reading, seq, ts), self._now_ms())
            if batch is not None:
                self._queue(batch)
            next_tick = max(next_tick + interval, loop.time())
            await sleep_unless_stopped(stopping, next_tick - loop.time())
        rest = self._batches.take()
        if rest is not None:
            self._queue(rest)

    def _queue(self, batch: Telemetry) -> None:
        for payload in encode_batches(batch):
            self.backlog.put(Outgoing(self._telemetry_topic, payload))

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._now_ms() / 1000, dt.UTC)

    async def _renewal(self, stopping: asyncio.Event) -> None:
        retry_s = self.config.enrolment.retry_s
        path = self.config.tls.identity_path
        while not stopping.is_set():
            try:
                current = await asyncio.to_thread(load_identity, path)
            except AgentError as exc:
                self._log.error("certificate renewal: %s; looking again in %.0f s", exc, retry_s)
                await sleep_unless_stopped(stopping, retry_s)
                continue
            wait_s = (current.renew_at - self._now()).total_seconds()
            if wait_s > 0:
                await sleep_unless_stopped(stopping, min(wait_s, RENEWAL_RECHECK_S))
                continue
            try:
                renewed = await self._renew_once()
            except AgentError as exc:
                self._log.warning(
                    "certificate renewal failed (certificate %s valid until %s): %s; "
                    "next attempt in %.0f s",
                    current.serial_hex,
                    current.not_after.isoformat(timespec="seconds"),
                    exc,
                    retry_s,
                )
                await sleep_unless_stopped(stopping, retry_s)
                continue
            self._log.info(
                "certificate renewed: serial %s, valid until %s",
                renewed.serial_hex,
                renewed.not_after.isoformat(timespec="seconds"),
            )
            if self.config.enrolment.reconnect_after_renew:
                self.uplink.request_reconnect()
            if renewed.renew_due(self._now()):
                # A certificate already due (very short-lived, or our clock is ahead) must not
                # turn into a loop of renewals.
                await sleep_unless_stopped(stopping, retry_s)

    async def _renew_once(self) -> Identity:
        tls = self.config.tls
        key = await asyncio.to_thread(new_key)
        enrolment = await renew(
            self.config.enrolment.renew_url, tls.ca_path, tls.identity_path, key
        )
        ca_pem = await asyncio.to_thread(read_ca, tls.ca_path)
        return await asyncio.to_thread(
            store_identity,
            tls.identity_path,
            key,
            enrolment.certificate_pem,
            ca_pem=ca_pem,
            cn=self.config.terminal.id,
        )
