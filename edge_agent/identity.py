"""The terminal's identity: its private key, its certificate, and the TLS contexts built on them.

The only module of the agent that imports ``cryptography``, and the one that builds ``ssl``
contexts. Everything here is synchronous; the event loop calls it through a thread.

The identity file is one PEM file, the private key first and the certificate chain after it
(leaf, then the fleet CA), mode 0600 in a 0700 directory. Key and certificate live in one file
so that a renewal replaces both with one ``rename``: a power cut can leave the old identity or
the new one, never a new key beside an old certificate.

The key never leaves this module as text except into that file: :class:`TerminalKey` and
:class:`Identity` have reprs without it, and no error message quotes the file's content.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.config import AgentConfig, TlsSettings
from edge_agent.errors import IdentityError
from fleet_protocol.enrolment import format_fingerprint

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

IDENTITY_FILE_MODE: Final = 0o600
PUBLIC_FILE_MODE: Final = 0o644
PRIVATE_DIR_MODE: Final = 0o700
#: Permission bits that let anyone but the owner at the key.
_NOT_OWNER_BITS: Final = 0o077

_PEM_BLOCK: Final = re.compile(
    rb"-----BEGIN (?P<label>[A-Z0-9 ]+)-----\r?\n.*?-----END (?P=label)-----", re.DOTALL
)
_KEY_LABELS: Final = frozenset({b"PRIVATE KEY", b"EC PRIVATE KEY"})
_PUBLIC_DER: Final = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class TerminalKey:
    """A private key generated on this kiosk. It is shown as its curve only, never its value."""

    __slots__ = ("_key",)

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def __repr__(self) -> str:
        return f"TerminalKey({self._key.curve.name})"

    def public_der(self) -> bytes:
        return self._key.public_key().public_bytes(*_PUBLIC_DER)

    def signing_request(self, cn: str) -> str:
        """A PEM certificate signing request for ``cn``, signed with this key."""
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(self._key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def with_chain(self, chain_pem: bytes) -> bytes:
        """The identity file's content: this key (PEM), then ``chain_pem``."""
        # Unencrypted: the agent starts unattended after a power cut, with nobody to type a
        # passphrase. File mode and directory mode protect it instead.
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem + chain_pem


def new_key() -> TerminalKey:
    """A new ECDSA P-256 key (what the fleet CA issues for)."""
    return TerminalKey(ec.generate_private_key(ec.SECP256R1()))


def csr_pem(key: TerminalKey, cn: str) -> str:
    """A PEM certificate signing request for ``cn`` (the terminal id), signed with ``key``."""
    return key.signing_request(cn)


@dataclass(frozen=True)
class Identity:
    """What the identity file says about this terminal (the key itself is not kept)."""

    path: Path
    cn: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    #: SHA-256 of the leaf certificate, as ``fleetctl`` shows it.
    fingerprint: str

    @property
    def renew_at(self) -> dt.datetime:
        """When two thirds of the lifetime have passed: a third is left for retries while the
        server or the network is away."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3

    def renew_due(self, now: dt.datetime) -> bool:
        return now >= self.renew_at

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.not_after

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:X}"


def certificate_fingerprint(pem: str | bytes) -> str:
    """SHA-256 of the first certificate's DER: upper-case hex pairs joined by colons."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    cert = _certificates(data, what="the CA certificate")[0]
    return _fingerprint(cert)


def _fingerprint(cert: x509.Certificate) -> str:
    return format_fingerprint(cert.fingerprint(hashes.SHA256()))


def _certificates(data: bytes, *, what: str) -> list[x509.Certificate]:
    certs = []
    for block in _PEM_BLOCK.finditer(data):
        if block["label"] != b"CERTIFICATE":
            continue
        try:
            certs.append(x509.load_pem_x509_certificate(block[0]))
        except ValueError as exc:
            raise IdentityError(f"{what}: certificate {len(certs) + 1} is not valid") from exc
    if not certs:
        raise IdentityError(f"{what}: no PEM certificate in it")
    return certs


