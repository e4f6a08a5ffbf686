"""Polling a device and reporting what changed.

Every driver is a :class:`Device`: ``poll`` reads the device's status (opening its link if
needed) and ``assess`` turns a status into a :class:`~firmware_bridge.health.Assessment`. A
:class:`DeviceWatch` polls at a fixed interval and yields an :class:`Observation` whenever the
assessment or the status changes. A device that does not answer is reported, never skipped:
``DeviceUnavailable`` makes it *absent* and ``ProtocolViolation`` / ``RequestRefused`` make it
*faulty*, each with the error's reason. The next poll retries, so a device that comes back is
seen within one interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from firmware_bridge.errors import (
    BridgeError,
    ConfigError,
    DeviceUnavailable,
    ProtocolViolation,
    RequestRefused,
)
from firmware_bridge.health import Assessment, Health

S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)
log = logging.getLogger(__name__)


class Device(Protocol[S]):
    """What :class:`DeviceWatch` needs from a driver."""

    @property
    def name(self) -> str: ...

    async def poll(self) -> S: ...

    def assess(self, status: S) -> Assessment: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Observation(Generic[S_co]):
    """One change seen on a device. ``status`` is ``None`` when it could not be read."""

    device: str
    assessment: Assessment
    status: S_co | None
    at: float
    """Monotonic time of the poll that saw it."""


def assessment_of_error(exc: BridgeError) -> Assessment:
    """The health a failed poll means, with the error's reason."""
    if isinstance(exc, DeviceUnavailable):
        return Assessment(Health.ABSENT, (exc.reason,), str(exc))
    if isinstance(exc, ProtocolViolation | RequestRefused):
        return Assessment(Health.FAULTY, (exc.reason,), str(exc))
    return Assessment(Health.FAULTY, (exc.reason,), str(exc))


class DeviceWatch(Generic[S]):
    """Polls one device every ``interval_s`` and yields observations on change."""

    def __init__(
        self,
        device: Device[S],
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"poll interval: {interval_s} must be above zero")
        self.device = device
        self.interval_s = interval_s
        self._clock = clock
        self.latest: Observation[S] | None = None
        self.polls = 0
        self.failures = 0

    async def poll_once(self) -> Observation[S]:
        """Poll now; return the observation (changed or not) and remember it as latest."""
        self.polls += 1
        status: S | None
        try:
            status = await self.device.poll()
            assessment = self.device.assess(status)
        except ConfigError:
            raise
        except BridgeError as exc:
            self.failures += 1
            status, assessment = None, assessment_of_error(exc)
        observation = Observation(self.device.name, assessment, status, self._clock())
        self.latest = observation
        return observation

    async def changes(self) -> AsyncGenerator[Observation[S], None]:
        """Poll forever; yield the first observation and then each one that differs."""
        previous: tuple[Assessment, S | None] | None = None
        try:
            while True:
                started = self._clock()
                observation = await self.poll_once()
                key = (_comparable(observation.assessment), observation.status)
                if key != previous:
                    previous = key
                    if observation.assessment.health is not Health.OK:
                        log.info(
                            "%s: %s (%s)",
                            self.device.name,
                            observation.assessment.health,
                            ", ".join(observation.assessment.reasons),
                        )
                    yield observation
                elapsed = self._clock() - started
                await asyncio.sleep(max(0.0, self.interval_s - elapsed))
        finally:
            await self.device.close()


def _comparable(assessment: Assessment) -> Assessment:
    # The detail text may carry changing numbers (timeouts, byte counts); a change of health or
    # reasons is what matters to the people reading the events.
    return Assessment(assessment.health, assessment.reasons)
