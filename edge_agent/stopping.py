"""Waiting that a shutdown cuts short: every sleep of a background task goes through here."""

from __future__ import annotations

import asyncio
import contextlib


async def sleep_unless_stopped(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stopping`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=max(0.0, seconds))