def _common_name(cert: x509.Certificate, *, what: str) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise IdentityError(f"{what}: the certificate's subject has no single CN")
    return names[0].value


def _private_key(data: bytes, *, what: str) -> ec.EllipticCurvePrivateKey:
    blocks = [b for b in _PEM_BLOCK.finditer(data) if b["label"] in _KEY_LABELS]
    if len(blocks) != 1:
        if any(b["label"] == b"ENCRYPTED PRIVATE KEY" for b in _PEM_BLOCK.finditer(data)):
            raise IdentityError(f"{what}: the private key is encrypted; the agent needs it plain")
        raise IdentityError(
            f"{what}: expected one private key, found {len(blocks)}; re-enrol this kiosk"
        )
    try:
        key = serialization.load_pem_private_key(blocks[0][0], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is not repeated: nothing read from a key file goes into text.
        raise IdentityError(f"{what}: the private key cannot be read") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{what}: the private key is not an ECDSA key")
    return key


def _identity(path: Path, data: bytes) -> tuple[Identity, x509.Certificate]:
    what = str(path)
    key = _private_key(data, what=what)
    leaf = _certificates(data, what=what)[0]
    if key.public_key().public_bytes(*_PUBLIC_DER) != leaf.public_key().public_bytes(*_PUBLIC_DER):
        raise IdentityError(
            f"{path}: 私钥与证书不匹配 / the private key does not belong to the certificate in "
            "the same file; the file is damaged: re-enrol this kiosk (kiosk-agent enroll --force)"
        )
    identity = Identity(
        path=path,
        cn=_common_name(leaf, what=what),
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint=_fingerprint(leaf),
    )
    return identity, leaf


def _who_else(mode: int) -> str:
    rights = []
    for who, read, write in (("group", 0o040, 0o020), ("others", 0o004, 0o002)):
        can = [verb for verb, bit in (("read", read), ("write", write)) if mode & bit]
        if can:
            rights.append(f"{who} can {' and '.join(can)} it")
    return "; ".join(rights) or "group or others have access to it"


def _check_private_mode(path: Path) -> None:
    """Refuse a key file that anyone but its owner can get at."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise IdentityError(
            f"{path}: 身份文件不存在 / no identity file: enrol this kiosk first "
            "(kiosk-agent enroll --server URL --token TOKEN --ca-fingerprint FP --terminal ID)"
        ) from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the identity file: {exc.strerror}") from exc
    if mode & _NOT_OWNER_BITS:
        raise IdentityError(
            f"{path}: 私钥文件权限过宽，已拒绝使用 / refusing the identity file: it holds this "
            f"terminal's private key and is mode {mode:04o} ({_who_else(mode)}); whoever reads "
            f"it can act as this terminal. Fix: chmod 600 {path}"
        )


def _load(path: Path) -> tuple[Identity, x509.Certificate]:
    _check_private_mode(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the identity file: {exc.strerror}") from exc
    return _identity(path, data)


def load_identity(path: Path) -> Identity:
    """Read the identity file; refuse it if group or others can access it (blocking I/O)."""
    return _load(path)[0]


def read_ca(path: Path) -> str:
    """The fleet CA certificate (PEM) from ``path``; checked to hold a certificate."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the fleet CA file: {exc.strerror}") from exc
    _certificates(data, what=str(path))
    return data.decode("ascii", "replace")


def _check_issued_by(leaf: x509.Certificate, ca_pem: str, *, what: str) -> None:
    ca = _certificates(ca_pem.encode("ascii", "replace"), what="the fleet CA")[0]
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise IdentityError(
            f"{what}: the certificate was not issued by the fleet CA "
            f"(fingerprint {_fingerprint(ca)})"
        ) from exc


