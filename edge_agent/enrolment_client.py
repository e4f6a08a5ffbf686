"""Adapter: enrolment and renewal over HTTPS (the only module of the agent that imports aiohttp).

Enrolment trusts nothing it has not checked: the fleet CA is fetched without verification,
which is safe because nothing secret goes with that request, and is then accepted only if its
SHA-256 fingerprint is the one ops handed over with the token. The token and the CSR travel
only over a connection verified against that CA, with the server's name checked.

Renewal runs over mutual TLS with the terminal's current certificate: the server knows the
terminal from the certificate, so no token is needed.

The clock reference (:class:`HttpsClockReference`) asks the same server for its time at
``GET /enroll/v1/time``, verifying it against the fleet CA without presenting a certificate.

Every request has a timeout and ignores proxy settings from the environment: a kiosk's
enrolment must not depend on, or leak to, whatever proxy a technician's shell had set.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Final

import aiohttp
import msgspec

from edge_agent.clock import ClockUnavailable
from edge_agent.errors import EnrolmentError, IdentityError
from edge_agent.identity import (
    TerminalKey,
    certificate_fingerprint,
    csr_pem,
    read_ca,
    renewal_credentials,
    server_context,
)
from fleet_protocol.enrolment import (
    CA_PATH,
    ENROL_PATH,
    MAX_MESSAGE,
    RENEW_PATH,
    Enrolment,
    EnrolmentRequest,
    Refusal,
    RenewalRequest,
    decode,
    encode,
    parse_fingerprint,
)
from fleet_protocol.errors import DecodeError
from fleet_protocol.messages import Millis

DEFAULT_TIMEOUT_S: Final = 30.0
#: The fleet server's clock endpoint (served beside enrolment, see fleet_server.enrolment_api).
TIME_PATH: Final = "/enroll/v1/time"
CLOCK_TIMEOUT_S: Final = 10.0
#: {"ms": 1732190400000} is 20 bytes; allow for whitespace and future fields.
_MAX_TIME_ANSWER: Final = 4096
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


class _ServerTime(msgspec.Struct, frozen=True):
    ms: Millis


def clock_base_url(renew_url: str) -> str:
    """Where the clock endpoint is, from the renewal URL the server gave at enrolment.

    The server builds ``renew_url`` as its public URL plus ``/enroll/v1/renew``, so taking
    that suffix off gives the public URL back, path prefix (a reverse proxy's) included; a
    renewal URL of another shape gives its ``scheme://host:port``.
    """
    url = urllib.parse.urlsplit(renew_url)
    if url.scheme != "https" or not url.hostname:
        raise EnrolmentError(f"{renew_url!r}: the renewal URL must be https://HOST[:PORT]/...")
    if url.path.endswith(RENEW_PATH) and not url.query and not url.fragment:
        return urllib.parse.urlunsplit(
            (url.scheme, url.netloc, url.path[: -len(RENEW_PATH)], "", "")
        )
    return f"{url.scheme}://{url.netloc}"


class HttpsClockReference:
    """The fleet server's clock over HTTPS, verified against the fleet CA in ``ca_path``.

    An async context manager: the connection is kept open between the back-to-back
    measurements of one check, so only the first pays for the TLS handshake. Raises
    :class:`~edge_agent.clock.ClockUnavailable` when the server cannot be read, and
    :class:`IdentityError` on entering when the CA file cannot be used.
    """

    def __init__(self, base_url: str, ca_path: Path, *, timeout_s: float = CLOCK_TIMEOUT_S) -> None:
        self.url = base_url.rstrip("/") + TIME_PATH
        self._ca_path = ca_path
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpsClockReference:
        ca_pem = await asyncio.to_thread(read_ca, self._ca_path)
        connector = aiohttp.TCPConnector(ssl=server_context(ca_pem), limit=1)
        self._session = _session(self._timeout_s, connector)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def server_time_ms(self) -> int:
        if self._session is None:
            raise RuntimeError("HttpsClockReference is used outside its 'async with'")
        what = "对时 / reading the fleet server's clock"
        try:
            async with self._session.get(self.url) as response:
                if response.status != 200:
                    raise ClockUnavailable(f"{what}: {self.url} answered HTTP {response.status}")
                data = await _body(response, _MAX_TIME_ANSWER)
        except EnrolmentError as exc:  # the answer was too large
            raise ClockUnavailable(f"{what}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ClockUnavailable(str(_unreachable(what, self.url, exc))) from exc
        try:
            return msgspec.json.decode(data, type=_ServerTime).ms
        # ValidationError is a DecodeError; msgspec raises Python's own error for invalid
        # UTF-8 inside a string.
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ClockUnavailable(
                f"{what}: {self.url} did not answer with its time ({exc})"
            ) from exc
