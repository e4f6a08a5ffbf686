"""Adapter: the status page over aiohttp web, rendered with jinja2. The only module of the page
that imports either.

Routes (all answer only to the page's own names, see :func:`_host_problem`):

- ``GET /``                    the status, refreshing itself every 10 s; works without JavaScript
- ``GET /login``, ``POST /login``   staff choose their name and type their passcode
- ``POST /logout``
- ``GET /confirm/{action}``    what exactly will happen, with a confirm button (logged in only)
- ``POST /do/{action}``        runs it and shows the outcome (logged in, with the form token)
- ``GET /lang/{zh|en}``        the language cookie, then back

GET never changes the kiosk: only POST acts, and every POST must carry the form token of the
session (or, for the login form, of the browser) and must not come from another site.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hmac
import ipaddress
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import jinja2
from aiohttp import hdrs, web

from edge_agent.errors import AgentError
from edge_agent.status_model import (
    ActionKind,
    ActionOutcome,
    PeripheralView,
    StaffActions,
    StatusSnapshot,
    StatusSource,
    Words,
)
from edge_agent.status_page import texts
from edge_agent.status_page.staff import (
    LoginThrottle,
    StaffAccount,
    StaffSession,
    StaffSessions,
    StatusPageSettings,
    verify_staff,
)
from edge_agent.status_page.texts import TEXT

Lang = Literal["zh", "en"]

#: Forms carry a name, a passcode and two tokens; nothing larger is ever posted here.
MAX_REQUEST_BYTES: Final = 16 * 1024
REFRESH_S: Final = 10
EVENTS_SHOWN: Final = 20

SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

_LANG_COOKIE: Final = "kiosk_lang"
# Browsers keep cookies per host, not per port: several agents on one machine (fleet-sim, a test)
# would log each other out if their cookies shared a name.
_SESSION_COOKIE: Final = "kiosk_session_{port}"
_FORM_COOKIE: Final = "kiosk_form_{port}"
_LOCAL_PATH: Final = re.compile(r"^/(?!/)[A-Za-z0-9_\-/.?=&%]*\Z")
_HOST_HEADER: Final = re.compile(
    r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.-]+))(?::(?P<port>[0-9]{1,5}))?"
)


class StatusPageError(AgentError):
    """The status page cannot listen where it is configured to."""


@dataclass(slots=True)
class _Page:
    """Everything the handlers share; one per app, so many agents can run in one process."""

    settings: StatusPageSettings
    source: StatusSource
    actions: StaffActions
    log: logging.Logger
    sessions: StaffSessions
    throttle: LoginThrottle
    names: frozenset[str]
    # One login checked at a time: the lock count stays exact under parallel guesses, and
    # scrypt never takes more than one core of the kiosk.
    login_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


PAGE: Final = web.AppKey("status_page", _Page)


@functools.cache
def _templates() -> jinja2.Environment:
    # Shared by every app in the process: templates are read and compiled once.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("edge_agent.status_page", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


# --- requests -------------------------------------------------------------------------------


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2 and isinstance(sockname[1], int):
        return sockname[1]
    return None


def _cookie(request: web.Request, pattern: str) -> str:
    return pattern.format(port=_local_port(request) or 0)


def _lang(request: web.Request) -> Lang:
    return "en" if request.cookies.get(_LANG_COOKIE) == "en" else "zh"


def _local_path(value: str | None, default: str = "/") -> str:
    """``value`` if it is a path on this page (never another site), else ``default``."""
    return value if value and _LOCAL_PATH.fullmatch(value) else default


def _split_host(value: str) -> tuple[str, int | None] | None:
    """(name, port) of a Host header; None when it is not a well-formed one."""
    match = _HOST_HEADER.fullmatch(value.lower())
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else None
    if port is not None and port > 65535:
        return None
    if match["v6"] is None:
        return match["name"].removesuffix("."), port
    try:
        return str(ipaddress.IPv6Address(match["v6"])), port
    except ValueError:
        return None


def _host_problem(request: web.Request, names: frozenset[str]) -> int | None:
    """The status to refuse the request with when its Host is not one of this page's; else None.

    A page that answers to any Host can be driven by another web site through DNS rebinding.
    """
    header = request.headers.get(hdrs.HOST)
    split = _split_host(header) if header else None
    if split is None:
        return 400
    name, port = split
    local_port = _local_port(request)
    if name not in names or local_port is None or (port or 80) != local_port:
        return 421
    return None


def _same_origin(request: web.Request) -> bool:
    """False when the browser says the request came from another site.

    Browsers send Origin with every POST; Referer is the fallback for older ones. A client that
    sends neither is not a browser, so cross-site forgery is not in question; the form token
    still decides.
    """
    host = (request.headers.get(hdrs.HOST) or "").lower()
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None:
        return origin.lower() == f"http://{host}"
    referer = request.headers.get(hdrs.REFERER)
    if referer is not None:
        parts = urllib.parse.urlsplit(referer)
        return parts.scheme == "http" and parts.netloc.lower() == host
    return True


def _field(form: Mapping[str, object], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _same_token(given: str, expected: str | None) -> bool:
    return bool(given) and expected is not None and hmac.compare_digest(given, expected)


def _session(request: web.Request, *, activity: bool = False) -> StaffSession | None:
    page = request.app[PAGE]
    return page.sessions.get(
        request.cookies.get(_cookie(request, _SESSION_COOKIE)), activity=activity
    )


def _session_ended(request: web.Request) -> bool:
    """The browser holds a session cookie that no longer opens a session."""
    return _cookie(request, _SESSION_COOKIE) in request.cookies and _session(request) is None


def _set_cookie(response: web.StreamResponse, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, path="/", httponly=True, samesite="Strict", max_age=max_age)


# --- rendering ------------------------------------------------------------------------------


def _clock_time(ts_ms: int) -> str:
    """Wall-clock time on the kiosk's own time zone, as staff read it off the wall."""
    return dt.datetime.fromtimestamp(ts_ms / 1000).astimezone().strftime("%m-%d %H:%M:%S")


