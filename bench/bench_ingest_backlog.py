"""Memory of the fleet server's ingest under a broker backlog, against plain aiomqtt.

A persistent ingest session is subscribed, goes away, and N telemetry messages queue up in the
broker for it. Then a consumer comes back and works through the backlog slowly (as when
InfluxDB is slow). Printed: the consumer's peak RSS growth, for

- baseline: aiomqtt as it comes (reads ahead into an unbounded queue, acknowledges at once);
- ingest:   fleet_server.mqtt_ingest (Receive Maximum, acknowledged after handling).

Each consumer runs in its own process so their memory is measured apart. Real Mosquitto from
the project's stack, on loopback. Bounded: N messages, and a time limit per consumer.

    .venv/bin/python bench/bench_ingest_backlog.py [--messages 20000] [--size 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import resource
import ssl
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_server.config import BrokerSettings
from fleet_server.mqtt_ingest import Delivery, MqttIngest
from provisioning.stack import StackInfo, run_stoppable, running_stack

TOPIC = "kiosk/v1/bench-0001/telemetry"
PER_MESSAGE_S = 0.0002  # simulated slow store
TIME_LIMIT_S = 120.0


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _tls(info: StackInfo) -> ssl.SSLContext:
    """The fleet server's identity on the broker's service listener (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=info.pki_dir / "ca.pem")
    context.load_cert_chain(info.pki_dir / "fleet-server.pem", info.pki_dir / "fleet-server.key")
    return context


def _session_client(info: StackInfo, client_id: str) -> aiomqtt.Client:
    """A plain aiomqtt client resuming the persistent session ``client_id``."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    return aiomqtt.Client(
        "127.0.0.1",
        info.mqtt_service_port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=props,
        tls_context=_tls(info),
    )


async def _prepare(info: StackInfo, client_id: str) -> None:
    # One share group per consumer: a group shared with the other (offline) consumer's
    # session would split the backlog between the two.
    async with _session_client(info, client_id) as client:
        await client.subscribe(f"$share/{client_id}/kiosk/v1/+/telemetry", qos=1)


async def _fill(info: StackInfo, count: int, size: int) -> None:
    payload = b"x" * size
    async with aiomqtt.Client(
        "127.0.0.1",
        info.mqtt_service_port,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=_tls(info),
    ) as client:
        for _ in range(count):
            await client.publish(TOPIC, payload, qos=1)


async def _baseline(info: StackInfo, count: int, client_id: str) -> int:
    seen = 0
    async with _session_client(info, client_id) as client:
        async with asyncio.timeout(TIME_LIMIT_S):
            async for _ in client.messages:
                seen += 1
                await asyncio.sleep(PER_MESSAGE_S)
                if seen >= count:
                    break
    return seen


async def _ingest(info: StackInfo, count: int, client_id: str) -> int:
    seen = 0
    stopping = asyncio.Event()
    ingest = MqttIngest(
        BrokerSettings(
            host="127.0.0.1",
            port=info.mqtt_service_port,
            ca_file=str(info.pki_dir / "ca.pem"),
            cert_file=str(info.pki_dir / "fleet-server.pem"),
            key_file=str(info.pki_dir / "fleet-server.key"),
            client_id=client_id,
            receive_maximum=200,
            share_group=client_id,
            session_expiry_s=600,
        ),
        logging.getLogger("bench"),
    )

    async def handle(delivery: Delivery) -> None:
        nonlocal seen
        if delivery.topic == TOPIC:
            seen += 1
        await asyncio.sleep(PER_MESSAGE_S)
        delivery.ack()
        if seen >= count:
            stopping.set()

    async with asyncio.timeout(TIME_LIMIT_S):
        await ingest.run(handle, stopping)
    return seen


def _consume(
    kind: str,
    info: StackInfo,
    count: int,
    client_id: str,
    out: multiprocessing.Queue[tuple[int, int, float]],
) -> None:
    start_rss = _rss_kib()
    started = time.perf_counter()
    runner = _baseline if kind == "baseline" else _ingest
    seen = asyncio.run(runner(info, count, client_id))
    out.put((seen, _rss_kib() - start_rss, time.perf_counter() - started))


def _measure(kind: str, info: StackInfo, count: int, size: int) -> tuple[int, int, float]:
    client_id = f"bench-{kind}"
    asyncio.run(_prepare(info, client_id))
    asyncio.run(_fill(info, count, size))
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[tuple[int, int, float]] = ctx.Queue()
    proc = ctx.Process(target=_consume, args=(kind, info, count, client_id, out))
    proc.start()
    try:
        result = out.get(timeout=TIME_LIMIT_S + 30)
        proc.join(30)
    finally:
        if proc.is_alive():
            # Stopped meanwhile (Ctrl-C, SIGTERM) or stuck: the consumer would otherwise run
            # on, reconnecting to a stopped broker, and exit waits for it (up to its limit).
            proc.terminate()
            proc.join(30)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_stack(Path(tmp) / "stack") as info:
        print(
            f"backlog: {args.messages} messages x {args.size} B "
            f"= {args.messages * args.size / 2**20:.1f} MiB in Mosquitto",
            flush=True,
        )
        results = {
            kind: _measure(kind, info, args.messages, args.size) for kind in ("baseline", "ingest")
        }
    for kind, (seen, rss_kib, secs) in results.items():
        print(
            f"{kind:9s} received {seen:6d}  peak RSS growth {rss_kib / 1024:7.1f} MiB  "
            f"{secs:5.1f} s"
        )
    base, ours = results["baseline"][1], results["ingest"][1]
    print(f"ratio ingest/baseline peak RSS growth: {ours / max(base, 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stoppable(main))
