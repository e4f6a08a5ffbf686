"""InfluxDB adapter: the one fleet_server module that talks HTTP to InfluxDB (aiohttp).

Only the v1 HTTP API is used: line protocol to ``POST /write`` and InfluxQL to ``POST /query``.
InfluxDB 1.x serves it natively and 2.x/3.x as their v1 compatibility API (a token goes in
``Authorization: Token ...``), so one code path serves all three. Times are milliseconds both
ways: writes use ``precision=ms`` and queries ``epoch=ms``.

Errors are translated here, and only here, into the fleet server's tree:

- `InfluxUnavailable`: cannot connect, connection dropped, timed out, 5xx, 408 or 429 (the
  server asked to be retried), or an answer that is not InfluxDB's JSON. Retrying may help.
- `InfluxRejected`: any other 4xx (bad line protocol, a field that changed type, unknown
  database, bad credentials, InfluxQL syntax) and a statement error inside a 200 answer.
  Retrying the same request will not help. The message carries the server's own error text.

Neither message ever contains the token or URL credentials.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import Final, Self

import aiohttp
import msgspec
from yarl import URL

from fleet_server.errors import ConfigError, InfluxRejected, InfluxUnavailable

__all__ = ["Cell", "InfluxDB", "Series", "quote_ident", "quote_literal"]

Cell = float | int | str | bool | None
"""One value in a result row, as InfluxDB's JSON gives it.

