"""Adapter: the ops HTTP API (aiohttp web). Read-only for now; loopback by default.

GET /healthz              200 when the broker subscription is up, else 503
GET /api/v1/terminals     every terminal with status and last seen (TerminalList)
GET /api/v1/ingest        ingest counters: messages, rejects by terminal and reason, writes,
                          the spool, quarantined samples, clock faults, flooding terminals
GET /metrics              the same and more in Prometheus text format (fleet_server.metrics)
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

import msgspec
from aiohttp import web

from fleet_protocol.ops import TerminalList
from fleet_server.errors import FleetServerError
from fleet_server.metrics import CONTENT_TYPE, AlertingView, IngestStats, fleet_families, render
from fleet_server.ops_fleet_api import add_fleet_routes
from fleet_server.registry import Registry

__all__ = ["IngestStats", "make_app", "serve"]

Counts = Callable[[], Mapping[str, int]]

REGISTRY = web.AppKey("registry", Registry)
STATS: web.AppKey[Callable[[], IngestStats]] = web.AppKey("stats")
HEALTHY: web.AppKey[Callable[[], bool]] = web.AppKey("healthy")
TERMINAL_STATES: web.AppKey[Counts | None] = web.AppKey("terminal_states")
MAIL_COUNTERS: web.AppKey[Counts | None] = web.AppKey("mail_counters")
ALERTING: web.AppKey[Callable[[], AlertingView] | None] = web.AppKey("alerting")

_encoder = msgspec.json.Encoder()


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status, content_type="application/json")


async def _terminals(request: web.Request) -> web.Response:
    """The registry's terminals, with what ingest knows of them now: a wrong clock, a flood."""
    views = await request.app[REGISTRY].terminals()
    stats = request.app[STATS]()
    flooding = set(stats.flooding)
    faults = stats.clock_faults
    if flooding or faults:
        views = [
            msgspec.structs.replace(
                v,
                clock_offset_ms=faults[v.id].offset_ms if v.id in faults else None,
                flooding=v.id in flooding,
            )
            if v.id in flooding or v.id in faults
            else v
            for v in views
        ]
    return _json(TerminalList(terminals=views))


async def _ingest(request: web.Request) -> web.Response:
    return _json(request.app[STATS]())


async def _healthz(request: web.Request) -> web.Response:
    ok = request.app[HEALTHY]()
    return _json({"ok": ok}, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    app = request.app
    states = app[TERMINAL_STATES]
    if states is not None:
        by_state = dict(states())
    else:
        by_state = {"online": 0, "offline": 0, "unknown": 0}
        by_state.update(Counter(t.status for t in await app[REGISTRY].terminals()))
    mail, alerting = app[MAIL_COUNTERS], app[ALERTING]
    text = render(
        fleet_families(
            app[STATS](),
            by_state,
            None if mail is None else mail(),
            None if alerting is None else alerting(),
        )
    )
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def make_app(
    registry: Registry,
    stats: Callable[[], IngestStats],
    healthy: Callable[[], bool],
    *,
    terminal_states: Counts | None = None,
    mail_counters: Counts | None = None,
    alerting: Callable[[], AlertingView] | None = None,
    ack_secret: bytes | None = None,
    clock: Callable[[], int] = wall_ms,
) -> web.Application:
    """The ops API. ``terminal_states`` counts terminals by presence state for /metrics (by
    default the registry's online/offline/unknown); ``mail_counters`` are the mailer's
    counters by outcome (sent, failed, ...), when the server sends mail; ``alerting`` the
    alerting loop's counters, when it runs."""
    app = web.Application()
    app[REGISTRY] = registry
    app[STATS] = stats
    app[HEALTHY] = healthy
    app[TERMINAL_STATES] = terminal_states
    app[MAIL_COUNTERS] = mail_counters
    app[ALERTING] = alerting
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/api/v1/terminals", _terminals)
    app.router.add_get("/api/v1/ingest", _ingest)
    app.router.add_get("/metrics", _metrics)
    add_fleet_routes(app, registry, ack_secret=ack_secret, clock=clock)
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
