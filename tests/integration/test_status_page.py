"""The status page as village staff meet it, in Debian chromium, and as an attacker meets it, over
raw HTTP: served by the real aiohttp app on loopback, fed a hand-made snapshot of a kiosk whose
receipt printer is out of paper, with a fake agent that records what staff asked it to do."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import Browser, Page, expect

from edge_agent.status_model import (
    ActionOutcome,
    ClockView,
    EventView,
    InterfaceView,
    LinkView,
    OutboxView,
    PeripheralView,
    PowerView,
    StatusSnapshot,
    Words,
)
from edge_agent.status_page import (
    StaffAccount,
    StatusPageSettings,
    hash_passcode,
    make_app,
    running,
)
from tests.integration.browser import KIOSK_PORTRAIT, chromium, new_page

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

STAFF = "王芳"
PASSCODE = "qiaotou-2024-ok"
OTHER_STAFF = "李强"
OTHER_PASSCODE = "another-pass-99"
NOW_MS = 1_750_000_000_000
LOGGER = "test.status-page"

PAPER_OUT = Words("打印机缺纸", "The printer is out of paper")
LOAD_PAPER = Words("请更换纸卷", "Load a new paper roll")


def kiosk_snapshot() -> StatusSnapshot:
    """A village kiosk whose receipt printer ran out of paper five minutes ago."""
    return StatusSnapshot(
        terminal="zhujing-dqzx-01",
        site="zhujing-dqzx",
        agent_version="0.1.0",
        now_ms=NOW_MS,
        boot_ms=NOW_MS - 3 * 86400_000,
        link=LinkView(
            broker="fleet.example.gov.cn:8883",
            connected=True,
            since_ms=NOW_MS - 7200_000,
            session=4,
            rtt_ms=38.0,
            dns_ok=True,
        ),
        clock=ClockView(offset_ms=120.0, max_offset_ms=5000.0),
        power=PowerView(
            on_ac=True,
            ups=Words("市电供电", "On mains"),
            ups_charge_percent=100.0,
            ups_runtime_s=1800.0,
            supply_voltage=24.1,
            cabinet_door_open=False,
            cabinet_temperature=31.0,
        ),
        peripherals=(
            PeripheralView(
                id="receipt-printer",
                role="receipt_printer",
                title=Words("凭条打印机", "Receipt printer"),
                state="faulty",
                since_ms=NOW_MS - 300_000,
                problem=PAPER_OUT,
                action=LOAD_PAPER,
                power_channel="relay-1",
                printable=True,
            ),
            PeripheralView(
                id="id-card-reader",
                role="id_card_reader",
                title=Words("身份证阅读器", "ID card reader"),
                state="ok",
                since_ms=NOW_MS - 86400_000,
                power_channel="relay-2",
            ),
            PeripheralView(
                id="camera",
                role="camera",
                title=Words("摄像头", "Camera"),
                state="ok",
                since_ms=NOW_MS - 86400_000,
                essential=False,
            ),
        ),
        outbox=OutboxView(pending=0, pending_bytes=0, oldest_ms=None),
        network=(
            InterfaceView("eth0", "ethernet", up=True, addresses=("192.168.1.23",)),
            InterfaceView("wwan0", "cellular", up=False),
        ),
        versions={"config": "2024.06.1", "service-items": "118"},
        events=(
            EventView(NOW_MS - 300_000, "peripheral", "error", "receipt-printer: paper out"),
            EventView(NOW_MS - 3600_000, "staff", "info", "power_cycle id-card-reader", "李强"),
        ),
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class SnapshotSource:
    current: StatusSnapshot

    def snapshot(self) -> StatusSnapshot:
        return self.current


@dataclass
class RecordingActions:
    """The agent's side of the page: records each request, answers as the agent would."""

    calls: list[tuple[str, str | None, str]] = field(default_factory=list)

    async def reboot_terminal(self, actor: str) -> ActionOutcome:
        self.calls.append(("reboot_terminal", None, actor))
        return ActionOutcome(True, Words("终端将在几秒后重启", "The terminal restarts in a moment"))

    async def restart_app(self, actor: str) -> ActionOutcome:
        self.calls.append(("restart_app", None, actor))
        return ActionOutcome(True, Words("自助服务程序已重启", "The kiosk application restarted"))

    async def power_cycle(self, peripheral_id: str, actor: str) -> ActionOutcome:
        self.calls.append(("power_cycle", peripheral_id, actor))
        return ActionOutcome(
            True, Words("凭条打印机已断电并重新上电", "The receipt printer was power-cycled")
        )

    async def print_test_ticket(self, peripheral_id: str, actor: str) -> ActionOutcome:
        self.calls.append(("print_test", peripheral_id, actor))
        return ActionOutcome(True, Words("测试页已打印", "Test page printed"))


