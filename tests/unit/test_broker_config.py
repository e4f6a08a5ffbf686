"""The generated mosquitto.conf: loopback only, deliberate limits, each explained."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TypedDict, Unpack

import pytest

from fleet_protocol.codec import MAX_PAYLOAD
from provisioning.broker_config import (
    MIB,
    TERMINAL_WRITES,
    BrokerSettings,
    render_acl,
    render_broker_config,
)
from provisioning.errors import InvalidSettings, ProvisioningError

DATA = Path("/srv/stack/mosquitto/data")
LOG = Path("/srv/stack/mosquitto/mosquitto.log")
PKI = Path("/srv/stack/pki")


class Overrides(TypedDict, total=False):
    host: str
    port: int
    service_host: str
    service_port: int
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
    base = BrokerSettings(
        port=18830,
        service_port=18840,
        data_dir=DATA,
        log_file=LOG,
        ca_file=PKI / "ca.pem",
        service_ca_file=PKI / "service-ca.pem",
        cert_file=PKI / "broker.pem",
        key_file=PKI / "broker.key",
        crl_file=PKI / "crl.pem",
        acl_file=PKI / "broker.acl",
    )
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


def test_listeners_bind_the_given_addresses_only() -> None:
    text = render_broker_config(settings())
    assert options(text)["listener"] == ["18830 127.0.0.1", "18840 127.0.0.1"]
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
        ("allow_anonymous", "client certificate"),
        ("acl_file", "already open"),
        ("use_username_as_clientid", "client id"),
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
        {"host": "localhost"},
        {"service_host": "broker.example"},
        {"service_port": 18830},
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
    listeners = options(render_broker_config(settings(host="::1", service_host="::1")))
    assert listeners["listener"] == ["18830 ::1", "18840 ::1"]


def listener_blocks(text: str) -> list[dict[str, list[str]]]:
    """The options of each ``listener`` block, in order."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("listener "):
            blocks.append([])
        if blocks and line.strip() and not line.startswith("#"):
            blocks[-1].append(line)
    return [options("\n".join(block)) for block in blocks]


def test_there_is_no_plain_listener_and_no_anonymous_access() -> None:
    text = render_broker_config(settings(host="0.0.0.0"))
    assert options(text)["allow_anonymous"] == ["false"]
    blocks = listener_blocks(text)
    assert len(blocks) == 2
    for block in blocks:
        assert block["require_certificate"] == ["true"]
        assert block["use_identity_as_username"] == ["true"]
        assert block["certfile"] == [str(PKI / "broker.pem")]
        assert block["tls_version"] == ["tlsv1.2"]


def test_terminals_and_services_are_admitted_by_different_cas() -> None:
    terminal, service = listener_blocks(render_broker_config(settings()))
    assert terminal["cafile"] == [str(PKI / "ca.pem")]
    assert terminal["crlfile"] == [str(PKI / "crl.pem")]
    # A terminal cannot take over another's session by choosing its client id.
    assert terminal["use_username_as_clientid"] == ["true"]
    # The service listener never admits a terminal certificate.
    assert service["cafile"] == [str(PKI / "service-ca.pem")]
    assert "use_username_as_clientid" not in service


def test_the_acl_gives_each_terminal_its_own_topics_only() -> None:
    lines = render_acl([]).splitlines()
    patterns = [line for line in lines if line.startswith("pattern ")]
    assert sorted(patterns) == sorted(
        [f"pattern write kiosk/v1/%u/{c}" for c in TERMINAL_WRITES]
        + ["pattern read kiosk/v1/%u/desired", "pattern read kiosk/v1/%u/cmd/#"]
    )
    assert set(TERMINAL_WRITES) == {
        "state",
        "telemetry",
        "peripherals",
        "events",
        "reported",
        "cmd-result",
    }
    # Nothing lets a terminal read another's commands or write outside its own subtree.
    assert not [
        line
        for line in lines
        if "topic" in line
        and "#" in line
        and "%u" not in line
        and not line.startswith("topic readwrite kiosk/v1/#")
        and line != "topic deny #"
    ]
    server = lines.index("user fleet.server")
    assert lines[server + 1] == "topic readwrite kiosk/v1/#"


def test_a_revoked_terminal_is_denied_everything_before_the_patterns() -> None:
    lines = render_acl(["zj-01"]).splitlines()
    user = lines.index("user zj-01")
    assert lines[user + 1] == "topic deny #"
    assert user < min(i for i, line in enumerate(lines) if line.startswith("pattern "))


@pytest.mark.parametrize("name", ["ZJ-01", "a/b", "x\ntopic readwrite #", "+"])
def test_the_acl_refuses_a_name_that_is_not_a_terminal_id(name: str) -> None:
    with pytest.raises(ValueError, match="not valid"):
        render_acl([name])
