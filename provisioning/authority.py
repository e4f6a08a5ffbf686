"""The fleet's certificate authority as a service: PKI directory, tokens, issuing, revocation.

This is the enrolment/issuing surface that the fleet server may import (DESIGN.md). ``fleetctl``
drives the same code for ops. Everything is synchronous (``sqlite3``, files); the server calls
it through a thread.

The PKI directory (mode 0700, every private key 0600)::

    DIR/pki.json              settings: validity periods, enrolment URL, broker endpoint, reload
    DIR/ca.pem  ca.key        fleet CA: server certificates and every terminal's certificate
    DIR/service-ca.pem .key   service CA: client certificates of the fleet's own services
    DIR/broker.pem .key       the broker's TLS server certificate (SANs from `ca init`)
    DIR/server.pem .key       the fleet server's HTTPS certificate (enrolment, ops API)
    DIR/fleet-server.pem .key the fleet server's MQTT client identity (service CA)
    DIR/ops.pem .key          fleetctl's MQTT client identity (service CA), to cut sessions off
    DIR/authority.db          tokens (hashed), issued certificates, audit log (SQLite, WAL)
    DIR/crl.pem               the fleet CA's CRL, read by the broker's terminal listener
    DIR/broker.acl            the broker's ACL: per-terminal patterns, denials of revoked ones

Rules that hold whatever the caller does:

- a token is stored as its SHA-256 only, is bound to one terminal id and site, expires, and is
  spent by the first request that shows it: ``BEGIN IMMEDIATE`` serialises requests (threads
  and processes alike), so of two concurrent requests exactly one gets a certificate;
- a certificate's CN is always a valid terminal id; a refused id is audited;
- every attempt, issued or refused, is written to the audit log, in its own transaction when
  the attempt fails, so a refusal is recorded even though nothing else is;
- renewal needs the current, unrevoked, not superseded certificate and a new key; the
  certificate it replaces is revoked after the grace period.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import hashlib
import ipaddress
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import msgspec

from fleet_protocol.errors import InvalidId
from fleet_protocol.ids import SiteId, TerminalId, site_id, terminal_id
from provisioning import pki
from provisioning.broker_config import render_acl
from provisioning.errors import EnrolmentRefused, PkiError, PkiExists

#: The MQTT identity (certificate CN) of the fleet server and of fleetctl. A dot can never be
#: in a terminal id, so no terminal certificate can carry these names.
SERVER_IDENTITY: Final = "fleet.server"
OPS_IDENTITY: Final = "fleet.ops"

DAY: Final = 86400
SCHEMA_VERSION: Final = 1

Outcome = Literal["issued", "refused", "created", "revoked", "initialised"]


class PkiSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``pki.json``: chosen at ``ca init``, the broker part updated by whoever runs the broker."""

    device_validity_s: int = 90 * DAY
    renewal_grace_s: int = 7 * DAY
    token_ttl_s: int = DAY
    crl_validity_s: int = 30 * DAY
    #: What ``fleetctl token create`` prints and the QR code carries.
    enrol_url: str = "https://127.0.0.1:8701"
    #: Told to every terminal at enrolment: the broker's terminal listener.
    broker_host: str = "127.0.0.1"
    broker_port: int = 8883
    #: The broker's service listener (service CA), where fleetctl cuts sessions off.
    service_host: str = "127.0.0.1"
    service_port: int = 8884
    #: Run after the CRL or the ACL changed so the broker rereads them (argv, no shell).
    reload_command: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.device_validity_s < 10:
            raise ValueError("device_validity_s must be at least 10 seconds")
        for name in ("renewal_grace_s", "token_ttl_s", "crl_validity_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("broker_port", "service_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} is not in 1..65535")


@dataclass(frozen=True)
class PkiLayout:
    root: Path

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def settings(self) -> Path:
        return self.root / "pki.json"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def service_ca_cert(self) -> Path:
        return self.root / "service-ca.pem"

    @property
    def service_ca_key(self) -> Path:
        return self.root / "service-ca.key"

    @property
    def db(self) -> Path:
        return self.root / "authority.db"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def acl(self) -> Path:
        return self.root / "broker.acl"

    def cert(self, name: str) -> Path:
        return self.root / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"


