"""The server's subscription under a broker backlog: everything arrives, nothing is dropped,
and the in-process queue stays at its bound. (Mosquitto before 2.0.13 pushed a resumed
session's backlog past Receive Maximum; the client then pauses reading. The broker required
now keeps to Receive Maximum, so the pause is a guard that need not trigger here.)"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_server.mqtt_ingest import Delivery, MqttIngest
from provisioning.stack import StackInfo
from tests.integration.fleet import mqtt_client, service_identity, service_settings

pytestmark = pytest.mark.integration

BACKLOG = 3000
RECEIVE_MAXIMUM = 50


async def _subscribe_then_leave(stack: StackInfo, client_id: str, group: str) -> None:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 300
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    async with mqtt_client(
        stack,
        service_identity(stack),
        client_id=client_id,
        service=True,
        clean_start=False,
        properties=props,
    ) as client:
        await client.subscribe(f"$share/{group}/kiosk/v1/+/telemetry", qos=1)


async def _publish(stack: StackInfo, terminal: str, count: int) -> None:
    async with mqtt_client(stack, service_identity(stack), service=True) as client:
        for i in range(count):
            await client.publish(f"kiosk/v1/{terminal}/telemetry", str(i).encode(), qos=1)


@pytest.mark.asyncio
async def test_a_backlog_is_worked_through_completely_with_a_bounded_queue(
    stack: StackInfo,
) -> None:
    tag = uuid.uuid4().hex[:8]
    client_id, group, terminal = f"ingest-{tag}", f"g{tag}", f"backlog-{tag}"
    await _subscribe_then_leave(stack, client_id, group)
    await _publish(stack, terminal, BACKLOG)

    seen: list[int] = []
    stopping = asyncio.Event()

    async def slow_store(delivery: Delivery) -> None:
        if delivery.topic == f"kiosk/v1/{terminal}/telemetry":
            seen.append(int(delivery.payload))
        await asyncio.sleep(0.0005)  # a store slower than the broker
        delivery.ack()
        if len(seen) >= BACKLOG:
            stopping.set()

    ingest = MqttIngest(
        service_settings(stack, client_id, group, receive_maximum=RECEIVE_MAXIMUM),
        logging.getLogger("test"),
    )
    async with asyncio.timeout(60):
        await ingest.run(slow_store, stopping)

    assert sorted(seen) == list(range(BACKLOG))  # nothing lost, nothing twice
    assert ingest.link_stats.connections == 1  # and no reconnect was needed to get it all
    assert ingest.link_stats.peak <= RECEIVE_MAXIMUM
