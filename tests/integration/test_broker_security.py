"""Terminal isolation on the real broker with real certificates.

Threat model: one kiosk's disk is copied, so the attacker holds terminal A's key and
certificate. Mosquitto acknowledges a denied QoS 1 publish and grants every SUBSCRIBE, so these
tests assert on what was delivered and stored, never on acks. Each test uses terminal ids of its
own, so revocations here do not touch other tests on the shared broker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from fleet_protocol.codec import encode
from fleet_protocol.ids import CommandId, CommandName, TerminalId
from fleet_protocol.messages import Command, State, SystemSample, Telemetry
from fleet_protocol.topics import Channel, command_topic, topic
from provisioning import pki
from provisioning.authority import FleetAuthority, write_private
from provisioning.stack import Service, StackInfo
from tests.integration.fleet import (
    BIN,
    Identity,
    RunningServer,
    eventually,
    http_json,
    influx_query,
    issue_identity,
    mqtt_client,
    mqtt_session_works,
    service_identity,
    start_server,
)

pytestmark = pytest.mark.integration

#: After a control message arrived, how long anything forged still has to show up.
QUIET_S = 1.5


def names(prefix: str) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:6]
    return f"{prefix}-a-{tag}", f"{prefix}-b-{tag}"


def telemetry(seq: int) -> bytes:
    sample = SystemSample(
        seq=seq,
        ts=int(time.time() * 1000),
        cpu_percent=1.0,
        memory_percent=2.0,
        memory_available=3,
        disk_percent=4.0,
        disk_free=5,
        uptime_s=6.0,
        net_bytes_sent=7,
        net_bytes_recv=8,
    )
    return encode(Telemetry(samples=[sample]))


def forged_payloads(victim: str) -> list[tuple[str, bytes, bool]]:
    """What an attacker would send as ``victim``: every channel, valid payloads."""
    t = TerminalId(victim)
    now = int(time.time() * 1000)
    state = encode(State(online=False, session=999, ts=now, reason="lost"))
    command = encode(
        Command(
            id=CommandId("forged-0001"),
            name=CommandName("reboot"),
            issued_at=now,
            expires_at=now + 60_000,
        )
    )
    return [
        (topic(t, Channel.STATE), state, True),
        (topic(t, Channel.TELEMETRY), telemetry(4242), False),
        (topic(t, Channel.PERIPHERALS), b'{"ts":1,"peripherals":[]}', True),
        (topic(t, Channel.EVENTS), b"{}", False),
        (topic(t, Channel.REPORTED), b"{}", True),
        (topic(t, Channel.CMD_RESULT), b"{}", False),
        (topic(t, Channel.DESIRED), b"{}", True),
        (command_topic(t, CommandName("reboot")), command, False),
    ]


class Sniffer:
    """The fleet's own view (service identity): everything published under kiosk/v1."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    def topics(self, terminal: str) -> list[str]:
        return [t for t, _ in self.seen if t.startswith(f"kiosk/v1/{terminal}/")]

    async def run(self, stack: StackInfo, ready: asyncio.Event) -> None:
        async with mqtt_client(
            stack,
            service_identity(stack),
            client_id=f"sniff-{uuid.uuid4().hex[:8]}",
            service=True,
        ) as client:
            await client.subscribe("kiosk/v1/#", qos=1)
            ready.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                self.seen.append((str(message.topic), message.payload))


async def until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not true in time")


@pytest.fixture(scope="module")
def stack(reloaded_stack: StackInfo) -> StackInfo:
    """This module's revocations reload the broker: its own stack (see ``reloaded_stack``)."""
    return reloaded_stack


