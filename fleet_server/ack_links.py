"""Signed acknowledge links: an owner clicks one in an alert e-mail to say "we know".

A token is ``a1.<alert id, base64url>.<expiry ms>.<HMAC-SHA256, base64url>``: URL-safe, opaque
to the reader, and worthless once altered or expired. The MAC is checked (in constant time)
before anything else in the token is believed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from typing import Final

from fleet_server.errors import FleetServerError
from fleet_server.mail_message import local_time

MIN_SECRET_BYTES: Final = 16
_VERSION: Final = "a1"
_EXPIRY_RE: Final = re.compile(r"[0-9]{1,16}")


class AckLinkError(FleetServerError):
    """An acknowledge link that cannot be honoured."""


class AckLinkInvalid(AckLinkError):
    """The link is malformed, altered, or signed with another key."""


class AckLinkExpired(AckLinkError):
    """The link was genuine but is too old."""


def ack_token(alert_id: str, secret: bytes, expires_ms: int) -> str:
    """A token that names ``alert_id`` until ``expires_ms`` (ms since the epoch)."""
    _check_secret(secret)
    if not alert_id:
        raise ValueError("alert id must not be empty")
    if not 0 <= expires_ms < 10**16:
        raise ValueError(f"expiry out of range: {expires_ms}")
    payload = f"{_VERSION}.{_b64(alert_id.encode())}.{expires_ms}"
    return f"{payload}.{_b64(_mac(secret, payload))}"


def verify_ack_token(token: str, secret: bytes, now_ms: int) -> str:
    """The alert id ``token`` names; AckLinkInvalid or AckLinkExpired if it may not be used."""
    _check_secret(secret)
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != _VERSION:
        raise AckLinkInvalid("not an acknowledge link of this system")
    payload = ".".join(parts[:3])
    try:
        mac = _unb64(parts[3])
    except (binascii.Error, ValueError) as exc:
        raise AckLinkInvalid("the link's signature is malformed") from exc
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        raise AckLinkInvalid("the link was altered or signed with another key")
    if _EXPIRY_RE.fullmatch(parts[2]) is None:  # signed by us, so only a bug gets here
        raise AckLinkInvalid("the link's expiry is malformed")
    try:
        alert_id = _unb64(parts[1]).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise AckLinkInvalid("the link's alert id is malformed") from exc
    expires_ms = int(parts[2])
    if now_ms >= expires_ms:
        raise AckLinkExpired(f"the link expired at {local_time(expires_ms)} (Beijing time)")
    return alert_id


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"ack link secret must be at least {MIN_SECRET_BYTES} bytes")


def _mac(secret: bytes, payload: str) -> bytes:
    return hmac.new(secret, payload.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
