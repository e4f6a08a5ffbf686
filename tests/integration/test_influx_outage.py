"""A minute without InfluxDB under load: real Mosquitto, InfluxDB and `fleet-server`.

Four terminals publish telemetry through the broker with their own certificates, 80 samples a
second in all, before, during and after InfluxDB is stopped for a minute. The server spools
what it cannot write (the spool depth shows on /metrics), keeps acknowledging, keeps its memory
flat, and replays the spool in order once InfluxDB is back: every sample arrives exactly once,
at its own timestamp. A sample stamped two hours ahead is quarantined, not written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet_protocol import Sample, SystemSample, Telemetry, encode
from provisioning import stack
from tests.integration.fleet import (
    BIN,
    Proc,
    eventually,
    free_port,
    http_json,
    influx_query,
    issue_identity,
    mqtt_client,
    server_healthy,
    server_metrics,
    write_server_config,
)

pytestmark = pytest.mark.integration

TERMINALS = [f"outage-{n:02d}" for n in range(4)]
#: Messages a second per terminal (480 a minute: under the flood limit of 600) ...
RATE_HZ = 8
#: ... of this many samples each.
SAMPLES = 10
OUTAGE_S = 60.0
FUTURE_SEQ = 1_000_000
#: RSS growth allowed over the outage. Held in memory, the ~20,000 samples (about 4 MB of line
#: protocol, several times that as Python objects) would pass it; spooled they cost nothing.
RSS_GROWTH_LIMIT_KIB = 30 * 1024


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[stack.StackInfo]:
    with stack.running_stack(tmp_path / "stack") as info:
        yield info


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sample(seq: int, ts: int) -> SystemSample:
    return SystemSample(
        seq=seq,
        ts=ts,
        cpu_percent=12.5,
        memory_percent=40.0,
        memory_available=8_000_000_000,
        disk_percent=50.0,
        disk_free=100_000_000_000,
        uptime_s=3600.0,
        net_bytes_sent=1000,
        net_bytes_recv=2000,
    )


@dataclass
class Publisher:
    """One terminal publishing telemetry at RATE_HZ; remembers what the broker accepted."""

    terminal: str
    sent: list[tuple[int, int]] = field(default_factory=list)  # (ts, seq), broker-acknowledged
    next_seq: int = 1
    last_ts: int = 0

    def batch(self) -> list[Sample]:
        samples: list[Sample] = []
        for _ in range(SAMPLES):
            self.last_ts = max(self.last_ts + 1, now_ms())
            samples.append(sample(self.next_seq, self.last_ts))
            self.next_seq += 1
        return samples

    async def run(self, info: stack.StackInfo, certs: Path, stop: asyncio.Event) -> None:
        identity = await asyncio.to_thread(issue_identity, info, self.terminal, certs)
        topic = f"kiosk/v1/{self.terminal}/telemetry"
        async with mqtt_client(info, identity) as client:
            if self.terminal == TERMINALS[0]:
                future = sample(FUTURE_SEQ, now_ms() + 2 * 3_600_000)
                await client.publish(topic, encode(Telemetry(samples=[future])), qos=1)
            loop = asyncio.get_running_loop()
            due = loop.time()
            while not stop.is_set():
                samples = self.batch()
                # QoS 1: publish returns once the broker acknowledged the message.
                await client.publish(topic, encode(Telemetry(samples=samples)), qos=1)
                self.sent.extend((s.ts, s.seq) for s in samples)
                # On a fixed schedule: a slow acknowledgement does not lower the rate.
                due = max(due + 1 / RATE_HZ, loop.time() - 1 / RATE_HZ)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))


def stored(info: stack.StackInfo, terminal: str) -> list[tuple[int, int]]:
    """(time, seq) of every system point of ``terminal``, in time order."""
    series = influx_query(
        info.influx_url,
        info.influx_database,
        f'SELECT "seq" FROM "system" WHERE "terminal" = \'{terminal}\' ORDER BY time',
    )
    if not series:
        return []
    values = series[0]["values"]
    assert isinstance(values, list)
    return [(int(t), int(seq)) for t, seq in values]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def stop_influx(info: stack.StackInfo) -> None:
    os.kill(info.pid(stack.Service.INFLUX), signal.SIGTERM)

    def stopped() -> bool:
        found = stack.status(info.workdir)
        return not any(s.running for s in found.services if s.service is stack.Service.INFLUX)

    eventually(stopped, timeout=15)


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_minute_without_influxdb_under_load_loses_nothing_and_keeps_memory_flat(
    own_stack: stack.StackInfo, tmp_path: Path
) -> None:
    began = time.monotonic()
    api_port = free_port()
    config = write_server_config(
        tmp_path / "server.toml",
        stack=own_stack,
        influx_url=own_stack.influx_url,
        database=own_stack.influx_database,
        registry=tmp_path / "registry.sqlite3",
        api_port=api_port,
    )
    server = Proc(
        [str(BIN / "fleet-server"), "run", "--config", str(config)], tmp_path / "server.log"
    ).start()
    api = f"http://127.0.0.1:{api_port}"
    stop = asyncio.Event()
    publishers = [Publisher(t) for t in TERMINALS]
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(eventually, lambda: server_healthy(api), 20)
        tasks = [
            asyncio.create_task(p.run(own_stack, tmp_path / "tls", stop), name=p.terminal)
            for p in publishers
        ]

        def flowing() -> bool:
            return all(len(stored(own_stack, t)) >= 2 * RATE_HZ * SAMPLES for t in TERMINALS)

        await asyncio.to_thread(eventually, flowing, 30)
        rss_before = rss_kib(server.pid)

        await asyncio.to_thread(stop_influx, own_stack)
        outage_began = time.monotonic()
        depths: list[float] = []
        rss_during: list[int] = []
        while time.monotonic() - outage_began < OUTAGE_S:
            await asyncio.sleep(5)
            _, values = await asyncio.to_thread(server_metrics, api)
            depths.append(values["fleet_spool_batches"])
            rss_during.append(rss_kib(server.pid))
            assert values["fleet_spool_holding"] == 0, "deliveries held: the spool is full"
        await asyncio.to_thread(stack.up, own_stack.workdir, detach=False)
        outage_s = time.monotonic() - outage_began

        await asyncio.sleep(5)  # live traffic meets the replay
        stop.set()
        await asyncio.gather(*tasks)

        def drained() -> dict[str, float] | None:
            _, values = server_metrics(api)
            return values if values["fleet_spool_batches"] == 0 else None

        after = await asyncio.to_thread(eventually, drained, 60)

        def complete() -> dict[str, list[tuple[int, int]]] | None:
            found = {p.terminal: stored(own_stack, p.terminal) for p in publishers}
            done = all(len(found[p.terminal]) >= len(p.sent) for p in publishers)
            return found if done else None

        found = await asyncio.to_thread(eventually, complete, 30)
        content_type, _ = await asyncio.to_thread(server_metrics, api)
        ingest = await asyncio.to_thread(http_json, f"{api}/api/v1/ingest")
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        code = server.stop()
    assert code == 0, f"fleet-server exited {code}:\n{server.output()[-3000:]}"

    # Every sample exactly once, at its own timestamp, in order; the two-hours-ahead one not.
    for publisher in publishers:
        assert len(publisher.sent) > (OUTAGE_S + 5) * RATE_HZ * SAMPLES
        assert found[publisher.terminal] == publisher.sent, publisher.terminal

    # The outage was spooled (not held in memory, not left in the broker), then replayed.
    assert max(depths) > 0, depths
    assert after["fleet_spool_batches"] == 0
    assert after["fleet_spool_points"] == 0
    assert after["fleet_spool_replayed_points_total"] > 0
    assert after["fleet_influx_write_retries_total"] > 0
    growth = max(rss_during) - rss_before
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB during the outage"
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"

    assert isinstance(ingest, dict)
    assert ingest["quarantined"] == {TERMINALS[0]: {"future": 1}}
    # The fault was raised, and cleared by the live samples in the window that followed.
    assert f"{TERMINALS[0]}: clock fault, samples stamped +7200 s" in server.output()
    assert ingest["clock_faults"] == {}
    assert ingest["flooding"] == []

    print(
        f"outage {outage_s:.1f} s, test {time.monotonic() - began:.1f} s; spool depth seen "
        f"{[int(d) for d in depths]} batches; replayed "
        f"{int(after['fleet_spool_replayed_points_total'])} points; RSS before "
        f"{rss_before} KiB, during {rss_during} KiB"
    )
