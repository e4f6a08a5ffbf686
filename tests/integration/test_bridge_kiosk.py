"""A whole kiosk from its shipped profile, against simulated devices: the receipt printer on a
pty behind a by-id link, the controller board over Modbus RTU, and (24-hour zone) a real upsd
with dummy-ups. What village staff and installers rely on: every declared device is reported,
each change arrives once per poll, a peripheral is power-cycled by its name, and the installer's
``kiosk-bridge`` tool says the same."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from firmware_bridge.health import Health
from firmware_bridge.kiosk import KioskDevices, PeripheralChange
from firmware_bridge.profiles import load_profile
from firmware_bridge.simulation import SimulatedKiosk

pytestmark = pytest.mark.integration

POLL_S = 0.3
BIN = Path(sys.executable).parent
FAST = [
    {"id": "receipt-printer", "poll_s": POLL_S},
    {"id": "controller-board", "poll_s": POLL_S},
    {"id": "ups", "poll_s": POLL_S},
]


@pytest_asyncio.fixture
async def kiosk(tmp_path: Path) -> AsyncIterator[SimulatedKiosk]:
    async with SimulatedKiosk(load_profile("zone24", FAST), tmp_path / "sim") as simulated:
        yield simulated


class Changes:
    """Every change the kiosk's devices report, in arrival order."""

    def __init__(self) -> None:
        self.seen: list[PeripheralChange] = []
        self._arrived = asyncio.Event()

    async def __call__(self, change: PeripheralChange) -> None:
        self.seen.append(change)
        self._arrived.set()

    async def wait_for(
        self, test: Callable[[PeripheralChange], bool], within_s: float
    ) -> PeripheralChange:
        deadline = time.monotonic() + within_s
        while True:
            for change in self.seen:
                if test(change):
                    return change
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = [
                    (
                        c.peripheral.id,
                        c.observation.assessment.health,
                        c.observation.assessment.reasons,
                    )
                    for c in self.seen
                ]
                raise AssertionError(f"no such change within {within_s} s; seen {got}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()


def _is(
    peripheral: str, health: Health, reason: str | None = None
) -> Callable[[PeripheralChange], bool]:
    def test(change: PeripheralChange) -> bool:
        a = change.observation.assessment
        return (
            change.peripheral.id == peripheral
            and a.health is health
            and (reason is None or reason in a.reasons)
        )

    return test


@pytest.mark.asyncio
async def test_every_fault_of_the_kiosk_arrives_within_a_poll_and_clears(
    kiosk: SimulatedKiosk,
) -> None:
    devices = KioskDevices(kiosk.profile)
    changes = Changes()
    runner = asyncio.create_task(devices.run(changes))
    try:
        for pid in ("receipt-printer", "controller-board", "ups"):
            await changes.wait_for(_is(pid, Health.OK), 5.0)
        # Only the three devices the bridge talks to are watched; USB ones are the agent's.
        assert {c.peripheral.id for c in changes.seen} == {
            "receipt-printer",
            "controller-board",
            "ups",
        }

        kiosk.printer().state.paper_out = True
        paper = await changes.wait_for(
            _is("receipt-printer", Health.FAULTY, "paper_out"), 3 * POLL_S
        )
        assert paper.peripheral.title == "凭条打印机"

        await kiosk.board().set_door_open(True)
        await changes.wait_for(
            _is("controller-board", Health.DEGRADED, "cabinet_door_open"), 3 * POLL_S
        )

        await asyncio.to_thread(kiosk.ups().set, on_battery=True, charge=80, runtime_s=900)
        # dummy-ups rereads its state file about once a second; then one poll.
        await changes.wait_for(_is("ups", Health.DEGRADED, "on_battery"), 3.0 + 3 * POLL_S)

        kiosk.printer().state.paper_out = False
        await kiosk.board().set_door_open(False)
        count = len(changes.seen)
        for pid in ("receipt-printer", "controller-board"):
            ok_again = _is(pid, Health.OK)

            def recovered(c: PeripheralChange, ok_again: Callable[..., bool] = ok_again) -> bool:
                return changes.seen.index(c) >= count and ok_again(c)

            await changes.wait_for(recovered, 3 * POLL_S)
        # The fault began once and was not repeated at every poll. (The four status requests
        # are read one after another, so a change in between can show for one poll as a mixed
        # reading, a second observation of the same fault; debouncing is the agent's business.)
        printer = [c for c in changes.seen if c.peripheral.id == "receipt-printer"]
        onsets = [
            later
            for earlier, later in itertools.pairwise(printer)
            if "paper_out" in later.observation.assessment.reasons
            and "paper_out" not in earlier.observation.assessment.reasons
        ]
        assert len(onsets) == 1
        # Nothing new while nothing changes, however many polls go by.
        watch = devices.watch("receipt-printer")
        polls, seen = watch.polls, len(changes.seen)
        while watch.polls < polls + 4:
            await asyncio.sleep(POLL_S / 2)
        assert [c.peripheral.id for c in changes.seen[seen:]] == []
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await devices.close()


@pytest.mark.asyncio
async def test_a_peripheral_is_power_cycled_by_its_name(kiosk: SimulatedKiosk) -> None:
    async with KioskDevices(kiosk.profile) as devices:
        report = await devices.power_cycle("receipt-printer", off_s=0.3)
    assert report.outcome == "done"
    assert report.channel == "receipt_printer"
    writes = kiosk.board().writes_to("receipt_printer")
    assert [w.power_on for w in writes] == [False, True]
    assert writes[1].at - writes[0].at >= 0.3
    assert await kiosk.board().power_on("receipt_printer")


@pytest.mark.asyncio
async def test_a_declared_device_that_is_not_there_is_reported_absent_with_the_reason(
    tmp_path: Path,
) -> None:
    profile = load_profile(
        "comprehensive",
        [
            {
                "id": "receipt-printer",
                "url": str(tmp_path / "by-id" / "usb-printer"),
                "timeout_s": 0.3,
            },
            {"id": "controller-board", "url": "socket://127.0.0.1:1", "timeout_s": 0.3},
        ],
    )
    async with KioskDevices(profile) as devices:
        seen = await devices.poll_all()
    assert set(seen) == {"receipt-printer", "controller-board"}
    printer = seen["receipt-printer"].assessment
    board = seen["controller-board"].assessment
    assert (printer.health, printer.reasons) == (Health.ABSENT, ("port_missing",))
    assert "usb-printer" in printer.detail
    assert (board.health, board.reasons) == (Health.ABSENT, ("connection_refused",))


def _processes_under(workdir: Path) -> list[int]:
    """PIDs of processes whose environment points into ``workdir`` (NUT_CONFPATH)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(workdir).encode() in environ:
            found.append(int(proc.name))
    return found


def _bridge(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kiosk-bridge"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_installer_tool_probes_prints_and_power_cycles_a_simulated_kiosk(tmp_path: Path) -> None:
    workdir = tmp_path / "sim"
    sim = subprocess.Popen(
        [str(BIN / "kiosk-bridge"), "simulate", "zone24", "--dir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    overrides = workdir / "overrides.toml"
    try:
        deadline = time.monotonic() + 30
        while not overrides.exists():
            assert sim.poll() is None, sim.stdout.read() if sim.stdout else ""
            assert time.monotonic() < deadline, "the simulators did not come up in 30 s"
            time.sleep(0.1)

        probe = _bridge("probe", "zone24", "--overrides", str(overrides), "--json")
        assert probe.returncode == 0, probe.stderr
        rows = {row["id"]: row for row in json.loads(probe.stdout)}
        assert len(rows) == len(load_profile("zone24").peripherals)
        assert {
            pid: rows[pid]["health"] for pid in ("receipt-printer", "controller-board", "ups")
        } == {
            "receipt-printer": "ok",
            "controller-board": "ok",
            "ups": "ok",
        }
        assert rows["id-card-reader"]["health"] is None  # seen by the agent through udev

        ticket = _bridge(
            "print-test", "zone24", "--overrides", str(overrides), "--terminal", "亭林镇01"
        )
        assert ticket.returncode == 0, ticket.stderr
        assert "printer still ok" in ticket.stdout

        cycle = _bridge(
            "power-cycle", "zone24", "a4-printer", "--off-s", "0.2", "--overrides", str(overrides)
        )
        assert cycle.returncode == 0, cycle.stdout + cycle.stderr
        assert "a4_printer: 断电重启完成" in cycle.stdout

        # upsd and dummy-ups run with their config under the work dir.
        assert len(_processes_under(workdir)) >= 2

        refused = _bridge("power-cycle", "zone24", "qr-scanner", "--overrides", str(overrides))
        assert refused.returncode == 2
        assert "qr-scanner" in refused.stderr
        assert "no power channel" in refused.stderr
    finally:
        sim.send_signal(signal.SIGTERM)
        out, _ = sim.communicate(timeout=30)
    assert sim.returncode == 0, out
    assert "simulators stopped" in out
    assert not _processes_under(workdir), "upsd and dummy-ups end with the simulator"


def test_a_bad_profile_is_refused_with_the_field_named(tmp_path: Path) -> None:
    bad = tmp_path / "kiosk.toml"
    bad.write_text(
        (Path(__file__).parents[2] / "firmware_bridge/profiles/comprehensive.toml")
        .read_text()
        .replace('code_page = "gb18030"', 'code_page = "ebcdic"')
    )
    result = _bridge("show", str(bad))
    assert result.returncode == 2
    assert "peripherals[2].code_page: 'ebcdic'" in result.stderr
