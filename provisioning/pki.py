"""X.509 for the fleet: keys, the two CAs, server and client certificates, CSRs and CRLs.

The only module of the project that signs anything, and the only one of ``provisioning`` that
imports ``cryptography``. Everything is ECDSA P-256 with SHA-256: OpenSSL (Mosquitto), Python's
``ssl`` and every kiosk OS accept it, and keys and signatures are small. (Ed25519 would do for
the signatures, but Mosquitto 2.0 with OpenSSL 1.1 on older kiosk images does not negotiate it
for client certificates everywhere; P-256 works on all of them.)

Two certificate authorities, both self-signed, so a listener can trust exactly one of them:

``fleet CA``
    Signs the broker's and the fleet server's TLS server certificates and every terminal's
    client certificate. Terminals trust it (they pin its fingerprint at enrolment). The broker's
    terminal listener accepts client certificates from it only, checked against the CRL.
``service CA``
    Signs the client certificates of the fleet's own services (the fleet server, ``fleetctl``).
    The broker's service listener accepts client certificates from it only, so a terminal's
    certificate can never open a session there, where client ids are not forced.

Functions here are synchronous and pure apart from the randomness of key generation; callers
that run an event loop use a thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet_protocol.enrolment import format_fingerprint
from provisioning.errors import PkiError

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey

#: Backdating of notBefore, so a kiosk whose clock is a few minutes behind accepts a fresh
#: certificate.
CLOCK_SKEW: Final = dt.timedelta(minutes=5)


def new_key() -> PrivateKey:
    """A new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (protected by file permissions, see DESIGN)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes, *, what: str) -> PrivateKey:
    """Load an ECDSA private key; ``what`` names it in the error."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{what} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{what} is not an ECDSA key")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(data: bytes, *, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{what} is not a PEM certificate") from exc


def certs_from_pem(data: bytes, *, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError(f"{what} is not a PEM certificate chain") from exc
    return certs


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as ``fleetctl`` prints it and kiosks pin it."""
    return format_fingerprint(cert.fingerprint(hashes.SHA256()))


def key_id(public_key: PublicKey) -> str:
    """SHA-256 of the DER public key: tells whether two requests carry the same key."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def common_name(name: x509.Name) -> str | None:
    """The single CN of ``name``, or None when there is none or more than one."""
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Authority:
    """A CA certificate with its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @classmethod
    def create(cls, title: str, *, now: dt.datetime, days: int) -> Authority:
        """A new self-signed CA that may sign end-entity certificates only (path length 0)."""
        key = new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kiosk-fleet"),
                x509.NameAttribute(NameOID.COMMON_NAME, title),
            ]
        )
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key)

    def check_pair(self, *, what: str) -> None:
        """Refuse a CA whose key does not belong to its certificate (files mixed up)."""
        if self.cert.public_key() != self.key.public_key():
            raise PkiError(f"{what}: the private key does not belong to the certificate")

    def issue(
        self,
        *,
        cn: str,
        public_key: ec.EllipticCurvePublicKey,
        now: dt.datetime,
        days: float,
        server_names: Sequence[str] = (),
        client: bool = False,
        serial: int | None = None,
    ) -> x509.Certificate:
        """An end-entity certificate for ``cn``.

        ``server_names`` (DNS names or IP addresses) make it a TLS server certificate with
        those SANs; ``client`` adds the clientAuth EKU. The caller checks ``cn``.
        """
        if not server_names and not client:
            raise PkiError("a certificate must be for a server, a client or both")
        usages = []
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_general_names(server_names)), critical=False
            )
        return builder.sign(self.key, hashes.SHA256())

    def crl(
        self,
        revoked: Iterable[tuple[int, dt.datetime]],
        *,
        now: dt.datetime,
        next_update: dt.timedelta,
        number: int,
    ) -> x509.CertificateRevocationList:
        """A CRL listing ``(serial, revoked_at)`` pairs, valid until ``now + next_update``."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + next_update)
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for serial, revoked_at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256())


def crl_to_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def new_csr(cn: str, key: PrivateKey) -> bytes:
    """A PEM certificate signing request for ``cn`` (used by tests; the agent has its own)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class SigningRequest:
    """A CSR whose signature was checked; ``cn`` is its subject's CN as sent (not yet valid)."""

    cn: str | None
    public_key: ec.EllipticCurvePublicKey


def read_csr(pem: bytes) -> SigningRequest:
    """Parse and verify a PEM CSR: it must be signed by the P-256 key it carries."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise PkiError("the request is not a PEM certificate signing request") from exc
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise PkiError("the request's key is not an ECDSA P-256 key")
    try:
        valid = csr.is_signature_valid
    except InvalidSignature:  # pragma: no cover - cryptography reports False instead
        valid = False
    if not valid:
        raise PkiError("the request's signature does not verify")
    extra = [attr for attr in csr.subject if attr.oid != NameOID.COMMON_NAME]
    if extra:
        raise PkiError("the request's subject must hold the CN only")
    return SigningRequest(cn=common_name(csr.subject), public_key=public)


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def is_valid_dns_name(name: str) -> bool:
    """A host name fit for a SAN: labels of letters, digits and '-', dots between."""
    if not name or len(name) > 253:
        return False
    labels = name.rstrip(".").split(".")
    return all(
        re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels
    )


def crl_next_update(pem: bytes) -> dt.datetime | None:
    """When the PEM CRL ``pem`` lapses; None when it cannot be read or has no next update."""
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError:
        return None
    return crl.next_update_utc
