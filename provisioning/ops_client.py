"""Adapter: ``fleetctl``'s client of the fleet server's ops API (HTTP, JSON).

``fleetctl`` never opens the server's database: it asks the server, so it works the same
against a remote server or several of them, and the server stays the registry's only writer.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Final, TypeVar

import msgspec

from fleet_protocol.ops import AckRequest, AlertLog, SitesImported, TerminalList
from fleet_protocol.sites import Site
from provisioning.errors import OpsApiError

DEFAULT_SERVER: Final = "http://127.0.0.1:8700"
SERVER_ENV: Final = "FLEET_SERVER_URL"

T = TypeVar("T")


def default_server() -> str:
    return os.environ.get(SERVER_ENV, DEFAULT_SERVER)


def _request(server: str, path: str, kind: type[T], body: bytes | None = None) -> T:
    """GET ``path`` (POST ``body`` as JSON, when given) and decode the answer as ``kind``."""
    if not server.startswith(("http://", "https://")):
        raise OpsApiError(f"--server must be an http:// or https:// URL, not {server!r}")
    url = server.rstrip("/") + path
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")  # noqa: S310 - http(s) only, checked above
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310 - http(s) only, checked above
            answer = response.read()
    except urllib.error.HTTPError as exc:
        raise OpsApiError(_refusal(server, path, exc)) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OpsApiError(
            f"cannot reach the fleet server at {server} ({reason}); is `fleet-server run` "
            f"running there? Point at it with --server URL or ${SERVER_ENV}."
        ) from exc
    try:
        return msgspec.json.decode(answer, type=kind)
    except msgspec.DecodeError as exc:
        raise OpsApiError(f"fleet server at {server} sent an unexpected answer: {exc}") from exc


class _Refusal(msgspec.Struct, frozen=True):
    error: str


class _Queued(msgspec.Struct, frozen=True):
    queued: bool


def _refusal(server: str, path: str, exc: urllib.error.HTTPError) -> str:
    """The server's own explanation (``{"error": ...}``) when it sent one."""
    try:
        body = exc.read(64 * 1024)
        explanation = msgspec.json.decode(body, type=_Refusal).error
    except (OSError, msgspec.DecodeError):
        explanation = None
    if explanation:
        return f"fleet server at {server}: {explanation}"
    hint = " (is the server older than this fleetctl?)" if exc.code in (404, 405) else ""
    return f"fleet server at {server} answered {exc.code} for {path}{hint}"


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def terminals(server: str) -> TerminalList:
    return _request(server, "/api/v1/terminals", TerminalList)


def import_sites(server: str, sites: Sequence[Site]) -> SitesImported:
    """Store ``sites`` (already validated) on the server, replacing those with the same id."""
    return _request(server, "/api/v1/sites", SitesImported, msgspec.json.encode(list(sites)))


def sites(server: str) -> list[Site]:
    return _request(server, "/api/v1/sites", list[Site])


def site(server: str, site_id: str) -> Site:
    return _request(server, f"/api/v1/sites/{_quote(site_id)}", Site)


def alerts(server: str, limit: int) -> AlertLog:
    """The newest ``limit`` entries of the alert log, newest first."""
    return _request(server, f"/api/v1/alerts?limit={limit}", AlertLog)


def ack_alert(server: str, alert_id: str, who: str) -> None:
    """Ask the server to acknowledge ``alert_id``; its alerting engine applies it within
    seconds, and ignores ids it does not know."""
    body = msgspec.json.encode(AckRequest(who=who))
    answer = _request(server, f"/api/v1/alerts/{_quote(alert_id)}/ack", _Queued, body)
    if not answer.queued:
        raise OpsApiError(f"fleet server at {server} did not queue the acknowledgement")


def to_json(value: object) -> str:
    return json.dumps(msgspec.to_builtins(value), ensure_ascii=False, indent=2)