@dataclass(frozen=True)
class IssuedCertificate:
    terminal: TerminalId
    site: SiteId
    serial: int
    not_after: dt.datetime
    chain_pem: bytes  # leaf, then the fleet CA
    ca_pem: bytes
    #: The terminal had been revoked: the ACL no longer denies it, and the broker must reload
    #: to see that.
    acl_changed: bool = False


@dataclass(frozen=True)
class EnrolmentToken:
    """A token as created: the secret is shown once and never stored."""

    secret: str
    terminal: TerminalId
    site: SiteId
    expires_at: dt.datetime
    enrol_url: str
    ca_fingerprint: str

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"EnrolmentToken(terminal={self.terminal!r}, expires_at={self.expires_at})"


@dataclass(frozen=True)
class AuditEntry:
    ts: dt.datetime
    action: str
    outcome: str
    terminal: str
    reason: str
    actor: str
    detail: str


@dataclass(frozen=True)
class CertificateRecord:
    serial: int
    terminal: TerminalId
    not_after: dt.datetime
    status: str  # valid | superseded | revoked
    revoke_at: dt.datetime | None


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def default_actor() -> str:
    try:
        return f"fleetctl:{getpass.getuser()}"
    except OSError:  # no user name for this uid (containers)
        return f"fleetctl:uid={os.getuid()}"


def new_token_secret(draw: Callable[[int], str] = secrets.token_urlsafe) -> str:
    """192 random bits in URL-safe base64, never starting with ``-``.

    Ops paste the token into ``kiosk-agent enroll --token TOKEN``; a token starting with a
    dash would be read as an option there (one in 64 would), so such draws are discarded.
    """
    while True:
        secret = draw(24)
        if not secret.startswith("-"):
            return secret


def token_hash(secret: str) -> str:
    # Tokens carry 192 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


# --- files ---------------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte on, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(
            f"{path} is missing; is {path.parent} a PKI directory made by `fleetctl ca init`?"
        ) from exc
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc


def _check_names(names: Sequence[str], what: str) -> None:
    if not names:
        raise PkiError(f"{what}: at least one host name or address is needed")
    for name in names:
        if not pki.is_valid_dns_name(name):
            try:
                ipaddress.ip_address(name)
            except ValueError as exc:
                raise PkiError(
                    f"{what}: {name!r} is neither a host name nor an IP address"
                ) from exc


# --- ca init -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitResult:
    root: Path
    ca_fingerprint: str
    service_ca_fingerprint: str


def init_pki(
    root: Path,
    *,
    broker_names: Sequence[str],
    server_names: Sequence[str],
    settings: PkiSettings,
    force: bool = False,
    now: dt.datetime | None = None,
    ca_days: int = 3650,
    server_days: int = 825,
) -> InitResult:
    """Create the two CAs and the servers' and services' certificates under ``root``."""
    now = now or now_utc()
    layout = PkiLayout(root)
    _check_names(broker_names, "broker certificate")
    _check_names(server_names, "fleet server certificate")
    if layout.ca_key.exists() and not force:
        raise PkiExists(
            f"{root} already holds a fleet CA ({layout.ca_cert.name}); every terminal "
            "certificate chains to it. Pass --force to replace it (all terminals must then "
            "enrol again)."
        )
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    if force and layout.db.exists():
        for suffix in ("", "-wal", "-shm"):
            layout.db.with_name(layout.db.name + suffix).unlink(missing_ok=True)
    fleet = pki.Authority.create("kiosk-fleet CA", now=now, days=ca_days)
    service = pki.Authority.create("kiosk-fleet service CA", now=now, days=ca_days)
    write_private(layout.ca_key, pki.key_to_pem(fleet.key))
    write_public(layout.ca_cert, pki.cert_to_pem(fleet.cert))
    write_private(layout.service_ca_key, pki.key_to_pem(service.key))
    write_public(layout.service_ca_cert, pki.cert_to_pem(service.cert))
    for name, names in (("broker", broker_names), ("server", server_names)):
        key = pki.new_key()
        cert = fleet.issue(
            cn=names[0],
            public_key=key.public_key(),
            now=now,
            days=server_days,
            server_names=names,
        )
        write_private(layout.key(name), pki.key_to_pem(key))
        write_public(layout.cert(name), pki.cert_to_pem(cert))
    for name, cn in (("fleet-server", SERVER_IDENTITY), ("ops", OPS_IDENTITY)):
        key = pki.new_key()
        cert = service.issue(
            cn=cn, public_key=key.public_key(), now=now, days=server_days, client=True
        )
        write_private(layout.key(name), pki.key_to_pem(key))
        write_public(layout.cert(name), pki.cert_to_pem(cert) + pki.cert_to_pem(service.cert))
    save_settings(root, settings)
    authority = FleetAuthority.open(root)
    authority.refresh_crl(now=now)
    authority.record(
        action="ca-init",
        outcome="initialised",
        terminal="",
        reason="",
        actor=default_actor(),
        detail=f"fleet CA {pki.fingerprint(fleet.cert)}",
        now=now,
    )
    return InitResult(root, pki.fingerprint(fleet.cert), pki.fingerprint(service.cert))


