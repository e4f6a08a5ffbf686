"""Adapter: sending one message over SMTP with aiosmtplib, the only module that imports it.

Every failure leaves as a :class:`DeliveryDeferred` (retry later) or a
:class:`DeliveryRefused` (this message can never go through as it is). Only a 5xx answer to a
recipient or to the message's content is a refusal. A 5xx to our login or our sender address
is a fault of the server's settings, not of the message: it is deferred, so the outbox keeps
the alerts and sends them once the settings are fixed.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Literal

import aiosmtplib

from fleet_server.mail_message import DeliveryDeferred, DeliveryRefused

Security = Literal["starttls", "tls", "none"]


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    host: str
    port: int
    mail_from: str
    """The envelope sender (bounces go here); the From header is the message's own."""
    security: Security = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0
    tls_context: ssl.SSLContext | None = None
    """Verifies the server; None: the system's trusted CAs."""
    local_hostname: str | None = None
    """Our name in EHLO; None: this machine's fully qualified name."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"SMTP port out of range: {self.port}")
        if self.security not in ("starttls", "tls", "none"):
            raise ValueError(f"SMTP security must be starttls, tls or none: {self.security!r}")
        if (self.username is None) != (self.password is None):
            raise ValueError("SMTP username and password go together")
        if self.timeout_s <= 0:
            raise ValueError(f"SMTP timeout must be positive: {self.timeout_s}")


class SmtpSender:
    def __init__(self, settings: SmtpSettings, log: logging.Logger) -> None:
        self._settings = settings
        self._log = log

    async def send(self, message: EmailMessage) -> None:
        """Hand ``message`` to the server for the recipients in its To/Cc headers."""
        s = self._settings
        try:
            errors, _ = await aiosmtplib.send(
                message,
                sender=s.mail_from,
                hostname=s.host,
                port=s.port,
                username=s.username,
                password=s.password,
                timeout=s.timeout_s,
                use_tls=s.security == "tls",
                start_tls=s.security == "starttls",
                tls_context=s.tls_context,
                local_hostname=s.local_hostname,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if all(500 <= code < 600 for code in codes):
                raise DeliveryRefused(f"every recipient refused: {detail}") from exc
            raise DeliveryDeferred(f"recipients not accepted now: {detail}") from exc
        except (aiosmtplib.SMTPDataError, aiosmtplib.SMTPRecipientRefused) as exc:
            text = f"{s.host}:{s.port} answered {exc.code} {exc.message}"
            if 500 <= exc.code < 600:
                raise DeliveryRefused(text) from exc
            raise DeliveryDeferred(text) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryDeferred(f"{s.host}:{s.port} answered {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            # OSError covers refused connections and TLS failures; timeouts are SMTPException.
            raise DeliveryDeferred(f"cannot deliver through {s.host}:{s.port}: {exc}") from exc
        if errors:
            # Some recipients took it: sending again would duplicate their copy.
            self._log.error(
                "mail %s refused for %s",
                message["Message-ID"],
                "; ".join(f"{rcpt}: {r.code} {r.message}" for rcpt, r in errors.items()),
            )