def _render(
    request: web.Request,
    template: str,
    *,
    status: int = 200,
    session: StaffSession | None = None,
    here: str | None = None,
    **context: object,
) -> web.Response:
    page = request.app[PAGE]
    lang = _lang(request)

    def tr(words: Words | None) -> str:
        return "" if words is None else words.in_language(lang)

    html = (
        _templates()
        .get_template(template)
        .render(
            lang=lang,
            tr=tr,
            text=TEXT,
            texts=texts,
            session=session,
            read_only=page.settings.read_only,
            # After a POST, switching language goes back to the status, not to the action.
            here=here or (_local_path(request.path_qs) if request.method == "GET" else "/"),
            colon=": " if lang == "en" else "：",
            Action=ActionKind,
            clock_time=_clock_time,
            **context,
        )
    )
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _message(
    request: web.Request, status: int, words: Words, *, session: StaffSession | None = None
) -> web.Response:
    return _render(request, "message.html", status=status, message=words, session=session)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={hdrs.LOCATION: location})


def _to_login(request: web.Request, next_path: str) -> web.Response:
    query = {"next": next_path}
    if _session_ended(request):
        query["ended"] = "1"
    return _see_other(f"/login?{urllib.parse.urlencode(query)}")


# --- middleware and headers -----------------------------------------------------------------


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    page = request.app[PAGE]
    refused = _host_problem(request, page.names)
    if refused is not None:
        page.log.warning(
            "status page: refused %s %s with Host %r from %s",
            request.method,
            request.path,
            request.headers.get(hdrs.HOST),
            request.remote,
        )
        return web.Response(
            status=refused, text=f"{TEXT.bad_host.zh}\n{TEXT.bad_host.en}\n", charset="utf-8"
        )
    if request.method not in ("GET", "HEAD") and not _same_origin(request):
        page.log.warning(
            "status page: refused cross-site %s %s (Origin %r, Referer %r) from %s",
            request.method,
            request.path,
            request.headers.get(hdrs.ORIGIN),
            request.headers.get(hdrs.REFERER),
            request.remote,
        )
        return _message(request, 403, TEXT.cross_site)
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _message(request, 404, TEXT.not_found)
    except web.HTTPMethodNotAllowed as exc:
        response = _message(request, 405, TEXT.not_allowed)
        response.headers[hdrs.ALLOW] = ",".join(sorted(exc.allowed_methods))
        return response


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