A float field holding a whole number comes back as an int (the server writes ``1.0`` as
``1``); ``time`` is an int in ms; a column the row has no value for is None.
"""

_RETRY_LATER_4XX: Final = frozenset({408, 429})
_DETAIL_CHARS: Final = 500
_INFLUXQL_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\n": "\\n"})
_UNQUOTABLE: Final = re.compile("[\x00\r]")


class Series(msgspec.Struct, frozen=True):
    """One series of a query result: ``GROUP BY`` tags, column names and rows."""

    name: str = ""
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    columns: tuple[str, ...] = ()
    values: tuple[tuple[Cell, ...], ...] = ()


class _StatementResult(msgspec.Struct, frozen=True):
    statement_id: int = 0
    series: tuple[Series, ...] = ()
    error: str | None = None


class _QueryResponse(msgspec.Struct, frozen=True):
    results: tuple[_StatementResult, ...] = ()
    error: str | None = None


class _ErrorBody(msgspec.Struct, frozen=True):
    error: str


_query_decoder: Final = msgspec.json.Decoder(_QueryResponse)
_error_decoder: Final = msgspec.json.Decoder(_ErrorBody)


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted InfluxQL identifier (measurement, tag key, field key).

    Raises ValueError for NUL or CR, which InfluxQL cannot quote (see `quote_literal`).
    """
    return '"' + _influxql_escape(name, "identifier").replace('"', '\\"') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a single-quoted InfluxQL string literal, e.g. for ``WHERE "site" = ...``.

    InfluxQL knows the escapes ``\\\\``, ``\\'``, ``\\"`` and ``\\n`` only. Its scanner reads
    NUL as end of input and CR as a line break, and a quoted string cannot span lines, so a
    value with NUL or CR cannot be written at all (InfluxDB 1.6.7: 400 "error parsing query"); that
    raises ValueError. Nothing `fleet_server.lineproto` accepts as a tag value contains them.
    """
    return "'" + _influxql_escape(value, "string literal").replace("'", "\\'") + "'"


def _influxql_escape(text: str, what: str) -> str:
    bad = _UNQUOTABLE.search(text)
    if bad is not None:
        raise ValueError(
            f"InfluxQL cannot quote {bad.group()!r} (at {bad.start()}) in a {what}: {text!r}"
        )
    return text.translate(_INFLUXQL_ESCAPES)


class InfluxDB:
    """A connection pool to one InfluxDB database; use as ``async with InfluxDB(...) as db``.

    ``url`` is the server's base URL (``http://127.0.0.1:8086``, or one with a path prefix
    behind a proxy). ``timeout_s`` bounds each whole request, connecting included.
    """

    def __init__(
        self, url: str, database: str, *, token: str | None = None, timeout_s: float = 10.0
    ) -> None:
        usage = f"InfluxDB URL {url!r} must be http(s)://host[:port][/path], without a query"
        try:
            base = URL(url)
        except ValueError as exc:
            raise ConfigError(f"{usage}: {exc}") from exc
        if (
            base.scheme not in {"http", "https"}
            or not base.host
            or base.query_string
            or base.fragment
        ):
            raise ConfigError(usage)
        if not database:
            raise ConfigError("InfluxDB database name is empty")
        if not timeout_s > 0:
            raise ConfigError(f"InfluxDB timeout must be positive, not {timeout_s!r}")
        self._base = base
        self._shown = str(base.with_user(None))
        self._database = database
        self._token = token
        self._timeout_s = timeout_s
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        """The base URL, without any credentials it was given."""
        return self._shown

    @property
    def database(self) -> str:
        return self._database

    async def __aenter__(self) -> Self:
        if self._http is not None:
            raise RuntimeError("this InfluxDB is already open")
        headers = {} if self._token is None else {"Authorization": f"Token {self._token}"}
        self._http = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self._timeout_s)
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    async def ping(self) -> bool:
        """True if the server answers its health check with 2xx within the timeout."""
        try:
            async with self._session().get(self._base / "ping") as response:
                return 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def ensure_database(self) -> None:
        """Create the database unless it exists.

        InfluxDB 1.x only: 2.x and 3.x create buckets their own way and refuse the statement
        (`InfluxRejected`); point the server at a bucket mapped for the v1 API there instead.
        """
        await self.query(f"CREATE DATABASE {quote_ident(self._database)}")

    async def write(self, body: bytes) -> None:
        """Write line protocol with millisecond timestamps (see `fleet_server.lineproto`)."""
        await self._call(
            "write",
            "write",
            params={"db": self._database, "precision": "ms"},
            data=body,
            headers={"Content-Type": "text/plain; charset=utf-8"},
        )

    async def query(self, influxql: str) -> list[Series]:
        """Run InfluxQL (one or more statements); the series of all statements, in order.

        Build ``WHERE`` clauses with `quote_ident` and `quote_literal`, never by pasting values.
        """
        body = await self._call(
            "query", "query", params={"db": self._database, "epoch": "ms"}, data={"q": influxql}
        )
        try:
            response = _query_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise InfluxUnavailable(
                f"InfluxDB at {self._shown} answered a query with something that is not "
                f"InfluxDB JSON ({exc}): {_clip(body)}"
            ) from exc
        if response.error is not None:
            raise InfluxRejected(f"InfluxDB at {self._shown} refused the query: {response.error}")
        series: list[Series] = []
        for result in response.results:
            if result.error is not None:
                raise InfluxRejected(
                    f"InfluxDB at {self._shown} refused statement {result.statement_id} of "
                    f"the query: {result.error}"
                )
            series.extend(result.series)
        return series

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("use InfluxDB as `async with InfluxDB(...) as influx:`")
        return self._http

    async def _call(
        self,
        what: str,
        endpoint: str,
        *,
        params: dict[str, str],
        data: bytes | dict[str, str],
        headers: dict[str, str] | None = None,
    ) -> bytes:
        """POST to ``endpoint``; the body of a 2xx answer, or the translated error."""
        http = self._session()
        try:
            async with http.post(
                self._base / endpoint, params=params, data=data, headers=headers
            ) as response:
                status, reason = response.status, response.reason or ""
                body = await response.read()
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            raise InfluxUnavailable(
                f"{what} to InfluxDB at {self._shown} timed out after {self._timeout_s:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise InfluxUnavailable(
                f"{what} to InfluxDB at {self._shown} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if 200 <= status < 300:
            return body
        detail = f"{status} {reason}: {_error_text(body)}"
        if 400 <= status < 500 and status not in _RETRY_LATER_4XX:
            raise InfluxRejected(f"InfluxDB at {self._shown} refused the {what}: {detail}")
        raise InfluxUnavailable(f"InfluxDB at {self._shown} failed the {what}: {detail}")


def _error_text(body: bytes) -> str:
    """The server's error message: the ``error`` of its JSON body, else the body itself."""
    try:
        return _clip(_error_decoder.decode(body).error)
    except msgspec.DecodeError:
        return _clip(body)


def _clip(body: bytes | str) -> str:
    """Server text for a message, cut short in the middle: InfluxDB echoes whole (possibly
    huge) lines back as ``unable to parse '<line>': <reason>``, and the reason is at the end."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    text = text.strip()
    if len(text) <= _DETAIL_CHARS:
        return text
    half = _DETAIL_CHARS // 2
    return f"{text[:half]} ...({len(text) - 2 * half} chars)... {text[-half:]}"
