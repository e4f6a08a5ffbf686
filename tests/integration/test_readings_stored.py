"""Network, power and the newer system readings reach a real InfluxDB through a real fleet
server, at the agents' own timestamps; and the server's clock endpoint answers an agent over
HTTPS verified against the fleet CA."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.clock import ClockUnavailable, OffsetEstimate
from edge_agent.enrolment_client import HttpsClockReference, clock_base_url
from fleet_protocol.codec import encode
from fleet_protocol.enrolment import RENEW_PATH
from fleet_protocol.ids import site_id
from fleet_protocol.messages import (
    InterfaceSample,
    Message,
    NetworkSample,
    PowerSample,
    Sample,
    State,
    SystemSample,
    Telemetry,
)
from provisioning.stack import StackInfo
from tests.integration.fleet import (
    Identity,
    RunningServer,
    eventually,
    free_port,
    influx_query,
    issue_identity,
    mqtt_client,
    start_server,
)

pytestmark = pytest.mark.integration

SITE = "zhujing-dqzx"


@pytest.fixture(scope="module")
def server(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(stack, tmp_path_factory.mktemp("readings"), enrolment=True)
    yield running
    running.stop()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def publish(stack: StackInfo, identity: Identity, *messages: tuple[str, Message]) -> None:
    async with mqtt_client(stack, identity) as client:
        for channel, message in messages:
            await client.publish(f"kiosk/v1/{identity.name}/{channel}", encode(message), qos=1)


def rows(
    stack: StackInfo, server: RunningServer, query: str
) -> list[tuple[dict[str, str], dict[str, object]]]:
    """(tags, row) for every row the query returns, over all series."""
    out: list[tuple[dict[str, str], dict[str, object]]] = []
    for series in influx_query(stack.influx_url, server.database, query):
        tags = series.get("tags") or {}
        columns = series["columns"]
        values = series["values"]
        assert isinstance(tags, dict)
        assert isinstance(columns, list)
        assert isinstance(values, list)
        out.extend((tags, dict(zip(columns, value, strict=True))) for value in values)
    return out


def wait_rows(
    stack: StackInfo, server: RunningServer, query: str, count: int
) -> list[tuple[dict[str, str], dict[str, object]]]:
    def stored() -> list[tuple[dict[str, str], dict[str, object]]] | None:
        found = rows(stack, server, query)
        return found if len(found) >= count else None

    return eventually(stored, timeout=20)


def test_network_and_power_samples_are_stored_at_their_timestamps_live_and_replayed(
    stack: StackInfo, server: RunningServer, tmp_path: Path
) -> None:
    terminal = f"kiosk-{uuid.uuid4().hex[:8]}"
    identity = issue_identity(stack, terminal, tmp_path, site=SITE)
    live_ts = now_ms() - 5_000
    replayed_ts = live_ts - 3_600_000  # an hour ago, sent after the link came back
    network = NetworkSample(
        seq=11,
        ts=live_ts,
        interfaces=[
            InterfaceSample(
                name="enp3s0",
                kind="ethernet",
                up=True,
                bytes_sent=123_456,
                bytes_recv=654_321,
                errors=0,
            ),
            InterfaceSample(name="wwan0", kind="cellular", up=False, bytes_sent=0, bytes_recv=0),
        ],
        broker_rtt_ms=41.5,
        dns_ok=True,
        dns_ms=7.25,
    )
    power = PowerSample(
        seq=12,
        ts=live_ts,
        ups_status="OB DISCHRG",
        ups_on_battery=True,
        ups_charge_percent=64.0,
        ups_runtime_s=900.0,
        supply_voltage=0.0,
        cabinet_door_open=True,
        cabinet_temperature=36.5,
    )
    system = SystemSample(
        seq=13,
        ts=live_ts,
        cpu_percent=3.5,
        memory_percent=41.0,
        memory_available=2_000_000_000,
        disk_percent=30.0,
        disk_free=80_000_000_000,
        uptime_s=7_200.0,
        net_bytes_sent=1,
        net_bytes_recv=2,
        boot_ms=live_ts - 7_200_000,
        reboot_count=3,
        clock_offset_ms=-2_500.5,
    )
    replayed: list[Sample] = [
        PowerSample(seq=1, ts=replayed_ts, ups_status="OL", ups_on_battery=False),
        NetworkSample(
            seq=2,
            ts=replayed_ts,
            interfaces=[
                InterfaceSample(
                    name="enp3s0", kind="ethernet", up=False, bytes_sent=5, bytes_recv=6
                )
            ],
        ),
    ]
    asyncio.run(
        publish(
            stack,
            identity,
            ("state", State(online=True, session=1, ts=now_ms(), site=site_id(SITE))),
            ("telemetry", Telemetry(samples=[network, power, system])),
            ("telemetry", Telemetry(samples=replayed, historical=True)),
        )
    )
    where = f"WHERE terminal = '{terminal}'"

    stored_network = wait_rows(stack, server, f"SELECT * FROM network {where} GROUP BY *", 3)
    by_key = {(tags["iface"], row["time"]): (tags, row) for tags, row in stored_network}
    tags, row = by_key[("enp3s0", live_ts)]
    assert tags == {"terminal": terminal, "site": SITE, "iface": "enp3s0", "kind": "ethernet"}
    assert (row["up"], row["bytes_sent"], row["bytes_recv"], row["errors"]) == (
        True,
        123_456,
        654_321,
        0,
    )
    assert row["historical"] is False
    tags, row = by_key[("wwan0", live_ts)]
    assert (tags["kind"], row["up"], row["errors"]) == ("cellular", False, None)
    tags, row = by_key[("enp3s0", replayed_ts)]
    assert (row["up"], row["historical"], row["seq"]) == (False, True, 2)

    [(tags, link)] = rows(stack, server, f"SELECT * FROM link {where} GROUP BY *")
    assert tags == {"terminal": terminal, "site": SITE}
    assert (link["time"], link["broker_rtt_ms"], link["dns_ok"], link["dns_ms"]) == (
        live_ts,
        41.5,
        True,
        7.25,
    )

    stored_power = wait_rows(stack, server, f"SELECT * FROM power {where} GROUP BY *", 2)
    power_by_time = {row["time"]: (tags, row) for tags, row in stored_power}
    tags, row = power_by_time[live_ts]
    assert tags == {"terminal": terminal, "site": SITE}
    assert row["ups_status"] == "OB DISCHRG"
    assert (row["ups_on_battery"], row["ups_charge_percent"], row["ups_runtime_s"]) == (
        True,
        64.0,
        900.0,
    )
    assert (row["supply_voltage"], row["cabinet_door_open"], row["cabinet_temperature"]) == (
        0.0,
        True,
        36.5,
    )
    assert row.get("on_ac") is None  # not sent, not stored as a default
    tags, row = power_by_time[replayed_ts]
    assert (row["ups_status"], row["ups_on_battery"], row["historical"]) == ("OL", False, True)

    [(tags, stored_system)] = rows(stack, server, f"SELECT * FROM system {where} GROUP BY *")
    assert stored_system["time"] == live_ts
    assert stored_system["boot_ms"] == live_ts - 7_200_000
    assert stored_system["reboot_count"] == 3
    assert stored_system["clock_offset_ms"] == -2_500.5


def test_the_clock_endpoint_answers_an_agent_without_a_client_certificate(
    stack: StackInfo, server: RunningServer
) -> None:
    base = clock_base_url(server.enrol_url + RENEW_PATH)  # as the agent derives it
    assert base == server.enrol_url

    async def check() -> float | None:
        async with HttpsClockReference(base, stack.pki_dir / "ca.pem") as reference:
            return await OffsetEstimate().measure(reference, now_ms, rounds=3)

    offset = asyncio.run(check())
    assert offset is not None
    # Server and agent share this machine's clock: what remains is the measurement's error.
    assert abs(offset) < 1_000


def test_an_unreachable_fleet_server_is_a_clock_unavailable(stack: StackInfo) -> None:
    async def check() -> None:
        base = f"https://127.0.0.1:{free_port()}"
        async with HttpsClockReference(base, stack.pki_dir / "ca.pem", timeout_s=5) as reference:
            await reference.server_time_ms()

    with pytest.raises(ClockUnavailable, match="cannot reach"):
        asyncio.run(check())