# --- handlers -------------------------------------------------------------------------------


async def _status(request: web.Request) -> web.Response:
    page = request.app[PAGE]
    snapshot = page.source.snapshot()
    level, headline = texts.verdict(snapshot)
    return _render(
        request,
        "status.html",
        session=_session(request),
        snapshot=snapshot,
        level=level,
        headline=headline,
        concerns=texts.concerns(snapshot),
        events=snapshot.events[:EVENTS_SHOWN],
        refresh_s=REFRESH_S,
    )


def _login_page(
    request: web.Request,
    *,
    status: int = 200,
    problem: Words | None = None,
    chosen: str = "",
    next_path: str = "/",
) -> web.Response:
    page = request.app[PAGE]
    name = _cookie(request, _FORM_COOKIE)
    token = request.cookies.get(name) or secrets.token_urlsafe(32)
    response = _render(
        request,
        "login.html",
        status=status,
        staff=[a.name for a in page.settings.staff],
        chosen=chosen,
        problem=problem,
        form_token=token,
        next_path=next_path,
        here=f"/login?{urllib.parse.urlencode({'next': next_path})}",
    )
    _set_cookie(response, name, token, max_age=None)
    return response


async def _login_form(request: web.Request) -> web.Response:
    ended = request.query.get("ended") == "1"
    return _login_page(
        request,
        problem=TEXT.session_ended if ended else None,
        next_path=_local_path(request.query.get("next")),
    )


async def _check_passcode(
    page: _Page, name: str, passcode: str, address: str
) -> tuple[int, Words] | StaffAccount:
    """The account when ``passcode`` is its passcode, else the status and words to refuse with.

    A locked name or address is refused before its passcode is looked at.
    """
    account = page.settings.account(name)
    key = account.name if account else None
    async with page.login_lock:
        locked = page.throttle.locked_for(key, address)
        if locked > 0:
            page.log.warning(
                "status page: login of %r from %s refused: locked for %.0f s more",
                name,
                address,
                locked,
            )
            return 429, texts.lockout(locked)
        matched = await asyncio.to_thread(verify_staff, passcode, account)
        if matched and account is not None:
            page.throttle.succeeded(account.name, address)
            return account
        lock_s = page.throttle.failed(key, address)
    if lock_s > 0:
        page.log.warning(
            "status page: wrong passcode for %r from %s; locked for %.0f s", name, address, lock_s
        )
        return 429, texts.lockout(lock_s)
    page.log.warning("status page: wrong passcode for %r from %s", name, address)
    return 401, texts.wrong_passcode(page.throttle.attempts_left(key, address))


async def _login(request: web.Request) -> web.Response:
    page = request.app[PAGE]
    if page.settings.read_only:
        return _login_page(request, status=403)
    form = await request.post()
    form_cookie = request.cookies.get(_cookie(request, _FORM_COOKIE))
    if not _same_token(_field(form, "form_token"), form_cookie):
        page.log.warning("status page: login form without its token from %s", request.remote)
        return _login_page(request, status=403, problem=TEXT.form_expired)
    name = _field(form, "staff")
    if not name:
        return _login_page(request, status=400, problem=TEXT.choose_staff)
    address = request.remote or "?"
    next_path = _local_path(_field(form, "next"))
    checked = await _check_passcode(page, name, _field(form, "passcode"), address)
    if isinstance(checked, tuple):
        status, problem = checked
        return _login_page(
            request, status=status, problem=problem, chosen=name, next_path=next_path
        )
    old = request.cookies.get(_cookie(request, _SESSION_COOKIE))
    if old:
        page.sessions.close(old)
    session = page.sessions.open(checked.name)
    page.log.info("status page: %s logged in from %s", checked.name, address)
    response = _see_other(next_path)
    _set_cookie(response, _cookie(request, _SESSION_COOKIE), session.token, max_age=None)
    return response