def identity_file_content(key: TerminalKey, chain_pem: str, *, ca_pem: str, cn: str) -> bytes:
    """The identity file for ``key`` and a chain just issued for it, after checking the chain.

    The chain must start with a certificate for ``cn`` and ``key``, issued by the fleet CA
    ``ca_pem``: an identity that the broker would refuse is never written over a working one.
    """
    what = "the issued certificate"
    certs = _certificates(chain_pem.encode("ascii", "replace"), what=what)
    leaf = certs[0]
    if key.public_der() != leaf.public_key().public_bytes(*_PUBLIC_DER):
        raise IdentityError(f"{what} is not for the key this kiosk sent")
    cn_issued = _common_name(leaf, what=what)
    if cn_issued != cn:
        raise IdentityError(f"{what} is for {cn_issued!r}, not for this terminal {cn!r}")
    _check_issued_by(leaf, ca_pem, what=what)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return key.with_chain(chain)


def write_file_atomically(path: Path, data: bytes, *, mode: int, dir_mode: int) -> None:
    """Replace ``path`` with ``data`` so that a power cut leaves the old file or the new one.

    The temporary file is created with ``mode`` (never wider for a moment), fsynced, renamed
    over ``path``, and the directory fsynced. A missing directory is created with ``dir_mode``.
    """
    parent = path.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, mode=dir_mode)
        os.chmod(parent, dir_mode)  # mkdir's mode is narrowed by the umask; say it exactly
    tmp = parent / f".{path.name}.tmp"
    # A temporary file left by a crash may have another mode; O_EXCL below needs it gone.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def store_identity(
    path: Path, key: TerminalKey, chain_pem: str, *, ca_pem: str, cn: str
) -> Identity:
    """Check the issued chain, then atomically write the identity file (0600, directory 0700)."""
    data = identity_file_content(key, chain_pem, ca_pem=ca_pem, cn=cn)
    try:
        write_file_atomically(path, data, mode=IDENTITY_FILE_MODE, dir_mode=PRIVATE_DIR_MODE)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot write the identity file: {exc.strerror}") from exc
    return _identity(path, data)[0]


def store_ca(path: Path, ca_pem: str) -> None:
    """Atomically write the fleet CA certificate (public) next to the identity."""
    _certificates(ca_pem.encode("ascii", "replace"), what="the fleet CA")
    try:
        write_file_atomically(
            path, ca_pem.encode("ascii"), mode=PUBLIC_FILE_MODE, dir_mode=PRIVATE_DIR_MODE
        )
    except OSError as exc:
        raise IdentityError(f"{path}: cannot write the fleet CA file: {exc.strerror}") from exc


# -- TLS contexts ---------------------------------------------------------------------------


