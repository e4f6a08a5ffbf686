"""A background task asked to stop and cancelled at the same moment must end cancelled.

This is the moment a simulated power cut hits a kiosk: its stop event is set as the task is
cancelled. A task that swallowed the cancellation would carry on with an orderly shutdown (and
reconnect to say goodbye) that a kiosk without power never gets to do.
"""

from __future__ import annotations

import asyncio

import pytest

from edge_agent.stopping import sleep_unless_stopped as agent_sleep
from fleet_server.stopping import sleep_unless_stopped as server_sleep


@pytest.mark.parametrize("sleep", [agent_sleep, server_sleep], ids=["agent", "server"])
def test_a_cancellation_arriving_with_the_stop_is_not_swallowed(sleep: object) -> None:
    async def scenario() -> bool:
        stopping = asyncio.Event()
        carried_on = False

        async def worker() -> None:
            nonlocal carried_on
            await sleep(stopping, 60)  # type: ignore[operator]
            carried_on = True

        task = asyncio.create_task(worker())
        await asyncio.sleep(0)  # the worker is asleep
        stopping.set()  # in the same turn of the loop, before the worker runs again:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return carried_on

    assert asyncio.run(scenario()) is False


def test_it_sleeps_the_whole_time_unless_stopped_and_returns_early_when_stopped() -> None:
    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        start = loop.time()
        await agent_sleep(stopping, 0.05)
        slept = loop.time() - start
        loop.call_later(0.01, stopping.set)
        start = loop.time()
        await agent_sleep(stopping, 30)
        return slept, loop.time() - start

    slept, stopped_after = asyncio.run(scenario())
    assert slept >= 0.05
    assert stopped_after < 5
