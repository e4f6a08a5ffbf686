"""Outages lose no telemetry: a broker restart and an InfluxDB outage leave no gap in any
agent's sample sequence. Each test runs its own stack, so it can stop parts of it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning import stack
from tests.integration.fleet import (
    BIN,
    Proc,
    eventually,
    free_port,
    http_json,
    influx_query,
    server_healthy,
    write_agent_config,
    write_server_config,
)

pytestmark = pytest.mark.integration

TERMINAL = "tinglin-dqzx-01"


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[stack.StackInfo]:
    with stack.running_stack(tmp_path / "stack") as info:
        yield info


def _stop_service(info: stack.StackInfo, service: stack.Service) -> None:
    os.kill(info.pid(service), signal.SIGTERM)  # a clean stop: Mosquitto saves its queue

    def stopped() -> bool:
        found = stack.status(info.workdir)
        return not any(s.running for s in found.services if s.service is service)

    eventually(stopped, timeout=15)


def _seqs(info: stack.StackInfo) -> list[int]:
    series = influx_query(
        info.influx_url,
        info.influx_database,
        f'SELECT "seq" FROM "system" WHERE "terminal" = \'{TERMINAL}\'',
    )
    if not series:
        return []
    values = series[0]["values"]
    assert isinstance(values, list)
    return sorted(int(v[1]) for v in values)


def _start_fleet(info: stack.StackInfo, tmp_path: Path) -> tuple[Proc, Proc, str]:
    api_port = free_port()
    config = write_server_config(
        tmp_path / "server.toml",
        stack=info,
        influx_url=info.influx_url,
        database=info.influx_database,
        registry=tmp_path / "registry.sqlite3",
        api_port=api_port,
    )
    server = Proc(
        [str(BIN / "fleet-server"), "run", "--config", str(config)], tmp_path / "server.log"
    ).start()
    api = f"http://127.0.0.1:{api_port}"
    # The server's subscription must exist before the first sample is published; in
    # production its persistent session always does.
    eventually(lambda: server_healthy(api), timeout=20)
    agent_config = write_agent_config(
        tmp_path / "agent.toml",
        terminal=TERMINAL,
        site="tinglin-dqzx",
        stack=info,
        state_dir=tmp_path / "state",
        interval_s=0.2,
        batch_size=2,
    )
    agent = Proc(
        [str(BIN / "kiosk-agent"), "run", "--config", str(agent_config)], tmp_path / "agent.log"
    ).start()
    return server, agent, api


def _assert_no_gap(info: stack.StackInfo, until: int) -> list[int]:
    def reached() -> list[int] | None:
        seqs = _seqs(info)
        return seqs if seqs and seqs[-1] >= until else None

    seqs = eventually(reached, timeout=30)
    assert seqs == list(range(1, seqs[-1] + 1)), "a sample is missing"
    return seqs


def test_a_broker_restart_loses_no_sample(own_stack: stack.StackInfo, tmp_path: Path) -> None:
    server, agent, _ = _start_fleet(own_stack, tmp_path)
    try:
        eventually(lambda: len(_seqs(own_stack)) >= 5, timeout=20)
        _stop_service(own_stack, stack.Service.MQTT)
        time.sleep(3)  # the agent keeps sampling into its backlog meanwhile
        restarted = stack.up(own_stack.workdir, detach=False)
        assert restarted.mqtt_port == own_stack.mqtt_port
        before = max(_seqs(own_stack))
        seqs = _assert_no_gap(own_stack, until=before + 20)
        assert len(seqs) >= before + 20
    finally:
        agent.stop()
        server.stop()


def test_an_influxdb_outage_loses_no_sample(own_stack: stack.StackInfo, tmp_path: Path) -> None:
    server, agent, api = _start_fleet(own_stack, tmp_path)
    try:
        eventually(lambda: len(_seqs(own_stack)) >= 5, timeout=20)
        before = max(_seqs(own_stack))
        _stop_service(own_stack, stack.Service.INFLUX)
        # While InfluxDB is down the server retries and holds the acknowledgements.
        eventually(
            lambda: (
                (s := http_json(f"{api}/api/v1/ingest"))
                and isinstance(s, dict)
                and s["write_retries"] > 0
            ),
            timeout=15,
        )
        time.sleep(2)
        stack.up(own_stack.workdir, detach=False)
        _assert_no_gap(own_stack, until=before + 30)
    finally:
        agent.stop()
        server.stop()
