"""CPU the presence table costs a quiet fleet each second, by fleet size, against a full walk.

The server's alerting step runs once a second: every terminal heard since the last step is a
heartbeat for the presence table (``on_telemetry``), then ``tick`` lets time pass (stale,
heartbeat backstop, planned deadlines, end of flapping). In a quiet fleet nothing changes, and
the cost should be what came in, not the size of the fleet.

This bench feeds a table the steady state of ``--seconds`` s of fleet time: N terminals born,
each heard every ``--interval`` s (spread evenly over the interval), one tick a second, and
prints the CPU µs per second of fleet time for a small and a large fleet, for the table as the
server runs it (a tick settles the terminals whose deadline has come) and, as the baseline in
the same run, for a table whose tick settles every terminal (what it did before it kept
deadlines: at 6,000 terminals a fifth of the fleet server's samples). No transition may
happen in either: the fleet stays online throughout, or the bench fails.

    .venv/bin/python bench/bench_presence_tick.py [--small 2000] [--large 20000]
        [--interval 10] [--seconds 300]
"""

from __future__ import annotations

import argparse
import sys
import time

from fleet_protocol.messages import State
from fleet_server.presence_table import SECOND, PresenceTable, Transition

START_MS = 1_704_700_000_000


class FullWalk(PresenceTable):
    """The baseline: every tick settles every terminal."""

    def tick(self, now_ms: int) -> list[Transition]:
        now = self._clock(now_ms)
        out: list[Transition] = []
        for terminal in sorted(self._records):
            out += self._settle(terminal, self._records[terminal], now, cause="telemetry")
        return out


def quiet_fleet(table: PresenceTable, size: int, interval_s: int, seconds: int) -> float:
    """CPU µs a second of fleet time: heartbeats and one tick a second."""
    names = [f"t-{i:05d}" for i in range(size)]
    for name in names:
        table.on_state(name, State(online=True, session=1, ts=1), START_MS)
    # Who is heard in which second of the interval: the fleet spread evenly over it.
    by_second = [names[s::interval_s] for s in range(interval_s)]
    changes = 0
    started = time.process_time()
    for second in range(1, seconds + 1):
        now = START_MS + second * SECOND
        for name in by_second[second % interval_s]:
            changes += len(table.on_telemetry(name, now))
        changes += len(table.tick(now))
    spent = time.process_time() - started
    if changes:
        raise RuntimeError(f"{changes} transitions in a quiet fleet of {size}")
    return spent / seconds * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2_000, help="default 2000")
    parser.add_argument("--large", type=int, default=20_000, help="default 20000")
    parser.add_argument("--interval", type=int, default=10, help="s between telemetry, 10")
    parser.add_argument("--seconds", type=int, default=300, help="fleet time, s, 300")
    args = parser.parse_args()
    if not 0 < args.interval <= args.seconds:
        parser.error("--interval must be positive and at most --seconds")
    cost: dict[tuple[str, int], float] = {}
    for size in (args.small, args.large):
        for name, table in (("deadlines", PresenceTable()), ("full walk", FullWalk())):
            cost[name, size] = quiet_fleet(table, size, args.interval, args.seconds)
            print(
                f"{name:9s} {size:>6,} terminals, heard every {args.interval} s: "
                f"{cost[name, size]:8.0f} µs CPU a second of fleet time "
                f"({cost[name, size] / size * 1e3:6.1f} ns a terminal), "
                f"{cost[name, size] / 1e4:5.2f} % of a core"
            )
    large, small = args.large, args.small
    print(
        f"ratio deadlines / full walk at {large:,} terminals: "
        f"{cost['deadlines', large] / cost['full walk', large]:.3f}"
    )
    per_terminal = cost["deadlines", large] / large / (cost["deadlines", small] / small)
    print(
        f"cost a terminal, {large:,} vs {small:,} (deadlines): ratio {per_terminal:.2f} "
        "(goal: near 1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
