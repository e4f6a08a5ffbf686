"""Adapter: the enrolment HTTPS endpoint (aiohttp web) over :mod:`provisioning.authority`.

Contract: :mod:`fleet_protocol.enrolment`. TLS with the fleet server's certificate; a client
certificate is optional on the connection and required by ``/renew`` (mutual TLS), where the
presented certificate must be the terminal's current one (the authority checks serial and
status, so a revoked or renewed-away certificate cannot renew).

``GET /enroll/v1/time`` answers ``{"ms": <the server's wall clock, ms since the epoch>}``
without any authentication: agents measure their clock offset against it. It tells nothing
that is not public, and a client certificate is not needed on that connection; the agent
verifies the server against the fleet CA, so the time cannot be forged on the way.

The authority is synchronous (SQLite, signing); every call runs in a worker thread. The
``pki-upkeep`` task revokes renewed-away certificates once their grace period is over, re-signs
the CRL before it lapses, and has the broker reread CRL and ACL when either changed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
from aiohttp import web

from fleet_protocol import enrolment as contract
from fleet_protocol.errors import DecodeError
from fleet_server.errors import FleetServerError
from fleet_server.stopping import sleep_unless_stopped
from provisioning.authority import FleetAuthority, IssuedCertificate
from provisioning.broker_control import reload_broker
from provisioning.errors import BrokerControlError, EnrolmentRefused, ProvisioningError

AUTHORITY = web.AppKey("authority", FleetAuthority)
RENEW_URL = web.AppKey("renew_url", str)
NOW_MS: web.AppKey[Callable[[], int]] = web.AppKey("now_ms")

#: The clock endpoint (beside the contract's paths; see the module docstring).
TIME_PATH = "/enroll/v1/time"

log = logging.getLogger("fleet-server.enrolment")

_JSON = "application/json"


def _answer(message: contract.EnrolmentMessage, status: int = 200) -> web.Response:
    return web.Response(body=contract.encode(message), status=status, content_type=_JSON)


def _refused(reason: str, message: str, status: int = 403) -> web.Response:
    return _answer(contract.Refusal(reason=reason, message=message), status)


def _peer(request: web.Request) -> str:
    return f"enrolment:{request.remote or '?'}"


M = TypeVar("M", contract.EnrolmentRequest, contract.RenewalRequest)


async def _read(request: web.Request, kind: type[M]) -> M:
    if request.content_length is not None and request.content_length > contract.MAX_REQUEST:
        raise DecodeError("too_large", f"{request.content_length} bytes")
    body = await request.content.read(contract.MAX_REQUEST + 1)
    if len(body) > contract.MAX_REQUEST:
        raise DecodeError("too_large", f"over {contract.MAX_REQUEST} bytes")
    return contract.decode(kind, body)


def _enrolment(request: web.Request, issued: IssuedCertificate) -> contract.Enrolment:
    authority = request.app[AUTHORITY]
    s = authority.settings
    return contract.Enrolment(
        terminal=issued.terminal,
        site=issued.site,
        certificate_pem=issued.chain_pem.decode(),
        ca_pem=issued.ca_pem.decode(),
        broker=contract.BrokerEndpoint(host=s.broker_host, port=s.broker_port),
        not_after=int(issued.not_after.timestamp()),
        renew_url=request.app[RENEW_URL],
    )


async def _ca(request: web.Request) -> web.Response:
    return web.Response(body=request.app[AUTHORITY].ca_pem, content_type="application/x-pem-file")


async def _time(request: web.Request) -> web.Response:
    body = msgspec.json.encode({"ms": request.app[NOW_MS]()})
    # A cached time is a wrong time.
    return web.Response(body=body, content_type=_JSON, headers={"Cache-Control": "no-store"})


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def _enrol(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    try:
        body = await _read(request, contract.EnrolmentRequest)
    except DecodeError as exc:
        return _refused("bad-request", f"the request cannot be read: {exc}", 400)
    try:
        issued = await asyncio.to_thread(
            authority.enroll, body.token, body.csr_pem.encode(), actor=_peer(request)
        )
    except EnrolmentRefused as exc:
        log.warning("enrolment from %s refused: %s", request.remote, exc.reason)
        return _refused(exc.reason, str(exc))
    log.info("enrolled %s (serial %x)", issued.terminal, issued.serial)
    if issued.acl_changed:
        # A revoked terminal enrolled again: the broker must drop its ACL denial.
        try:
            await asyncio.to_thread(reload_broker, authority.settings.reload_command)
        except BrokerControlError as exc:
            log.warning("broker not reloaded after re-enrolling %s: %s", issued.terminal, exc)
    return _answer(_enrolment(request, issued))


async def _renew(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    serial_hex = peer.get("serialNumber") if isinstance(peer, dict) else None
    if not isinstance(serial_hex, str):
        return _refused(
            "no-certificate", "renewal needs the terminal's current certificate (mutual TLS)"
        )
    try:
        body = await _read(request, contract.RenewalRequest)
    except DecodeError as exc:
        return _refused("bad-request", f"the request cannot be read: {exc}", 400)
    try:
        issued = await asyncio.to_thread(
            authority.renew, int(serial_hex, 16), body.csr_pem.encode(), actor=_peer(request)
        )
    except EnrolmentRefused as exc:
        log.warning("renewal from %s refused: %s", request.remote, exc.reason)
        return _refused(exc.reason, str(exc))
    log.info("renewed %s (serial %x)", issued.terminal, issued.serial)
    return _answer(_enrolment(request, issued))


def make_enrolment_app(
    authority: FleetAuthority, renew_url: str, now_ms: Callable[[], int] = wall_ms
) -> web.Application:
    app = web.Application(client_max_size=contract.MAX_REQUEST)
    app[AUTHORITY] = authority
    app[RENEW_URL] = renew_url
    app[NOW_MS] = now_ms
    app.router.add_get(contract.CA_PATH, _ca)
    app.router.add_get(TIME_PATH, _time)
    app.router.add_post(contract.ENROL_PATH, _enrol)
    app.router.add_post(contract.RENEW_PATH, _renew)
    return app


def tls_context(pki_dir: Path) -> ssl.SSLContext:
    """Server TLS with the fleet server's certificate; client certificates optional, checked
    against the fleet CA when presented."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(pki_dir / "server.pem", pki_dir / "server.key")
        context.load_verify_locations(cafile=pki_dir / "ca.pem")
    except (OSError, ssl.SSLError) as exc:
        raise FleetServerError(f"cannot load the enrolment TLS files in {pki_dir}: {exc}") from exc
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