@pytest.fixture(scope="module")
def server(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(stack, tmp_path_factory.mktemp("security"))
    yield running
    running.stop()


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.asyncio
async def test_a_terminal_cannot_publish_on_another_terminals_topics(
    stack: StackInfo, server: RunningServer, tmp_path: Path, qos: int, v5: bool
) -> None:
    a_name, b_name = names("pub")
    a = issue_identity(stack, a_name, tmp_path)
    issue_identity(stack, b_name, tmp_path)
    sniffer = Sniffer()
    ready = asyncio.Event()
    sniffing = asyncio.create_task(sniffer.run(stack, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with mqtt_client(stack, a, v5=v5) as attacker:
            for where, payload, retain in forged_payloads(b_name):
                await attacker.publish(where, payload, qos=qos, retain=retain)
            # A's own telemetry after the forgeries: the broker keeps one client's order, so
            # once this arrives anything allowed before it would have arrived too.
            await attacker.publish(
                topic(TerminalId(a_name), Channel.TELEMETRY), telemetry(1), qos=1
            )
        await until(lambda: sniffer.topics(a_name))
        await asyncio.sleep(QUIET_S)
    finally:
        sniffing.cancel()
    assert sniffer.topics(b_name) == []

    # The pipeline works (A's own sample is stored) and stores nothing for B.
    def stored(terminal: str) -> list[dict[str, object]]:
        return influx_query(
            stack.influx_url,
            server.database,
            f'SELECT * FROM "system" WHERE "terminal" = \'{terminal}\'',
        )

    eventually(lambda: stored(a_name), timeout=10)
    assert stored(b_name) == []
    listed = {t["id"] for t in _terminals(server)}
    assert b_name not in listed


def _terminals(server: RunningServer) -> list[dict[str, object]]:
    body = http_json(f"{server.api}/api/v1/terminals")
    assert isinstance(body, dict)
    terminals: list[dict[str, object]] = body["terminals"]
    return terminals


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
@pytest.mark.asyncio
async def test_a_terminal_cannot_read_another_terminals_commands(
    stack: StackInfo, tmp_path: Path, v5: bool
) -> None:
    a_name, b_name = names("sub")
    a = issue_identity(stack, a_name, tmp_path)
    b = issue_identity(stack, b_name, tmp_path)
    spied: list[str] = []
    got_by_b: list[str] = []

    async def collect(client: aiomqtt.Client, into: list[str]) -> None:
        async for message in client.messages:
            into.append(str(message.topic))

    async with (
        mqtt_client(stack, a, v5=v5) as attacker,
        mqtt_client(stack, b) as victim,
        mqtt_client(
            stack, service_identity(stack), client_id=f"srv-{a_name}", service=True
        ) as fleet_server,
    ):
        for spy in (
            f"kiosk/v1/{b_name}/cmd/#",
            f"kiosk/v1/{b_name}/desired",
            "#",
            "kiosk/v1/+/cmd/#",
            f"kiosk/v1/{b_name}/#",
        ):
            await attacker.subscribe(spy, qos=1)
        await victim.subscribe(f"kiosk/v1/{b_name}/cmd/#", qos=1)
        await victim.subscribe(f"kiosk/v1/{b_name}/desired", qos=1)
        tasks = [
            asyncio.create_task(collect(attacker, spied)),
            asyncio.create_task(collect(victim, got_by_b)),
        ]
        try:
            now = int(time.time() * 1000)
            command = Command(
                id=CommandId(f"cmd-{uuid.uuid4().hex[:10]}"),
                name=CommandName("reboot"),
                issued_at=now,
                expires_at=now + 60_000,
            )
            await fleet_server.publish(
                command_topic(TerminalId(b_name), CommandName("reboot")), encode(command), qos=1
            )
            await fleet_server.publish(
                topic(TerminalId(b_name), Channel.DESIRED), b"{}", qos=1, retain=True
            )
            await until(lambda: len(got_by_b) == 2)
            await asyncio.sleep(QUIET_S)
        finally:
            for task in tasks:
                task.cancel()
    assert sorted(got_by_b) == sorted(
        [f"kiosk/v1/{b_name}/cmd/reboot", f"kiosk/v1/{b_name}/desired"]
    )
    assert spied == []


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
@pytest.mark.asyncio
async def test_taking_another_terminals_client_id_or_username_does_not_disturb_it(
    stack: StackInfo, tmp_path: Path, v5: bool
) -> None:
    a_name, b_name = names("cid")
    a = issue_identity(stack, a_name, tmp_path)
    b = issue_identity(stack, b_name, tmp_path)
    log = stack.layout.log_file(Service.MQTT)
    before = log.read_text(errors="replace").count(f"Client {b_name} already connected")
    received: list[str] = []

    async def collect(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            received.append(str(message.topic))

    async with mqtt_client(stack, b) as victim:
        await victim.subscribe(f"kiosk/v1/{b_name}/cmd/#", qos=1)
        listening = asyncio.create_task(collect(victim))
        try:
            async with mqtt_client(
                stack, a, client_id=b_name, username=b_name, password="x", v5=v5
            ) as attacker:
                await attacker.publish(
                    topic(TerminalId(b_name), Channel.TELEMETRY), telemetry(7), qos=1
                )
                await asyncio.sleep(0.5)
            # B is still connected: a command sent now reaches it on the same connection.
            async with mqtt_client(
                stack, service_identity(stack), client_id=f"srv-{b_name}", service=True
            ) as fleet_server:
                await fleet_server.publish(f"kiosk/v1/{b_name}/cmd/ping", b"{}", qos=1)
            await until(lambda: received)
            assert not listening.done(), "B's connection was dropped"
            await victim.publish(topic(TerminalId(b_name), Channel.TELEMETRY), telemetry(8), qos=1)
        finally:
            listening.cancel()
    assert received == [f"kiosk/v1/{b_name}/cmd/ping"]
    after = log.read_text(errors="replace").count(f"Client {b_name} already connected")
    assert after == before, "the broker closed B's connection for a client with B's id"


# --- certificates that must not open a session ---------------------------------------------


def _foreign_identity(
    stack: StackInfo, directory: Path, name: str, *, self_signed: bool
) -> Identity:
    """A certificate with the right CN that the fleet CA never issued."""
    now = dt.datetime.now(dt.UTC)
    if self_signed:
        own = pki.Authority.create(name, now=now, days=1)  # issuer = subject = the name
        key, pem = own.key, pki.cert_to_pem(own.cert)
    else:
        other = pki.Authority.create("kiosk-fleet CA", now=now, days=30)  # same title, other key
        key = pki.new_key()
        pem = pki.cert_to_pem(
            other.issue(cn=name, public_key=key.public_key(), now=now, days=1, client=True)
        ) + pki.cert_to_pem(other.cert)
    path = directory / f"{name}.pem"
    write_private(path, pki.key_to_pem(key) + pem)
    return Identity(name, path, stack.pki_dir / "ca.pem")


def _expired_identity(stack: StackInfo, directory: Path, name: str) -> Identity:
    layout = stack.pki_dir
    fleet = pki.Authority(
        cert=pki.cert_from_pem((layout / "ca.pem").read_bytes(), what="ca"),
        key=pki.key_from_pem((layout / "ca.key").read_bytes(), what="ca key"),
    )
    key = pki.new_key()
    cert = fleet.issue(
        cn=name,
        public_key=key.public_key(),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=10),
        days=1,
        client=True,
    )
    path = directory / f"{name}.pem"
    write_private(path, pki.key_to_pem(key) + pki.cert_to_pem(cert))
    return Identity(name, path, layout / "ca.pem")


def _revoked_identity(stack: StackInfo, directory: Path, name: str) -> Identity:
    identity = issue_identity(stack, name, directory)
    FleetAuthority.open(stack.pki_dir).revoke(name, actor="tests")
    log = stack.layout.log_file(Service.MQTT)
    reloads = log.read_text(errors="replace").count("Reloading config.")
    subprocess.run(
        [str(BIN / "fleetctl"), "stack", "reload", "--workdir", str(stack.workdir)],
        check=True,
        capture_output=True,
        timeout=20,
    )
    # The command only sends SIGHUP: the broker rereads its CRL at its next turn. A probe
    # faster than that would be let in on the old CRL; wait for the broker to say it reloaded.
    eventually(
        lambda: log.read_text(errors="replace").count("Reloading config.") > reloads,
        timeout=10,
        every=0.02,
    )
    return identity


async def _connects(stack: StackInfo, identity: Identity | None, *, service: bool = False) -> bool:
    return await mqtt_session_works(
        stack, identity, client_id=f"probe-{uuid.uuid4().hex[:8]}", service=service
    )


@pytest.mark.parametrize(
    "kind", ["none", "self-signed", "other-ca", "expired", "revoked", "terminal-on-service"]
)
@pytest.mark.asyncio
async def test_no_session_without_a_valid_certificate(
    stack: StackInfo, tmp_path: Path, kind: str
) -> None:
    name = f"bad-{kind}-{uuid.uuid4().hex[:6]}"
    identity: Identity | None
    service = False
    match kind:
        case "none":
            identity = None
        case "self-signed":
            identity = _foreign_identity(stack, tmp_path, name, self_signed=True)
        case "other-ca":
            identity = _foreign_identity(stack, tmp_path, name, self_signed=False)
        case "expired":
            identity = _expired_identity(stack, tmp_path, name)
        case "revoked":
            identity = _revoked_identity(stack, tmp_path, name)
        case _:
            identity = issue_identity(stack, name, tmp_path)
            service = True
    assert not await _connects(stack, identity, service=service)
    # The same broker admits a good certificate: the refusal is about the certificate.
    assert await _connects(stack, issue_identity(stack, f"good-{name[:40]}", tmp_path))


# --- revocation of a connected terminal ----------------------------------------------------


@pytest.mark.asyncio
async def test_revoking_a_connected_terminal_cuts_it_off_and_leaves_others_alone(
    stack: StackInfo, tmp_path: Path
) -> None:
    a_name, b_name = names("rev")
    a = issue_identity(stack, a_name, tmp_path)
    b = issue_identity(stack, b_name, tmp_path)
    sniffer = Sniffer()
    ready = asyncio.Event()
    sniffing = asyncio.create_task(sniffer.run(stack, ready))
    await asyncio.wait_for(ready.wait(), 10)

    async def watch(client: aiomqtt.Client) -> None:
        async for _ in client.messages:
            pass

    try:
        async with mqtt_client(stack, a) as revoked, mqtt_client(stack, b) as other:
            await revoked.subscribe(f"kiosk/v1/{a_name}/cmd/#", qos=1)
            a_link = asyncio.create_task(watch(revoked))
            b_link = asyncio.create_task(watch(other))
            await revoked.publish(topic(TerminalId(a_name), Channel.TELEMETRY), telemetry(1), qos=1)
            await until(lambda: sniffer.topics(a_name))

            started = time.monotonic()
            done = await asyncio.to_thread(
                subprocess.run,
                [str(BIN / "fleetctl"), "terminals", "revoke", a_name, "--pki", str(stack.pki_dir)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            # A's open session ends within seconds ...
            with pytest.raises(aiomqtt.MqttError):
                await asyncio.wait_for(a_link, 10)
            assert time.monotonic() - started < 10
            # ... and B's connection was not touched: it publishes, the fleet receives it.
            assert not b_link.done()
            await other.publish(topic(TerminalId(b_name), Channel.TELEMETRY), telemetry(2), qos=1)
            await until(lambda: len(sniffer.topics(b_name)) == 1)
            b_link.cancel()
        before = len(sniffer.topics(a_name))
        # A cannot come back with its certificate.
        assert not await _connects(stack, a)
        await asyncio.sleep(0.5)
        assert len(sniffer.topics(a_name)) == before
    finally:
        sniffing.cancel()
    audit = FleetAuthority.open(stack.pki_dir).audit(terminal=a_name)
    assert [e.action for e in audit if e.outcome == "revoked"] == ["revoke"]
