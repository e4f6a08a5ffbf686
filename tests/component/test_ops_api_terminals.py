"""``GET /api/v1/terminals`` on a real registry file, served on loopback: each terminal as the
registry has it, plus what ingest knows of it right now (a wrong clock, a flood), and
``fleetctl terminals list`` showing both to ops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fleet_protocol import State, site_id, terminal_id
from fleet_protocol.ops import TerminalView
from fleet_server.api import make_app
from fleet_server.metrics import ClockFaultView, IngestStats
from fleet_server.registry import Registry, SiteRecord
from provisioning import cli, ops_client

NOW = 1_795_000_000_000
SITE = SiteRecord(site_id("zhujing-dqzx"), "朱泾镇党群服务中心", "朱泾镇", "金山区")
AHEAD = terminal_id("zhujing-dqzx-01")
NOISY = terminal_id("zhujing-dqzx-02")
QUIET = terminal_id("zhujing-dqzx-03")


def stats(*, faults: dict[str, ClockFaultView], flooding: list[str]) -> IngestStats:
    return IngestStats(
        received={},
        rejected={},
        points_written=0,
        batches_written=0,
        write_retries=0,
        points_rejected=0,
        broker_connected=True,
        clock_faults=faults,
        flooding=flooding,
    )


@pytest_asyncio.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[str, list[IngestStats]]]:
    """The ops API's URL, and the ingest stats it serves (replace the one element to change)."""
    now = [stats(faults={}, flooding=[])]
    async with Registry(tmp_path / "registry.db") as registry:
        await registry.migrate()
        await registry.put_sites([SITE])
        for terminal in (AHEAD, NOISY, QUIET):
            birth = State(online=True, session=1, ts=NOW, site=SITE.id)
            await registry.apply_state(terminal, birth, NOW)
        app: web.Application = make_app(registry, lambda: now[0], lambda: True)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            yield str(client.make_url("")).rstrip("/"), now


async def listing(url: str) -> dict[str, TerminalView]:
    found = await asyncio.to_thread(ops_client.terminals, url)
    return {t.id: t for t in found.terminals}


@pytest.mark.asyncio
async def test_a_wrong_clock_and_a_flood_show_on_the_terminal_until_they_end(
    api: tuple[str, list[IngestStats]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, now = api
    plain = await listing(url)
    assert all(v.clock_offset_ms is None and not v.flooding for v in plain.values())

    fault = ClockFaultView(first_ms=NOW, last_ms=NOW + 5_000, offset_ms=-7_200_000, count=12)
    now[0] = stats(faults={AHEAD: fault}, flooding=[NOISY])
    views = await listing(url)
    assert views[AHEAD].clock_offset_ms == -7_200_000
    assert not views[AHEAD].flooding
    assert views[NOISY].flooding
    assert views[NOISY].clock_offset_ms is None
    assert views[QUIET] == plain[QUIET]

    code = await asyncio.to_thread(cli.main, ["terminals", "list", "--server", url])
    out = capsys.readouterr().out
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("zhujing")}
    assert "时钟偏差 clock -7200 s" in lines[AHEAD]
    assert "消息过多 flooding" in lines[NOISY]
    assert "时钟" not in lines[QUIET]
    assert "flooding" not in lines[QUIET]

    code = await asyncio.to_thread(cli.main, ["terminals", "list", "--server", url, "--json"])
    assert code == 0
    body = msgspec.json.decode(capsys.readouterr().out.encode())
    assert {t["id"]: t.get("clock_offset_ms") for t in body["terminals"]}[AHEAD] == -7_200_000

    now[0] = stats(faults={}, flooding=[])  # the clock was set right, the flood stopped
    assert await listing(url) == plain
