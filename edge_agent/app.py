"""The agent: wires the collectors to the uplink. No global state, so many can share a process.

Tasks (all named, all owned by one TaskGroup, all ended through ``stopping``):
- ``telemetry``: one system reading per interval, batched into the backlog;
- ``uplink``: the broker connection, publishing the backlog in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from edge_agent.backlog import Backlog, Outgoing
from edge_agent.config import AgentConfig
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
            await stopping.wait()
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
