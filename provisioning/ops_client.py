"""Adapter: ``fleetctl``'s client of the fleet server's ops API (HTTP, JSON).

``fleetctl`` never opens the server's database: it asks the server, so it works the same
against a remote server or several of them, and the server stays the registry's only writer.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Final, TypeVar

import msgspec

from fleet_protocol.ops import TerminalList
from provisioning.errors import OpsApiError

DEFAULT_SERVER: Final = "http://127.0.0.1:8700"
SERVER_ENV: Final = "FLEET_SERVER_URL"

T = TypeVar("T")


def default_server() -> str:
    return os.environ.get(SERVER_ENV, DEFAULT_SERVER)


def _get(server: str, path: str, kind: type[T]) -> T:
    url = server.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=15) as response:  # noqa: S310 - http(s) only, checked below
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise OpsApiError(f"fleet server at {server} answered {exc.code} for {path}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OpsApiError(
            f"cannot reach the fleet server at {server} ({reason}); is `fleet-server run` "
            f"running there? Point at it with --server URL or ${SERVER_ENV}."
        ) from exc
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise OpsApiError(f"fleet server at {server} sent an unexpected answer: {exc}") from exc


def terminals(server: str) -> TerminalList:
    if not server.startswith(("http://", "https://")):
        raise OpsApiError(f"--server must be an http:// or https:// URL, not {server!r}")
    return _get(server, "/api/v1/terminals", TerminalList)


def to_json(value: object) -> str:
    return json.dumps(msgspec.to_builtins(value), ensure_ascii=False, indent=2)
