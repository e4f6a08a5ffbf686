"""The console scripts as an operator meets them: help, bad config, bad arguments."""

from __future__ import annotations

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
