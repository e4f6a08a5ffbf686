"""Commands from the fleet server reach a real `kiosk-agent run` through real Mosquitto: queued
while the agent is down, run at most once per id (also across restarts), never after expiry,
every outcome answered on cmd-result with the request's MQTT 5 correlation data.

The test acts as the fleet server on MQTT (its service certificate). The agent's reboot and
restart-app commands point at a recorder script that appends its argv and the time to a file,
so what the agent ran, and when, is visible without rebooting anything.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiomqtt
import pytest
import pytest_asyncio
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_protocol.codec import decode, encode
from fleet_protocol.ids import CommandId, CommandName, TerminalId
from fleet_protocol.messages import Command, CommandResult, Event, Scalar, State
from fleet_protocol.topics import Channel, command_topic, topic
from provisioning.stack import StackInfo
from tests.integration.fleet import (
    BIN,
    Proc,
    RunningServer,
    mqtt_client,
    service_identity,
    start_server,
    write_agent_config,
)

pytestmark = pytest.mark.integration
T = TypeVar("T")

SITE = "zhujing-dqzx"
RECORDER = """#!{python}
import sys, time
with open(sys.argv[1], "a", encoding="utf-8") as out:
    out.write(f"{{time.time():.6f}} {{' '.join(sys.argv[2:])}}\\n")
"""
#: The reboot recorder stops the agent the moment it runs, as a machine going down would (sh
#: starts in a millisecond; nothing the agent had not published by then gets out), records
#: itself, asks the broker what it holds as the terminal's state, and lets the agent go on.
REBOOT_RECORDER = """#!/bin/sh
kill -STOP $PPID
echo "$(date +%s.%N) $2" >> "$1"
"{python}" "{reader}" > "$1.state"
kill -CONT $PPID
"""
#: Prints the retained message on one topic, read with the fleet server's identity.
RETAINED_READER = """
import asyncio, ssl, sys, time
import aiomqtt