async def _logout(request: web.Request) -> web.Response:
    page = request.app[PAGE]
    session = _session(request)
    if session is None:
        return _see_other("/")
    form = await request.post()
    if not _same_token(_field(form, "csrf"), session.csrf):
        page.log.warning("status page: logout without its form token from %s", request.remote)
        return _message(request, 403, TEXT.form_expired, session=session)
    page.sessions.close(session.token)
    page.log.info("status page: %s logged out", session.staff)
    response = _see_other("/")
    response.del_cookie(_cookie(request, _SESSION_COOKIE), path="/")
    return response


def _action(request: web.Request) -> ActionKind:
    try:
        return ActionKind(request.match_info["action"])
    except ValueError:
        raise web.HTTPNotFound from None


def _target(
    snapshot: StatusSnapshot, kind: ActionKind, peripheral_id: str
) -> tuple[bool, PeripheralView | None]:
    """(allowed, peripheral): whether ``kind`` may be done to ``peripheral_id`` on this kiosk."""
    if kind in (ActionKind.REBOOT_TERMINAL, ActionKind.RESTART_APP):
        return not peripheral_id, None
    found = next((p for p in snapshot.peripherals if p.id == peripheral_id), None)
    if found is None:
        return False, None
    if kind is ActionKind.POWER_CYCLE:
        return found.power_channel is not None, found
    return found.printable, found


async def _confirm(request: web.Request) -> web.Response:
    page = request.app[PAGE]
    kind = _action(request)
    session = _session(request, activity=True)
    if session is None:
        return _to_login(request, _local_path(request.path_qs))
    snapshot = page.source.snapshot()
    if snapshot.planned is not None:
        return _message(
            request,
            409,
            texts.sentences(snapshot.planned, TEXT.planned_no_actions),
            session=session,
        )
    peripheral_id = request.query.get("peripheral", "")
    allowed, peripheral = _target(snapshot, kind, peripheral_id)
    if not allowed:
        raise web.HTTPNotFound
    return _render(
        request,
        "confirm.html",
        session=session,
        kind=kind,
        peripheral=peripheral,
        description=texts.action_description(kind, peripheral),
    )


async def _run(
    actions: StaffActions, kind: ActionKind, peripheral_id: str, actor: str
) -> ActionOutcome:
    match kind:
        case ActionKind.REBOOT_TERMINAL:
            return await actions.reboot_terminal(actor=actor)
        case ActionKind.RESTART_APP:
            return await actions.restart_app(actor=actor)
        case ActionKind.POWER_CYCLE:
            return await actions.power_cycle(peripheral_id, actor=actor)
        case ActionKind.PRINT_TEST:
            return await actions.print_test_ticket(peripheral_id, actor=actor)


async def _do(request: web.Request) -> web.Response:
    page = request.app[PAGE]
    kind = _action(request)
    session = _session(request, activity=True)
    if session is None:
        page.log.warning("status page: %s from %s without a live login", kind, request.remote)
        return _to_login(request, "/")
    form = await request.post()
    if not _same_token(_field(form, "csrf"), session.csrf):
        page.log.warning("status page: %s by %s refused: no valid form token", kind, session.staff)
        return _message(request, 403, TEXT.form_expired, session=session)
    snapshot = page.source.snapshot()
    if snapshot.planned is not None:
        return _message(
            request,
            409,
            texts.sentences(snapshot.planned, TEXT.planned_no_actions),
            session=session,
        )
    peripheral_id = _field(form, "peripheral")
    allowed, peripheral = _target(snapshot, kind, peripheral_id)
    if not allowed:
        raise web.HTTPNotFound
    what = f"{kind}({peripheral_id})" if peripheral_id else str(kind)
    page.log.info("status page: %s asks for %s", session.staff, what)
    try:
        outcome = await _run(page.actions, kind, peripheral_id, session.staff)
    except AgentError as exc:
        page.log.warning("status page: %s for %s failed: %s", what, session.staff, exc)
        outcome = ActionOutcome(ok=False, message=TEXT.action_error)
    page.log.info(
        "status page: %s for %s %s: %s",
        what,
        session.staff,
        "done" if outcome.ok else "failed",
        outcome.message.en,
    )
    return _render(
        request,
        "outcome.html",
        session=session,
        kind=kind,
        peripheral=peripheral,
        outcome=outcome,
    )


