"""The fleet authority with real files, real SQLite and real X.509: what ops and kiosks rely on."""

from __future__ import annotations

import datetime as dt
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning import pki
from provisioning.authority import (
    FleetAuthority,
    PkiSettings,
    init_pki,
    new_token_secret,
)
from provisioning.errors import EnrolmentRefused, PkiExists

NAMES = ("localhost", "127.0.0.1")
T0 = dt.datetime(2026, 11, 21, 8, 0, tzinfo=dt.UTC)


@pytest.fixture
def authority(tmp_path: Path) -> FleetAuthority:
    init_pki(
        tmp_path / "pki",
        broker_names=NAMES,
        server_names=NAMES,
        settings=PkiSettings(renewal_grace_s=3600),
        now=T0,
    )
    return FleetAuthority.open(tmp_path / "pki")


def csr_for(cn: str) -> tuple[pki.PrivateKey, bytes]:
    key = pki.new_key()
    return key, pki.new_csr(cn, key)


def leaf(chain_pem: bytes) -> x509.Certificate:
    return pki.certs_from_pem(chain_pem, what="chain")[0]


def reasons(authority: FleetAuthority, terminal: str) -> list[tuple[str, str, str]]:
    return [(e.action, e.outcome, e.reason) for e in authority.audit(terminal=terminal)]


def test_ca_init_keeps_keys_private_and_refuses_to_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    first = init_pki(root, broker_names=NAMES, server_names=NAMES, settings=PkiSettings())
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    keys = sorted(p.name for p in root.glob("*.key"))
    assert keys == [
        "broker.key",
        "ca.key",
        "fleet-server.key",
        "ops.key",
        "server.key",
        "service-ca.key",
    ]
    for key in root.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    with pytest.raises(PkiExists, match="--force"):
        init_pki(root, broker_names=NAMES, server_names=NAMES, settings=PkiSettings())
    assert FleetAuthority.open(root).ca_fingerprint == first.ca_fingerprint
    second = init_pki(
        root, broker_names=NAMES, server_names=NAMES, settings=PkiSettings(), force=True
    )
    assert second.ca_fingerprint != first.ca_fingerprint


