"""Watching a device: every change is reported once, and a device that does not answer or
answers nonsense is reported absent or faulty with the reason — never silently skipped."""

from __future__ import annotations

import pytest

from firmware_bridge.errors import (
    BridgeError,
    ConfigError,
    DeviceTimeout,
    DeviceUnavailable,
    ProtocolViolation,
    RequestRefused,
)
from firmware_bridge.health import OK, Assessment, Health, worst
from firmware_bridge.watch import DeviceWatch, Observation


class ScriptedDevice:
    """A device whose polls return (or raise) the scripted items in turn; the last repeats."""

    def __init__(self, script: list[str | BridgeError]) -> None:
        self.name = "receipt-printer"
        self.script = script
        self.polls = 0
        self.closed = False

    async def poll(self) -> str:
        item = self.script[min(self.polls, len(self.script) - 1)]
        self.polls += 1
        if isinstance(item, BridgeError):
            raise item
        return item

    def assess(self, status: str) -> Assessment:
        if status == "paper_out":
            return Assessment(Health.FAULTY, ("paper_out",))
        return OK

    async def close(self) -> None:
        self.closed = True


async def _collect(watch: DeviceWatch[str], n: int) -> list[Observation[str]]:
    out: list[Observation[str]] = []
    changes = watch.changes()
    try:
        async for observation in changes:
            out.append(observation)
            if len(out) == n:
                break
    finally:
        await changes.aclose()
    return out


@pytest.mark.asyncio
async def test_each_change_is_reported_once_with_its_reason() -> None:
    device = ScriptedDevice(
        [
            "ready",
            "ready",
            "paper_out",
            "paper_out",
            DeviceTimeout("printer: no complete answer within 1 s"),
            DeviceTimeout("printer: no complete answer within 1 s"),
            ProtocolViolation("status byte 0xff", reason="bad_fixed_bits"),
            "ready",
        ]
    )
    watch = DeviceWatch(device, 0.001)
    seen = await _collect(watch, 5)
    assert [(o.assessment.health, o.assessment.reasons, o.status) for o in seen] == [
        (Health.OK, (), "ready"),
        (Health.FAULTY, ("paper_out",), "paper_out"),
        (Health.ABSENT, ("no_answer",), None),
        (Health.FAULTY, ("bad_fixed_bits",), None),
        (Health.OK, (), "ready"),
    ]
    assert device.polls == 8
    assert watch.failures == 3
    assert device.closed, "stopping the watch closes the device's link"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "health", "reason"),
    [
        (DeviceUnavailable("gone", reason="port_missing"), Health.ABSENT, "port_missing"),
        (DeviceTimeout("silent"), Health.ABSENT, "no_answer"),
        (ProtocolViolation("crc", reason="bad_crc"), Health.FAULTY, "bad_crc"),
        (RequestRefused("no", reason="modbus_exception_2"), Health.FAULTY, "modbus_exception_2"),
    ],
)
async def test_a_failed_poll_is_reported_not_skipped(
    error: BridgeError, health: Health, reason: str
) -> None:
    watch = DeviceWatch(ScriptedDevice([error]), 1.0)
    observation = await watch.poll_once()
    assert observation.assessment.health is health
    assert observation.assessment.reasons == (reason,)
    assert observation.status is None
    assert watch.latest is observation


@pytest.mark.asyncio
async def test_a_config_error_is_not_disguised_as_a_faulty_device() -> None:
    watch = DeviceWatch(ScriptedDevice([ConfigError("code_page: 'x' is unknown")]), 1.0)
    with pytest.raises(ConfigError):
        await watch.poll_once()


def test_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="poll interval"):
        DeviceWatch(ScriptedDevice(["ready"]), 0)


def test_worst_keeps_every_reason_at_the_worst_level() -> None:
    a = Assessment(Health.DEGRADED, ("paper_near_end",))
    b = Assessment(Health.FAULTY, ("cover_open",), "cover")
    c = Assessment(Health.FAULTY, ("cutter_error", "cover_open"), "cutter")
    combined = worst(OK, a, b, c)
    assert combined.health is Health.FAULTY
    assert combined.reasons == ("cover_open", "cutter_error")
    assert combined.detail == "cover; cutter"
    assert worst() == OK
    with pytest.raises(ValueError, match="reason"):
        Assessment(Health.FAULTY)