@dataclass
class Served:
    url: str
    port: int
    source: SnapshotSource
    actions: RecordingActions
    clock: FakeClock


HASHES = {STAFF: hash_passcode(PASSCODE), OTHER_STAFF: hash_passcode(OTHER_PASSCODE)}


def page_settings(**overrides: Any) -> StatusPageSettings:
    settings = StatusPageSettings(
        port=0,
        server_names=("kiosk-01.local",),
        staff=tuple(StaffAccount(name=n, passcode_hash=h) for n, h in HASHES.items()),
    )
    return msgspec.structs.replace(settings, **overrides)


async def serve(settings: StatusPageSettings) -> AsyncIterator[Served]:
    source = SnapshotSource(kiosk_snapshot())
    actions = RecordingActions()
    clock = FakeClock()
    app = make_app(settings, source, actions, logging.getLogger(LOGGER), clock=clock)
    async with running(app, settings) as listening:
        port = listening.ports[0]
        yield Served(listening.urls[0], port, source, actions, clock)


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    async for s in serve(page_settings()):
        yield s


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe: keep cookies for an IP-address host, which is what the page is opened by.
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        yield session


async def log_in_browser(page: Page, served: Served, passcode: str = PASSCODE) -> None:
    await page.goto(served.url + "login")
    await page.get_by_label(STAFF).check()
    await page.get_by_label("密码").fill(passcode)
    await page.get_by_role("button", name="登录").click()


async def log_in_http(http: aiohttp.ClientSession, served: Served) -> None:
    async with http.get(served.url + "login") as response:
        html = await response.text()
    token = re.search(r'name="form_token" value="([^"]+)"', html)
    assert token is not None
    form = {"form_token": token[1], "staff": STAFF, "passcode": PASSCODE, "next": "/"}
    async with http.post(served.url + "login", data=form) as response:
        assert response.status == 200
        assert STAFF in await response.text()


async def csrf_of(http: aiohttp.ClientSession, served: Served) -> str:
    async with http.get(served.url + "confirm/reboot_terminal") as response:
        assert response.status == 200
        token = re.search(r'name="csrf" value="([^"]+)"', await response.text())
    assert token is not None
    return token[1]


# --- what staff see -------------------------------------------------------------------------


