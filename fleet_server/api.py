"""Adapter: the ops HTTP API (aiohttp web). Read-only for now; loopback by default.

GET /healthz              200 when the broker subscription is up, else 503
GET /api/v1/terminals     every terminal with status and last seen (TerminalList)
GET /api/v1/ingest        ingest counters: messages, rejects by terminal and reason, writes
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from fleet_protocol.ops import TerminalList
from fleet_server.errors import FleetServerError
from fleet_server.registry import Registry


class IngestStats(msgspec.Struct, frozen=True, kw_only=True):
    received: dict[str, int]
    rejected: dict[str, dict[str, int]]
    points_written: int
    batches_written: int
    write_retries: int
    points_rejected: int
    broker_connected: bool


REGISTRY = web.AppKey("registry", Registry)
STATS: web.AppKey[Callable[[], IngestStats]] = web.AppKey("stats")
HEALTHY: web.AppKey[Callable[[], bool]] = web.AppKey("healthy")

_encoder = msgspec.json.Encoder()


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status, content_type="application/json")


async def _terminals(request: web.Request) -> web.Response:
    return _json(TerminalList(terminals=await request.app[REGISTRY].terminals()))


async def _ingest(request: web.Request) -> web.Response:
    return _json(request.app[STATS]())


async def _healthz(request: web.Request) -> web.Response:
    ok = request.app[HEALTHY]()
    return _json({"ok": ok}, status=200 if ok else 503)


def make_app(
    registry: Registry, stats: Callable[[], IngestStats], healthy: Callable[[], bool]
) -> web.Application:
    app = web.Application()
    app[REGISTRY] = registry
    app[STATS] = stats
    app[HEALTHY] = healthy
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/api/v1/terminals", _terminals)
    app.router.add_get("/api/v1/ingest", _ingest)
    return app


async def serve(app: web.Application, host: str, port: int) -> Callable[[], Awaitable[None]]:
    """Start serving ``app``; returns the coroutine function that stops it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise FleetServerError(
            f"ops API cannot listen on {host}:{port}: {exc.strerror}; set [api] port to a free one"
        ) from exc
    return runner.cleanup
