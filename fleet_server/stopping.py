"""Waiting that a shutdown cuts short: every sleep of a background task goes through here."""

from __future__ import annotations

import asyncio
import contextlib


async def sleep_unless_stopped(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stopping`` is set meanwhile."""
    # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that arrives as
    # the event is set (gh-86296), and the cancelled task would then carry on.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds)):
            await stopping.wait()