async def test_without_login_the_page_shows_the_paper_out_printer_and_no_action_buttons(
    browser: Browser, served: Served, tmp_path: Path
) -> None:
    page = await new_page(browser, KIOSK_PORTRAIT)
    await page.goto(served.url)

    await expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    await expect(page.locator("#verdict")).to_contain_text("无法使用")
    await expect(page.locator("#verdict")).to_contain_text("请更换纸卷")
    printer = page.locator("#device-receipt-printer")
    await expect(printer).to_contain_text("凭条打印机")
    await expect(printer).to_contain_text("故障")
    await expect(printer).to_contain_text("打印机缺纸：请更换纸卷")
    await expect(page.locator("#link")).to_contain_text("已连接 2 小时")
    await expect(page.locator("#network")).to_contain_text("有线网络")
    await expect(page.locator("#network")).to_contain_text("4G/5G 移动网络")
    await expect(page.locator("#events")).to_contain_text("操作人：李强")
    await expect(page.get_by_role("link", name="工作人员登录")).to_be_visible()
    for button in ("重新上电", "打印测试页", "重启终端"):
        await expect(page.get_by_text(button)).to_have_count(0)
    # Refreshes itself without JavaScript; touch-sized controls on the kiosk's screen.
    await expect(page.locator('meta[http-equiv="refresh"]')).to_have_attribute("content", "10")
    box = await page.get_by_role("link", name="工作人员登录").bounding_box()
    assert box is not None
    assert box["height"] >= 48
    await page.screenshot(path=tmp_path / "status-kiosk.png", full_page=True)

    await page.get_by_role("link", name="English").click()
    await expect(page.locator("html")).to_have_attribute("lang", "en")
    await expect(page.locator("#verdict")).to_contain_text("Not working")
    await expect(page.locator("#device-receipt-printer")).to_contain_text(
        "The printer is out of paper: Load a new paper roll"
    )
    await expect(page.get_by_role("link", name="Staff login")).to_be_visible()
    await page.screenshot(path=tmp_path / "status-laptop-en.png", full_page=True)
    await page.get_by_role("link", name="中文").click()
    await expect(page.locator("#verdict")).to_contain_text("无法使用")
    assert served.actions.calls == []


