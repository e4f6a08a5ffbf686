"""Adapter: enrolment and renewal over HTTPS (the only module of the agent that imports aiohttp).

Enrolment trusts nothing it has not checked: the fleet CA is fetched without verification,
which is safe because nothing secret goes with that request, and is then accepted only if its
SHA-256 fingerprint is the one ops handed over with the token. The token and the CSR travel
only over a connection verified against that CA, with the server's name checked.

Renewal runs over mutual TLS with the terminal's current certificate: the server knows the
terminal from the certificate, so no token is needed.

Every request has a timeout and ignores proxy settings from the environment: a kiosk's
enrolment must not depend on, or leak to, whatever proxy a technician's shell had set.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path
from typing import Final

import aiohttp

from edge_agent.errors import EnrolmentError, IdentityError
from edge_agent.identity import (
    TerminalKey,
    certificate_fingerprint,
    csr_pem,
    renewal_credentials,
    server_context,
)
from fleet_protocol.enrolment import (
    CA_PATH,
    ENROL_PATH,
    MAX_MESSAGE,
    Enrolment,
    EnrolmentRequest,
    Refusal,
    RenewalRequest,
    decode,
    encode,
    parse_fingerprint,
)
from fleet_protocol.errors import DecodeError

DEFAULT_TIMEOUT_S: Final = 30.0
#: A PEM CA certificate is about 1 KiB; anything much larger is not what we asked for.
MAX_CA_PEM: Final = 64 * 1024
_REFUSAL_STATUSES: Final = frozenset({400, 403})


def normalise_fingerprint(text: str) -> str:
    """A pinned SHA-256 fingerprint in the one form ops see (see ``parse_fingerprint``)."""
    try:
        return parse_fingerprint(text)
    except ValueError as exc:
        raise EnrolmentError(
            f"CA 指纹格式不对 / {text!r} is not a SHA-256 fingerprint: 64 hex digits, colons "
            "optional, as `fleetctl token create` prints it"
        ) from exc


def _base_url(server_url: str) -> str:
    url = urllib.parse.urlsplit(server_url)
    if url.scheme != "https" or not url.hostname:
        raise EnrolmentError(
            f"{server_url!r}: the enrolment server URL must be https://HOST[:PORT]"
        )
    return server_url.rstrip("/")


def _session(timeout_s: float, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        trust_env=False,
        raise_for_status=False,
    )


async def _body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(16 * 1024):
        size += len(chunk)
        if size > limit:
            raise EnrolmentError(f"{response.url}: the answer is over {limit} bytes; not read")
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer(response: aiohttp.ClientResponse, what: str) -> Enrolment:
    data = await _body(response, MAX_MESSAGE)
    if response.status in _REFUSAL_STATUSES:
        try:
            refusal = decode(Refusal, data)
        except DecodeError:
            raise EnrolmentError(
                f"{what}: the server refused (HTTP {response.status}) without saying why"
            ) from None
        raise EnrolmentError(
            f"{what}: 服务器拒绝 / refused by the server ({refusal.reason}): {refusal.message}",
            reason=refusal.reason,
        )
    if response.status != 200:
        raise EnrolmentError(f"{what}: the server answered HTTP {response.status}")
    try:
        return decode(Enrolment, data)
    except DecodeError as exc:
        raise EnrolmentError(f"{what}: the server's answer cannot be read ({exc})") from exc


def _unreachable(what: str, url: str, exc: BaseException) -> EnrolmentError:
    if isinstance(exc, TimeoutError):
        detail = "no answer in time"
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
        detail = f"the server's certificate is not accepted: {exc.certificate_error}"
    else:
        detail = str(exc) or type(exc).__name__
    return EnrolmentError(f"{what}: cannot reach {url}: {detail}")


async def fetch_ca(server_url: str, ca_fingerprint: str, *, timeout_s: float) -> str:
    """The fleet CA from the server, accepted only if its fingerprint is the pinned one."""
    pinned = normalise_fingerprint(ca_fingerprint)
    url = _base_url(server_url) + CA_PATH
    what = "获取 fleet CA / fetching the fleet CA"
    try:
        # Unverified on purpose: the fingerprint check below is the verification, and this
        # request carries nothing secret.
        async with (
            _session(timeout_s, aiohttp.TCPConnector(ssl=False)) as session,
            session.get(url) as response,
        ):
            if response.status != 200:
                raise EnrolmentError(f"{what}: {url} answered HTTP {response.status}")
            data = await _body(response, MAX_CA_PEM)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise _unreachable(what, url, exc) from exc
    return accept_ca(server_url, data, pinned)


def accept_ca(server_url: str, served_pem: bytes, ca_fingerprint: str) -> str:
    """``served_pem`` as text if it is the fleet CA ops pinned, else a clear refusal."""
    pinned = normalise_fingerprint(ca_fingerprint)
    try:
        served = certificate_fingerprint(served_pem)
    except IdentityError as exc:
        raise EnrolmentError(
            f"获取 fleet CA / fetching the fleet CA: {server_url} did not answer with a PEM "
            "certificate; nothing was sent to it"
        ) from exc
    if served != pinned:
        raise EnrolmentError(
            f"CA 指纹不符，未发送任何信息 / {server_url} is not the expected fleet server: its "
            f"CA has fingerprint {served}, expected {pinned}. Nothing was sent to it (no token, "
            "no request). Check the server URL and the fingerprint with ops"
        )
    return served_pem.decode("ascii")


async def enroll(
    server_url: str,
    token: str,
    ca_fingerprint: str,
    key: TerminalKey,
    *,
    terminal: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Enrolment:
    """Spend ``token`` on a certificate for ``key`` with CN ``terminal``.

    The token is bound to one terminal id by ops; a CSR for another id is refused and spends
    the token, so the caller validates ``terminal`` before calling.
    """
    pinned = normalise_fingerprint(ca_fingerprint)
    ca_pem = await fetch_ca(server_url, pinned, timeout_s=timeout_s)
    url = _base_url(server_url) + ENROL_PATH
    what = "登记 / enrolment"
    body = encode(EnrolmentRequest(token=token, csr_pem=csr_pem(key, terminal)))
    try:
        async with (
            _session(timeout_s, aiohttp.TCPConnector(ssl=server_context(ca_pem))) as session,
            session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp,
        ):
            enrolment = await _answer(resp, what)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise _unreachable(what, url, exc) from exc
    _check_answer(enrolment, pinned, terminal, what)
    return enrolment


async def renew(
    renew_url: str,
    ca_file: Path,
    identity_file: Path,
    new_key: TerminalKey,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Enrolment:
    """A certificate for ``new_key``, asked for with the current identity over mutual TLS.

    Raises :class:`IdentityError` when the current identity or the CA file cannot be used
    (a local fault) and :class:`EnrolmentError` when the server refused or was not reached.
    """
    what = "证书续期 / certificate renewal"
    credentials = await asyncio.to_thread(renewal_credentials, ca_file, identity_file)
    cn = credentials.identity.cn
    request = await asyncio.to_thread(csr_pem, new_key, cn)
    body = encode(RenewalRequest(csr_pem=request))
    try:
        async with (
            _session(timeout_s, aiohttp.TCPConnector(ssl=credentials.context)) as session,
            session.post(renew_url, data=body, headers={"Content-Type": "application/json"}) as r,
        ):
            enrolment = await _answer(r, what)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise _unreachable(what, renew_url, exc) from exc
    _check_answer(enrolment, credentials.ca_fingerprint, cn, what)
    return enrolment


def _check_answer(enrolment: Enrolment, pinned: str, terminal: str, what: str) -> None:
    if enrolment.terminal != terminal:
        raise EnrolmentError(
            f"{what}: the server issued for terminal {enrolment.terminal!r}, not {terminal!r}"
        )
    try:
        answered_ca = certificate_fingerprint(enrolment.ca_pem)
    except IdentityError as exc:
        raise EnrolmentError(f"{what}: the answer's ca_pem is not a certificate") from exc
    if answered_ca != pinned:
        raise EnrolmentError(
            f"{what}: the answer names another fleet CA ({answered_ca}, expected {pinned}); "
            "not used"
        )
