"""Adapter: the ops API's fleet routes (aiohttp web): sites, the alert log, acknowledgements,
and the signed acknowledge links that alert e-mails carry.

POST /api/v1/sites                  import sites: a JSON list of Site -> SitesImported
GET  /api/v1/sites                  every imported site (a JSON list of Site)
GET  /api/v1/sites/{id}             one site; 404 when unknown
GET  /api/v1/alerts?limit=N         the alert log, newest first (AlertLog)
POST /api/v1/alerts/{alert_id}/ack  AckRequest -> 202 {"queued": true}
GET  /ack/{token}                   the page an e-mail link opens: the alert and one button
POST /ack/{token}                   that button: acknowledges the alert

A JSON error answers ``{"error": "..."}`` in words ops can act on. Acknowledgements are only
queued in the registry: the alerting engine, in whichever process holds its lease, takes them
within a tick or two and ignores ids it does not know.

``GET /ack/{token}`` changes nothing: mail scanners and link previews fetch every link in a
message, and an alert must not be acknowledged by a virus scanner. Only the form's POST does.
The link routes exist only when the server has an acknowledge secret.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import msgspec
from aiohttp import web

from fleet_protocol.ops import AckRequest, AlertEntry, AlertLog, SitesImported
from fleet_protocol.sites import InvalidSite, Site, check_text
from fleet_server.ack_links import (
    MIN_SECRET_BYTES,
    AckLinkExpired,
    AckLinkInvalid,
    verify_ack_token,
)
from fleet_server.errors import RegistryError
from fleet_server.mail_message import local_time
from fleet_server.registry import Registry

__all__ = ["LINK_ACTOR", "MAX_ALERTS", "MAX_SITES_BODY", "add_fleet_routes"]

#: A sites import of several thousand sites is well under this.
MAX_SITES_BODY: Final = 5 * 1024 * 1024
MAX_ACK_BODY: Final = 4096
DEFAULT_ALERTS: Final = 100
MAX_ALERTS: Final = 5000
#: Who an acknowledgement through an e-mail link is recorded as.
LINK_ACTOR: Final = "e-mail link"

CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

_encoder = msgspec.json.Encoder()
_sites_decoder = msgspec.json.Decoder(list[Site])
_ack_decoder = msgspec.json.Decoder(AckRequest)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BadRequest(Exception):
    """The request body cannot be used; the message says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status, content_type="application/json")


def _error(message: str, status: int) -> web.Response:
    return _json({"error": message}, status)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused past ``limit`` bytes (the application's own cap is lower
    than a large sites import, so the stream is read here)."""
    too_large = _BadRequest(f"the body is larger than {limit} bytes", 413)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    while chunk := await request.content.read(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _json_api(handler: Handler) -> Handler:
    """Answer a bad request or an unavailable registry as ``{"error": ...}``."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _BadRequest as exc:
            return _error(str(exc), exc.status)
        except RegistryError as exc:
            return _error(f"the registry is not available: {exc}", 503)

    return answer


