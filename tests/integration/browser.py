"""Debian chromium under Playwright, for tests that look at pages the way a person does.

    async with chromium() as browser:
        page = await new_page(browser, KIOSK_PORTRAIT)
        await page.goto(url)

Each :func:`chromium` is a fresh browser with a throw-away profile (Playwright's ``launch``
makes a temporary user-data dir and deletes it on close), so no cookie or cache leaks from one
test to the next. Nothing here knows about a particular page.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Final

from playwright.async_api import Browser, Page, ViewportSize, async_playwright

CHROMIUM: Final = "/usr/bin/chromium"
# No sandbox: tests may run as root, where chromium refuses to start with one. The rest keeps
# the browser from reaching out to the internet on its own (updates, sync, QUIC probes).
CHROMIUM_ARGS: Final = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

#: The kiosk's own screen, upright.
KIOSK_PORTRAIT: Final = ViewportSize(width=1080, height=1920)
#: A staff member's laptop on the site LAN.
LAPTOP: Final = ViewportSize(width=1366, height=768)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless chromium with a fresh profile, closed when the block ends."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(
    browser: Browser, viewport: ViewportSize = LAPTOP, *, locale: str = "zh-CN"
) -> Page:
    """A page in a new browser context (its own cookies), sized like ``viewport``."""
    context = await browser.new_context(viewport=viewport, locale=locale)
    return await context.new_page()
