"""The kiosk's identity file: safe to store, refused when unsafe, renewed on time, never leaked.

A throwaway fleet CA is made here with ``cryptography`` directly, standing in for the
provisioning side, so the agent's code is tested against certificates it did not make itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent import cli
from edge_agent.config import AgentConfig, TerminalSettings, TlsSettings
from edge_agent.errors import IdentityError
from edge_agent.identity import (
    Identity,
    TerminalKey,
    broker_context,
    certificate_fingerprint,
    check_identity,
    csr_pem,
    describe_tls_failure,
    load_identity,
    new_key,
    store_ca,
    store_identity,
)
from fleet_protocol.ids import SiteId, TerminalId

TERMINAL = TerminalId("zhujing-dqzx-01")
NOW = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class FleetCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, title: str = "Test Fleet CA") -> FleetCa:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(title))
            .issuer_name(_name(title))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> str:
        return _pem(self.cert)

    def issue(
        self,
        csr: str,
        *,
        not_before: dt.datetime = NOW,
        days: int = 90,
        server_names: tuple[str, ...] = (),
    ) -> x509.Certificate:
        request = x509.load_pem_x509_csr(csr.encode())
        builder = (
            x509.CertificateBuilder()
            .subject_name(request.subject)
            .issuer_name(self.cert.subject)
            .public_key(request.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + dt.timedelta(days=days))
        )
        if server_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in server_names]),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return builder.sign(self.key, hashes.SHA256())

    def chain(
        self,
        key: TerminalKey,
        cn: str = TERMINAL,
        *,
        not_before: dt.datetime = NOW,
        days: int = 90,
        server_names: tuple[str, ...] = (),
    ) -> str:
        csr = csr_pem(key, cn)
        leaf = self.issue(csr, not_before=not_before, days=days, server_names=server_names)
        return _pem(leaf) + self.pem


@pytest.fixture(scope="module")
def ca() -> FleetCa:
    return FleetCa.create()


def _store(
    ca: FleetCa, directory: Path, *, not_before: dt.datetime = NOW, days: int = 90
) -> Identity:
    key = new_key()
    return store_identity(
        directory / "tls" / "identity.pem",
        key,
        ca.chain(key, not_before=not_before, days=days),
        ca_pem=ca.pem,
        cn=TERMINAL,
    )


def _config(identity_file: Path, ca_file: Path, terminal: str = TERMINAL) -> AgentConfig:
    return AgentConfig(
        terminal=TerminalSettings(id=TerminalId(terminal), site=SiteId("zhujing-dqzx")),
        tls=TlsSettings(ca_file=str(ca_file), identity_file=str(identity_file)),
    )


# -- storing and loading ----------------------------------------------------------------------


def test_identity_is_written_owner_only_in_an_owner_only_directory(
    ca: FleetCa, tmp_path: Path
) -> None:
    identity = _store(ca, tmp_path)
    assert stat.S_IMODE(identity.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(identity.path.parent.stat().st_mode) == 0o700
    text = identity.path.read_text()
    # One file: the key first, then leaf and CA, so one rename swaps key and certificate.
    assert text.index("PRIVATE KEY") < text.index("CERTIFICATE")
    assert text.count("BEGIN CERTIFICATE") == 2
    assert load_identity(identity.path) == identity


def test_renewal_replaces_the_identity_and_leaves_no_temporary_file(
    ca: FleetCa, tmp_path: Path
) -> None:
    first = _store(ca, tmp_path)
    second = _store(ca, tmp_path)
    assert second.serial != first.serial
    assert load_identity(first.path).serial == second.serial
    assert stat.S_IMODE(second.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in second.path.parent.iterdir()) == ["identity.pem"]


def test_the_fleet_ca_is_stored_beside_the_identity(ca: FleetCa, tmp_path: Path) -> None:
    path = tmp_path / "tls" / "ca.pem"
    store_ca(path, ca.pem)
    assert certificate_fingerprint(path.read_bytes()) == certificate_fingerprint(ca.pem)


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o640, "group can read"), (0o604, "others can read")],
    ids=["0640", "0604"],
)
def test_an_identity_file_others_can_read_is_refused_with_the_fix(
    ca: FleetCa, tmp_path: Path, mode: int, who: str
) -> None:
    identity = _store(ca, tmp_path)
    identity.path.chmod(mode)
    with pytest.raises(IdentityError) as info:
        load_identity(identity.path)
    message = str(info.value)
    assert str(identity.path) in message
    assert f"mode {mode:04o}" in message
    assert who in message
    assert f"chmod 600 {identity.path}" in message


def test_an_identity_file_group_can_write_is_refused(ca: FleetCa, tmp_path: Path) -> None:
    identity = _store(ca, tmp_path)
    identity.path.chmod(0o620)
    with pytest.raises(IdentityError, match="group can write"):
        load_identity(identity.path)


def test_the_broker_connection_is_refused_an_identity_others_can_read(
    ca: FleetCa, tmp_path: Path
) -> None:
    # The check also runs per connection: a file loosened while the agent runs is not used.
    identity = _store(ca, tmp_path)
    ca_file = tmp_path / "tls" / "ca.pem"
    store_ca(ca_file, ca.pem)
    identity.path.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        broker_context(_config(identity.path, ca_file).tls, "broker.example")


def test_a_key_that_does_not_belong_to_the_certificate_is_refused(
    ca: FleetCa, tmp_path: Path
) -> None:
    path = tmp_path / "identity.pem"
    other = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(_key_pem(other) + ca.chain(new_key()).encode())
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="does not belong to the certificate") as info:
        load_identity(path)
    assert "PRIVATE KEY" not in str(info.value)


def test_a_missing_identity_file_says_to_enrol(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="kiosk-agent enroll"):
        load_identity(tmp_path / "identity.pem")


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("other-key", "not for the key this kiosk sent"),
        ("other-cn", "not for this terminal"),
        ("other-ca", "not issued by the fleet CA"),
    ],
)
def test_an_issued_chain_that_would_not_work_never_replaces_the_identity(
    ca: FleetCa, tmp_path: Path, problem: str, expected: str
) -> None:
    current = _store(ca, tmp_path)
    before = current.path.read_bytes()
    key = new_key()
    if problem == "other-key":
        chain = ca.chain(new_key())
    elif problem == "other-cn":
        chain = ca.chain(key, cn="someone-else-01")
    else:
        chain = FleetCa.create("Another CA").chain(key)
    with pytest.raises(IdentityError, match=expected):
        store_identity(current.path, key, chain, ca_pem=ca.pem, cn=TERMINAL)
    assert current.path.read_bytes() == before


# -- what the certificate says ----------------------------------------------------------------


def test_renewal_is_due_after_two_thirds_of_the_lifetime(ca: FleetCa, tmp_path: Path) -> None:
    identity = _store(ca, tmp_path, not_before=NOW, days=90)
    assert identity.not_before == NOW
    assert identity.not_after == NOW + dt.timedelta(days=90)
    assert identity.renew_at == NOW + dt.timedelta(days=60)
    assert not identity.renew_due(NOW + dt.timedelta(days=60) - dt.timedelta(seconds=1))
    assert identity.renew_due(NOW + dt.timedelta(days=60))
    assert not identity.expired(NOW + dt.timedelta(days=89))
    assert identity.expired(NOW + dt.timedelta(days=90))


def test_the_signing_request_names_the_terminal_and_proves_the_key() -> None:
    key = new_key()
    request = x509.load_pem_x509_csr(csr_pem(key, TERMINAL).encode())
    assert request.is_signature_valid
    assert request.subject == _name(TERMINAL)
    public = request.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    assert request.signature_hash_algorithm is not None
    assert request.signature_hash_algorithm.name == "sha256"


def test_each_new_key_is_different() -> None:
    first, second = new_key(), new_key()
    assert first.public_der() != second.public_der()


def test_the_ca_fingerprint_is_the_sha256_of_its_der(ca: FleetCa) -> None:
    digest = hashlib.sha256(ca.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    fingerprint = certificate_fingerprint(ca.pem)
    assert fingerprint.replace(":", "") == digest.upper()
    assert len(fingerprint.split(":")) == 32


# -- nothing of the key in text ---------------------------------------------------------------


def test_no_private_key_text_in_reprs_or_error_messages(ca: FleetCa, tmp_path: Path) -> None:
    key = new_key()
    identity = store_identity(
        tmp_path / "identity.pem", key, ca.chain(key), ca_pem=ca.pem, cn=TERMINAL
    )
    key_body = identity.path.read_text().split("-----")[2].strip().splitlines()[0]
    identity.path.chmod(0o640)
    with pytest.raises(IdentityError) as refused:
        load_identity(identity.path)
    texts = [repr(key), str(key), repr(identity), str(identity), str(refused.value)]
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert key_body not in text


# -- the agent's start-up check ---------------------------------------------------------------


def test_an_identity_for_another_terminal_stops_the_agent(ca: FleetCa, tmp_path: Path) -> None:
    identity = _store(ca, tmp_path)
    ca_file = tmp_path / "tls" / "ca.pem"
    store_ca(ca_file, ca.pem)
    with pytest.raises(IdentityError, match=r"certificate is for terminal 'zhujing-dqzx-01'"):
        check_identity(_config(identity.path, ca_file, terminal="fengjing-01"))
    assert check_identity(_config(identity.path, ca_file)).cn == TERMINAL


def test_an_identity_from_another_fleet_ca_stops_the_agent(ca: FleetCa, tmp_path: Path) -> None:
    identity = _store(ca, tmp_path)
    ca_file = tmp_path / "tls" / "ca.pem"
    store_ca(ca_file, FleetCa.create("Another CA").pem)
    with pytest.raises(IdentityError, match="not issued by the fleet CA"):
        check_identity(_config(identity.path, ca_file))


def _write_agent_config(tmp_path: Path, identity: Path, ca_file: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[terminal]\nid = "{TERMINAL}"\nsite = "zhujing-dqzx"\n'
        f'[tls]\nca_file = "{ca_file}"\nidentity_file = "{identity}"\n'
        f'[storage]\nstate_dir = "{tmp_path / "state"}"\n'
    )
    return path


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_readable_key_stops_the_agent_at_start_with_the_fix(
    ca: FleetCa, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    identity = _store(ca, tmp_path)
    ca_file = tmp_path / "tls" / "ca.pem"
    store_ca(ca_file, ca.pem)
    identity.path.chmod(0o640)
    config = _write_agent_config(tmp_path, identity.path, ca_file)
    assert cli.main([command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiosk-agent: error: ")
    assert f"chmod 600 {identity.path}" in err
    assert "Traceback" not in err


def test_check_config_shows_the_certificate(
    ca: FleetCa, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = _store(ca, tmp_path)
    ca_file = tmp_path / "tls" / "ca.pem"
    store_ca(ca_file, ca.pem)
    config = _write_agent_config(tmp_path, identity.path, ca_file)
    assert cli.main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"serial {identity.serial_hex}" in out
    assert "renewal  from" in out


# -- TLS to the broker, over a socket pair (no network) ---------------------------------------


@dataclass
class Broker:
    """The server side of one TLS handshake, in a thread."""

    context: ssl.SSLContext
    sock: socket.socket
    error: BaseException | None = None

    def serve(self) -> None:
        try:
            with self.context.wrap_socket(self.sock, server_side=True) as tls:
                tls.sendall(b"ok")
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            self.error = exc


def _broker_context(ca: FleetCa, tmp_path: Path, crl: bytes = b"") -> ssl.SSLContext:
    key = new_key()
    chain = ca.chain(key, cn="broker", not_before=_real_now(), server_names=("broker.fleet.test",))
    path = tmp_path / "broker.pem"
    path.write_bytes(key.with_chain(chain.encode()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(path)
    context.load_verify_locations(cadata=ca.pem)
    context.verify_mode = ssl.CERT_REQUIRED
    if crl:
        crl_file = tmp_path / "crl.pem"  # cadata takes certificates only
        crl_file.write_bytes(crl)
        context.load_verify_locations(cafile=crl_file)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def _handshake(
    broker_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, dialled: str
) -> tuple[bytes, BaseException | None]:
    ours, theirs = socket.socketpair()
    broker = Broker(broker_ctx, theirs)
    thread = threading.Thread(target=broker.serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(ours, server_hostname=dialled) as tls:
            greeting = tls.recv(2)
            tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
    return greeting, broker.error


def _real_now() -> dt.datetime:
    # The TLS library checks validity against the real clock, not the tests' NOW.
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


def _terminal_setup(ca: FleetCa, tmp_path: Path) -> tuple[TlsSettings, Identity]:
    identity = _store(ca, tmp_path, not_before=_real_now())
    ca_file = tmp_path / "tls" / "ca.pem"
    store_ca(ca_file, ca.pem)
    return _config(identity.path, ca_file).tls, identity


def test_the_broker_is_checked_against_server_name_not_the_address_dialled(
    ca: FleetCa, tmp_path: Path
) -> None:
    tls, _ = _terminal_setup(ca, tmp_path)
    broker_ctx = _broker_context(ca, tmp_path)
    greeting, error = _handshake(broker_ctx, broker_context(tls, "broker.fleet.test"), "10.0.0.5")
    assert (greeting, error) == (b"ok", None)
    wrong = broker_context(tls, "other.fleet.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(broker_ctx, wrong, "broker.fleet.test")
    assert wrong.failure is not None
    assert "other.fleet.test" in describe_tls_failure(wrong.failure)


def test_a_revoked_certificate_is_reported_as_refused_by_the_broker(
    ca: FleetCa, tmp_path: Path
) -> None:
    tls, identity = _terminal_setup(ca, tmp_path)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        .next_update(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(identity.serial)
            .revocation_date(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
            .build()
        )
        .sign(ca.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    client = broker_context(tls, "broker.fleet.test")
    with pytest.raises(ssl.SSLError):
        _handshake(_broker_context(ca, tmp_path, crl), client, "broker.fleet.test")
    assert client.failure is not None
    message = describe_tls_failure(client.failure)
    assert message.startswith("broker refused our certificate: ")
    assert "revoked" in message
