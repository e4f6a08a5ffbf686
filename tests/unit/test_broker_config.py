"""The generated mosquitto.conf: loopback only, deliberate limits, each explained."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TypedDict, Unpack

import pytest

from fleet_protocol.codec import MAX_PAYLOAD
from provisioning.broker_config import MIB, BrokerSettings, render_broker_config
from provisioning.errors import InvalidSettings, ProvisioningError

DATA = Path("/srv/stack/mosquitto/data")
LOG = Path("/srv/stack/mosquitto/mosquitto.log")


class Overrides(TypedDict, total=False):
    host: str
    port: int
    data_dir: Path
    log_file: Path
    run_as_user: str | None
    max_queued_messages: int
    max_queued_bytes: int
    max_inflight_messages: int
    max_packet_size: int
    max_keepalive: int
    persistent_client_expiration: str
    autosave_interval: int


def settings(**overrides: Unpack[Overrides]) -> BrokerSettings:
    base = BrokerSettings(port=18830, data_dir=DATA, log_file=LOG)
    return replace(base, **overrides)


def options(text: str) -> dict[str, list[str]]:
    """Option name -> values, in order, ignoring comments and blank lines."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, value = line.partition(" ")
        found.setdefault(name, []).append(value)
    return found


def comment_before(text: str, option: str) -> str:
    """The comment block directly above the first line setting ``option``."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"{option} "))
    block: list[str] = []
    for line in reversed(lines[:index]):
        if not line.startswith("#"):
            if block or not line.strip():
                break
            continue  # another option of the same commented group
        block.insert(0, line)
    return "\n".join(block)


def test_one_plain_listener_on_loopback_only() -> None:
    text = render_broker_config(settings())
    assert options(text)["listener"] == ["18830 127.0.0.1"]
    assert "0.0.0.0" not in text
    assert "bind_address" not in options(text)
    assert "port" not in options(text)  # the legacy default listener would bind all interfaces


def test_limits_have_the_chosen_values() -> None:
    found = options(render_broker_config(settings()))
    assert found["max_queued_messages"] == ["1000000"]
    assert found["max_queued_bytes"] == [str(512 * MIB)]
    assert found["max_inflight_messages"] == ["100"]
    assert found["queue_qos0_messages"] == ["false"]
    assert found["max_packet_size"] == [str(1 * MIB)]
    assert found["max_keepalive"] == ["300"]
    assert found["set_tcp_nodelay"] == ["true"]
    assert found["persistent_client_expiration"] == ["14d"]


def test_broker_packet_limit_is_above_the_codec_limit() -> None:
    found = options(render_broker_config(settings()))
    assert int(found["max_packet_size"][0]) > MAX_PAYLOAD


@pytest.mark.parametrize(
    ("option", "explained_by"),
    [
        ("max_queued_messages", "drops QoS 0"),
        ("max_queued_bytes", "drops QoS 0"),
        ("queue_qos0_messages", "QoS 0"),
        ("max_inflight_messages", "ingest"),
        ("max_packet_size", "MAX_PAYLOAD"),
        ("max_keepalive", "keep-alive"),
        ("set_tcp_nodelay", "Nagle"),
        ("persistent_client_expiration", "expire"),
        ("allow_anonymous", "TLS"),
    ],
)
def test_each_deliberate_setting_is_explained_in_the_file(option: str, explained_by: str) -> None:
    text = render_broker_config(settings())
    assert explained_by in comment_before(text, option)


def test_persistence_and_logging_go_to_the_given_paths() -> None:
    found = options(render_broker_config(settings(autosave_interval=120)))
    assert found["persistence"] == ["true"]
    assert found["persistence_location"] == [str(DATA)]
    assert found["autosave_interval"] == ["120"]
    assert found["log_dest"] == [f"file {LOG}"]
    assert found["allow_anonymous"] == ["true"]


def test_user_is_set_only_when_asked() -> None:
    assert "user" not in options(render_broker_config(settings()))
    assert options(render_broker_config(settings(run_as_user="fleet")))["user"] == ["fleet"]


def test_custom_limits_are_rendered() -> None:
    found = options(
        render_broker_config(
            settings(max_queued_messages=5000, max_queued_bytes=64 * MIB, max_inflight_messages=20)
        )
    )
    assert found["max_queued_messages"] == ["5000"]
    assert found["max_queued_bytes"] == [str(64 * MIB)]
    assert found["max_inflight_messages"] == ["20"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"host": "0.0.0.0"},
        {"host": "192.168.1.10"},
        {"host": "localhost"},
        {"port": 0},
        {"port": 70000},
        {"data_dir": Path("relative/data")},
        {"log_file": Path("/srv/stack/evil.log\nallow_anonymous true")},
        {"max_packet_size": MAX_PAYLOAD},
        {"max_queued_messages": 0},
        {"max_queued_bytes": 0},
        {"max_queued_bytes": 64 * 1024},
        {"max_inflight_messages": 0},
        {"max_keepalive": 5},
        {"persistent_client_expiration": "14 days"},
        {"persistent_client_expiration": "0d"},
        {"run_as_user": "two words"},
        {"autosave_interval": -1},
    ],
)
def test_settings_that_cannot_work_are_refused(overrides: Overrides) -> None:
    with pytest.raises(InvalidSettings) as caught:
        settings(**overrides)
    assert isinstance(caught.value, ProvisioningError)
    assert isinstance(caught.value, ValueError)


def test_ipv6_loopback_is_allowed() -> None:
    assert options(render_broker_config(settings(host="::1")))["listener"] == ["18830 ::1"]