def save_settings(root: Path, settings: PkiSettings) -> None:
    write_public(PkiLayout(root).settings, msgspec.json.format(msgspec.json.encode(settings)))


def load_settings(root: Path) -> PkiSettings:
    path = PkiLayout(root).settings
    try:
        return msgspec.json.decode(_read(path), type=PkiSettings)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PkiError(f"{path}: {exc}") from exc


# --- the authority -------------------------------------------------------------------------

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    terminal TEXT NOT NULL,
    site TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    spent_at INTEGER,
    spent_reason TEXT
);
CREATE INDEX IF NOT EXISTS tokens_terminal ON tokens(terminal);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    terminal TEXT NOT NULL,
    site TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    via TEXT NOT NULL,
    key_sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('valid', 'superseded', 'revoked')),
    revoke_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS certificates_terminal ON certificates(terminal);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    terminal TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _ts(value: dt.datetime) -> int:
    return int(value.timestamp())


def _dt(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


class FleetAuthority:
    """Issues, renews and revokes terminal certificates of one PKI directory."""

    def __init__(self, layout: PkiLayout, settings: PkiSettings, fleet: pki.Authority) -> None:
        self.layout = layout
        self.settings = settings
        self._fleet = fleet
        self.ca_pem = pki.cert_to_pem(fleet.cert)
        self.ca_fingerprint = pki.fingerprint(fleet.cert)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def __repr__(self) -> str:
        return f"FleetAuthority({self.layout.root})"

    @classmethod
    def open(cls, root: Path) -> FleetAuthority:
        layout = PkiLayout(root)
        settings = load_settings(root)
        fleet = pki.Authority(
            cert=pki.cert_from_pem(_read(layout.ca_cert), what=str(layout.ca_cert)),
            key=pki.key_from_pem(_read(layout.ca_key), what=str(layout.ca_key)),
        )
        fleet.check_pair(what=str(layout.ca_key))
        return cls(layout, settings, fleet)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.layout.db, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- audit --

    def record(
        self,
        *,
        action: str,
        outcome: Outcome,
        terminal: str,
        reason: str,
        actor: str,
        detail: str = "",
        now: dt.datetime,
        db: sqlite3.Connection | None = None,
    ) -> None:
        row = (_ts(now), action, outcome, terminal, reason, actor, detail)
        sql = (
            "INSERT INTO audit (ts, action, outcome, terminal, reason, actor, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        if db is not None:
            db.execute(sql, row)
            return
        with self._transaction() as own:
            own.execute(sql, row)

    def _refuse(
        self,
        *,
        action: str,
        terminal: str,
        reason: str,
        message: str,
        actor: str,
        now: dt.datetime,
        detail: str = "",
    ) -> EnrolmentRefused:
        self.record(
            action=action,
            outcome="refused",
            terminal=terminal,
            reason=reason,
            actor=actor,
            detail=detail or message,
            now=now,
        )
        return EnrolmentRefused(reason, message)

    def audit(self, *, terminal: str | None = None, limit: int = 200) -> list[AuditEntry]:
        with self._connect() as db:
            if terminal is None:
                rows = db.execute(
                    "SELECT ts, action, outcome, terminal, reason, actor, detail FROM audit "
                    "ORDER BY id DESC LIMIT ?",
                    (limit,),
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT ts, action, outcome, terminal, reason, actor, detail FROM audit "
                    "WHERE terminal = ? ORDER BY id DESC LIMIT ?",
                    (terminal, limit),
                ).fetchall()
        return [AuditEntry(_dt(r[0]), *r[1:]) for r in reversed(rows)]

    # -- tokens --

    def create_token(
        self,
        terminal: str,
        site: str,
        *,
        ttl: dt.timedelta | None = None,
        actor: str,
        now: dt.datetime | None = None,
    ) -> EnrolmentToken:
        """A one-time token for ``terminal``; earlier unspent tokens of it stop working."""
        now = now or now_utc()
        tid = self._terminal_or_refuse(terminal, action="token-create", actor=actor, now=now)
        try:
            sid = site_id(site)
        except InvalidId as exc:
            raise self._refuse(
                action="token-create",
                terminal=tid,
                reason="bad-site-id",
                message=str(exc),
                actor=actor,
                now=now,
            ) from exc
        ttl = ttl if ttl is not None else dt.timedelta(seconds=self.settings.token_ttl_s)
        if ttl <= dt.timedelta(0):
            raise EnrolmentRefused("bad-ttl", "the token's lifetime must be positive")
        secret = new_token_secret()
        expires = now + ttl
        with self._transaction() as db:
            replaced = db.execute(
                "UPDATE tokens SET spent_at = ?, spent_reason = 'replaced' "
                "WHERE terminal = ? AND spent_at IS NULL",
                (_ts(now), tid),
            ).rowcount
            db.execute(
                "INSERT INTO tokens (hash, terminal, site, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (token_hash(secret), tid, sid, _ts(now), _ts(expires)),
            )
            detail = f"site {sid}, expires {expires.isoformat(timespec='seconds')}"
            if replaced:
                detail += f"; {replaced} earlier unspent token(s) withdrawn"
            self.record(
                action="token-create",
                outcome="created",
                terminal=tid,
                reason="",
                actor=actor,
                detail=detail,
                now=now,
                db=db,
            )
        return EnrolmentToken(
            secret=secret,
            terminal=tid,
            site=sid,
            expires_at=expires,
            enrol_url=self.settings.enrol_url,
            ca_fingerprint=self.ca_fingerprint,
        )

    # -- issuing --

    def enroll(
        self, token: str, csr_pem: bytes, *, actor: str, now: dt.datetime | None = None
    ) -> IssuedCertificate:
        """Spend ``token`` on a certificate for the CSR's key; at most once per token."""
        now = now or now_utc()
        action = "enroll"
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT terminal, site, expires_at, spent_at, spent_reason FROM tokens "
                "WHERE hash = ?",
                (token_hash(token),),
            ).fetchone()
            refusal: tuple[str, str, str] | None = None
            if row is None:
                refusal = ("", "token-unknown", "this enrolment token is not known")
            else:
                terminal, site, expires_at, spent_at, spent_reason = row
                if spent_at is not None:
                    refusal = (
                        terminal,
                        "token-used",
                        f"this enrolment token was already used ({spent_reason}); ask ops "
                        "for a new one",
                    )
                elif expires_at <= _ts(now):
                    refusal = (
                        terminal,
                        "token-expired",
                        f"this enrolment token expired at {_dt(expires_at).isoformat()}; ask "
                        "ops for a new one",
                    )
            if refusal is not None:
                db.execute("ROLLBACK")
                raise self._refuse(
                    action=action,
                    terminal=refusal[0],
                    reason=refusal[1],
                    message=refusal[2],
                    actor=actor,
                    now=now,
                )
            try:
                request = pki.read_csr(csr_pem)
            except PkiError as exc:
                # A garbled request does not spend the token: the kiosk may simply retry.
                db.execute("ROLLBACK")
                raise self._refuse(
                    action=action,
                    terminal=terminal,
                    reason="bad-csr",
                    message=str(exc),
                    actor=actor,
                    now=now,
                ) from exc
            if request.cn != terminal:
                # Someone holding this token asked for another identity: spend the token so it
                # cannot be tried again, and record both names.
                db.execute(
                    "UPDATE tokens SET spent_at = ?, spent_reason = 'identity-mismatch' "
                    "WHERE hash = ?",
                    (_ts(now), token_hash(token)),
                )
                self.record(
                    action=action,
                    outcome="refused",
                    terminal=terminal,
                    reason="identity-mismatch",
                    actor=actor,
                    detail=f"CSR asked for CN {request.cn!r}; the token is for {terminal}",
                    now=now,
                    db=db,
                )
                db.execute("COMMIT")
                raise EnrolmentRefused(
                    "identity-mismatch",
                    f"the request is for {request.cn!r} but the token is for {terminal}; "
                    "the token is now spent",
                )
            db.execute(
                "UPDATE tokens SET spent_at = ?, spent_reason = 'issued' WHERE hash = ?",
                (_ts(now), token_hash(token)),
            )
            issued = self._issue(
                db,
                TerminalId(terminal),
                SiteId(site),
                request.public_key,
                via="token",
                actor=actor,
                now=now,
            )
            db.execute("COMMIT")
        return self._lift_denial(issued)

    def renew(
        self,
        presented_serial: int,
        csr_pem: bytes,
        *,
        actor: str,
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """A new certificate for the holder of a current one (already checked by TLS)."""
        now = now or now_utc()
        action = "renew"
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT terminal, site, status, not_after, key_sha256 FROM certificates "
                "WHERE serial = ?",
                (str(presented_serial),),
            ).fetchone()
            refusal: tuple[str, str, str] | None = None
            if row is None:
                refusal = ("", "certificate-unknown", "this certificate was not issued here")
            else:
                terminal, site, status, not_after, old_key = row
                if status != "valid":
                    refusal = (
                        terminal,
                        f"certificate-{status}",
                        f"this certificate is {status}; it cannot be renewed",
                    )
                elif not_after <= _ts(now):
                    refusal = (terminal, "certificate-expired", "this certificate has expired")
            if refusal is not None:
                db.execute("ROLLBACK")
                raise self._refuse(
                    action=action,
                    terminal=refusal[0],
                    reason=refusal[1],
                    message=refusal[2],
                    actor=actor,
                    now=now,
                    detail=f"serial {presented_serial:x}: {refusal[2]}",
                )
            try:
                request = pki.read_csr(csr_pem)
            except PkiError as exc:
                db.execute("ROLLBACK")
                raise self._refuse(
                    action=action,
                    terminal=terminal,
                    reason="bad-csr",
                    message=str(exc),
                    actor=actor,
                    now=now,
                ) from exc
            if request.cn != terminal:
                db.execute("ROLLBACK")
                raise self._refuse(
                    action=action,
                    terminal=terminal,
                    reason="identity-mismatch",
                    message=f"the request is for {request.cn!r}, the certificate for {terminal}",
                    actor=actor,
                    now=now,
                )
            if pki.key_id(request.public_key) == old_key:
                db.execute("ROLLBACK")
                raise self._refuse(
                    action=action,
                    terminal=terminal,
                    reason="same-key",
                    message="a renewal must come with a new key; this is the current one",
                    actor=actor,
                    now=now,
                )
            revoke_at = now + dt.timedelta(seconds=self.settings.renewal_grace_s)
            db.execute(
                "UPDATE certificates SET status = 'superseded', revoke_at = ? WHERE serial = ?",
                (_ts(revoke_at), str(presented_serial)),
            )
            issued = self._issue(
                db,
                TerminalId(terminal),
                SiteId(site),
                request.public_key,
                via="renewal",
                actor=actor,
                now=now,
                detail=f"replaces {presented_serial:x}, revoked at {revoke_at.isoformat()}",
            )
            db.execute("COMMIT")
        return issued

    def issue_direct(
        self,
        terminal: str,
        site: str,
        public_key: pki.PublicKey,
        *,
        actor: str,
        now: dt.datetime | None = None,
        validity_s: int | None = None,
    ) -> IssuedCertificate:
        """Issue without a token (factory provisioning, the demo, tests): audited as such."""
        now = now or now_utc()
        tid = self._terminal_or_refuse(terminal, action="issue", actor=actor, now=now)
        try:
            sid = site_id(site)
        except InvalidId as exc:
            raise self._refuse(
                action="issue",
                terminal=tid,
                reason="bad-site-id",
                message=str(exc),
                actor=actor,
                now=now,
            ) from exc
        with self._transaction() as db:
            issued = self._issue(
                db,
                tid,
                sid,
                public_key,
                via="direct",
                actor=actor,
                now=now,
                validity_s=validity_s,
            )
        return self._lift_denial(issued)

    def provision_identity(
        self,
        terminal: str,
        site: str,
        path: Path,
        *,
        actor: str,
        validity_s: int | None = None,
    ) -> IssuedCertificate:
        """Factory provisioning (the demo, fleet-sim, tests): the key is made here, not on the
        kiosk, and written with its chain to ``path`` (0600), the agent's identity file."""
        key = pki.new_key()
        issued = self.issue_direct(
            terminal, site, key.public_key(), actor=actor, validity_s=validity_s
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, pki.key_to_pem(key) + issued.chain_pem)
        return issued

    def _lift_denial(self, issued: IssuedCertificate) -> IssuedCertificate:
        """Rewrite the ACL when ``issued`` ends a revoked terminal's denial."""
        if "user " + issued.terminal not in self.layout.acl.read_text(encoding="utf-8"):
            return issued
        self.refresh_crl()
        return dataclasses.replace(issued, acl_changed=True)

    def _terminal_or_refuse(
        self, terminal: str, *, action: str, actor: str, now: dt.datetime
    ) -> TerminalId:
        try:
            return terminal_id(terminal)
        except InvalidId as exc:
            raise self._refuse(
                action=action,
                terminal=_printable(terminal),
                reason="bad-terminal-id",
                message=f"{exc}; no certificate is ever issued for such a name",
                actor=actor,
                now=now,
            ) from exc

    def _issue(
        self,
        db: sqlite3.Connection,
        terminal: TerminalId,
        site: SiteId,
        public_key: pki.PublicKey,
        *,
        via: str,
        actor: str,
        now: dt.datetime,
        detail: str = "",
        validity_s: int | None = None,
    ) -> IssuedCertificate:
        terminal = terminal_id(terminal)  # the CN rule holds however we got here
        days = (validity_s or self.settings.device_validity_s) / DAY
        cert = self._fleet.issue(
            cn=terminal, public_key=public_key, now=now, days=days, client=True
        )
        not_after = cert.not_valid_after_utc
        db.execute(
            "INSERT INTO certificates "
            "(serial, terminal, site, issued_at, not_after, via, key_sha256, status)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'valid')",
            (
                str(cert.serial_number),
                terminal,
                site,
                _ts(now),
                _ts(not_after),
                via,
                pki.key_id(public_key),
            ),
        )
        # A terminal that was revoked and enrols again is no longer denied by the ACL.
        self.record(
            action={"token": "enroll", "renewal": "renew"}.get(via, "issue"),
            outcome="issued",
            terminal=terminal,
            reason="",
            actor=actor,
            detail=(
                f"serial {cert.serial_number:x}, via {via}, until "
                f"{not_after.isoformat(timespec='seconds')}" + (f"; {detail}" if detail else "")
            ),
            now=now,
            db=db,
        )
        return IssuedCertificate(
            terminal=terminal,
            site=site,
            serial=cert.serial_number,
            not_after=not_after,
            chain_pem=pki.cert_to_pem(cert) + self.ca_pem,
            ca_pem=self.ca_pem,
        )

    # -- revocation --

    def revoke(
        self,
        terminal: str,
        *,
        actor: str,
        reason: str = "revoked by ops",
        now: dt.datetime | None = None,
    ) -> list[int]:
        """Revoke every certificate of ``terminal`` and withdraw its unspent tokens."""
        now = now or now_utc()
        tid = self._terminal_or_refuse(terminal, action="revoke", actor=actor, now=now)
        with self._transaction() as db:
            serials = [
                int(r[0])
                for r in db.execute(
                    "SELECT serial FROM certificates WHERE terminal = ? AND status != 'revoked'",
                    (tid,),
                )
            ]
            db.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = ? "
                "WHERE terminal = ? AND status != 'revoked'",
                (_ts(now), tid),
            )
            db.execute(
                "UPDATE tokens SET spent_at = ?, spent_reason = 'revoked' "
                "WHERE terminal = ? AND spent_at IS NULL",
                (_ts(now), tid),
            )
            self.record(
                action="revoke",
                outcome="revoked",
                terminal=tid,
                reason=reason,
                actor=actor,
                detail="serials " + (", ".join(f"{s:x}" for s in serials) or "none"),
                now=now,
                db=db,
            )
        self.refresh_crl(now=now)
        return serials

    def apply_due_revocations(self, *, now: dt.datetime | None = None) -> list[int]:
        """Revoke superseded certificates whose grace period is over; rewrites the CRL."""
        now = now or now_utc()
        with self._transaction() as db:
            due = db.execute(
                "SELECT serial, terminal FROM certificates "
                "WHERE status = 'superseded' AND revoke_at <= ?",
                (_ts(now),),
            ).fetchall()
            for serial, term in due:
                db.execute(
                    "UPDATE certificates SET status = 'revoked', revoked_at = ? WHERE serial = ?",
                    (_ts(now), serial),
                )
                self.record(
                    action="revoke",
                    outcome="revoked",
                    terminal=term,
                    reason="superseded by renewal",
                    actor="fleet-server",
                    detail=f"serial {int(serial):x}, grace period over",
                    now=now,
                    db=db,
                )
        if due:
            self.refresh_crl(now=now)
        return [int(s) for s, _ in due]

    def crl_due(self, *, now: dt.datetime | None = None) -> bool:
        """True when the CRL on disk is past half its validity (re-sign it before it lapses)."""
        now = now or now_utc()
        try:
            next_update = pki.crl_next_update(self.layout.crl.read_bytes())
        except OSError:
            return True
        if next_update is None:
            return True
        return next_update - now < dt.timedelta(seconds=self.settings.crl_validity_s / 2)

    def refresh_crl(self, *, now: dt.datetime | None = None) -> None:
        """Rewrite the CRL and the ACL from the database (both files atomically)."""
        now = now or now_utc()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO counters (name, value) VALUES ('crl', 1) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1"
            )
            (number,) = db.execute("SELECT value FROM counters WHERE name = 'crl'").fetchone()
            # An expired certificate is refused anyway; it can leave the CRL a day later.
            revoked = db.execute(
                "SELECT serial, revoked_at FROM certificates "
                "WHERE status = 'revoked' AND not_after > ?",
                (_ts(now) - DAY,),
            ).fetchall()
            denied = sorted(self._denied_terminals(db))
        crl = self._fleet.crl(
            ((int(s), _dt(at)) for s, at in revoked),
            now=now,
            next_update=dt.timedelta(seconds=self.settings.crl_validity_s),
            number=number,
        )
        write_public(self.layout.crl, pki.crl_to_pem(crl))
        write_public(self.layout.acl, render_acl(denied).encode())

    @staticmethod
    def _denied_terminals(db: sqlite3.Connection) -> set[str]:
        """Terminals with a revoked certificate and no valid one: the ACL denies them all."""
        rows = db.execute(
            "SELECT terminal FROM certificates GROUP BY terminal "
            "HAVING SUM(status = 'revoked') > 0 AND SUM(status != 'revoked') = 0"
        ).fetchall()
        return {r[0] for r in rows}

    def certificates(self, terminal: str | None = None) -> list[CertificateRecord]:
        with self._connect() as db:
            sql = "SELECT serial, terminal, not_after, status, revoke_at FROM certificates"
            args: tuple[str, ...] = ()
            if terminal is not None:
                sql += " WHERE terminal = ?"
                args = (terminal,)
            rows = db.execute(sql + " ORDER BY issued_at", args).fetchall()
        return [
            CertificateRecord(
                int(r[0]), TerminalId(r[1]), _dt(r[2]), r[3], _dt(r[4]) if r[4] else None
            )
            for r in rows
        ]


def _printable(value: str) -> str:
    """A refused name as it can be shown in an audit line: control characters escaped."""
    return json.dumps(value, ensure_ascii=False)[1:-1][:100]
