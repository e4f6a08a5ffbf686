"""A bench stopped with SIGTERM (``timeout``, a CI runner, ``kill``) stops everything it
started: Mosquitto, InfluxDB, the SMTP sink, fleet servers and load generators are gone when it
exits, with status 130 and one line instead of an interrupt's traceback. Python's default
SIGTERM would end the bench at once and leave all of them running.

Two benches: one stopped in plain code (``bench_ingest_backlog``, waiting for the consumer
process it started) and one inside its asyncio loop with a fleet server and light_fleet
processes running, and an edge Mosquitto it bridged to the stack's (``bench_fleet_size``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from provisioning.stack import STOPPED

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench"
START_S = 60.0
STOP_S = 45.0


def _names(procs: list[psutil.Process]) -> set[str]:
    """Command lines of those still running."""
    out = set()
    for p in procs:
        try:
            out.add(" ".join(p.cmdline()))
        except (psutil.Error, ChildProcessError):
            continue
    return out


def _consumer_running(bench: psutil.Process) -> bool:
    # The backlog is in the broker and a consumer process (multiprocessing) works through it,
    # while the bench waits for its result.
    return any("multiprocessing" in line for line in _names(bench.children()))


def _fleet_running(bench: psutil.Process) -> bool:
    # Its server and first light_fleet process are up (the stack started before them).
    lines = _names(bench.children(recursive=True))
    return any("light_fleet.py" in line for line in lines) and any(
        "fleet-server" in line for line in lines
    )


CASES: dict[str, tuple[list[str], Callable[[psutil.Process], bool], set[str]]] = {
    "plain code": (
        ["bench_ingest_backlog.py", "--messages", "20000"],
        _consumer_running,
        {"mosquitto", "influxd", "multiprocessing"},
    ),
    "asyncio loop": (
        [
            "bench_fleet_size.py",
            *("--sizes", "200", "--per-sim", "100", "--sites", "5", "--brokers", "2"),
        ],
        _fleet_running,
        {"mosquitto", "influxd", "fleet-server", "light_fleet.py"},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bench_stopped_with_sigterm_leaves_nothing_running(case: str, tmp_path: Path) -> None:
    argv, started, expected = CASES[case]
    log = tmp_path / "bench.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, str(BENCH / argv[0]), *argv[1:]], stdout=out, stderr=out
        )
    bench = psutil.Process(popen.pid)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + START_S
        while not started(bench):
            assert popen.poll() is None, log.read_text(encoding="utf-8", errors="replace")
            assert time.monotonic() < deadline, f"not started in {START_S:.0f} s"
            time.sleep(0.2)
        children = bench.children(recursive=True)
        running = " ".join(_names(children))
        assert all(name in running for name in expected), running

        popen.send_signal(signal.SIGTERM)
        status = popen.wait(STOP_S)

        text = log.read_text(encoding="utf-8", errors="replace")
        assert status == STOPPED, text
        assert f"{argv[0]}: stopped" in text
        # The interrupt is handled, not a traceback. (A library's own "Exception ignored in
        # __del__" at interpreter exit, e.g. paho's, is not the bench's and may appear.)
        assert "KeyboardInterrupt" not in text
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left running: {_names(alive)}"
    finally:
        # Only what this test started: the bench, then anything it left behind.
        if popen.poll() is None:
            popen.kill()
            popen.wait(30)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                continue