async def serve_enrolment(
    app: web.Application, host: str, port: int, context: ssl.SSLContext
) -> Callable[[], Awaitable[None]]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise FleetServerError(
            f"enrolment cannot listen on {host}:{port}: {exc.strerror}; set [enrolment] port"
        ) from exc
    return runner.cleanup


async def pki_upkeep(authority: FleetAuthority, every_s: float, stopping: asyncio.Event) -> None:
    """Revoke renewed-away certificates after their grace, keep the CRL fresh, reload."""
    reload_pending = False
    while not stopping.is_set():
        try:
            revoked = await asyncio.to_thread(authority.apply_due_revocations)
            stale = await asyncio.to_thread(authority.crl_due)
            if stale:
                await asyncio.to_thread(authority.refresh_crl)
            if revoked or stale or reload_pending:
                reload_pending = True
                await asyncio.to_thread(reload_broker, authority.settings.reload_command)
                reload_pending = False
                log.info(
                    "CRL updated (%d certificate(s) past their grace period); broker reloaded",
                    len(revoked),
                )
        except BrokerControlError as exc:
            log.warning("the broker did not reread the CRL: %s; retrying", exc)
        except (ProvisioningError, OSError, msgspec.MsgspecError) as exc:
            log.warning("PKI upkeep failed: %s; retrying in %.0f s", exc, every_s)
        await sleep_unless_stopped(stopping, every_s)