async def _set_lang(request: web.Request) -> web.Response:
    lang = request.match_info["lang"]
    if lang not in ("zh", "en"):
        raise web.HTTPNotFound
    response = _see_other(_local_path(request.query.get("next")))
    _set_cookie(response, _LANG_COOKIE, lang, max_age=365 * 86400)
    return response


# --- the app and its sockets ----------------------------------------------------------------


def _allowed_names(settings: StatusPageSettings) -> frozenset[str]:
    addresses = {str(ipaddress.ip_address(a)) for a in settings.listen}
    return frozenset({"localhost", *addresses, *settings.server_names})


def make_app(
    settings: StatusPageSettings,
    source: StatusSource,
    actions: StaffActions,
    logger: logging.Logger,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The status page; serve it with :func:`running`."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_guard])
    app[PAGE] = _Page(
        settings=settings,
        source=source,
        actions=actions,
        log=logger,
        sessions=StaffSessions(
            idle_s=settings.session_idle_s, max_s=settings.session_max_s, clock=clock
        ),
        throttle=LoginThrottle(
            limit=settings.lockout_after, lock_s=settings.lockout_s, clock=clock
        ),
        names=_allowed_names(settings),
    )
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", _status)
    app.router.add_get("/login", _login_form)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/confirm/{action}", _confirm)
    app.router.add_post("/do/{action}", _do)
    app.router.add_get("/lang/{lang}", _set_lang)
    # Compile the templates now rather than inside the first request.
    for name in ("status.html", "login.html", "confirm.html", "outcome.html", "message.html"):
        _templates().get_template(name)
    return app


@dataclass(frozen=True, slots=True)
class Listening:
    """Where the page is reachable: one (address, port) per configured listen address."""

    sockets: tuple[tuple[str, int], ...]
    #: Listen addresses that could not be bound, with why (e.g. the LAN address is gone).
    failed: tuple[tuple[str, str], ...] = ()

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(port for _, port in self.sockets)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(
            f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
            for host, port in self.sockets
        )


async def _bind(runner: web.AppRunner, address: str, port: int) -> tuple[str, int] | str:
    """The bound (address, port), or why it cannot be bound."""
    site = web.TCPSite(runner, address, port)
    try:
        await site.start()
    except OSError as exc:
        await site.stop()
        return exc.strerror or str(exc)
    host, bound_port = runner.addresses[-1][:2]
    return str(host), int(bound_port)


@contextlib.asynccontextmanager
async def running(app: web.Application, settings: StatusPageSettings) -> AsyncIterator[Listening]:
    """Serve ``app`` on every listen address of ``settings`` until the block ends.

    An address that cannot be bound is logged and skipped (a kiosk whose LAN address changed
    still shows the page on its own screen); :class:`StatusPageError` when none can be.
    """
    log = app[PAGE].log
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    try:
        sockets: list[tuple[str, int]] = []
        failed: list[tuple[str, str]] = []
        for address in settings.listen:
            bound = await _bind(runner, address, settings.port)
            if isinstance(bound, str):
                log.error(
                    "status page cannot listen on %s port %d: %s; check [status_page] listen "
                    "and port",
                    address,
                    settings.port,
                    bound,
                )
                failed.append((address, bound))
            else:
                sockets.append(bound)
        if not sockets:
            raise StatusPageError(
                "the status page cannot listen on any of its addresses ("
                + "; ".join(f"{a}: {r}" for a, r in failed)
                + "); check [status_page] listen and port"
            )
        yield Listening(tuple(sockets), tuple(failed))
    finally:
        await runner.cleanup()
