"""The ops API's fleet routes on a real registry file, served on loopback: sites import and
read-back, the alert log, acknowledgements through the API and through the signed e-mail
link, and ``fleetctl sites``/``alerts`` against that server."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from msgspec.structs import replace

from fleet_protocol.ids import site_id
from fleet_protocol.site_import import render_sites_toml
from fleet_protocol.sites import Interval, OpeningHours, Owner, Schedule, Site, SiteKind
from fleet_server.ack_links import ack_token
from fleet_server.ops_fleet_api import MAX_SITES_BODY, add_fleet_routes
from fleet_server.registry import AlertLogEntry, Registry
from provisioning import cli

SECRET = b"a secret of at least thirty-two bytes"
#: 2026-11-21 14:05 in Beijing.
NOW = int(datetime(2026, 11, 21, 6, 5, tzinfo=UTC).timestamp() * 1000)
DAY = 24 * 3600 * 1000
ALERT = f"terminal-offline:kiosk-zhujing-01:{NOW - 600_000}"

CENTRE = Site(
    id=site_id("zhujing-dqzx"),
    name="朱泾镇党群服务中心",
    district="金山区",
    town="朱泾镇",
    kind=SiteKind.PARTY_MASS_CENTRE,
    address="金山区朱泾镇人民路1号",
    owners=(Owner("王磊", "wang.lei@zhujing.example.gov.cn"),),
    schedule=Schedule(
        hours=OpeningHours(mon=(Interval(510, 720), Interval(810, 1020)), sat=(Interval(540, 720),))
    ),
    lat=30.898,
    lon=121.161,
    grace_s=600,
)
ZONE = Site(
    id=site_id("zhujing-24h"),
    name="朱泾社区24小时自助服务区",
    district="金山区",
    town="朱泾镇",
    kind=SiteKind.COMMUNITY_CENTRE,
    address="金山区朱泾镇人民路3号",
    owners=(Owner("李娜", "li.na@zhujing.example.gov.cn"), Owner("张伟", "zhang@x.example.cn")),
    schedule=Schedule(open_24h=True),
)


def decision(alert_id: str, action: str, at_ms: int, reason: str | None = None) -> AlertLogEntry:
    kind, _, rest = alert_id.partition(":")
    return AlertLogEntry(
        key=f"{alert_id}/{action}",
        alert_id=alert_id,
        action=action,
        at_ms=at_ms,
        kind=kind,
        subject=rest.rpartition(":")[0],
        site=CENTRE.id,
        district=CENTRE.district,
        reason=reason,
        recipients=("wang.lei@zhujing.example.gov.cn",),
    )


@dataclass
class Served:
    registry: Registry
    client: TestClient[web.Request, web.Application]
    clock: list[int]

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")


async def serve(tmp_path: Path, ack_secret: bytes | None) -> AsyncIterator[Served]:
    clock = [NOW]
    async with Registry(tmp_path / "registry.db") as registry:
        await registry.migrate()
        app = web.Application()
        add_fleet_routes(app, registry, ack_secret=ack_secret, clock=lambda: clock[0])
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            yield Served(registry, client, clock)


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in serve(tmp_path, SECRET):
        yield s


async def post_sites(served: Served, sites: list[Site]) -> dict[str, int]:
    body = io.BytesIO(msgspec.json.encode(sites))  # aiohttp warns about large raw bytes
    response = await served.client.post("/api/v1/sites", data=body)
    assert response.status == 200, await response.text()
    answer: dict[str, int] = await response.json()
    return answer


# --- sites ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_imported_sites_read_back_whole_and_a_second_import_updates(served: Served) -> None:
    assert await post_sites(served, [CENTRE, ZONE]) == {"added": 2, "updated": 0}
    moved = replace(CENTRE, address="金山区朱泾镇人民路9号")
    assert await post_sites(served, [moved]) == {"added": 0, "updated": 1}

    listing = await served.client.get("/api/v1/sites")
    assert listing.status == 200
    assert msgspec.json.decode(await listing.read(), type=list[Site]) == [ZONE, moved]  # by id
    one = await served.client.get(f"/api/v1/sites/{CENTRE.id}")
    assert msgspec.json.decode(await one.read(), type=Site) == moved


@pytest.mark.asyncio
async def test_a_bad_site_is_refused_naming_the_field_and_nothing_is_stored(served: Served) -> None:
    good = msgspec.to_builtins(ZONE)
    bad = msgspec.to_builtins(CENTRE)
    bad["owners"] = [{"name": "王磊", "email": "not-an-address"}]
    response = await served.client.post("/api/v1/sites", json=[good, bad])
    assert response.status == 400
    error = (await response.json())["error"]
    assert "not-an-address" in error
    assert "$[1].owners" in error
    assert await served.registry.sites() == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[{not json", "not a JSON list of sites"),
        (b'{"id": "zhujing-dqzx"}', "Expected `array`"),
        (b'[{"id": "Zhujing"}]', "$[0].id"),
    ],
)
async def test_a_body_that_is_not_a_list_of_sites_is_refused(
    served: Served, body: bytes, words: str
) -> None:
    response = await served.client.post("/api/v1/sites", data=body)
    assert response.status == 400
    assert words in (await response.json())["error"]


@pytest.mark.asyncio
async def test_the_same_site_twice_in_one_import_is_refused(served: Served) -> None:
    response = await served.client.post(
        "/api/v1/sites", data=msgspec.json.encode([CENTRE, ZONE, CENTRE])
    )
    assert response.status == 400
    assert "zhujing-dqzx appears twice" in (await response.json())["error"]


@pytest.mark.asyncio
async def test_a_large_import_is_taken_and_an_oversized_body_refused(served: Served) -> None:
    # More than aiohttp's default 1 MiB request cap, well under ours.
    many = [replace(CENTRE, id=site_id(f"site-{n:05d}")) for n in range(3000)]
    body = msgspec.json.encode(many)
    assert 1024 * 1024 < len(body) < MAX_SITES_BODY
    assert await post_sites(served, many) == {"added": 3000, "updated": 0}

    oversized = io.BytesIO(b" " * (MAX_SITES_BODY + 1))
    response = await served.client.post("/api/v1/sites", data=oversized)
    assert response.status == 413
    assert "larger than" in (await response.json())["error"]


@pytest.mark.asyncio
async def test_an_unknown_site_is_a_404_that_says_so(served: Served) -> None:
    response = await served.client.get("/api/v1/sites/nowhere-01")
    assert response.status == 404
    assert "no site 'nowhere-01'" in (await response.json())["error"]


# --- alerts -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_alert_log_comes_newest_first_up_to_the_limit(served: Served) -> None:
    log = [decision(ALERT, "sent", NOW - 300_000), decision(ALERT, "reminded", NOW)]
    await served.registry.save_engines({}, {}, log, NOW)

    response = await served.client.get("/api/v1/alerts", params={"limit": "1"})
    entries = (await response.json())["entries"]
    assert [e["action"] for e in entries] == ["reminded"]
    everything = await (await served.client.get("/api/v1/alerts")).json()
    assert [e["action"] for e in everything["entries"]] == ["reminded", "sent"]
    assert everything["entries"][0]["recipients"] == ["wang.lei@zhujing.example.gov.cn"]
    refused = await served.client.get("/api/v1/alerts", params={"limit": "0"})
    assert refused.status == 400
    assert "limit" in (await refused.json())["error"]


@pytest.mark.asyncio
async def test_an_acknowledgement_through_the_api_is_queued_for_the_engine(served: Served) -> None:
    response = await served.client.post(f"/api/v1/alerts/{ALERT}/ack", json={"who": "区运维 张三"})
    assert response.status == 202
    assert await response.json() == {"queued": True}
    assert await served.registry.take_acks() == [(ALERT, "区运维 张三", NOW)]


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [b"{}", b'{"who": ""}', b'{"who": "a\\nb"}', b"who"])
async def test_an_acknowledgement_without_a_proper_who_is_refused(
    served: Served, body: bytes
) -> None:
    response = await served.client.post(f"/api/v1/alerts/{ALERT}/ack", data=body)
    assert response.status == 400
    assert "invalid acknowledgement" in (await response.json())["error"]
    assert await served.registry.take_acks() == []


# --- the signed link from e-mails -------------------------------------------------------------


def html_headers_are_strict(response: ClientResponse) -> None:
    headers = response.headers
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "form-action 'self'" in csp
    assert headers["Cache-Control"] == "no-store"


@pytest.mark.asyncio
async def test_opening_the_link_only_shows_the_page_and_the_button_acknowledges(
    served: Served,
) -> None:
    path = f"/ack/{ack_token(ALERT, SECRET, NOW + DAY)}"

    page = await served.client.get(path)
    assert page.status == 200
    html_headers_are_strict(page)
    text = await page.text()
    assert text.index("确认已知晓") < text.index("Acknowledge this alert")  # Chinese first
    assert ALERT in text
    assert "kiosk-zhujing-01" in text
    assert "2026-11-21 13:55" in text  # when it went offline, Beijing time
    assert text.count("<button") == 1
    assert '<form method="post">' in text
    # A mail scanner fetching the link twice acknowledged nothing.
    await served.client.get(path)
    assert await served.registry.take_acks() == []

    done = await served.client.post(path)
    assert done.status == 200
    html_headers_are_strict(done)
    assert "已确认" in await done.text()
    assert await served.registry.take_acks() == [(ALERT, "e-mail link", NOW)]


@pytest.mark.asyncio
async def test_an_altered_link_is_refused_with_403(served: Served) -> None:
    token = ack_token(ALERT, SECRET, NOW + DAY)
    other = ack_token(f"{ALERT}9", SECRET, NOW + DAY)
    forged = ".".join([*token.split(".")[:1], other.split(".")[1], *token.split(".")[2:]])
    for path in (f"/ack/{forged}", f"/ack/{token[:-2]}", "/ack/hello"):
        for method in ("GET", "POST"):
            response = await served.client.request(method, path)
            assert response.status == 403, (method, path)
            html_headers_are_strict(response)
            text = await response.text()
            assert "链接无效" in text
            assert "This link is not valid" in text
    assert await served.registry.take_acks() == []


@pytest.mark.asyncio
async def test_an_expired_link_is_refused_with_410(served: Served) -> None:
    path = f"/ack/{ack_token(ALERT, SECRET, NOW + DAY)}"
    served.clock[0] = NOW + DAY
    for method in ("GET", "POST"):
        response = await served.client.request(method, path)
        assert response.status == 410
        text = await response.text()
        assert "链接已过期" in text
        assert "This link has expired" in text
    assert await served.registry.take_acks() == []


@pytest.mark.asyncio
async def test_the_page_escapes_what_the_alert_id_holds(served: Served) -> None:
    hostile = "terminal-offline:<script>alert(1)</script>&\"':1"
    text = await (await served.client.get(f"/ack/{ack_token(hostile, SECRET, NOW + DAY)}")).text()
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;&#x27;" in text


@pytest.mark.asyncio
async def test_without_a_secret_there_are_no_links(tmp_path: Path) -> None:
    async for served in serve(tmp_path, None):
        response = await served.client.get(f"/ack/{ack_token(ALERT, SECRET, NOW + DAY)}")
        assert response.status == 404
        assert (await served.client.get("/api/v1/sites")).status == 200


def test_a_short_ack_secret_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        add_fleet_routes(web.Application(), Registry(Path("unused")), ack_secret=b"x", clock=int)


# --- fleetctl against the server --------------------------------------------------------------


async def fleetctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # urllib blocks: run the CLI in a thread so that the server keeps serving on this loop.
    code = await asyncio.to_thread(cli.main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.asyncio
async def test_fleetctl_imports_lists_shows_and_acknowledges(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites_file = tmp_path / "sites.toml"
    sites_file.write_text(render_sites_toml([CENTRE, ZONE]), encoding="utf-8")
    server = ("--server", served.url)

    code, out, _ = await fleetctl(capsys, "sites", "import", str(sites_file), *server)
    assert code == 0
    assert out == "导入 2 个点位（新增 2，更新 0） / imported 2 sites (2 new, 0 updated)\n"
    code, out, _ = await fleetctl(capsys, "sites", "import", str(sites_file), "--json", *server)
    assert json.loads(out) == {"added": 0, "updated": 2}

    code, out, _ = await fleetctl(capsys, "sites", "list", *server)
    assert code == 0
    centre_row = next(line for line in out.splitlines() if line.startswith("zhujing-dqzx"))
    assert "金山区/朱泾镇" in centre_row
    assert "党群服务中心" in centre_row
    zone_row = next(line for line in out.splitlines() if line.startswith("zhujing-24h"))
    assert "社区事务受理服务中心" in zone_row
    assert "24小时" in zone_row
    assert zone_row.rstrip().endswith("2")  # owners
    code, out, _ = await fleetctl(capsys, "sites", "list", "--json", *server)
    assert msgspec.json.decode(out, type=list[Site]) == [ZONE, CENTRE]

    code, out, _ = await fleetctl(capsys, "sites", "show", "zhujing-dqzx", *server)
    assert code == 0
    assert "王磊 <wang.lei@zhujing.example.gov.cn>" in out
    assert "周一 mon  08:30-12:00, 13:30-17:00" in out
    assert "周日 sun  休息 closed" in out
    assert "600 秒 s（10 分钟 min）" in out
    code, _, err = await fleetctl(capsys, "sites", "show", "nowhere-01", *server)
    assert code == cli.EXIT_USER_ERROR
    assert "no site 'nowhere-01' has been imported" in err
    assert "Traceback" not in err

    await served.registry.save_engines(
        {}, {}, [decision(ALERT, "suppressed", NOW, reason="outside-hours")], NOW
    )
    code, out, _ = await fleetctl(capsys, "alerts", "list", *server)
    assert code == 0
    [_, row, _] = out.splitlines()
    for cell in ("2026-11-21 14:05", "暂缓 suppressed", "终端离线", "kiosk-zhujing-01"):
        assert cell in row
    assert "非开放时间 outside-hours" in row
    assert ALERT in row
    assert "wang.lei@zhujing.example.gov.cn" in row

    code, out, err = await fleetctl(capsys, "alerts", "ack", ALERT, "--who", "张三", *server)
    assert (code, err) == (0, "")
    assert ALERT in out
    code, _, err = await fleetctl(capsys, "alerts", "ack", "site-offline:nowhere:1", *server)
    assert code == 0
    assert "not in the alert log" in err
    [(first, who, _), (second, default_who, _)] = await served.registry.take_acks()
    assert (first, who) == (ALERT, "张三")
    assert second == "site-offline:nowhere:1"
    assert default_who.startswith("fleetctl:")
