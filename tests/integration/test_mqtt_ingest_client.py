"""The server's own MQTT client against the real Mosquitto: a quiet connection is kept alive by
pings, a silent (half-open) broker is detected and left, and a connection the broker closes is
resumed with the persistent session, with nothing lost: what was published while the client
was away arrives, and what it had not acknowledged is delivered again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest

from fleet_server import mqtt_ingest
from fleet_server.config import BrokerSettings
from fleet_server.mqtt_ingest import Delivery, MqttIngest
from fleet_server.mqtt_wire import ConnAck, Decoder, Packet, encode_connect
from provisioning.stack import Service, StackInfo, status
from tests.integration.fleet import mqtt_client, service_identity, service_settings

pytestmark = pytest.mark.integration

KEEPALIVE_S = 2


def settings(stack: StackInfo, client_id: str, group: str) -> BrokerSettings:
    return service_settings(stack, client_id, group, keepalive_s=KEEPALIVE_S, receive_maximum=20)


@asynccontextmanager
async def running(
    ingest: MqttIngest, handle: Callable[[Delivery], None]
) -> AsyncIterator[asyncio.Task[None]]:
    """``ingest`` running with ``handle`` until the block ends (a planned stop)."""

    async def handler(delivery: Delivery) -> None:
        handle(delivery)

    stopping = asyncio.Event()
    task = asyncio.create_task(ingest.run(handler, stopping), name="ingest-under-test")
    try:
        async with asyncio.timeout(10):
            await ingest.connected.wait()
        yield task
    finally:
        stopping.set()
        async with asyncio.timeout(15):
            await task


async def until(check: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def publish(stack: StackInfo, topic: str, payloads: list[bytes]) -> None:
    async with mqtt_client(stack, service_identity(stack), service=True) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


@contextmanager
def broker_frozen(stack: StackInfo) -> Iterator[None]:
    """The broker stopped (SIGSTOP): its TCP connections stay open but nothing answers, as
    with a broker host that hangs or a network path that silently drops everything."""
    pid = next(s.pid for s in status(stack.workdir).services if s.service is Service.MQTT)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.asyncio
async def test_pings_keep_a_quiet_connection_up_past_twice_the_keepalive(
    stack: StackInfo,
) -> None:
    tag = uuid.uuid4().hex[:8]
    ingest = MqttIngest(settings(stack, f"quiet-{tag}", f"g{tag}"), logging.getLogger("test"))
    async with running(ingest, lambda d: d.ack()):
        await asyncio.sleep(KEEPALIVE_S * 2.5)
        assert ingest.connected.is_set()
        # Without them Mosquitto drops a client silent for 1.5 keep-alives.
        assert ingest.link_stats.pings >= 2
    assert ingest.link_stats.connections == 1


@pytest.mark.asyncio
async def test_a_silent_broker_is_left_and_the_client_comes_back_when_it_answers(
    stack: StackInfo, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:8]
    ingest = MqttIngest(settings(stack, f"halfopen-{tag}", f"g{tag}"), logging.getLogger("test"))
    async with running(ingest, lambda d: d.ack()):
        with broker_frozen(stack):
            await until(lambda: not ingest.connected.is_set(), timeout=KEEPALIVE_S * 4)
        await until(lambda: ingest.link_stats.connections == 2, timeout=20)
    assert any("nothing from the broker for" in r.getMessage() for r in caplog.records)


async def take_over_session(stack: StackInfo, client_id: str) -> asyncio.StreamWriter:
    """Connect with ``client_id``'s persistent session, which makes Mosquitto disconnect the
    client holding it. This client never acknowledges: whatever the broker sends it stays
    unacknowledged in the session."""
    identity = service_identity(stack)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=identity.ca_file)
    context.load_cert_chain(identity.identity_file)
    reader, writer = await asyncio.open_connection(
        stack.mqtt_host, stack.mqtt_service_port, ssl=context
    )
    writer.write(
        encode_connect(
            client_id,
            clean_start=False,
            keepalive_s=60,
            session_expiry_s=300,
            receive_maximum=100,
        )
    )
    decoder = Decoder()
    packets: list[Packet] = []
    while not packets:
        packets = decoder.feed(await reader.read(4096))
    assert packets[0] == ConnAck(session_present=True, reason_code=0)
    return writer


@pytest.mark.asyncio
async def test_a_client_the_broker_closed_resumes_its_session_and_loses_nothing(
    stack: StackInfo, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:8]
    client_id, terminal = f"resume-{tag}", f"resume-{tag}"
    topic = f"kiosk/v1/{terminal}/telemetry"
    # Away long enough for the publishing below to happen while it is.
    monkeypatch.setattr(mqtt_ingest, "RECONNECT_MIN_S", 3.0)
    ingest = MqttIngest(settings(stack, client_id, f"g{tag}"), logging.getLogger("test"))
    seen: list[bytes] = []
    dups: list[bytes] = []

    def store(delivery: Delivery) -> None:
        if delivery.topic != topic:
            delivery.ack()
            return
        if delivery.payload in seen:
            dups.append(delivery.payload)
        seen.append(delivery.payload)
        if not delivery.payload.startswith(b"held") or len(dups) > 0:
            delivery.ack()  # "held" is acknowledged only once it came again

    async with running(ingest, store):
        await publish(stack, topic, [b"before-1", b"held-1", b"before-2"])
        await until(lambda: len(seen) == 3, timeout=10)

        intruder = await take_over_session(stack, client_id)
        await until(lambda: not ingest.connected.is_set(), timeout=5)
        await publish(stack, topic, [b"away-1", b"away-2"])
        intruder.close()  # without DISCONNECT: the session and its unacknowledged stay
        with contextlib.suppress(OSError):
            await intruder.wait_closed()

        await until(lambda: b"away-2" in seen and b"held-1" in dups, timeout=20)
        assert ingest.link_stats.connections == 2
    assert seen.count(b"before-1") == 1  # acknowledged: not delivered again
    assert set(seen) == {b"before-1", b"held-1", b"before-2", b"away-1", b"away-2"}
    assert any("0x8E Session taken over" in r.getMessage() for r in caplog.records)
