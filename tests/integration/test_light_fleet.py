"""The bench's light kiosk generator (``bench/light_fleet.py``) against the real stack and a
real fleet server: its kiosks are counted online, their telemetry is stored in InfluxDB without
a decode error, and at stop they are recorded as shut down (the broker keeps their "shutdown"
state, no will); a process killed outright leaves each kiosk's last will ("lost"). And what it
sends is what the agent's MQTT client sends, byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

import bench.light_fleet as light
from edge_agent.config import BrokerSettings, TlsSettings
from edge_agent.mqtt_uplink import MqttUplink
from fleet_protocol.codec import decode, encode
from fleet_protocol.ids import site_id, terminal_id
from fleet_protocol.messages import State
from fleet_server.mqtt_wire import DISCONNECT, encode_subscribe, encode_varint
from provisioning.stack import StackInfo
from tests.integration.fleet import (
    Proc,
    RunningServer,
    eventually,
    http_json,
    influx_query,
    mqtt_client,
    provision_sim,
    service_identity,
    start_server,
)

pytestmark = pytest.mark.integration

LIGHT_FLEET = Path(light.__file__)
SITE = "light-site"
#: fleet_server's metrics of what it dropped: all must stay 0.
DROPPED = ("fleet_ingest_rejected_total", "fleet_ingest_quarantined_samples_total")


def light_fleet(stack: StackInfo, workdir: Path, prefix: str, count: int) -> Proc:
    provision_sim(stack, workdir / "tls", prefix, count, SITE)
    return Proc(
        [
            sys.executable,
            str(LIGHT_FLEET),
            *("--terminals", str(count), "--prefix", prefix, "--site", SITE),
            *("--broker-port", str(stack.mqtt_port), "--tls-dir", str(workdir / "tls")),
            *("--interval", "1", "--connect-rate", "50"),
        ],
        workdir / f"{prefix}.log",
    ).start()


def terminals(server: RunningServer) -> dict[str, dict[str, Any]]:
    listing = http_json(f"{server.api}/api/v1/terminals")
    assert isinstance(listing, dict)
    return {str(t["id"]): t for t in listing["terminals"]}


def metric_lines(server: RunningServer) -> list[str]:
    with urllib.request.urlopen(f"{server.api}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text.splitlines()


def seqs(stack: StackInfo, server: RunningServer, measurement: str, terminal: str) -> list[int]:
    series = influx_query(
        stack.influx_url,
        server.database,
        f'SELECT "seq" FROM "{measurement}" WHERE "terminal" = \'{terminal}\'',
    )
    if not series:
        return []
    values = series[0]["values"]
    assert isinstance(values, list)
    return sorted({int(v[1]) for v in values})


async def retained_states(stack: StackInfo, names: list[str]) -> dict[str, State]:
    """The retained ``state`` of each terminal, read as the fleet server reads it."""
    found: dict[str, State] = {}
    client_id = f"lf-observer-{uuid.uuid4().hex[:8]}"
    async with mqtt_client(stack, service_identity(stack), client_id=client_id, service=True) as c:
        for terminal in names:
            await c.subscribe(f"kiosk/v1/{terminal}/state", qos=1)
        async with asyncio.timeout(10):
            async for message in c.messages:
                assert isinstance(message.payload, bytes)
                found[str(message.topic).split("/")[2]] = decode(State, message.payload)
                if len(found) == len(names):
                    break
    return found


def test_light_kiosks_are_online_store_telemetry_and_shut_down(
    stack: StackInfo, tmp_path: Path
) -> None:
    server = start_server(stack, tmp_path)
    run = uuid.uuid4().hex[:6]
    stopped, killed = f"lf{run}a", f"lf{run}b"
    procs = [light_fleet(stack, tmp_path, stopped, 3), light_fleet(stack, tmp_path, killed, 1)]
    names = [f"{stopped}-{i:04d}" for i in (1, 2, 3)] + [f"{killed}-0001"]
    try:
        eventually(
            lambda: all(terminals(server).get(t, {}).get("status") == "online" for t in names),
            20,
        )
        assert "light-fleet: all 3 kiosks connected" in procs[0].output()
        for terminal in names:
            assert terminals(server)[terminal]["site"] == SITE
            # One message a second, three samples each, numbered from 1 without a gap.
            for measurement in ("system", "power", "network"):
                found = eventually(
                    lambda m=measurement, t=terminal: (  # type: ignore[misc]
                        s if len(s := seqs(stack, server, m, t)) >= 2 else None
                    ),
                    15,
                )
                assert found == list(range(1, found[-1] + 1)), (measurement, found)
        dropped = [
            line for line in metric_lines(server) if line.startswith(DROPPED) and line[-2:] != " 0"
        ]
        assert not dropped, dropped

        procs[1].signal(signal.SIGKILL)  # no DISCONNECT: the broker publishes the will
        assert procs[0].stop(timeout=10) == 0, procs[0].output()
        assert "light-fleet: stopped 3 connected kiosks" in procs[0].output()

        def offline() -> dict[str, str] | None:
            views = terminals(server)
            found = {t: str(views[t].get("reason")) for t in names}
            ended = all(views[t]["status"] == "offline" for t in names)
            return found if ended else None

        reasons = eventually(offline, 15)
        assert reasons == {**dict.fromkeys(names[:3], "shutdown"), names[3]: "lost"}
        # What the broker keeps: the goodbye (a DISCONNECT followed it, so no will replaced
        # it), and the will of the killed one, of the session its birth had.
        retained = asyncio.run(retained_states(stack, names))
        assert {t: (s.online, s.reason, s.session) for t, s in retained.items()} == {
            **dict.fromkeys(names[:3], (False, "shutdown", 1)),
            names[3]: (False, "lost", 1),
        }
    finally:
        for proc in procs:
            proc.stop()
        server.stop()


# --- the same bytes as the agent ------------------------------------------------------------


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        digit = (await reader.readexactly(1))[0]
        length |= (digit & 0x7F) << shift
        if not digit & 0x80:
            break
        shift += 7
    return first, await reader.readexactly(length)


async def _agent_packets(terminal: str, site: str, session: int, ts: int) -> list[bytes]:
    """What the agent's uplink client sends on connecting (CONNECT, SUBSCRIBE, birth) and
    leaving (DISCONNECT), seen by a fake broker over plain TCP that acknowledges each."""
    packets: list[bytes] = []
    done = asyncio.Event()

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(3):
                first, body = await _read_packet(reader)
                packets.append(bytes((first,)) + encode_varint(len(body)) + body)
                if first == 0x10:
                    writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK, success, no properties
                elif first == 0x82:
                    writer.write(b"\x90\x04" + body[:2] + b"\x00\x01")  # SUBACK, QoS 1
                else:
                    topic_end = 2 + int.from_bytes(body[:2], "big")
                    writer.write(b"\x40\x02" + body[topic_end : topic_end + 2])  # PUBACK
                await writer.drain()
            first, body = await _read_packet(reader)  # the DISCONNECT at the end
            packets.append(bytes((first,)) + encode_varint(len(body)) + body)
        finally:
            writer.close()
            await writer.wait_closed()
            done.set()

    server = await asyncio.start_server(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def next_session() -> int:
        return session

    uplink = MqttUplink(
        terminal_id(terminal),
        site_id(site),
        BrokerSettings(host="127.0.0.1", port=port),
        TlsSettings(ca_file="unused", identity_file="unused"),
        outbox=None,  # type: ignore[arg-type]
        next_session=next_session,
        now_ms=lambda: ts,
        agent_version=light.agent_version(),
        logger=logging.getLogger("test"),
    )
    birth = State(
        online=True, session=session, ts=ts, site=site_id(site), agent_version=light.agent_version()
    )
    async with server:
        async with uplink._client(session, None) as client:  # type: ignore[arg-type]
            await client.subscribe(uplink._cmd_filter, qos=1)
            await client.publish_acked(uplink._state_topic, encode(birth), retain=True)
        await asyncio.wait_for(done.wait(), 10)
    return packets


@pytest.mark.asyncio
async def test_light_kiosk_sends_the_agents_bytes() -> None:
    terminal, site, session, ts = "lf-bytes-0001", "light-site", 7, 1_700_000_000_000
    agent = await _agent_packets(terminal, site, session, ts)
    state = f"kiosk/v1/{terminal}/state"
    will = State(online=False, session=session, ts=ts, reason="lost")
    birth = State(
        online=True, session=session, ts=ts, site=site_id(site), agent_version=light.agent_version()
    )
    ours = [
        light.agent_connect(terminal, light.KEEPALIVE_S, light.SESSION_EXPIRY_S, state, will),
        encode_subscribe(1, [(f"kiosk/v1/{terminal}/cmd/+", 1)]),
        light.encode_publish(light.topic_field(state), 2, encode(birth), retain=True),
        DISCONNECT,
    ]
    assert ours == agent
