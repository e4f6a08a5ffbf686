"""The console scripts as an operator meets them: help, bad config, bad arguments."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from provisioning.stack import StackInfo
from tests.integration.fleet import BIN, write_agent_config

pytestmark = pytest.mark.integration

COMMANDS = ["kiosk-agent", "fleet-server", "fleetctl", "fleet-sim"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: {command}")


@pytest.mark.parametrize(
    ("command", "config", "expected"),
    [
        (
            "kiosk-agent",
            '[terminal]\nid = "zhujing-dqzx-01"\nsite = "zhujing-dqzx"\n[broker]\nport = "x"\n',
            "agent.toml: broker.port: Expected `int`, got `str`",
        ),
        (
            "kiosk-agent",
            '[terminal]\nid = "ZJ 01"\nsite = "zhujing-dqzx"\n',
            "agent.toml: terminal.id: Expected `str` of 3-63 characters of a-z, 0-9",
        ),
        (
            "fleet-server",
            '[influx]\nurl = "http://127.0.0.1:1"\n[registry]\npath = "r.db"\n[api]\nprot = 1\n',
            "server.toml: api: Object contains unknown field `prot`",
        ),
        ("fleet-server", "[influx\n", "server.toml: not valid TOML"),
    ],
)
def test_a_bad_config_names_file_and_field_and_exits_without_traceback(
    tmp_path: Path, command: str, config: str, expected: str
) -> None:
    name = "agent.toml" if command == "kiosk-agent" else "server.toml"
    path = tmp_path / name
    path.write_text(config, encoding="utf-8")
    result = run(command, "run", "--config", str(path))
    assert result.returncode == 2
    assert f"{command}: error: {tmp_path}/" in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run("kiosk-agent", "check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml: cannot read config file: No such file or directory" in result.stderr


def test_check_config_prints_what_it_understood(stack: StackInfo, tmp_path: Path) -> None:
    path = write_agent_config(
        tmp_path / "agent.toml",
        terminal="fengjing-dqzx-01",
        site="fengjing-dqzx",
        stack=stack,
        state_dir=tmp_path / "state",
    )
    result = run("kiosk-agent", "check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "terminal fengjing-dqzx-01 at site fengjing-dqzx" in result.stdout


def test_fleetctl_says_what_to_do_when_the_server_is_not_running() -> None:
    result = run("fleetctl", "terminals", "list", "--server", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "cannot reach the fleet server at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_fleet_sim_refuses_an_invalid_prefix() -> None:
    result = run(
        "fleet-sim",
        "--prefix",
        "Bad Prefix",
        "--state-dir",
        "/tmp/x",
        "--terminals",
        "1",
        "--tls-dir",
        "/tmp/x",
    )
    assert result.returncode == 2
    assert "'Bad Prefix-" in result.stderr
    assert "is not valid: 3-63 characters of a-z, 0-9 and '-'" in result.stderr


def test_status_reads_the_outbox_of_an_agent_that_is_not_running(
    stack: StackInfo, tmp_path: Path
) -> None:
    path = write_agent_config(
        tmp_path / "agent.toml",
        terminal="fengjing-dqzx-09",
        site="fengjing-dqzx",
        stack=stack,
        state_dir=tmp_path / "state",
    )
    never_ran = run("kiosk-agent", "status", "--config", str(path))
    assert never_ran.returncode == 2
    assert "the agent has not run here yet" in never_ran.stderr

    from edge_agent.outbox import OutboxLimits, Outgoing, Priority  # noqa: PLC0415
    from edge_agent.store import AgentStore  # noqa: PLC0415

    async def queue() -> None:
        store = AgentStore.open(tmp_path / "state" / "agent.db")
        outbox = store.outbox("fengjing-dqzx-09", OutboxLimits(250, 10**9))
        for i in range(3):  # room for two: one telemetry message is dropped
            await outbox.put(Outgoing("t", b"x" * 100, Priority.TELEMETRY), 1_700_000_000_000 + i)
        store.close()

    asyncio.run(queue())
    result = run("kiosk-agent", "status", "--config", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pending"] == 2
    assert report["pending_bytes"] == 200
    assert report["dropped"] == {"full/telemetry": 1}
    human = run("kiosk-agent", "status", "--config", str(path)).stdout
    assert "待发送 pending  2 messages" in human
    assert "full/telemetry 1" in human