async def test_staff_power_cycle_the_printer_after_confirming(
    browser: Browser, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    page = await new_page(browser)
    await page.goto(served.url)
    await page.get_by_role("link", name="工作人员登录").click()
    await page.get_by_label(STAFF).check()
    await page.get_by_label("密码").fill(PASSCODE)
    await page.get_by_role("button", name="登录").click()

    await expect(page.locator("#staff-name")).to_have_text(STAFF)
    printer = page.locator("#device-receipt-printer")
    await printer.get_by_role("link", name="重新上电").click()
    await expect(page.locator("#description")).to_contain_text("将关闭并重新打开 凭条打印机 的电源")
    assert served.actions.calls == []  # looking at the confirmation does nothing

    await page.get_by_role("button", name="确认执行").click()
    await expect(page.locator("#outcome")).to_have_text("凭条打印机已断电并重新上电")
    assert served.actions.calls == [("power_cycle", "receipt-printer", STAFF)]
    logged = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any(STAFF in m and "logged in" in m for m in logged)
    assert any(STAFF in m and "power_cycle(receipt-printer)" in m for m in logged)

    # Only peripherals with a power channel get the button; the printable one can print a test.
    await page.get_by_role("link", name="返回状态页").click()
    await expect(page.locator("#device-camera").get_by_text("重新上电")).to_have_count(0)
    await printer.get_by_role("link", name="打印测试页").click()
    await page.get_by_role("button", name="确认执行").click()
    await expect(page.locator("#outcome")).to_have_text("测试页已打印")
    assert served.actions.calls[-1] == ("print_test", "receipt-printer", STAFF)


async def test_staff_reboot_the_terminal_through_the_confirmation(
    browser: Browser, served: Served
) -> None:
    page = await new_page(browser, KIOSK_PORTRAIT)
    await log_in_browser(page, served)
    await page.get_by_role("link", name="重启终端").click()
    await expect(page.locator("#description")).to_contain_text("将重新启动整台终端")
    await page.get_by_role("button", name="确认执行").click()
    await expect(page.locator("#outcome")).to_contain_text("终端将在几秒后重启")
    assert served.actions.calls == [("reboot_terminal", None, STAFF)]

    # While the planned reboot is under way the page says so instead of offering buttons.
    served.source.current = replace(
        kiosk_snapshot(), planned=Words("终端正在重启，预计 3 分钟后恢复", "Restarting")
    )
    await page.goto(served.url)
    await expect(page.locator("#planned")).to_contain_text("终端正在重启，预计 3 分钟后恢复")
    await expect(page.get_by_text("重启终端")).to_have_count(0)
    await expect(page.get_by_text("重新上电")).to_have_count(0)


async def test_the_sixth_attempt_after_five_wrong_passcodes_is_refused_even_when_right(
    browser: Browser, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    page = await new_page(browser)
    for attempt in range(1, 5):
        await log_in_browser(page, served, passcode=f"wrong-guess-{attempt}")
        await expect(page.locator("#problem")).to_have_text(
            f"密码不正确。还可以再试 {5 - attempt} 次。"
        )
    await log_in_browser(page, served, passcode="wrong-guess-5")
    await expect(page.locator("#problem")).to_have_text("密码错误次数过多，请 5 分钟后再试。")

    await log_in_browser(page, served, passcode=PASSCODE)
    await expect(page.locator("#problem")).to_have_text("密码错误次数过多，请 5 分钟后再试。")
    await expect(page.locator("#staff-name")).to_have_count(0)
    served.clock.advance(170)
    await log_in_browser(page, served, passcode=PASSCODE)
    await expect(page.locator("#problem")).to_have_text("密码错误次数过多，请 3 分钟后再试。")
    await page.get_by_role("link", name="English").click()
    await expect(page.locator("#login")).to_be_visible()

    served.clock.advance(131)
    await page.get_by_label(STAFF).check()
    await page.get_by_label("Passcode").fill(PASSCODE)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.locator("#staff-name")).to_have_text(STAFF)
    logged = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("locked for 300 s" in m and STAFF in m for m in logged)
    assert any("refused: locked" in m and STAFF in m for m in logged)
    assert served.actions.calls == []


async def test_lockout_message_in_english(browser: Browser, served: Served) -> None:
    page = await new_page(browser)
    await page.goto(served.url + "lang/en?next=/login")
    for attempt in range(5):
        await page.get_by_label(STAFF).check()
        await page.get_by_label("Passcode").fill(f"wrong-guess-{attempt}")
        await page.get_by_role("button", name="Log in").click()
    await expect(page.locator("#problem")).to_have_text(
        "Too many wrong passcodes. Please try again in 5 minutes."
    )


async def test_one_address_cannot_walk_through_the_staff_names(
    http: aiohttp.ClientSession, served: Served
) -> None:
    async def attempt(name: str, passcode: str) -> tuple[int, str]:
        async with http.get(served.url + "login") as response:
            token = re.search(r'name="form_token" value="([^"]+)"', await response.text())
        assert token is not None
        form = {"form_token": token[1], "staff": name, "passcode": passcode}
        async with http.post(served.url + "login", data=form) as response:
            return response.status, await response.text()

    for name in (STAFF, OTHER_STAFF, STAFF, OTHER_STAFF):
        status, _ = await attempt(name, "not-the-passcode")
        assert status == 401
    status, html = await attempt("nobody-here", "not-the-passcode")
    assert status == 429
    # The right passcode of another name, from the same address: still locked.
    status, html = await attempt(OTHER_STAFF, OTHER_PASSCODE)
    assert status == 429
    assert "密码错误次数过多，请 5 分钟后再试" in html


# --- what is refused ------------------------------------------------------------------------


async def test_a_cross_site_post_is_refused(
    browser: Browser, served: Served, http: aiohttp.ClientSession
) -> None:
    # Another site on the same machine: for cookies the same site as the page (same host), so
    # only the Origin check and the form token stand between it and the kiosk.
    async def evil(request: web.Request) -> web.Response:
        return web.Response(
            text=(
                f'<form method="post" action="{served.url}do/reboot_terminal">'
                '<input name="csrf" value="guess"><button id="go">win a prize</button></form>'
            ),
            content_type="text/html",
        )

    other = web.Application()
    other.router.add_get("/", evil)
    runner = web.AppRunner(other)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    evil_port = runner.addresses[0][1]
    try:
        page = await new_page(browser)
        await log_in_browser(page, served)
        await expect(page.locator("#staff-name")).to_have_text(STAFF)
        await page.goto(f"http://127.0.0.1:{evil_port}/")
        async with page.expect_response(served.url + "do/reboot_terminal") as answer:
            await page.click("#go")
        assert (await answer.value).status == 403
        await expect(page.locator("#message")).to_contain_text("已拒绝")
    finally:
        await runner.cleanup()

    # Raw HTTP: logged in, with the right form token, but from another site's page ...
    await log_in_http(http, served)
    csrf = await csrf_of(http, served)
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{evil_port}"):
        async with http.post(
            served.url + "do/reboot_terminal", data={"csrf": csrf}, headers={"Origin": origin}
        ) as response:
            assert response.status == 403
    async with http.post(
        served.url + "do/reboot_terminal",
        data={"csrf": csrf},
        headers={"Referer": "http://evil.example/page"},
    ) as response:
        assert response.status == 403
    # ... or from the page itself without the form token, or with another one.
    same_origin = {"Origin": served.url.rstrip("/")}
    for form in ({}, {"csrf": ""}, {"csrf": csrf[:-2] + "xx"}):
        async with http.post(
            served.url + "do/reboot_terminal", data=form, headers=same_origin
        ) as response:
            assert response.status == 403
    assert served.actions.calls == []

    async with http.post(
        served.url + "do/reboot_terminal", data={"csrf": csrf}, headers=same_origin
    ) as response:
        assert response.status == 200
    assert served.actions.calls == [("reboot_terminal", None, STAFF)]


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:{port}", "127.0.0.1:1", "127.0.0.2:{port}", "localhost.evil"],
)
async def test_a_wrong_host_header_is_refused(
    http: aiohttp.ClientSession, served: Served, host: str
) -> None:
    await log_in_http(http, served)
    csrf = await csrf_of(http, served)
    wrong = {"Host": host.format(port=served.port)}
    async with http.get(served.url, headers=wrong) as response:
        assert response.status == 421
        assert "已拒绝" in await response.text()
    async with http.post(
        served.url + "do/reboot_terminal", data={"csrf": csrf}, headers=wrong
    ) as response:
        assert response.status == 421
    assert served.actions.calls == []


