"""The first path through the system, with real Mosquitto and InfluxDB and real processes:
agents publish telemetry, the fleet server stores it and knows who is online."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet_protocol.codec import decode, encode
from fleet_protocol.messages import State
from provisioning.stack import StackInfo
from tests.integration.fleet import (
    BIN,
    Proc,
    eventually,
    free_port,
    http_json,
    influx_query,
    mqtt_client,
    server_healthy,
    service_identity,
    write_agent_config,
    write_server_config,
)

pytestmark = pytest.mark.integration

KEEPALIVE_S = 2
#: Mosquitto 2.0 sweeps keep-alives in whole seconds and not on every tick: with a 2 s
#: keep-alive the will went out 4.7 to 7.9 s after the agent fell silent (1.5 x 2 s = 3 s).
#: With the production keep-alive of 30 s that is 45 s plus the same few seconds.
MARGIN_S = 7
SITES = {
    "zhujing-dqzx": ("朱泾镇党群服务中心", "朱泾镇", "金山区"),
    "fengjing-hdc": ('枫泾镇 和平村, 村居服务点 = "一站式"', "枫泾镇", "金山区"),
}


@dataclass
class Fleet:
    stack: StackInfo
    workdir: Path
    database: str
    api: str
    server: Proc
    agents: dict[str, Proc]

    def agent(self, terminal: str, site: str) -> Proc:
        if (previous := self.agents.get(terminal)) is not None:
            previous.stop()  # reap it: a restarted agent replaces the earlier process
        config = write_agent_config(
            self.workdir / f"{terminal}.toml",
            terminal=terminal,
            site=site,
            stack=self.stack,
            state_dir=self.workdir / "state" / terminal,
            keepalive_s=KEEPALIVE_S,
        )
        proc = Proc(
            [str(BIN / "kiosk-agent"), "run", "--config", str(config)],
            self.workdir / f"{terminal}.log",
        ).start()
        self.agents[terminal] = proc
        return proc

    def terminals(self) -> dict[str, dict[str, object]]:
        out = subprocess.run(
            [str(BIN / "fleetctl"), "terminals", "list", "--server", self.api, "--json"],
            capture_output=True,
            check=True,
            timeout=20,
        )
        listing = json.loads(out.stdout)
        return {t["id"]: t for t in listing["terminals"]}

    def status(self, terminal: str) -> object:
        return self.terminals().get(terminal, {}).get("status")

    def query(self, q: str) -> list[dict[str, object]]:
        return influx_query(self.stack.influx_url, self.database, q)


@pytest.fixture
def fleet(stack: StackInfo, tmp_path: Path) -> Iterator[Fleet]:
    # Each test gets its own database, share group and client id, so nothing leaks between
    # tests through the shared broker and InfluxDB.
    tag = uuid.uuid4().hex[:8]
    database = f"e2e_{tag}"
    api_port = free_port()
    sites = "".join(
        f'\n[[sites]]\nid = "{sid}"\nname = {json.dumps(n, ensure_ascii=False)}\n'
        f'town = "{t}"\ndistrict = "{d}"\n'
        for sid, (n, t, d) in SITES.items()
    )
    config = write_server_config(
        tmp_path / "server.toml",
        stack=stack,
        influx_url=stack.influx_url,
        database=database,
        registry=tmp_path / "registry.sqlite3",
        api_port=api_port,
        client_id=f"fleet-server-{tag}",
        share_group=f"g{tag}",
        extra=sites,
    )
    server = Proc(
        [str(BIN / "fleet-server"), "run", "--config", str(config)], tmp_path / "server.log"
    ).start()
    api = f"http://127.0.0.1:{api_port}"
    fleet = Fleet(stack, tmp_path, database, api, server, {})
    try:
        eventually(lambda: server_healthy(api), timeout=20)
        yield fleet
    finally:
        for agent in fleet.agents.values():
            agent.stop()
        code = server.stop()
        assert code == 0, f"fleet-server exited {code}:\n{server.output()[-3000:]}"


def _tags_by_terminal(series: list[dict[str, object]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for s in series:
        tags = s["tags"]
        assert isinstance(tags, dict)
        out[tags["terminal"]] = tags
    return out


def test_three_agents_are_stored_with_their_tags_and_listed_online(fleet: Fleet) -> None:
    placement = {
        "zhujing-dqzx-01": "zhujing-dqzx",
        "zhujing-dqzx-02": "zhujing-dqzx",
        "fengjing-hdc-01": "fengjing-hdc",
    }
    for terminal, site in placement.items():
        fleet.agent(terminal, site)

    def stored() -> dict[str, dict[str, str]] | None:
        series = fleet.query(
            'SELECT count("cpu_percent") FROM "system" GROUP BY "terminal", "site", "town", '
            '"district"'
        )
        tags = _tags_by_terminal(series)
        return tags if set(tags) == set(placement) else None

    tags = eventually(stored, timeout=15)
    for terminal, site in placement.items():
        _name, town, district = SITES[site]
        assert tags[terminal] == {
            "terminal": terminal,
            "site": site,
            "town": town,
            "district": district,
        }

    def all_online() -> dict[str, dict[str, object]] | None:
        listing = fleet.terminals()
        online = all(listing.get(x, {}).get("status") == "online" for x in placement)
        return listing if online else None

    listing = eventually(all_online, timeout=10)
    assert listing["fengjing-hdc-01"]["site_name"] == SITES["fengjing-hdc"][0]
    assert listing["zhujing-dqzx-01"]["last_seen_ms"]


def test_samples_keep_their_own_timestamps(fleet: Fleet) -> None:
    before = int(time.time() * 1000)
    fleet.agent("tinglin-dqzx-01", "zhujing-dqzx")
    rows = eventually(
        lambda: fleet.query('SELECT "seq", "cpu_percent" FROM "system" ORDER BY time'),
        timeout=15,
    )
    values = rows[0]["values"]
    assert isinstance(values, list)
    times = [v[0] for v in values]
    seqs = [v[1] for v in values]
    assert times == sorted(times)
    assert all(before - 1000 <= t <= int(time.time() * 1000) for t in times)
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)


def test_a_killed_agent_is_offline_within_the_keepalive_bound_and_back_after_restart(
    fleet: Fleet,
) -> None:
    terminal = "zhujing-cun-01"
    agent = fleet.agent(terminal, "zhujing-dqzx")
    eventually(lambda: fleet.status(terminal) == "online", timeout=15)
    first_session = fleet.terminals()[terminal]["session"]
    assert isinstance(first_session, int)

    killed_at = time.monotonic()
    agent.signal(signal.SIGKILL)
    eventually(lambda: fleet.status(terminal) == "offline", timeout=KEEPALIVE_S * 1.5 + MARGIN_S)
    assert time.monotonic() - killed_at <= KEEPALIVE_S * 1.5 + MARGIN_S
    assert fleet.terminals()[terminal]["reason"] == "lost"

    fleet.agent(terminal, "zhujing-dqzx")
    eventually(
        lambda: (
            (t := fleet.terminals()[terminal])["status"] == "online"
            and t["session"] == first_session + 1
        ),
        timeout=15,
    )

    # A death of the earlier connection that reaches the server late must not win.
    stale = State(online=False, session=first_session, ts=1, reason="lost")
    asyncio.run(_publish(fleet.stack, f"kiosk/v1/{terminal}/state", encode(stale), retain=False))
    time.sleep(1.5)
    assert fleet.status(terminal) == "online"


def test_a_silent_agent_is_declared_lost_by_the_broker_keepalive(fleet: Fleet) -> None:
    """SIGSTOP keeps the TCP connection open but silent: only keep-alive can catch this."""
    terminal = "zhujing-cun-02"
    agent = fleet.agent(terminal, "zhujing-dqzx")
    eventually(lambda: fleet.status(terminal) == "online", timeout=15)
    stopped_at = time.monotonic()
    agent.signal(signal.SIGSTOP)
    try:
        eventually(
            lambda: fleet.status(terminal) == "offline", timeout=KEEPALIVE_S * 1.5 + MARGIN_S
        )
        elapsed = time.monotonic() - stopped_at
    finally:
        agent.signal(signal.SIGCONT)
    assert KEEPALIVE_S <= elapsed <= KEEPALIVE_S * 1.5 + MARGIN_S
    # Woken up, the agent notices, reconnects with a new session and is online again.
    eventually(lambda: fleet.status(terminal) == "online", timeout=20)


def test_sigterm_publishes_a_retained_shutdown_state(fleet: Fleet) -> None:
    terminal = "fengjing-hdc-02"
    agent = fleet.agent(terminal, "fengjing-hdc")
    eventually(lambda: fleet.status(terminal) == "online", timeout=15)
    agent.signal(signal.SIGTERM)
    assert agent.popen is not None
    assert agent.popen.wait(10) == 0
    eventually(lambda: fleet.terminals()[terminal]["reason"] == "shutdown", timeout=5)
    retained = asyncio.run(_retained(fleet.stack, f"kiosk/v1/{terminal}/state"))
    state = decode(State, retained)
    assert (state.online, state.reason) == (False, "shutdown")


def test_garbage_on_telemetry_is_counted_dropped_and_does_not_stop_ingest(fleet: Fleet) -> None:
    fleet.agent("zhujing-dqzx-03", "zhujing-dqzx")
    eventually(lambda: fleet.query('SELECT count("cpu_percent") FROM "system"'), timeout=15)
    garbage: list[bytes] = [
        b"",
        b"\xff\xfe\x00",
        b"not json",
        b"[]",
        b'{"samples": []}',
        b'{"samples": [{"kind": "system", "seq": -1}]}',
        b"{" * 5000,
        b'{"samples": 1}',
        b"x" * 300_000,
    ] * 20
    asyncio.run(_publish_many(fleet.stack, "kiosk/v1/garbage-01/telemetry", garbage))

    def counted() -> dict[str, int] | None:
        stats = http_json(f"{fleet.api}/api/v1/ingest")
        assert isinstance(stats, dict)
        mine = stats["rejected"].get("garbage-01", {})
        return mine if sum(mine.values()) == len(garbage) else None

    rejected = eventually(counted, timeout=15)
    assert rejected.keys() <= {"malformed", "schema", "too_large"}
    assert rejected["too_large"] == 20
    assert fleet.query('SELECT * FROM "system" WHERE "terminal" = \'garbage-01\'') == []
    # Ingest goes on: the live agent's points keep arriving after the burst.
    after = time.time() * 1000
    eventually(
        lambda: fleet.query(
            f'SELECT count("cpu_percent") FROM "system" WHERE time > {int(after)}ms'
        ),
        timeout=10,
    )
    assert fleet.server.popen is not None
    assert fleet.server.popen.poll() is None


async def _publish(stack: StackInfo, topic: str, payload: bytes, *, retain: bool) -> None:
    async with mqtt_client(stack, service_identity(stack), service=True) as client:
        await client.publish(topic, payload, qos=1, retain=retain)


async def _publish_many(stack: StackInfo, topic: str, payloads: list[bytes]) -> None:
    async with mqtt_client(stack, service_identity(stack), service=True) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


async def _retained(stack: StackInfo, topic: str) -> bytes:
    async with mqtt_client(stack, service_identity(stack), service=True) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("no retained message")
