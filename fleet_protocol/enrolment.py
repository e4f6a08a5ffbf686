"""The enrolment contract between ``kiosk-agent enroll`` and the fleet server (HTTPS, JSON).

Endpoints, all under the server's enrolment URL (``https://HOST:PORT``):

``GET  /enroll/v1/ca``
    The fleet CA certificate (PEM, ``application/x-pem-file``). The agent fetches it over an
    unverified connection, compares its SHA-256 fingerprint with the one ops gave it, and from
    then on verifies the server against it. Nothing secret travels before that check.
``POST /enroll/v1/certificate``  body :class:`EnrolmentRequest`, answer :class:`Enrolment`
    One-time token plus a CSR whose CN is the token's terminal id. The key never leaves the
    kiosk.
``POST /enroll/v1/renew``  body :class:`RenewalRequest`, answer :class:`Enrolment`
    Over mutual TLS with the terminal's current certificate; the CSR carries a new key.

A refusal is HTTP 403 (400 for a request that cannot be read) with a :class:`Refusal` body; its
``reason`` is a stable code also written to the audit log.
"""

from __future__ import annotations

import re
from typing import Final, TypeVar

import msgspec

from fleet_protocol.errors import DecodeError
from fleet_protocol.ids import SiteIdField, TerminalIdField

ENROL_PATH: Final = "/enroll/v1/certificate"
RENEW_PATH: Final = "/enroll/v1/renew"
CA_PATH: Final = "/enroll/v1/ca"

#: Largest request body the server reads: a P-256 CSR is under 1 KiB.
MAX_REQUEST: Final = 16 * 1024
#: Largest message either side decodes (an answer carries two certificates).
MAX_MESSAGE: Final = 64 * 1024


_FINGERPRINT_HEX: Final = re.compile(r"[0-9A-F]{64}")


def format_fingerprint(sha256_digest: bytes) -> str:
    """A SHA-256 digest as ops see it: upper-case hex pairs joined by colons (as OpenSSL)."""
    raw = sha256_digest.hex().upper()
    return ":".join(raw[i : i + 2] for i in range(0, len(raw), 2))


def parse_fingerprint(text: str) -> str:
    """Read a fingerprint as people copy it (colons optional, any case, ``SHA256:`` prefix) into
    :func:`format_fingerprint`'s form; ``ValueError`` if it is not 64 hex digits."""
    raw = text.strip().upper().removeprefix("SHA256:").replace(":", "").replace(" ", "")
    if _FINGERPRINT_HEX.fullmatch(raw) is None:
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits)")
    return format_fingerprint(bytes.fromhex(raw))


class EnrolmentRequest(msgspec.Struct, frozen=True):
    token: str
    csr_pem: str


class RenewalRequest(msgspec.Struct, frozen=True):
    csr_pem: str


class BrokerEndpoint(msgspec.Struct, frozen=True):
    """Where the terminal connects: TLS, its certificate as the client identity."""

    host: str
    port: int = msgspec.field(default=8883)


class Enrolment(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a terminal receives: its certificate chain, the CA, and where to connect."""

    terminal: TerminalIdField
    site: SiteIdField
    certificate_pem: str  # leaf first, then the issuing CA
    ca_pem: str
    broker: BrokerEndpoint
    not_after: int  # seconds since the epoch, for display; the certificate is authoritative
    renew_url: str = ""  # the full URL of the renewal endpoint; empty: do not renew


class Refusal(msgspec.Struct, frozen=True):
    reason: str
    message: str


EnrolmentMessage = EnrolmentRequest | RenewalRequest | Enrolment | Refusal
E = TypeVar("E", EnrolmentRequest, RenewalRequest, Enrolment, Refusal)

_encoder: Final = msgspec.json.Encoder()


def encode(message: EnrolmentMessage) -> bytes:
    return _encoder.encode(message)


def decode(kind: type[E], data: bytes) -> E:
    """Decode one enrolment message or raise :class:`DecodeError` (never anything else)."""
    if len(data) > MAX_MESSAGE:
        raise DecodeError("too_large", f"{len(data)} bytes, limit {MAX_MESSAGE}")
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise DecodeError("schema", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise DecodeError("malformed", str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise DecodeError("malformed", f"invalid UTF-8 at byte {exc.start}") from exc
