"""An SMTP sink for development, demos and tests: every message it receives becomes a file.

Run it as ``python -m provisioning.smtp_sink --host 127.0.0.1 --port N --maildir DIR``. Each
message is stored as ``DIR/<UTC timestamp>-<counter>.eml``, so the names sort in arrival order.
The file holds two headers naming the SMTP envelope (``X-Envelope-From``, ``X-Envelope-To``,
which may differ from the message's own From/To, e.g. for Bcc), followed by the message's bytes
exactly as received. A file appears complete or not at all: it is written under a hidden
temporary name, flushed to disk and renamed. SIGTERM or SIGINT stops the server cleanly.

This is the only module of the package that imports aiosmtpd.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from aiosmtpd.smtp import SMTP, Envelope, Session

logger: Final = logging.getLogger("provisioning.smtp_sink")

#: Banner host name; fixed so the server never waits on a DNS lookup of its own name.
SERVER_NAME: Final = "fleet-smtp-sink"


class MaildirSink:
    """aiosmtpd handler: store each message as an ``.eml`` file in ``maildir``."""

    def __init__(self, maildir: Path) -> None:
        self._maildir = maildir
        self._counter = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        del server, session
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{next(self._counter):06d}.eml"
        mail_from = str(envelope.mail_from)
        recipients = [str(rcpt) for rcpt in envelope.rcpt_tos]
        raw = envelope.original_content
        content = raw if isinstance(raw, bytes) else b""
        data = _envelope_headers(mail_from, recipients) + content
        try:
            path = await asyncio.to_thread(_write_atomically, self._maildir, name, data)
        except OSError:
            logger.exception("could not store a message from %s", mail_from)
            return "451 Requested action aborted: local error in processing"
        logger.info("stored %s (from %s to %s)", path.name, mail_from, ", ".join(recipients))
        return "250 Message accepted for delivery"


def _envelope_headers(mail_from: str, recipients: Sequence[str]) -> bytes:
    lines = [f"X-Envelope-From: <{mail_from}>"]
    lines.extend(f"X-Envelope-To: <{rcpt}>" for rcpt in recipients)
    # Addresses may be UTF-8 (SMTPUTF8); the message itself is stored byte for byte.
    return "".join(line + "\r\n" for line in lines).encode("utf-8", errors="surrogateescape")


def _write_atomically(maildir: Path, name: str, data: bytes) -> Path:
    final = maildir / name
    temporary = maildir / f".{name}.tmp"
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    temporary.rename(final)
    directory = os.open(maildir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return final


async def serve(host: str, port: int, maildir: Path, stop: asyncio.Event) -> None:
    """Accept mail on ``host:port`` into ``maildir`` until ``stop`` is set."""
    await asyncio.to_thread(maildir.mkdir, parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    handler = MaildirSink(maildir)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=SERVER_NAME, enable_SMTPUTF8=True, loop=loop),
        host=host,
        port=port,
    )
    logger.info("accepting mail on %s:%d into %s", host, port, maildir)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        logger.info("stopped")


async def _run(host: str, port: int, maildir: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(host, port, maildir, stop)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m provisioning.smtp_sink",
        description="SMTP sink: store every received message as an .eml file.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--maildir", type=Path, required=True, help="directory for .eml files")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # aiosmtpd logs every connection and command at INFO; keep its warnings only.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    host: str = args.host
    port: int = args.port
    maildir: Path = args.maildir
    try:
        asyncio.run(_run(host, port, maildir))
    except OSError as exc:
        logger.error("cannot serve on %s:%d: %s", host, port, exc)  # noqa: TRY400 -- one line, no traceback
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