# --- the JSON routes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Api:
    registry: Registry
    clock: Callable[[], int]

    async def import_sites(self, request: web.Request) -> web.StreamResponse:
        body = await _read_body(request, MAX_SITES_BODY)
        try:
            sites = _sites_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise _BadRequest(f"invalid site: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise _BadRequest(f"the body is not a JSON list of sites: {exc}") from exc
        seen: set[str] = set()
        for n, site in enumerate(sites):
            if site.id in seen:
                raise _BadRequest(f"site id {site.id} appears twice - at `$[{n}].id`")
            seen.add(site.id)
        added, updated = await self.registry.import_sites(sites)
        return _json(SitesImported(added=added, updated=updated))

    async def sites(self, _: web.Request) -> web.StreamResponse:
        return _json(await self.registry.sites())

    async def site(self, request: web.Request) -> web.StreamResponse:
        wanted = request.match_info["id"]
        for site in await self.registry.sites():
            if site.id == wanted:
                return _json(site)
        return _error(
            f"no site {wanted!r} has been imported; `fleetctl sites list` shows them", 404
        )

    async def alerts(self, request: web.Request) -> web.StreamResponse:
        text = request.query.get("limit", str(DEFAULT_ALERTS))
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_ALERTS:
            raise _BadRequest(f"limit: {text!r} is not a whole number from 1 to {MAX_ALERTS}")
        entries = await self.registry.alert_log(int(text))
        return _json(
            AlertLog(entries=msgspec.convert(entries, list[AlertEntry], from_attributes=True))
        )

    async def ack(self, request: web.Request) -> web.StreamResponse:
        alert_id = request.match_info["alert_id"]
        body = await _read_body(request, MAX_ACK_BODY)
        try:
            who = _ack_decoder.decode(body).who
            check_text("alert_id", alert_id)
            check_text("who", who)
        except (msgspec.DecodeError, InvalidSite) as exc:  # ValidationError is a DecodeError
            raise _BadRequest(f"invalid acknowledgement: {exc}") from exc
        await self.registry.ask_ack(alert_id, who, self.clock())
        return _json({"queued": True}, 202)


# --- acknowledge links (HTML) ---------------------------------------------------------------

_STYLE: Final = """
body { margin: 0; padding: 1rem; background: #f2f4f7; color: #1b1b1b;
  font: 18px/1.6 system-ui, "PingFang SC", "Microsoft YaHei", sans-serif; }
main { max-width: 34rem; margin: 1rem auto; padding: 1.5rem; background: #fff;
  border-radius: 12px; box-shadow: 0 1px 4px rgba(0, 0, 0, .12); }
h1 { margin: 0 0 .25rem; font-size: 1.5rem; }
.en { color: #555; font-size: .95rem; }
.alert { margin: 1rem 0; padding: .75rem 1rem; background: #f6f8fb; border-radius: 8px; }
code { word-break: break-all; }
button { display: block; width: 100%; min-height: 3.5rem; margin-top: 1.5rem; border: 0;
  border-radius: 10px; background: #1459b8; color: #fff; font-size: 1.25rem; cursor: pointer; }
button:active { background: #0e3f84; }
.done h1 { color: #1b7a38; }
.refused h1 { color: #a5281b; }
"""

#: What each alert kind is called on the page (ids are ``kind:subject:opened_at_ms``).
_KINDS: Final = {
    "terminal-offline": ("终端离线", "terminal offline"),
    "terminal-flapping": ("终端频繁掉线", "terminal keeps dropping off"),
    "peripherals": ("外设故障", "peripheral faults"),
    "site-offline": ("点位全部终端离线", "every terminal of the site offline"),
    "district-outage": ("区内多台终端离线", "many terminals of the district offline"),
}


def _page(status: int, css_class: str, title: str, content: str) -> web.Response:
    """``title`` and ``content`` are HTML: every value in them was escaped by the caller."""
    text = (
        '<!doctype html>\n<html lang="zh-CN">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex">\n'
        f"<title>{title}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f'<body>\n<main class="{css_class}">\n{content}\n</main>\n</body>\n</html>\n'
    )
    return web.Response(
        text=text,
        status=status,
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",  # the token is in the URL
            "X-Content-Type-Options": "nosniff",
        },
    )


def _alert_box(alert_id: str) -> str:
    kind, _, rest = alert_id.partition(":")
    subject, _, opened = rest.rpartition(":")
    lines = []
    if kind in _KINDS and subject and opened.isascii() and opened.isdigit():
        zh, en = _KINDS[kind]
        since = html.escape(local_time(int(opened)))
        lines.append(f"<div>{zh}：{html.escape(subject)}，自 {since} 起</div>")
        lines.append(f'<div class="en">{en}: {html.escape(subject)}, since {since}</div>')
    lines.append(f'<div class="en">告警编号 alert id: <code>{html.escape(alert_id)}</code></div>')
    return '<div class="alert">' + "".join(lines) + "</div>"


def _confirm_page(alert_id: str) -> web.Response:
    # No action attribute: the form posts back to this very URL, behind any proxy prefix.
    return _page(
        200,
        "confirm",
        "确认告警 / Acknowledge alert",
        "<h1>确认已知晓此告警？</h1>\n"
        '<p class="en">Acknowledge this alert?</p>\n'
        f"{_alert_box(alert_id)}\n"
        "<p>确认后不再发送提醒，也不会升级给区运维；终端恢复时仍会发送恢复通知。</p>\n"
        '<p class="en">Once acknowledged, there are no more reminders and no escalation to '
        "district ops; you still get the notice when it is resolved.</p>\n"
        '<form method="post"><button type="submit">确认已知晓 / Acknowledge</button></form>',
    )