def test_server_certificates_carry_the_given_names(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    init_pki(
        root,
        broker_names=["mqtt.jinshan.example", "10.8.0.1"],
        server_names=["fleet.example"],
        settings=PkiSettings(),
    )
    broker = pki.cert_from_pem((root / "broker.pem").read_bytes(), what="broker")
    sans = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["mqtt.jinshan.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.8.0.1"]
    server = pki.cert_from_pem((root / "server.pem").read_bytes(), what="server")
    server_sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert server_sans.get_values_for_type(x509.DNSName) == ["fleet.example"]


def test_a_token_gives_one_certificate_for_its_terminal(authority: FleetAuthority) -> None:
    token = authority.create_token("zj-01", "zj-dqzx", actor="ops", now=T0)
    # Only the hash is stored.
    assert token.secret.encode() not in authority.layout.db.read_bytes()
    key, csr = csr_for("zj-01")
    issued = authority.enroll(token.secret, csr, actor="kiosk", now=T0)
    cert = leaf(issued.chain_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "zj-01"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_after_utc - T0 == dt.timedelta(days=90)
    cert.verify_directly_issued_by(pki.cert_from_pem(issued.ca_pem, what="ca"))
    assert issued.site == "zj-dqzx"

    with pytest.raises(EnrolmentRefused) as replay:
        authority.enroll(token.secret, csr_for("zj-01")[1], actor="kiosk", now=T0)
    assert replay.value.reason == "token-used"
    assert len(authority.certificates("zj-01")) == 1
    assert reasons(authority, "zj-01")[-2:] == [
        ("enroll", "issued", ""),
        ("enroll", "refused", "token-used"),
    ]


def test_an_expired_token_is_refused(authority: FleetAuthority) -> None:
    token = authority.create_token(
        "zj-02", "zj-dqzx", ttl=dt.timedelta(hours=1), actor="ops", now=T0
    )
    with pytest.raises(EnrolmentRefused) as caught:
        authority.enroll(
            token.secret, csr_for("zj-02")[1], actor="k", now=T0 + dt.timedelta(hours=2)
        )
    assert caught.value.reason == "token-expired"
    assert authority.certificates("zj-02") == []


def test_a_csr_for_another_terminal_is_refused_and_spends_the_token(
    authority: FleetAuthority,
) -> None:
    token = authority.create_token("zj-03", "zj-dqzx", actor="ops", now=T0)
    with pytest.raises(EnrolmentRefused) as caught:
        authority.enroll(token.secret, csr_for("zj-04")[1], actor="k", now=T0)
    assert caught.value.reason == "identity-mismatch"
    with pytest.raises(EnrolmentRefused) as again:
        authority.enroll(token.secret, csr_for("zj-03")[1], actor="k", now=T0)
    assert again.value.reason == "token-used"
    assert authority.certificates() == []
    assert ("enroll", "refused", "identity-mismatch") in reasons(authority, "zj-03")


def test_a_garbled_csr_does_not_spend_the_token(authority: FleetAuthority) -> None:
    token = authority.create_token("zj-05", "zj-dqzx", actor="ops", now=T0)
    with pytest.raises(EnrolmentRefused) as caught:
        authority.enroll(
            token.secret, b"-----BEGIN CERTIFICATE REQUEST-----\nxx", actor="k", now=T0
        )
    assert caught.value.reason == "bad-csr"
    authority.enroll(token.secret, csr_for("zj-05")[1], actor="k", now=T0)
    assert len(authority.certificates("zj-05")) == 1


def test_an_unknown_token_is_refused_and_audited(authority: FleetAuthority) -> None:
    with pytest.raises(EnrolmentRefused) as caught:
        authority.enroll("not-a-token", csr_for("zj-06")[1], actor="k", now=T0)
    assert caught.value.reason == "token-unknown"
    assert authority.audit()[-1].reason == "token-unknown"


def test_concurrent_requests_with_one_token_get_exactly_one_certificate(
    authority: FleetAuthority,
) -> None:
    token = authority.create_token("zj-07", "zj-dqzx", actor="ops", now=T0)
    csrs = [csr_for("zj-07")[1] for _ in range(8)]
    outcomes: list[str] = []
    start = threading.Barrier(len(csrs))

    def attempt(csr: bytes) -> None:
        start.wait()
        try:
            authority.enroll(token.secret, csr, actor="k", now=T0)
        except EnrolmentRefused as exc:
            outcomes.append(exc.reason)
        else:
            outcomes.append("issued")

    threads = [threading.Thread(target=attempt, args=(c,)) for c in csrs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["issued"] + ["token-used"] * 7
    assert len(authority.certificates("zj-07")) == 1
    audited = [r for r in reasons(authority, "zj-07") if r[0] == "enroll"]
    assert len(audited) == 8


@pytest.mark.parametrize(
    "name",
    ["zj/01", "zj+01", "zj#01", "zj\x0001", "zj 01", "zj\t01", "ZJ-01", "z" * 64, "zj", "-zj"],
)
def test_a_name_that_is_not_a_terminal_id_gets_no_token_and_is_audited(
    authority: FleetAuthority, name: str
) -> None:
    with pytest.raises(EnrolmentRefused) as caught:
        authority.create_token(name, "zj-dqzx", actor="ops", now=T0)
    assert caught.value.reason == "bad-terminal-id"
    last = authority.audit()[-1]
    assert (last.action, last.outcome, last.reason) == (
        "token-create",
        "refused",
        "bad-terminal-id",
    )
    assert "\x00" not in last.terminal


def test_renewal_needs_the_current_certificate_and_a_new_key(authority: FleetAuthority) -> None:
    token = authority.create_token("zj-08", "zj-dqzx", actor="ops", now=T0)
    old_key, csr = csr_for("zj-08")
    first = authority.enroll(token.secret, csr, actor="k", now=T0)
    later = T0 + dt.timedelta(days=60)
    with pytest.raises(EnrolmentRefused) as same:
        authority.renew(first.serial, pki.new_csr("zj-08", old_key), actor="k", now=later)
    assert same.value.reason == "same-key"
    with pytest.raises(EnrolmentRefused) as other:
        authority.renew(first.serial, csr_for("zj-09")[1], actor="k", now=later)
    assert other.value.reason == "identity-mismatch"

    second = authority.renew(first.serial, csr_for("zj-08")[1], actor="k", now=later)
    assert second.serial != first.serial
    assert leaf(second.chain_pem).not_valid_after_utc - later == dt.timedelta(days=90)
    # A copy of the old certificate cannot renew again (someone else already did).
    with pytest.raises(EnrolmentRefused) as stale:
        authority.renew(first.serial, csr_for("zj-08")[1], actor="k", now=later)
    assert stale.value.reason == "certificate-superseded"

    # The old certificate is revoked once the grace period (1 h here) is over, not before.
    assert authority.apply_due_revocations(now=later + dt.timedelta(minutes=59)) == []
    assert first.serial not in crl_serials(authority)
    assert authority.apply_due_revocations(now=later + dt.timedelta(hours=1)) == [first.serial]
    assert first.serial in crl_serials(authority)
    assert second.serial not in crl_serials(authority)
    # Still a terminal with a valid certificate: the ACL does not deny it.
    assert "user zj-08" not in authority.layout.acl.read_text()


def crl_serials(authority: FleetAuthority) -> set[int]:
    crl = x509.load_pem_x509_crl(authority.layout.crl.read_bytes())
    crl_ca = pki.cert_from_pem(authority.ca_pem, what="ca")
    assert crl.is_signature_valid(crl_ca.public_key())  # type: ignore[arg-type]
    return {r.serial_number for r in crl}


def test_revocation_lists_every_certificate_and_denies_the_terminal(
    authority: FleetAuthority,
) -> None:
    token = authority.create_token("zj-10", "zj-dqzx", actor="ops", now=T0)
    first = authority.enroll(token.secret, csr_for("zj-10")[1], actor="k", now=T0)
    unused = authority.create_token("zj-10", "zj-dqzx", actor="ops", now=T0)
    serials = authority.revoke("zj-10", actor="ops", now=T0)
    assert serials == [first.serial]
    assert first.serial in crl_serials(authority)
    acl = authority.layout.acl.read_text().splitlines()
    assert acl[acl.index("user zj-10") + 1] == "topic deny #"
    # Unspent tokens of a revoked terminal stop working.
    with pytest.raises(EnrolmentRefused) as caught:
        authority.enroll(unused.secret, csr_for("zj-10")[1], actor="k", now=T0)
    assert caught.value.reason == "token-used"
    with pytest.raises(EnrolmentRefused) as renewal:
        authority.renew(first.serial, csr_for("zj-10")[1], actor="k", now=T0)
    assert renewal.value.reason == "certificate-revoked"

    # Enrolling again with a new token lifts the ACL denial; the old certificate stays revoked.
    again = authority.create_token("zj-10", "zj-dqzx", actor="ops", now=T0)
    authority.enroll(again.secret, csr_for("zj-10")[1], actor="k", now=T0)
    assert "user zj-10" not in authority.layout.acl.read_text()
    assert first.serial in crl_serials(authority)


def test_a_newer_token_withdraws_the_older_unspent_one(authority: FleetAuthority) -> None:
    old = authority.create_token("zj-11", "zj-dqzx", actor="ops", now=T0)
    new = authority.create_token("zj-11", "zj-dqzx", actor="ops", now=T0)
    with pytest.raises(EnrolmentRefused):
        authority.enroll(old.secret, csr_for("zj-11")[1], actor="k", now=T0)
    authority.enroll(new.secret, csr_for("zj-11")[1], actor="k", now=T0)


def test_the_token_secret_stays_out_of_its_repr(authority: FleetAuthority) -> None:
    token = authority.create_token("zj-12", "zj-dqzx", actor="ops", now=T0)
    assert token.secret not in repr(token)


def test_a_token_never_starts_with_a_dash_so_the_printed_enrol_command_parses() -> None:
    # One urlsafe draw in 64 starts with "-"; `kiosk-agent enroll --token -x...` would then
    # stop with "expected one argument" in front of the person enrolling the kiosk.
    draws = iter(["-starts-with-a-dash", "-again", "Kq3-usable_token"])
    assert new_token_secret(lambda _n: next(draws)) == "Kq3-usable_token"
    assert not any(new_token_secret().startswith("-") for _ in range(2000))