async def main():
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile={ca!r})
    context.load_cert_chain({identity!r})
    async with aiomqtt.Client(
        "127.0.0.1", {port}, identifier=f"reboot-recorder-{{time.time_ns()}}",
        protocol=aiomqtt.ProtocolVersion.V5, tls_context=context,
    ) as client:
        await client.subscribe({topic!r}, qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                sys.stdout.buffer.write(message.payload)
                return

asyncio.run(main())
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_id() -> str:
    return f"cmd-{uuid.uuid4().hex[:16]}"


def command(
    name: str,
    command_id: str,
    *,
    issued_at: int | None = None,
    expires_at: int | None = None,
    args: dict[str, Scalar] | None = None,
) -> bytes:
    issued = now_ms() if issued_at is None else issued_at
    return encode(
        Command(
            id=CommandId(command_id),
            name=CommandName(name),
            issued_at=issued,
            expires_at=issued + 60_000 if expires_at is None else expires_at,
            args=args or {},
        )
    )


@dataclass(frozen=True)
class Heard:
    """A message from the terminal as the fleet side received it, with when (wall clock)."""

    topic: str
    payload: bytes
    at: float
    correlation: bytes | None


class FleetSide:
    """The fleet server's side of one terminal on MQTT: sends commands, hears all it says."""

    def __init__(self, client: aiomqtt.Client, terminal: str) -> None:
        self._client = client
        self.terminal = TerminalId(terminal)
        self.heard: list[Heard] = []

    async def listen(self) -> None:
        async for message in self._client.messages:
            correlation = getattr(message.properties, "CorrelationData", None)
            assert isinstance(message.payload, bytes)
            self.heard.append(
                Heard(
                    str(message.topic),
                    message.payload,
                    time.time(),
                    correlation if isinstance(correlation, bytes) else None,
                )
            )

    async def send(self, name: str, payload: bytes, correlation: bytes | None = None) -> None:
        """Publish as the server does: QoS 1, with a response topic and correlation data."""
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = topic(self.terminal, Channel.CMD_RESULT)
        if correlation is not None:
            props.CorrelationData = correlation
        await self._client.publish(
            command_topic(self.terminal, CommandName(name)), payload, qos=1, properties=props
        )

    def on(self, channel: Channel) -> list[Heard]:
        where = topic(self.terminal, channel)
        return [h for h in self.heard if h.topic == where]

    def results(self, command_id: str) -> list[tuple[CommandResult, Heard]]:
        found = [(decode(CommandResult, h.payload), h) for h in self.on(Channel.CMD_RESULT)]
        return [(r, h) for r, h in found if r.id == command_id]

    def states(self) -> list[tuple[State, Heard]]:
        return [(decode(State, h.payload), h) for h in self.on(Channel.STATE)]

    def events(self) -> list[Event]:
        return [decode(Event, h.payload) for h in self.on(Channel.EVENTS)]

    async def result(self, command_id: str, count: int = 1) -> tuple[CommandResult, Heard]:
        """The ``count``-th answer to ``command_id``, once it arrived."""
        await until(lambda: len(self.results(command_id)) >= count, timeout=30)
        return self.results(command_id)[count - 1]

    async def online(self, after: float = 0.0) -> State:
        """A birth heard after ``after`` (wall clock): the agent is connected and subscribed."""

        def birth() -> State | None:
            return next((s for s, h in self.states() if s.online and h.at > after), None)

        return await until(birth, timeout=30)


async def until(check: Callable[[], T | None], timeout: float) -> T:
    """Poll ``check`` on the event loop until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true within {timeout} s; last value: {last!r}")


@dataclass
class Kiosk:
    """One kiosk's `kiosk-agent run`, started and stopped by the test; its reboot and
    restart-app commands append to ``calls_file`` (see the recorders above)."""

    terminal: str
    config: Path
    log: Path
    calls_file: Path
    runs: list[Proc] = field(default_factory=list)

    def start(self) -> Proc:
        proc = Proc([str(BIN / "kiosk-agent"), "run", "--config", str(self.config)], self.log)
        self.runs.append(proc.start())
        return proc

    @property
    def running(self) -> bool:
        return (
            bool(self.runs)
            and self.runs[-1].popen is not None
            and self.runs[-1].popen.poll() is None
        )

    async def stop(self) -> None:
        """SIGTERM, as systemd stops it: the agent must exit cleanly."""
        proc = self.runs[-1]
        proc.signal(signal.SIGTERM)
        await until(lambda: not self.running, timeout=30)
        assert proc.popen is not None
        assert proc.popen.returncode == 0, self.output()

    def calls(self) -> list[tuple[float, str]]:
        """What the recorder was run with: (when, argv after the file), oldest first."""
        if not self.calls_file.exists():
            return []
        lines = self.calls_file.read_text(encoding="utf-8").splitlines()
        return [(float(at), what) for at, what in (line.split(" ", 1) for line in lines)]

    def state_at_reboot(self) -> State | None:
        """The terminal's state the broker held when the reboot command ran (once read)."""
        written = self.calls_file.with_name(self.calls_file.name + ".state")
        if not written.exists() or not written.stat().st_size:
            return None
        return decode(State, written.read_bytes())

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def server(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(stack, tmp_path_factory.mktemp("agent-commands"))
    yield running
    running.stop()


@pytest.fixture
def kiosk(stack: StackInfo, server: RunningServer, tmp_path: Path) -> Iterator[Kiosk]:
    # A terminal of its own per test: its persistent session and ledger start empty.
    terminal = f"zhujing-cmd-{uuid.uuid4().hex[:8]}"
    calls = tmp_path / "calls.txt"
    fleet_identity = service_identity(stack)
    scripts = {
        "recorder": RECORDER.format(python=sys.executable),
        "reboot-recorder": REBOOT_RECORDER.format(
            python=sys.executable, reader=tmp_path / "retained.py"
        ),
        "retained.py": RETAINED_READER.format(
            ca=str(fleet_identity.ca_file),
            identity=str(fleet_identity.identity_file),
            port=stack.mqtt_service_port,
            topic=topic(TerminalId(terminal), Channel.STATE),
        ),
    }
    for name, text in scripts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        (tmp_path / name).chmod(0o755)
    recorder, reboot_recorder = tmp_path / "recorder", tmp_path / "reboot-recorder"
    config = write_agent_config(
        tmp_path / "agent.toml",
        terminal=terminal,
        site=SITE,
        stack=stack,
        state_dir=tmp_path / "state",
        # Frozen by the reboot recorder for a moment: not long enough to be declared lost.
        keepalive_s=10,
        interval_s=1.0,
        batch_size=3,
        extra=f"""
[system_commands]
reboot = [{json.dumps(str(reboot_recorder))}, {json.dumps(str(calls))}, "reboot"]
restart_app = [{json.dumps(str(recorder))}, {json.dumps(str(calls))}, "restart-app"]
""",
    )
    kiosk = Kiosk(terminal, config, tmp_path / "agent.log", calls)
    try:
        yield kiosk
    finally:
        for run in kiosk.runs:
            run.stop()


@pytest_asyncio.fixture
async def fleet(stack: StackInfo, kiosk: Kiosk) -> AsyncIterator[FleetSide]:
    t = TerminalId(kiosk.terminal)
    async with mqtt_client(
        stack, service_identity(stack), client_id=f"ops-{uuid.uuid4().hex[:8]}", service=True
    ) as client:
        side = FleetSide(client, kiosk.terminal)
        await client.subscribe(
            [
                (topic(t, channel), 1)
                for channel in (
                    Channel.STATE,
                    Channel.TELEMETRY,
                    Channel.EVENTS,
                    Channel.CMD_RESULT,
                )
            ]
        )
        listening = asyncio.create_task(side.listen(), name=f"fleet-side:{t}")
        try:
            yield side
        finally:
            listening.cancel()


def terminals(server: RunningServer) -> dict[str, dict[str, object]]:
    """The server's listing, as ops read it (`fleetctl terminals list --json`)."""
    out = subprocess.run(
        [str(BIN / "fleetctl"), "terminals", "list", "--server", server.api, "--json"],
        capture_output=True,
        check=True,
        timeout=20,
    )
    return {t["id"]: t for t in json.loads(out.stdout)["terminals"]}


@pytest.mark.asyncio
async def test_a_command_sent_while_the_agent_is_down_runs_once_when_it_is_back(
    kiosk: Kiosk, fleet: FleetSide
) -> None:
    kiosk.start()
    await fleet.online()
    await kiosk.stop()  # its persistent session stays at the broker, subscribed to cmd/+

    command_id = new_id()
    correlation = uuid.uuid4().bytes
    await fleet.send("restart-app", command("restart-app", command_id), correlation)

    back_at = time.time()
    kiosk.start()
    result, heard = await fleet.result(command_id)
    assert result.status == "ok", result
    assert heard.correlation == correlation
    calls = kiosk.calls()
    assert [what for _, what in calls] == ["restart-app"]
    assert calls[0][0] > back_at
    # The outcome is also an event, naming who asked.
    done = await until(
        lambda: [e for e in fleet.events() if e.attributes.get("id") == command_id], timeout=15
    )
    assert [(e.kind, e.actor) for e in done] == [("command.ok", "fleet-server")]


@pytest.mark.asyncio
async def test_the_same_command_id_again_is_answered_duplicate_and_not_run_even_after_a_restart(
    kiosk: Kiosk, fleet: FleetSide
) -> None:
    kiosk.start()
    await fleet.online()
    command_id = new_id()
    payload = command("restart-app", command_id)
    await fleet.send("restart-app", payload, b"first")
    first, _ = await fleet.result(command_id)
    assert first.status == "ok", first

    await fleet.send("restart-app", payload, b"second")
    again, heard = await fleet.result(command_id, 2)
    assert again.status == "duplicate", again
    assert "ok" in again.message  # it says what the first run came to
    assert heard.correlation == b"second"

    # The ledger is on disk: a restarted agent remembers the id.
    await kiosk.stop()
    restarted_at = time.time()
    kiosk.start()
    await fleet.online(after=restarted_at)
    await fleet.send("restart-app", payload, b"third")
    third, heard = await fleet.result(command_id, 3)
    assert third.status == "duplicate", third
    assert heard.correlation == b"third"
    assert [what for _, what in kiosk.calls()] == ["restart-app"]


@pytest.mark.asyncio
async def test_an_expired_command_is_answered_expired_and_never_run(
    kiosk: Kiosk, fleet: FleetSide
) -> None:
    kiosk.start()
    await fleet.online()
    stale = new_id()
    now = now_ms()
    await fleet.send(
        "restart-app",
        command("restart-app", stale, issued_at=now - 120_000, expires_at=now - 60_000),
        b"stale",
    )
    result, heard = await fleet.result(stale)
    assert (result.status, heard.correlation) == ("expired", b"stale")

    # Valid when sent, expired by the time the agent is back to run it.
    await kiosk.stop()
    late = new_id()
    expires_at = now_ms() + 1500
    await fleet.send("reboot", command("reboot", late, expires_at=expires_at), b"late")
    await asyncio.sleep(max(0.0, expires_at / 1000 - time.time()) + 0.2)
    kiosk.start()
    result, _ = await fleet.result(late)
    assert result.status == "expired", result
    assert kiosk.calls() == []

    def recorded() -> dict[object, str] | None:
        kinds: dict[object, str] = {e.attributes.get("id"): e.kind for e in fleet.events()}
        return kinds if {stale, late} <= kinds.keys() else None

    kinds = await until(recorded, timeout=15)
    assert (kinds[stale], kinds[late]) == ("command.expired", "command.expired")


@pytest.mark.asyncio
async def test_a_reboot_announces_planned_before_it_runs_and_the_server_expects_it_back(
    kiosk: Kiosk, fleet: FleetSide, server: RunningServer
) -> None:
    kiosk.start()
    await fleet.online()
    await until(lambda: terminals(server).get(kiosk.terminal, {}).get("status") == "online", 30)

    command_id = new_id()
    sent_ms = now_ms()
    # No delay: the announcement is all that stands between the command and the reboot.
    args: dict[str, Scalar] = {"delay_s": 0.0, "expected_back_s": 60.0}
    await fleet.send("reboot", command("reboot", command_id, args=args), b"reboot")
    result, heard = await fleet.result(command_id)
    assert (result.status, heard.correlation) == ("ok", b"reboot")
    calls = await until(kiosk.calls, timeout=15)
    assert [what for _, what in calls] == ["reboot"]

    # When the reboot ran, the broker already held the planned state, with when to expect
    # the terminal back.
    state = await until(kiosk.state_at_reboot, timeout=20)
    assert (state.online, state.reason) == (False, "planned"), state
    assert state.expected_back is not None
    assert sent_ms + 60_000 <= state.expected_back <= now_ms() + 60_000

    def listed_planned() -> dict[str, object] | None:
        listed = terminals(server).get(kiosk.terminal, {})
        return listed if listed.get("reason") == "planned" else None

    listed = await until(listed_planned, timeout=15)
    assert listed["status"] == "offline"

    # Going down for the reboot keeps it planned: never a lost terminal.
    stopping_at = time.time()
    await kiosk.stop()
    final = await until(
        lambda: next((s for s, h in fleet.states() if h.at > stopping_at), None), timeout=10
    )
    assert (final.online, final.reason) == (False, "planned")
    assert final.expected_back == state.expected_back
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # the server has had its chance to see it otherwise
        assert listed_planned() is not None, terminals(server).get(kiosk.terminal)
        await asyncio.sleep(0.2)


@pytest.mark.asyncio
async def test_diagnostics_answers_with_a_report_of_the_terminal(
    kiosk: Kiosk, fleet: FleetSide
) -> None:
    kiosk.start()
    await fleet.online()
    command_id = new_id()
    await fleet.send("diagnostics", command("diagnostics", command_id), b"diag")
    result, heard = await fleet.result(command_id)
    assert (result.status, heard.correlation) == ("ok", b"diag")
    assert kiosk.terminal in result.output
    assert "outbox" in result.output
    assert kiosk.calls() == []


@pytest.mark.asyncio
async def test_a_malformed_command_is_survived_and_telemetry_goes_on(
    kiosk: Kiosk, fleet: FleetSide
) -> None:
    kiosk.start()
    await fleet.online()
    garbage = [
        b"",
        b"\xff\xfe\x00",
        b"not json",
        b"[]",
        b'{"id": 5}',
        b"{" * 5000,
        b"x" * 300_000,
        b'{"id": "bad-payload-01", "name": "diagnostics"}',  # an id, but no times: answered
    ]
    for payload in garbage:
        await fleet.send("diagnostics", payload)
    sent_at = time.time()
    rejected, _ = await fleet.result("bad-payload-01")
    assert rejected.status == "rejected", rejected

    # Still running, still reporting, still taking commands.
    await until(
        lambda: len([h for h in fleet.on(Channel.TELEMETRY) if h.at > sent_at]) >= 2, timeout=15
    )
    command_id = new_id()
    await fleet.send("diagnostics", command("diagnostics", command_id))
    result, _ = await fleet.result(command_id)
    assert result.status == "ok"
    assert f"commands: {len(garbage)} malformed" in result.output
    assert kiosk.running
