"""The UPS driver against a real ``upsd`` 2.8 with ``dummy-ups`` drivers (Debian nut-server).

One upsd serves the module with a simulated UPS per test, so no test waits for another's
changes to be undone; each starts on mains with a full battery, every process running. What a
UPS reports is changed by rewriting its dummy-ups state file, which reaches upsd within
``REREAD_BOUND_S`` (measured 0.3 to 0.9 s over 20 changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from firmware_bridge.errors import ConfigError
from firmware_bridge.health import Health
from firmware_bridge.nut.driver import NutUps, UpsEventSeen, ups_events
from firmware_bridge.nut.protocol import UpsEvent, UpsStatus
from firmware_bridge.nut.upsd import REREAD_BOUND_S, SimulatedUps, UpsDaemon
from firmware_bridge.watch import DeviceWatch, Observation

pytestmark = pytest.mark.integration

INTERVAL = 0.25
"""Poll interval of the watches here."""
SLACK = 0.5
"""What one poll may take on a loaded test machine, on top of the interval."""
MAXAGE_S = 3
"""upsd's MAXAGE here: a driver silent this long makes its data stale."""


UPS_NAMES = tuple(f"ups{i}" for i in range(1, 13))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpsDaemon]:
    with UpsDaemon(tmp_path_factory.mktemp("nut"), UPS_NAMES, maxage_s=MAXAGE_S) as running:
        yield running


@pytest.fixture(scope="module")
def unused_names() -> Iterator[str]:
    return itertools.cycle(UPS_NAMES)


@pytest.fixture
def ups(daemon: UpsDaemon, unused_names: Iterator[str]) -> SimulatedUps:
    """A simulated UPS in its default state, upsd running."""
    handle = daemon.simulated_ups(next(unused_names))
    handle.reset()
    return handle


@pytest_asyncio.fixture
async def device(ups: SimulatedUps) -> AsyncIterator[NutUps]:
    """The driver of ``ups``, closed after the test whatever its outcome: a connection left
    open by a failed test would otherwise surface as a ResourceWarning in a later one."""
    driver = NutUps("ups", ups.url, ups.name)
    try:
        yield driver
    finally:
        await driver.close()


async def poll_until(
    watch: DeviceWatch[UpsStatus],
    done: Callable[[Observation[UpsStatus]], bool],
    within_s: float,
) -> tuple[Observation[UpsStatus], float]:
    """Poll every INTERVAL until ``done``; the observation and the seconds it took."""
    started = time.monotonic()
    while True:
        observation = await watch.poll_once()
        elapsed = time.monotonic() - started
        if done(observation):
            return observation, elapsed
        assert elapsed < within_s, f"not within {within_s} s; last: {observation.assessment}"
        await asyncio.sleep(INTERVAL)


def health_is(health: Health) -> Callable[[Observation[UpsStatus]], bool]:
    return lambda o: o.assessment.health is health


def test_missing_nut_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="apt-get install nut-server") as caught:
        UpsDaemon(tmp_path, nut_dir=tmp_path)
    assert str(tmp_path / "upsd") in str(caught.value)


def test_values_dummy_ups_cannot_carry_are_refused(ups: SimulatedUps) -> None:
    for value in ['say "hi"', "C:\\ups", "山特"]:
        with pytest.raises(ConfigError, match=r"ups\.model"):
            ups.set_variables({"ups.model": value})


@pytest.mark.asyncio
async def test_reads_the_ups_over_one_kept_connection(device: NutUps) -> None:
    for _ in range(3):
        status = await device.poll()
    assert status.on_mains
    assert not status.on_battery
    assert status.battery_charge == 100.0
    assert status.runtime_s == 1800.0
    assert status.load == 20.0
    assert status.input_voltage == 230.0
    assert (status.manufacturer, status.model) == ("Kiosk Fleet", "Simulated UPS")
    assert device.assess(status).health is Health.OK
    assert device.connects == 1


@pytest.mark.asyncio
async def test_a_variable_the_ups_stops_reporting_becomes_none(
    ups: SimulatedUps, device: NutUps
) -> None:
    ups.set_variables({"input.voltage": None, "ups.model": "C1K tower"})
    await asyncio.to_thread(ups.wait_served)
    status = await device.poll()
    assert status.input_voltage is None
    assert status.model == "C1K tower"


@pytest.mark.asyncio
async def test_mains_lost_is_seen_within_one_poll_after_upsd_has_it(
    ups: SimulatedUps, device: NutUps
) -> None:
    watch = DeviceWatch(device, INTERVAL)
    await poll_until(watch, health_is(Health.OK), within_s=1)
    ups.set(on_battery=True, charge=80, runtime_s=900)
    observation, elapsed = await poll_until(
        watch, health_is(Health.DEGRADED), within_s=REREAD_BOUND_S + INTERVAL + SLACK
    )
    assert observation.assessment.reasons == ("on_battery",)
    assert observation.status is not None
    assert observation.status.battery_charge == 80.0
    assert observation.status.runtime_s == 900.0
    assert elapsed <= REREAD_BOUND_S + INTERVAL + SLACK


