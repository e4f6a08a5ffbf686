"""A bad config file names the file, the field and what is wrong."""

from __future__ import annotations

import pytest

from edge_agent.config import parse_config as parse_agent
from edge_agent.errors import AgentConfigError
from fleet_server.config import parse_config as parse_server
from fleet_server.errors import ConfigError

AGENT_OK = (
    b'[terminal]\nid = "zhujing-dqzx-01"\nsite = "zhujing-dqzx"\n'
    b'[tls]\nca_file = "/var/lib/kiosk-agent/tls/ca.pem"\n'
    b'identity_file = "/var/lib/kiosk-agent/tls/identity.pem"\n'
)
SERVER_OK = (
    b'[influx]\nurl = "http://127.0.0.1:8086"\n[registry]\npath = "/tmp/r.db"\n'
    b'[broker]\nca_file = "/p/ca.pem"\ncert_file = "/p/s.pem"\nkey_file = "/p/s.key"\n'
)


def test_a_minimal_agent_config_gets_sensible_defaults() -> None:
    config = parse_agent(AGENT_OK, "agent.toml")
    assert config.terminal.id == "zhujing-dqzx-01"
    assert config.broker.keepalive_s == 30
    assert config.broker.port == 8883  # TLS only


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        (b'[terminal]\nid = "Kiosk 1"\nsite = "s-1"\n', "terminal.id", "3-63 characters"),
        (AGENT_OK + b'[broker]\nport = "1883"\n', "broker.port", "Expected `int`"),
        (AGENT_OK + b"[broker]\nport = 70000\n", "broker.port", "<= 65535"),
        (AGENT_OK + b"[broker]\nkeepalive = 30\n", "broker", "unknown field `keepalive`"),
        (AGENT_OK + b"[telemetry]\ninterval_s = 0\n", "telemetry.interval_s", "> 0"),
        (b'[terminal]\nsite = "s-1"\n', "terminal", "missing required field `id`"),
    ],
)
def test_agent_config_errors_name_the_file_and_field(text: bytes, field: str, problem: str) -> None:
    with pytest.raises(AgentConfigError) as info:
        parse_agent(text, "/etc/kiosk-agent/agent.toml")
    message = str(info.value)
    assert message.startswith(f"/etc/kiosk-agent/agent.toml: {field}: ")
    assert problem in message


def test_agent_config_that_is_not_toml_says_so_with_the_line() -> None:
    with pytest.raises(AgentConfigError, match=r"agent.toml: not valid TOML: .*line 2"):
        parse_agent(b'[terminal]\nid = "x\n', "agent.toml")


def test_server_config_errors_name_the_field_inside_a_list() -> None:
    text = SERVER_OK + b'[[sites]]\nid = "a-site"\nname = "A"\ntown = "T"\n'
    with pytest.raises(ConfigError, match=r"server.toml: sites\[0\]: .*`district`"):
        parse_server(text, "server.toml")


def test_server_config_refuses_a_site_listed_twice() -> None:
    site = b'[[sites]]\nid = "a-site"\nname = "A"\ntown = "T"\ndistrict = "D"\n'
    with pytest.raises(ConfigError, match="a-site"):
        parse_server(SERVER_OK + site + site, "server.toml")


def test_server_config_without_broker_tls_files_names_the_field() -> None:
    text = b'[influx]\nurl = "http://127.0.0.1:8086"\n[registry]\npath = "/tmp/r.db"\n[broker]\n'
    with pytest.raises(ConfigError, match=r"server.toml: broker: .*`ca_file`"):
        parse_server(text, "server.toml")
