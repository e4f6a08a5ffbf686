"""Reconnect delays: capped exponential backoff with full jitter.

A broker restart disconnects every terminal at once; without jitter they would all come back
in the same second and overflow the broker's listen backlog.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(
    minimum: float, maximum: float, rng: random.Random | None = None
) -> Iterator[float]:
    """Yield delays: uniformly random in [minimum/2, cap], cap doubling up to ``maximum``."""
    r = rng or random.Random()  # noqa: S311 - jitter, not cryptography
    cap = minimum
    while True:
        yield r.uniform(minimum / 2, cap)
        cap = min(maximum, cap * 2)
