"""The agent's TLS and enrolment settings, the CA pin, and what `kiosk-agent enroll` refuses.

Nothing here reaches a network: every refusal tested happens before the token could be sent.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent import cli
from edge_agent.config import parse_config, render_config
from edge_agent.enrolment_client import accept_ca, normalise_fingerprint
from edge_agent.errors import AgentConfigError, EnrolmentError

TERMINAL = b'[terminal]\nid = "zhujing-dqzx-01"\nsite = "zhujing-dqzx"\n'
TLS = (
    b'[tls]\nca_file = "/var/lib/kiosk-agent/tls/ca.pem"\n'
    b'identity_file = "/var/lib/kiosk-agent/tls/identity.pem"\n'
)
FINGERPRINT = "3A:" * 31 + "3A"
#: Nothing listens here: a test that got as far as the network would fail, not hang.
NOWHERE = "https://127.0.0.1:9"


# -- [tls] and [enrolment] --------------------------------------------------------------------


def test_a_config_without_tls_is_refused_naming_the_section() -> None:
    with pytest.raises(AgentConfigError) as info:
        parse_config(TERMINAL, "/etc/kiosk-agent/agent.toml")
    assert str(info.value) == ("/etc/kiosk-agent/agent.toml: Object missing required field `tls`")


@pytest.mark.parametrize("missing", ["ca_file", "identity_file"])
def test_a_tls_section_without_a_file_names_the_field(missing: str) -> None:
    lines = [line for line in TLS.split(b"\n") if not line.startswith(missing.encode())]
    with pytest.raises(AgentConfigError) as info:
        parse_config(TERMINAL + b"\n".join(lines), "agent.toml")
    assert str(info.value) == f"agent.toml: tls: Object missing required field `{missing}`"


def test_tls_is_the_default_broker_port_and_the_broker_host_the_name_checked() -> None:
    config = parse_config(TERMINAL + TLS + b'[broker]\nhost = "mqtt.fleet.test"\n', "a.toml")
    assert config.broker.port == 8883
    assert config.broker_server_name == "mqtt.fleet.test"
    assert config.tls.identity_path == Path("/var/lib/kiosk-agent/tls/identity.pem")


def test_server_name_overrides_the_broker_host_for_the_certificate_check() -> None:
    text = TERMINAL + TLS + b'server_name = "broker.fleet.test"\n[broker]\nhost = "10.8.0.1"\n'
    assert parse_config(text, "a.toml").broker_server_name == "broker.fleet.test"


def test_without_an_enrolment_section_the_certificate_is_never_renewed() -> None:
    config = parse_config(TERMINAL + TLS, "a.toml")
    assert config.enrolment.renew_url == ""
    assert config.enrolment.retry_s == 600
    assert config.enrolment.reconnect_after_renew is True


@pytest.mark.parametrize(
    "url", ["http://fleet.test/enroll/v1/renew", "fleet.test/enroll/v1/renew", "https:///x"]
)
def test_a_renewal_url_that_is_not_https_is_refused(url: str) -> None:
    text = TERMINAL + TLS + f'[enrolment]\nrenew_url = "{url}"\n'.encode()
    with pytest.raises(AgentConfigError, match=r"a.toml: enrolment: renew_url must be an https"):
        parse_config(text, "a.toml")


def test_a_rendered_config_reads_back_to_the_same_settings() -> None:
    text = (
        TERMINAL
        + TLS
        + b'server_name = "broker.fleet.test"\n'
        + b'[broker]\nhost = "10.8.0.1"\nport = 18883\n'
        + b'[enrolment]\nrenew_url = "https://fleet.test:8701/enroll/v1/renew"\nretry_s = 30\n'
        + b'reconnect_after_renew = false\n[storage]\nstate_dir = "/srv/\xe7\xbb\x88\xe7\xab\xaf"\n'
    )
    config = parse_config(text, "a.toml")
    assert parse_config(render_config(config).encode(), "b.toml") == config


# -- pinning the fleet CA ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "written",
    [
        FINGERPRINT,
        FINGERPRINT.lower(),
        FINGERPRINT.replace(":", ""),
        "SHA256:" + FINGERPRINT.replace(":", "").lower(),
        "sha256:" + FINGERPRINT,
        f"  {FINGERPRINT}\n",
    ],
)
def test_a_fingerprint_is_accepted_however_it_was_copied(written: str) -> None:
    assert normalise_fingerprint(written) == FINGERPRINT


@pytest.mark.parametrize(
    "written", ["", "3A:3A", FINGERPRINT + ":3A", "Z" * 64, "SHA1:" + "3A" * 32]
)
def test_something_that_is_not_a_sha256_fingerprint_is_refused(written: str) -> None:
    with pytest.raises(EnrolmentError, match="is not a SHA-256 fingerprint"):
        normalise_fingerprint(written)


def _self_signed_pem(title: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, title)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _fingerprint(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256())
    return der.hex()


def test_the_pinned_fleet_ca_is_accepted() -> None:
    pem = _self_signed_pem("Fleet CA")
    assert accept_ca("https://fleet.test", pem, _fingerprint(pem)) == pem.decode()


def test_another_ca_means_another_server_and_nothing_is_sent() -> None:
    pem = _self_signed_pem("Impostor CA")
    pinned = _self_signed_pem("Fleet CA")
    with pytest.raises(EnrolmentError) as info:
        accept_ca("https://fleet.test", pem, _fingerprint(pinned))
    message = str(info.value)
    assert "https://fleet.test is not the expected fleet server" in message
    assert "Nothing was sent" in message
    assert normalise_fingerprint(_fingerprint(pem)) in message
    assert info.value.reason is None


def test_an_answer_that_is_not_a_certificate_is_refused() -> None:
    with pytest.raises(EnrolmentError, match="did not answer with a PEM certificate"):
        accept_ca("https://fleet.test", b"<html>captive portal</html>", FINGERPRINT)


# -- kiosk-agent enroll: refusals before the token is spent ------------------------------------


def _enroll(tmp_path: Path, *extra: str) -> int:
    return cli.main(
        [
            "enroll",
            "--server",
            NOWHERE,
            "--token",
            "t0ken",
            "--ca-fingerprint",
            FINGERPRINT,
            "--config",
            str(tmp_path / "etc" / "agent.toml"),
            "--state-dir",
            str(tmp_path / "state"),
            *extra,
        ]
    )


def test_enroll_refuses_to_replace_an_identity_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = tmp_path / "state" / "tls" / "identity.pem"
    identity.parent.mkdir(parents=True)
    identity.write_bytes(b"the kiosk's working identity")
    assert _enroll(tmp_path, "--terminal", "zhujing-dqzx-01") == 2
    err = capsys.readouterr().err
    assert err.startswith("kiosk-agent: error: ")
    assert str(identity) in err
    assert "--force" in err
    assert identity.read_bytes() == b"the kiosk's working identity"


def test_enroll_refuses_to_replace_a_config_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "etc" / "agent.toml"
    config.parent.mkdir(parents=True)
    config.write_bytes(TERMINAL + TLS)
    assert _enroll(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{config} exists" in err
    assert config.read_bytes() == TERMINAL + TLS


def test_enroll_needs_the_terminal_id_the_token_was_made_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _enroll(tmp_path) == 2
    assert "--terminal ID is required" in capsys.readouterr().err


def test_enroll_refuses_an_invalid_terminal_id_before_spending_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _enroll(tmp_path, "--terminal", "Kiosk 1") == 2
    assert "--terminal: terminal id 'Kiosk 1' is not valid" in capsys.readouterr().err


def test_enroll_refuses_a_malformed_fingerprint_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["enroll", "--server", NOWHERE, "--token", "t", "--ca-fingerprint", "abc",
         "--terminal", "zhujing-dqzx-01", "--config", str(tmp_path / "a.toml"),
         "--state-dir", str(tmp_path / "state")]
    )  # fmt: skip
    assert code == 2
    assert "'abc' is not a SHA-256 fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
