"""Sample numbering, batching and reconnect delays of the agent (pure logic, injected clock)."""

from __future__ import annotations

import dataclasses
import itertools
import random

from edge_agent.backlog import Backlog, Outgoing
from edge_agent.backoff import backoff_delays
from edge_agent.telemetry import (
    BatchBuilder,
    MonotonicStamp,
    SystemReading,
    encode_batches,
    to_sample,
)
from fleet_protocol.codec import MAX_PAYLOAD, decode
from fleet_protocol.messages import MAX_SAMPLES_PER_BATCH, Telemetry

READING = SystemReading(
    cpu_percent=12.5,
    memory_percent=40.0,
    memory_available=4_000_000_000,
    disk_percent=50.0,
    disk_free=60_000_000_000,
    uptime_s=3600.0,
    net_bytes_sent=1,
    net_bytes_recv=2,
)


def test_timestamps_never_go_backwards_when_the_wall_clock_does() -> None:
    clock = iter([1000, 2000, 1500, 2500])
    stamp = MonotonicStamp(lambda: next(clock))
    stamps = [stamp.next() for _ in range(4)]
    assert stamps == [(1, 1000), (2, 2000), (3, 2000), (4, 2500)]


def test_a_batch_is_published_when_full() -> None:
    builder = BatchBuilder(size=3, max_age_ms=60_000)
    assert builder.add(to_sample(READING, 1, 1000), now_ms=1000) is None
    assert builder.add(to_sample(READING, 2, 2000), now_ms=2000) is None
    batch = builder.add(to_sample(READING, 3, 3000), now_ms=3000)
    assert batch is not None
    assert [s.seq for s in batch.samples] == [1, 2, 3]
    assert builder.take() is None


def test_a_batch_is_published_when_its_first_sample_is_old_enough() -> None:
    builder = BatchBuilder(size=100, max_age_ms=10_000)
    assert builder.add(to_sample(READING, 1, 0), now_ms=0) is None
    assert builder.due(now_ms=9_999) is None
    batch = builder.due(now_ms=10_000)
    assert batch is not None
    assert len(batch.samples) == 1


def test_out_of_range_cpu_readings_are_clamped_not_sent_invalid() -> None:
    sample = to_sample(
        SystemReading(
            cpu_percent=100.3,
            memory_percent=1,
            memory_available=1,
            disk_percent=1,
            disk_free=1,
            uptime_s=-0.5,
            net_bytes_sent=0,
            net_bytes_recv=0,
        ),
        1,
        1,
    )
    assert sample.cpu_percent == 100.0
    assert sample.uptime_s == 0.0


def test_backoff_grows_to_its_cap_and_is_jittered() -> None:
    delays = list(itertools.islice(backoff_delays(1.0, 30.0, random.Random(7)), 12))
    assert all(0.5 <= d <= 30.0 for d in delays)
    assert max(delays[6:]) > 8.0  # the cap has grown well past the minimum
    other = list(itertools.islice(backoff_delays(1.0, 30.0, random.Random(8)), 12))
    assert delays != other  # two terminals do not retry in lock step


def test_backlog_keeps_messages_until_acknowledged_and_drops_oldest_when_full() -> None:
    backlog = Backlog(max_items=2)
    a, b, c = (Outgoing("t", bytes([i])) for i in range(3))
    backlog.put(a)
    backlog.put(b)
    assert backlog.peek() is a
    backlog.put(c)
    assert backlog.dropped == 1
    assert backlog.peek() is b
    backlog.done(b)
    assert backlog.peek() is c
    assert len(backlog) == 1


def test_a_batch_too_large_for_one_message_is_split_and_loses_no_sample() -> None:
    hot = dataclasses.replace(READING, temperatures={f"sensor-{i:02d}": 40.5 for i in range(40)})
    batch = Telemetry(samples=[to_sample(hot, i, i) for i in range(MAX_SAMPLES_PER_BATCH)])
    payloads = encode_batches(batch)
    assert len(payloads) > 1
    assert all(len(p) <= MAX_PAYLOAD for p in payloads)
    seqs = [s.seq for p in payloads for s in decode(Telemetry, p).samples]
    assert seqs == list(range(MAX_SAMPLES_PER_BATCH))
