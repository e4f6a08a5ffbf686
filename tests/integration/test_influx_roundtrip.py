"""Line protocol and the InfluxDB adapter against a real InfluxDB (the stack's influxd 1.6).

Every value the encoder accepts must come back exactly; every value it refuses raises
LineProtocolError before anything is sent. Each test run writes to its own measurements.
"""

from __future__ import annotations

import asyncio
import socket
import unicodedata
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server.errors import ConfigError, InfluxRejected, InfluxUnavailable
from fleet_server.influx import Cell, InfluxDB, Series, quote_ident, quote_literal
from fleet_server.lineproto import (
    MAX_KEY_BYTES,
    MAX_TS_MS,
    MIN_TS_MS,
    LineProtocolError,
    Point,
    encode_point,
    encode_points,
)
from provisioning.stack import StackInfo

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:10]
T = TypeVar("T")

# Characters line protocol and InfluxQL treat specially, and the text kiosks really carry.
_SPECIAL = [
    " ", ",", "=", '"', "'", "\\", "#", "\\,", "\\ ", "\\=", '\\"', "\\\\", "\\n",
    "朱泾镇", " 党群服务中心", "枫泾镇,兴塔村 村委会", "24小时自助服务区", "\u3000", "😀",
]  # fmt: skip
_CONTROL = ["\n", "\t", "\r", "\x00", "\x85"]
_PRINTABLE = st.characters(exclude_categories=["Cc", "Cs"])
# Text with everything but control characters (which names and tags refuse), and any text.
CLEAN_TEXT = st.lists(
    st.one_of(st.sampled_from(_SPECIAL), st.text(_PRINTABLE, max_size=3)), max_size=6
).map("".join)
ANY_TEXT = st.lists(
    st.one_of(st.sampled_from(_SPECIAL + _CONTROL), st.text(max_size=3)), max_size=6
).map("".join)
EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Hypothesis tests are sync: each example runs its async part in a fresh event loop."""
    return asyncio.run(coro)


def rows(series: list[Series]) -> list[dict[str, Cell]]:
    return [dict(zip(s.columns, row, strict=True)) for s in series for row in s.values]


def refused_as_tag_value(value: str) -> bool:
    """The documented rule, independently: control characters and a trailing backslash."""
    return value.endswith("\\") or any(unicodedata.category(c) == "Cc" for c in value)


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- (a) values round-trip exactly, or are refused -------------------------------------------


def test_tag_values_and_string_fields_round_trip_or_are_refused(stack: StackInfo) -> None:
    measurement = f"lp_values_{RUN}"
    outcomes: Counter[str] = Counter()

    async def write_and_read(point: Point, uid: str, site: str) -> list[Series]:
        async with InfluxDB(stack.influx_url, stack.influx_database) as influx:
            await influx.write(encode_point(point))
            # Filter by the generated value itself too: quote_literal must carry it.
            return await influx.query(
                f"SELECT * FROM {quote_ident(measurement)} "
                f"WHERE {quote_ident('uid')} = {quote_literal(uid)} "
                f"AND {quote_ident('site')} = {quote_literal(site)} GROUP BY *"
            )

    @EXAMPLES
    @given(site=st.one_of(CLEAN_TEXT, ANY_TEXT), town=CLEAN_TEXT, note=ANY_TEXT)
    def check(site: str, town: str, note: str) -> None:
        uid = f"{sum(outcomes.values())}"
        ts_ms = 1_700_000_000_000 + int(uid)
        try:
            point = Point(
                measurement,
                {"uid": uid, "site": site, "town": town},
                {"note": note, "n": 1},
                ts_ms,
            )
        except LineProtocolError:
            outcomes["refused"] += 1
            assert refused_as_tag_value(site) or refused_as_tag_value(town)
            return
        assert not refused_as_tag_value(site)
        assert not refused_as_tag_value(town)
        outcomes["stored"] += 1
        series = run(write_and_read(point, uid, site))
        assert [s.name for s in series] == [measurement]
        # A tag stored empty is absent; InfluxQL shows an absent tag as "".
        assert set(series[0].tags) <= {"uid", "site", "town"}
        assert {key: series[0].tags.get(key, "") for key in ("uid", "site", "town")} == {
            "uid": uid,
            "site": site,
            "town": town,
        }
        assert rows(series) == [{"time": ts_ms, "n": 1, "note": note}]

    check()
    assert outcomes["stored"] >= 10, outcomes


def test_names_round_trip_or_are_refused(stack: StackInfo) -> None:
    """Measurements, tag keys and field keys, in a scratch database dropped afterwards."""
    database = f"lp_names_{RUN}"
    outcomes: Counter[str] = Counter()

    async def write_and_read(point: Point, measurement: str) -> list[Series]:
        async with InfluxDB(stack.influx_url, database) as influx:
            await influx.write(encode_point(point))
            return await influx.query(
                f"SELECT * FROM {quote_ident(measurement)} "
                f"WHERE {quote_ident('uid')} = {quote_literal(point.tags['uid'])} GROUP BY *"
            )

    # Prefixes keep tag keys and field keys apart across examples sharing a measurement.
    # More examples: three generated names per point, so more of them are refused.
    @settings(EXAMPLES, max_examples=60)
    @given(
        measurement=CLEAN_TEXT,
        tag_key=CLEAN_TEXT.map("t".__add__),
        field_key=CLEAN_TEXT.map("f".__add__),
    )
    def check(measurement: str, tag_key: str, field_key: str) -> None:
        uid = f"{sum(outcomes.values())}"
        try:
            point = Point(measurement, {"uid": uid, tag_key: "v"}, {field_key: 7}, 1000)
        except LineProtocolError:
            outcomes["refused"] += 1
            return
        outcomes["stored"] += 1
        series = run(write_and_read(point, measurement))
        assert [s.name for s in series] == [measurement]
        assert series[0].tags[tag_key] == "v"
        assert series[0].tags["uid"] == uid
        [row] = rows(series)
        assert row[field_key] == 7

    async def create() -> None:
        async with InfluxDB(stack.influx_url, database) as influx:
            await influx.ensure_database()

    async def drop() -> None:
        async with InfluxDB(stack.influx_url, database) as influx:
            await influx.query(f"DROP DATABASE {quote_ident(database)}")

    run(create())
    try:
        check()
    finally:
        run(drop())
    assert outcomes["stored"] >= 10, outcomes


@pytest.mark.asyncio
async def test_longest_series_key_the_encoder_accepts_is_stored(stack: StackInfo) -> None:
    measurement = f"lp_long_{RUN}"
    room = MAX_KEY_BYTES - len(f"{measurement},t=") - len("#!~#f")
    value = "朱" * (room // 3) + "x" * (room % 3)
    point = Point(measurement, {"t": value}, {"f": 1}, 1000)
    with pytest.raises(LineProtocolError):
        Point(measurement, {"t": value + "x"}, {"f": 1}, 1000)
    async with InfluxDB(stack.influx_url, stack.influx_database) as influx:
        await influx.write(encode_point(point))
        series = await influx.query(f"SELECT * FROM {quote_ident(measurement)} GROUP BY *")
        assert series[0].tags == {"t": value}
        # One byte more, sent raw, is refused by the server too.
        with pytest.raises(InfluxRejected, match="max key length exceeded"):
            await influx.write(encode_point(point).replace(b" f=", b"x f=", 1))


# --- (b) timestamps and redelivery -------------------------------------------------------


@pytest.mark.asyncio
async def test_the_samples_own_timestamp_is_stored(stack: StackInfo) -> None:
    measurement = f"lp_time_{RUN}"
    stamps = [1_700_000_000_123, 1_700_000_000_124, 0, -1, MAX_TS_MS, MIN_TS_MS]
    points = [Point(measurement, {"terminal": "sj-0001"}, {"v": 1.5}, ts) for ts in stamps]
    async with InfluxDB(stack.influx_url, stack.influx_database) as influx:
        await influx.write(encode_points(points))
        series = await influx.query(f"SELECT * FROM {quote_ident(measurement)}")
    assert [row["time"] for row in rows(series)] == sorted(stamps)
    assert {row["v"] for row in rows(series)} == {1.5}


@pytest.mark.asyncio
async def test_redelivered_point_overwrites_itself(stack: StackInfo) -> None:
    measurement = f"lp_redelivery_{RUN}"
    tags = {"terminal": "sj-0001", "site": "朱泾镇 党群服务中心"}
    point = Point(measurement, tags, {"cpu_percent": 12.5, "seq": 7}, 1_700_000_000_123)
    select = f"SELECT * FROM {quote_ident(measurement)} GROUP BY *"
    async with InfluxDB(stack.influx_url, stack.influx_database) as influx:
        await influx.write(encode_point(point))
        await influx.write(encode_point(point))
        await influx.write(encode_points([point, point]))
        assert rows(await influx.query(select)) == [
            {"time": 1_700_000_000_123, "cpu_percent": 12.5, "seq": 7}
        ]
        # Same series and timestamp, new values: the last write wins, still one point.
        again = Point(measurement, tags, {"cpu_percent": 13.0, "seq": 7}, 1_700_000_000_123)
        await influx.write(encode_point(again))
        assert rows(await influx.query(select)) == [
            {"time": 1_700_000_000_123, "cpu_percent": 13, "seq": 7}  # JSON has 13.0 as 13
        ]


# --- (c) errors, translated ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_unreachable_server_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_loopback_port()}"
    async with InfluxDB(url, "kiosk", timeout_s=5) as influx:
        assert await influx.ping() is False
        with pytest.raises(InfluxUnavailable, match=f"write to InfluxDB at {url} failed"):
            await influx.write(b"m f=1 1")
        with pytest.raises(InfluxUnavailable, match=url):
            await influx.query("SHOW DATABASES")


@pytest.mark.asyncio
async def test_silent_server_times_out_as_unavailable() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with InfluxDB(f"http://127.0.0.1:{port}", "kiosk", timeout_s=0.3) as influx:
            with pytest.raises(InfluxUnavailable, match=r"timed out after 0\.3 s"):
                await influx.write(b"m f=1 1")
            assert await influx.ping() is False
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def answering(status: int, text: str, seen: list[web.Request]) -> AsyncIterator[str]:
    """A loopback HTTP server standing in for a failing proxy or server in front of InfluxDB."""

    async def handle(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"error": text}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, InfluxUnavailable),
        (503, InfluxUnavailable),
        (429, InfluxUnavailable),
        (408, InfluxUnavailable),
        (401, InfluxRejected),
        (413, InfluxRejected),
    ],
)
async def test_http_status_is_translated(status: int, error: type[Exception]) -> None:
    seen: list[web.Request] = []
    async with (
        answering(status, "the server's own words", seen) as url,
        InfluxDB(url, "kiosk", token="s3cret-token") as influx,
    ):
        for call in (
            lambda: influx.write(b"m f=1 1"),
            lambda: influx.query("SHOW DATABASES"),
        ):
            with pytest.raises(error, match=f"{status} .*the server's own words") as caught:
                await call()
            assert "s3cret" not in str(caught.value)
    assert {r.headers["Authorization"] for r in seen} == {"Token s3cret-token"}


@pytest.mark.asyncio
async def test_malformed_body_is_rejected_with_the_servers_words(stack: StackInfo) -> None:
    async with InfluxDB(stack.influx_url, stack.influx_database) as influx:
        with pytest.raises(InfluxRejected, match="400 Bad Request: unable to parse 'garbage'"):
            await influx.write(b"garbage")


@pytest.mark.asyncio
async def test_field_type_conflict_is_rejected(stack: StackInfo) -> None:
    measurement = f"lp_conflict_{RUN}"
    async with InfluxDB(stack.influx_url, stack.influx_database) as influx:
        await influx.write(encode_point(Point(measurement, {}, {"v": 1.5}, 1)))
        with pytest.raises(InfluxRejected, match="field type conflict"):
            await influx.write(encode_point(Point(measurement, {}, {"v": "text"}, 2)))


@pytest.mark.asyncio
async def test_query_errors_are_rejected(stack: StackInfo) -> None:
    async with InfluxDB(stack.influx_url, stack.influx_database) as influx:
        with pytest.raises(InfluxRejected, match="error parsing query"):
            await influx.query("SELEC 1")
    async with InfluxDB(stack.influx_url, f"missing_{RUN}") as influx:
        with pytest.raises(InfluxRejected, match="database not found"):
            await influx.query("SELECT * FROM m")
        with pytest.raises(InfluxRejected, match="404 Not Found: database not found"):
            await influx.write(b"m f=1 1")


# --- the rest of the adapter ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_ping_and_ensure_database_is_idempotent(stack: StackInfo) -> None:
    database = f'lp "scratch" {RUN}'
    async with InfluxDB(stack.influx_url, database) as influx:
        assert await influx.ping() is True
        await influx.ensure_database()
        await influx.ensure_database()
        try:
            [databases] = await influx.query("SHOW DATABASES")
            assert (database,) in databases.values
            await influx.write(encode_point(Point("m", {}, {"f": 1}, 1)))
        finally:
            await influx.query(f"DROP DATABASE {quote_ident(database)}")


@pytest.mark.asyncio
async def test_several_statements_and_typed_cells(stack: StackInfo) -> None:
    measurement = f"lp_types_{RUN}"
    point = Point(
        measurement,
        {"terminal": "sj-0001"},
        {"f": 0.25, "i": -(2**63), "b": True, "s": "朱泾镇"},
        1_700_000_000_123,
    )
    async with InfluxDB(stack.influx_url, stack.influx_database) as influx:
        await influx.write(encode_point(point))
        series = await influx.query(
            f"SELECT * FROM {quote_ident(measurement)}; "
            f"SHOW TAG VALUES FROM {quote_ident(measurement)} WITH KEY = {quote_ident('terminal')}"
        )
    assert [s.name for s in series] == [measurement, measurement]
    assert rows(series[:1]) == [
        {
            "time": 1_700_000_000_123,
            "b": True,
            "f": 0.25,
            "i": -(2**63),
            "s": "朱泾镇",
            "terminal": "sj-0001",
        }
    ]
    assert series[1].values == (("terminal", "sj-0001"),)


def test_quoting_refuses_what_influxql_cannot_carry() -> None:
    assert quote_literal("it's \\ 朱\n") == "'it\\'s \\\\ 朱\\n'"
    assert quote_ident('a"b\\c') == '"a\\"b\\\\c"'
    for unquotable in ("a\rb", "a\x00b"):
        with pytest.raises(ValueError, match="cannot quote"):
            quote_literal(unquotable)
        with pytest.raises(ValueError, match="cannot quote"):
            quote_ident(unquotable)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1",
        "127.0.0.1:8086",
        "http://",
        "http://127.0.0.1:8086/?db=x",
        "http://127.0.0.1:8086/#x",
        "http://[::1",
    ],
)
def test_unusable_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="must be http"):
        InfluxDB(url, "kiosk")


@pytest.mark.asyncio
async def test_outside_async_with_is_a_programming_error() -> None:
    influx = InfluxDB("http://127.0.0.1:1", "kiosk")
    with pytest.raises(RuntimeError, match="async with"):
        await influx.write(b"m f=1 1")