async def test_the_page_answers_to_its_addresses_and_names_only() -> None:
    settings = page_settings(listen=("127.0.0.1", "::1"))
    app = make_app(
        settings, SnapshotSource(kiosk_snapshot()), RecordingActions(), logging.getLogger(LOGGER)
    )
    async with running(app, settings) as listening, aiohttp.ClientSession() as http:
        assert [host for host, _ in listening.sockets] == ["127.0.0.1", "::1"]
        v4, v6 = listening.urls
        p4, p6 = listening.ports
        assert v6 == f"http://[::1]:{p6}/"
        accepted = [
            (v4, f"127.0.0.1:{p4}"),
            (v4, f"localhost:{p4}"),
            (v4, f"kiosk-01.local:{p4}"),
            (v4, f"KIOSK-01.local:{p4}"),
            (v6, f"[::1]:{p6}"),
            (v6, f"[0:0::1]:{p6}"),
            (v6, f"localhost:{p6}"),
        ]
        for url, host in accepted:
            async with http.get(url, headers={"Host": host}) as response:
                assert response.status == 200, host
        refused = [
            (v4, ""),
            (v4, "[::1"),
            (v4, f"127.0.0.1:{p4}:1"),
            (v4, "a b"),
            (v4, f"127.0.0.1:{p6}"),  # another socket's port
            (v6, f"[::2]:{p6}"),
            (v6, f"::1:{p6}"),
        ]
        for url, host in refused:
            async with http.get(url, headers={"Host": host}) as response:
                assert response.status in (400, 421), host