@pytest.mark.asyncio
async def test_low_battery_is_faulty(ups: SimulatedUps, device: NutUps) -> None:
    watch = DeviceWatch(device, INTERVAL)
    ups.set(on_battery=True, low_battery=True, charge=8, runtime_s=120)
    observation, _ = await poll_until(
        watch, health_is(Health.FAULTY), within_s=REREAD_BOUND_S + INTERVAL + SLACK
    )
    assert observation.assessment.reasons == ("low_battery",)
    assert "8% charge" in observation.assessment.detail


@pytest.mark.asyncio
async def test_mains_lost_and_restored_arrive_as_events_in_order(
    ups: SimulatedUps, device: NutUps
) -> None:
    watch = DeviceWatch(device, INTERVAL)
    seen: list[UpsEventSeen] = []
    arrived = asyncio.Event()

    async def collect() -> None:
        async with contextlib.aclosing(ups_events(watch)) as events:
            async for event in events:
                seen.append(event)
                arrived.set()

    async def next_event() -> UpsEvent:
        await asyncio.wait_for(arrived.wait(), REREAD_BOUND_S + INTERVAL + SLACK)
        arrived.clear()
        return seen[-1].event

    task = asyncio.create_task(collect(), name="ups-events")
    try:
        await poll_until(watch, health_is(Health.OK), within_s=1)
        ups.set(on_battery=True, charge=95)
        assert await next_event() is UpsEvent.MAINS_LOST
        ups.set(on_battery=False, low_battery=True)
        assert await next_event() is UpsEvent.LOW_BATTERY
        await asyncio.sleep(INTERVAL * 2)  # nothing more may come of that change
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [s.event for s in seen] == [
        UpsEvent.MAINS_LOST,
        UpsEvent.MAINS_RESTORED,
        UpsEvent.LOW_BATTERY,
    ]
    assert seen[0].observation.status is not None
    assert seen[0].observation.status.on_battery
    assert seen[1].observation is seen[2].observation  # one reading, two events


@pytest.mark.asyncio
async def test_a_stopped_driver_is_absent_and_comes_back(ups: SimulatedUps, device: NutUps) -> None:
    watch = DeviceWatch(device, INTERVAL)
    await poll_until(watch, health_is(Health.OK), within_s=1)
    ups.stop_driver()
    observation, _ = await poll_until(watch, health_is(Health.ABSENT), within_s=INTERVAL + SLACK)
    assert observation.assessment.reasons == ("ups_driver_not_connected",)
    await asyncio.to_thread(ups.start_driver)
    await poll_until(watch, health_is(Health.OK), within_s=INTERVAL + SLACK)


@pytest.mark.asyncio
async def test_a_driver_that_lost_its_ups_is_faulty_with_stale_data(
    ups: SimulatedUps, device: NutUps
) -> None:
    watch = DeviceWatch(device, INTERVAL)
    await poll_until(watch, health_is(Health.OK), within_s=1)
    ups.freeze_driver()
    seen: list[Health] = []

    def faulty(observation: Observation[UpsStatus]) -> bool:
        seen.append(observation.assessment.health)
        return observation.assessment.health is Health.FAULTY

    observation, _ = await poll_until(watch, faulty, within_s=MAXAGE_S + 2 + SLACK)
    assert observation.assessment.reasons == ("ups_data_stale",)
    # Until then the last reading stood: a silent driver is never taken for a missing one.
    # How long that lasts has no lower bound worth asserting: upsd counts MAXAGE from the
    # driver's last word (its answer to upsd's PING, sent once a third of MAXAGE is gone),
    # which on a loaded machine came up to 2 s before the freeze (1.8 s seen in CI).
    assert set(seen[:-1]) <= {Health.OK}
    ups.thaw_driver()
    await poll_until(watch, health_is(Health.OK), within_s=2)


@pytest.mark.asyncio
async def test_upsd_stopped_is_absent_at_the_next_poll_and_the_same_driver_recovers(
    ups: SimulatedUps, device: NutUps
) -> None:
    watch = DeviceWatch(device, INTERVAL)
    await poll_until(watch, health_is(Health.OK), within_s=1)
    ups.daemon.stop()
    observation = await watch.poll_once()
    assert observation.assessment.health is Health.ABSENT
    assert observation.assessment.reasons == ("connection_refused",)
    await asyncio.to_thread(ups.daemon.start)
    observation = await watch.poll_once()
    assert observation.assessment.health is Health.OK


@pytest.mark.asyncio
async def test_a_upsd_restart_between_polls_costs_no_absent_reading(
    ups: SimulatedUps, device: NutUps
) -> None:
    watch = DeviceWatch(device, INTERVAL)
    await poll_until(watch, health_is(Health.OK), within_s=1)
    await asyncio.to_thread(ups.daemon.stop)
    await asyncio.to_thread(ups.daemon.start)
    observation = await watch.poll_once()
    assert observation.assessment.health is Health.OK
    assert device.connects == 2


@pytest.mark.asyncio
async def test_an_unknown_ups_name_is_absent(ups: SimulatedUps) -> None:
    watch = DeviceWatch(NutUps("ups", ups.url, "no-such-ups"), INTERVAL)
    try:
        observation = await watch.poll_once()
    finally:
        await watch.device.close()
    assert observation.assessment.health is Health.ABSENT
    assert observation.assessment.reasons == ("ups_unknown",)