def _done_page(alert_id: str) -> web.Response:
    return _page(
        200,
        "done",
        "已确认 / Acknowledged",
        "<h1>已确认</h1>\n"
        '<p class="en">Acknowledged</p>\n'
        f"{_alert_box(alert_id)}\n"
        "<p>谢谢。系统将在几秒内停止提醒。可以关闭此页面。</p>\n"
        '<p class="en">Thank you. Reminders stop within seconds. You can close this page.</p>',
    )


def _refused_page(status: int, zh: str, en: str, advice_zh: str, advice_en: str) -> web.Response:
    return _page(
        status,
        "refused",
        f"{zh} / {en}",
        f'<h1>{zh}</h1>\n<p class="en">{html.escape(en)}</p>\n'
        f"<p>{advice_zh}</p>\n"
        f'<p class="en">{html.escape(advice_en)}</p>',
    )


def _invalid_page() -> web.Response:
    return _refused_page(
        403,
        "链接无效",
        "This link is not valid",
        "请使用告警邮件中的完整链接；如仍无法确认，请联系区运维。",
        "Use the complete link from the alert e-mail; if that does not work, contact district ops.",
    )


def _expired_page(exc: AckLinkExpired) -> web.Response:
    return _refused_page(
        410,
        "链接已过期",
        "This link has expired",
        "确认链接只在一段时间内有效。如告警仍未处理，请联系区运维。",
        f"{_sentence(str(exc))} If the alert still needs attention, contact district ops.",
    )


def _sentence(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}."


def _unavailable_page() -> web.Response:
    return _refused_page(
        503,
        "暂时无法确认",
        "Cannot acknowledge right now",
        "系统暂时无法处理，请稍后再点一次按钮。",
        "The server cannot record it at the moment; press the button again in a minute.",
    )


@dataclass(frozen=True, slots=True)
class _AckLink:
    registry: Registry
    secret: bytes
    clock: Callable[[], int]

    async def show(self, request: web.Request) -> web.StreamResponse:
        """The page behind the link; no side effect (see the module docstring)."""
        try:
            alert_id = verify_ack_token(request.match_info["token"], self.secret, self.clock())
        except AckLinkExpired as exc:
            return _expired_page(exc)
        except AckLinkInvalid:
            return _invalid_page()
        return _confirm_page(alert_id)

    async def acknowledge(self, request: web.Request) -> web.StreamResponse:
        now = self.clock()
        try:
            alert_id = verify_ack_token(request.match_info["token"], self.secret, now)
        except AckLinkExpired as exc:
            return _expired_page(exc)
        except AckLinkInvalid:
            return _invalid_page()
        try:
            await self.registry.ask_ack(alert_id, LINK_ACTOR, now)
        except RegistryError:
            return _unavailable_page()
        return _done_page(alert_id)


# --- wiring ---------------------------------------------------------------------------------


def add_fleet_routes(
    app: web.Application,
    registry: Registry,
    *,
    ack_secret: bytes | None,
    clock: Callable[[], int],
) -> None:
    """Add the routes above to the ops API ``app``. ``clock`` is the wall clock in ms since
    the epoch; ``ack_secret`` verifies acknowledge links (None: no link routes, so 404)."""
    if ack_secret is not None and len(ack_secret) < MIN_SECRET_BYTES:
        raise ValueError(f"ack link secret must be at least {MIN_SECRET_BYTES} bytes")
    api = _Api(registry, clock)
    app.router.add_post("/api/v1/sites", _json_api(api.import_sites))
    app.router.add_get("/api/v1/sites", _json_api(api.sites))
    app.router.add_get("/api/v1/sites/{id}", _json_api(api.site))
    app.router.add_get("/api/v1/alerts", _json_api(api.alerts))
    app.router.add_post("/api/v1/alerts/{alert_id}/ack", _json_api(api.ack))
    if ack_secret is not None:
        link = _AckLink(registry, ack_secret, clock)
        app.router.add_get("/ack/{token}", link.show)
        app.router.add_post("/ack/{token}", link.acknowledge)