class _WatchedSocket(ssl.SSLSocket):
    """A TLS socket that tells its context why it failed.

    The MQTT library turns a TLS alert into "connection lost" or a timeout; the alert (for
    example "certificate revoked") is what the operator needs to read, so it is kept here.
    """

    def _note(self, exc: ssl.SSLError) -> None:
        if not isinstance(exc, ssl.SSLWantReadError | ssl.SSLWantWriteError):
            context = self.context
            if isinstance(context, BrokerTlsContext) and context.failure is None:
                context.failure = exc

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except ssl.SSLError as exc:
            self._note(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            self._note(exc)
            raise

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except ssl.SSLError as exc:
            self._note(exc)
            raise


class BrokerTlsContext(ssl.SSLContext):
    """The client context of one broker connection.

    The MQTT library passes the host it dials as the name to check; this context checks
    ``server_name`` instead, so a broker reached by address can still be verified by name.
    ``failure`` keeps the first TLS error of the connection, for the log.
    """

    sslsocket_class = _WatchedSocket
    server_name: str
    failure: ssl.SSLError | None

    def wrap_socket(  # noqa: PLR0917 - ssl's own signature
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,  # replaced by server_name
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.server_name,
            session=session,
        )


C = TypeVar("C", bound=ssl.SSLContext)


def _client_context(kind: type[C]) -> C:
    context = kind(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its name by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _trust(context: ssl.SSLContext, *, ca_file: Path | None = None, ca_pem: str = "") -> None:
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
        else:
            context.load_verify_locations(cadata=ca_pem)
    except (OSError, ssl.SSLError) as exc:
        where = ca_file or "the fleet CA"
        raise IdentityError(f"{where}: cannot use it as the fleet CA: {exc}") from exc


def _present(context: ssl.SSLContext, identity_file: Path) -> None:
    _check_private_mode(identity_file)
    try:
        context.load_cert_chain(identity_file)
    except (OSError, ssl.SSLError) as exc:
        # ssl's messages name a library function, never the file's content.
        raise IdentityError(
            f"{identity_file}: the TLS library cannot use the identity file ({exc}); "
            "re-enrol this kiosk (kiosk-agent enroll --force)"
        ) from exc


def broker_context(tls: TlsSettings, server_name: str) -> BrokerTlsContext:
    """A fresh context for one broker connection (so a renewed identity is used at once)."""
    context = _client_context(BrokerTlsContext)
    context.server_name = server_name
    context.failure = None
    _trust(context, ca_file=tls.ca_path)
    _present(context, tls.identity_path)
    return context


def server_context(ca_pem: str) -> ssl.SSLContext:
    """Verifies the enrolment server against the pinned fleet CA; presents no certificate."""
    context = _client_context(ssl.SSLContext)
    _trust(context, ca_pem=ca_pem)
    return context


def renewal_context(ca_file: Path, identity_file: Path) -> ssl.SSLContext:
    """Verifies the server against the fleet CA and presents the terminal's current identity."""
    context = _client_context(ssl.SSLContext)
    _trust(context, ca_file=ca_file)
    _present(context, identity_file)
    return context


@dataclass(frozen=True)
class RenewalCredentials:
    """What a renewal request is made with: the current identity over mutual TLS."""

    identity: Identity
    #: The fleet CA the answer must name: renewal never moves a terminal to another CA.
    ca_fingerprint: str
    context: ssl.SSLContext = field(repr=False)


def renewal_credentials(ca_file: Path, identity_file: Path) -> RenewalCredentials:
    """Load the current identity and the fleet CA for a renewal (blocking I/O)."""
    identity = load_identity(identity_file)
    ca_pem = read_ca(ca_file)
    return RenewalCredentials(
        identity=identity,
        ca_fingerprint=certificate_fingerprint(ca_pem),
        context=renewal_context(ca_file, identity_file),
    )


def describe_tls_failure(exc: ssl.SSLError) -> str:
    """One line for the log: whose certificate the TLS failure was about, and what to do."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the broker's certificate is not accepted: {exc.verify_message.rstrip('.')}; check "
            "tls.ca_file and tls.server_name"
        )
    reason = exc.reason or ""
    text = reason.lower().replace("_", " ") or str(exc)
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        return (
            f"broker refused our certificate: {text} (if it was revoked or has expired, "
            "re-enrol: kiosk-agent enroll --force)"
        )
    return f"TLS with the broker failed: {text}"


def check_identity(config: AgentConfig) -> Identity:
    """Everything the agent needs before it starts: a usable identity of this terminal.

    Refuses an identity file others can read, one whose certificate names another terminal
    (the broker would file everything under the certificate's name), one the fleet CA did not
    issue, and any file the TLS library itself cannot load.
    """
    identity, leaf = _load(config.tls.identity_path)
    if identity.cn != config.terminal.id:
        raise IdentityError(
            f"{identity.path}: the certificate is for terminal {identity.cn!r}, but terminal.id "
            f"is {config.terminal.id!r}; the broker knows a terminal by its certificate. "
            "Fix terminal.id, or enrol this kiosk again"
        )
    _check_issued_by(leaf, read_ca(config.tls.ca_path), what=str(identity.path))
    broker_context(config.tls, config.broker_server_name)
    return identity