async def test_an_expired_session_is_sent_back_to_the_login_page(
    browser: Browser, served: Served
) -> None:
    page = await new_page(browser)
    await log_in_browser(page, served)
    await expect(page.locator("#staff-name")).to_have_text(STAFF)
    # Watching the page (it refreshes itself) is not staff activity.
    served.clock.advance(599)
    await page.reload()
    served.clock.advance(2)
    await page.reload()
    await expect(page.locator("#staff-name")).to_have_count(0)
    await page.goto(served.url + "confirm/power_cycle?peripheral=receipt-printer")
    await expect(page.locator("#problem")).to_contain_text("登录已失效")
    await page.get_by_label(STAFF).check()
    await page.get_by_label("密码").fill(PASSCODE)
    await page.get_by_role("button", name="登录").click()
    # Back where the staff member was going.
    await expect(page.locator("#description")).to_contain_text("凭条打印机")
    assert served.actions.calls == []


async def test_a_session_ends_at_its_time_limit_however_busy(
    http: aiohttp.ClientSession, served: Served
) -> None:
    await log_in_http(http, served)
    csrf = await csrf_of(http, served)
    for _ in range(6):
        served.clock.advance(590)
        await csrf_of(http, served)  # a staff action every 10 minutes keeps it from idling
    served.clock.advance(70)  # 3610 s after login
    async with http.post(
        served.url + "do/reboot_terminal", data={"csrf": csrf}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"].startswith("/login?")
    assert served.actions.calls == []


async def test_get_never_acts(http: aiohttp.ClientSession, served: Served) -> None:
    await log_in_http(http, served)
    csrf = await csrf_of(http, served)
    for path in ("do/reboot_terminal", f"do/reboot_terminal?csrf={csrf}", "logout"):
        async with http.get(served.url + path) as response:
            assert response.status == 405
            assert "POST" in response.headers["Allow"]
    async with http.get(served.url) as response:
        assert STAFF in await response.text()  # still logged in
    assert served.actions.calls == []


async def test_actions_only_on_peripherals_that_support_them(
    http: aiohttp.ClientSession, served: Served
) -> None:
    await log_in_http(http, served)
    csrf = await csrf_of(http, served)
    refused = [
        ("power_cycle", "camera"),  # no power channel
        ("print_test", "id-card-reader"),  # not a printer
        ("power_cycle", "no-such-device"),
        ("format_disk", ""),
    ]
    for action, peripheral in refused:
        async with http.get(
            served.url + f"confirm/{action}", params={"peripheral": peripheral}
        ) as response:
            assert response.status == 404
        async with http.post(
            served.url + f"do/{action}", data={"csrf": csrf, "peripheral": peripheral}
        ) as response:
            assert response.status == 404
    assert served.actions.calls == []


async def test_headers_and_cookies_keep_the_page_to_itself(
    http: aiohttp.ClientSession, served: Served
) -> None:
    async with http.get(served.url + "login") as response:
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "form-action 'self'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert response.headers["Cache-Control"] == "no-store"
        html = await response.text()
    token = re.search(r'name="form_token" value="([^"]+)"', html)
    assert token is not None
    form = {"form_token": token[1], "staff": STAFF, "passcode": PASSCODE}
    async with http.post(served.url + "login", data=form, allow_redirects=False) as response:
        assert response.status == 303
        cookie = next(c for c in response.cookies.values() if c.key.startswith("kiosk_session"))
        assert cookie["httponly"]
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/"
    async with http.get(served.url + "no-such-page") as response:
        assert response.status == 404
        assert response.headers["Cache-Control"] == "no-store"


async def test_without_staff_accounts_the_page_is_read_only() -> None:
    async for served in serve(page_settings(staff=())):
        async with aiohttp.ClientSession() as http:
            async with http.get(served.url) as response:
                html = await response.text()
            assert "本页面只读" in html
            assert "工作人员登录" not in html
            async with http.post(
                served.url + "login", data={"staff": STAFF, "passcode": PASSCODE}
            ) as response:
                assert response.status == 403
        assert served.actions.calls == []
