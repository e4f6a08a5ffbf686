"""What a driver says about its device, in one shape for every family.

A device is ``ok``, ``degraded`` (working, but needs attention soon: paper near its end, battery
charging after an outage), ``faulty`` (answers, but cannot do its job: paper out, cover open,
malformed replies) or ``absent`` (does not answer at all). ``reasons`` are stable codes; the agent
turns them into plain words for village staff.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Health(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    FAULTY = "faulty"
    ABSENT = "absent"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Health.OK: 0, Health.DEGRADED: 1, Health.FAULTY: 2, Health.ABSENT: 3}


@dataclass(frozen=True, slots=True)
class Assessment:
    """A device's health with the reasons for it; ``detail`` is for logs and the status page."""

    health: Health
    reasons: tuple[str, ...] = ()
    detail: str = ""

    def __post_init__(self) -> None:
        if self.health is not Health.OK and not self.reasons:
            raise ValueError(f"a {self.health} assessment needs at least one reason")


OK = Assessment(Health.OK)


def worst(*assessments: Assessment) -> Assessment:
    """Combine assessments: the worst health, with the reasons of every assessment at that level."""
    if not assessments:
        return OK
    top = max(a.health.severity for a in assessments)
    at_top = [a for a in assessments if a.health.severity == top]
    reasons = tuple(dict.fromkeys(r for a in at_top for r in a.reasons))
    detail = "; ".join(a.detail for a in at_top if a.detail)
    return Assessment(at_top[0].health, reasons, detail)
