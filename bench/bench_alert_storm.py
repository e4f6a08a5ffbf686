"""CPU cost of the alert policy per presence change in a connect storm, by district size.

A broker restart drops every terminal of a district and brings them back within a minute: the
alert engine sees every terminal go offline and come back, many changes at each moment. This
bench builds one district of N terminals (3 per site, half the sites open, half closed, as in
the evening), feeds it that storm the way the server's alerting step does (changes in batches
at one ``now``, then a tick) and prints the CPU µs per change for a small and a large district,
and the CPU per tick apart (a tick walks every open alert once: the server ticks once a
second, however many changes came in).

If the cost of a change grows with the district (the engine once scanned every terminal of the
district on each change, quadratic over the storm: a third of the server's event loop in a
19,900-kiosk connect storm), the ratio of the large district's cost per change to the small
one's grows with it; the goal is a ratio near 1.

    .venv/bin/python bench/bench_alert_storm.py [--small 2000] [--large 20000] [--batch 500]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from fleet_server.alert_policy import AlertPolicy, Fleet, SitePolicy
from fleet_server.presence_table import MINUTE, PresenceStatus, Transition

START_MS = 1_704_700_000_000


@dataclass(frozen=True)
class Fixed:
    """Opening hours that never change during the bench."""

    open: bool

    def is_open(self, at_ms: int) -> bool:
        return self.open

    def next_opening_ms(self, after_ms: int) -> int | None:
        return after_ms + 60 * MINUTE


def district(size: int) -> Fleet:
    sites = {
        f"site-{n:05d}": SitePolicy(site=f"site-{n:05d}", district="d", schedule=Fixed(n % 2 == 0))
        for n in range((size + 2) // 3)
    }
    terminals = {f"t-{i:05d}": f"site-{i // 3:05d}" for i in range(size)}
    return Fleet(sites=sites, terminals=terminals)


def storm(size: int, batch: int) -> tuple[float, int, float, int]:
    """CPU seconds in changes, how many, CPU seconds in ticks, how many."""
    policy = AlertPolicy(district(size))
    terminals = sorted(policy.fleet.terminals)
    now = START_MS
    changes = ticks = 0
    in_changes = in_ticks = 0.0
    steps: list[tuple[PresenceStatus, PresenceStatus]] = [
        ("unknown", "online"),
        ("online", "offline"),
        ("offline", "online"),
    ]
    for old, new in steps:
        for first in range(0, size, batch):
            now += 100
            started = time.process_time()
            for terminal in terminals[first : first + batch]:
                policy.on_transition(Transition(terminal, old, new, now, "bench", 1), now)
                changes += 1
            ticked = time.process_time()
            policy.tick(now)
            ticks += 1
            in_changes += ticked - started
            in_ticks += time.process_time() - ticked
    return in_changes, changes, in_ticks, ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2_000, help="default 2000")
    parser.add_argument("--large", type=int, default=20_000, help="default 20000")
    parser.add_argument("--batch", type=int, default=500, help="changes per moment, default 500")
    args = parser.parse_args()
    per_change = {}
    for size in (args.small, args.large):
        seconds, changes, in_ticks, ticks = storm(size, args.batch)
        per_change[size] = seconds / changes * 1e6
        print(
            f"district of {size:>6,} terminals: {changes:>6,} changes, "
            f"{per_change[size]:6.1f} µs CPU a change; {ticks} ticks, "
            f"{in_ticks / ticks * 1e3:6.1f} ms CPU a tick (it walks the open alerts)"
        )
    ratio = per_change[args.large] / per_change[args.small]
    print(
        f"cost of a change, {args.large:,} vs {args.small:,} terminals: ratio {ratio:.2f} "
        f"(goal: near 1; {args.large / args.small:.0f} if it grew with the district)"
    )


if __name__ == "__main__":
    main()
