"""fleet-sim against the real stack: simulated kiosks connect over mutual TLS like real ones,
and each fault injected through its control socket reaches the fleet as it would from a kiosk.

One ``fleet-sim`` runs five kiosks for the module, one fault per kiosk so the faults do not
disturb each other: 0001 has the profile's device simulators (printer on a pty, relay board
over Modbus) and USB; 0002 loses its power; 0003 is rebooted; 0004's network flaps; 0005's
clock jumps. What the fleet sees is read where the fleet server reads it: the broker (as the
server's own identity), InfluxDB (through a running fleet server) and the server's ops API.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from fleet_protocol.codec import decode
from fleet_protocol.messages import Event, Peripherals, PeripheralStatus, State
from provisioning.stack import StackInfo, running_stack
from tests.integration.fleet import (
    BIN,
    Proc,
    RunningServer,
    eventually,
    http_json,
    influx_query,
    mqtt_client,
    service_identity,
    start_server,
    start_sim,
)

pytestmark = pytest.mark.integration

SITE = "fsim-site"
TERMINALS = 5
#: How soon the broker must publish the will after a power cut. The keep-alive (30 s) would
#: take 45 s; a socket dropped without DISCONNECT is noticed at once.
LOST_WITHIN_S = 10.0

Message = State | Event | Peripherals
_TYPES: dict[str, type[State] | type[Event] | type[Peripherals]] = {
    "state": State,
    "events": Event,
    "peripherals": Peripherals,
}


@dataclass(frozen=True)
class Seen:
    at: float  # time.monotonic() when it arrived
    terminal: str
    message: Message
    retained: bool


class Observer:
    """The fleet server's view of the broker, from a thread: every state, event and
    peripherals snapshot of the terminals whose id starts with ``prefix``."""

    def __init__(self, stack: StackInfo, prefix: str) -> None:
        self._stack = stack
        self._prefix = prefix
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"observer:{prefix}")

    def start(self) -> Observer:
        self._thread.start()
        if not self._ready.wait(20):
            raise AssertionError(f"observer did not subscribe: {self._failure!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        if self._failure is not None:
            raise AssertionError(f"observer failed: {self._failure!r}")

    def _main(self) -> None:
        try:
            asyncio.run(self._observe())
        except Exception as exc:  # handed to the test's thread by stop()
            self._failure = exc
            self._ready.set()

    async def _observe(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        client_id = f"observer-{uuid.uuid4().hex[:8]}"
        async with mqtt_client(
            self._stack, service_identity(self._stack), client_id=client_id, service=True
        ) as client:
            for channel in _TYPES:
                await client.subscribe(f"kiosk/v1/+/{channel}", qos=1)
            self._ready.set()
            reader = asyncio.create_task(self._read(client), name="observer-read")
            stopper = asyncio.create_task(self._stop.wait(), name="observer-stop")
            done, _ = await asyncio.wait([reader, stopper], return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
            stopper.cancel()
            if reader in done:
                reader.result()  # its error, if it failed
                raise AssertionError("the broker ended the observer's message stream")

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            _, _, terminal, channel = str(message.topic).split("/")[:4]
            if not terminal.startswith(self._prefix) or not isinstance(message.payload, bytes):
                continue
            seen = Seen(
                time.monotonic(),
                terminal,
                decode(_TYPES[channel], message.payload),
                bool(message.retain),
            )
            with self._lock:
                self._seen.append(seen)

    def seen(self, terminal: str, kind: type[Message], since: float = 0.0) -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self._seen
                if s.terminal == terminal and isinstance(s.message, kind) and s.at >= since
            ]

    def states(self, terminal: str, since: float = 0.0) -> list[State]:
        return [s.message for s in self.seen(terminal, State, since)]  # type: ignore[misc]

    def events(self, terminal: str, since: float = 0.0) -> list[Event]:
        return [s.message for s in self.seen(terminal, Event, since)]  # type: ignore[misc]

    def snapshots(self, terminal: str, since: float = 0.0) -> list[Peripherals]:
        return [s.message for s in self.seen(terminal, Peripherals, since)]  # type: ignore[misc]

    def timed_states(self, terminal: str, since: float) -> list[tuple[float, State]]:
        """States with when they arrived."""
        return [
            (s.at, s.message)
            for s in self.seen(terminal, State, since)
            if isinstance(s.message, State)
        ]

    def state(self, terminal: str) -> State | None:
        states = self.states(terminal)
        return states[-1] if states else None


@dataclass
class Sim:
    stack: StackInfo
    server: RunningServer
    proc: Proc
    control: Path
    observer: Observer
    prefix: str

    def terminal(self, n: int) -> str:
        return f"{self.prefix}-{n:04d}"

    def inject(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "fleet-sim"), "inject", "--control", str(self.control), *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def injected(self, *argv: str) -> float:
        """Inject a fault that must be accepted; when it was injected (monotonic)."""
        at = time.monotonic()
        result = self.inject(*argv)
        assert result.returncode == 0, result.stderr + self.log_tail()
        return at

    def log_tail(self) -> str:
        return "\nfleet-sim log:\n" + self.proc.output()[-4000:]

    def wait_online(self, terminal: str) -> State:
        return eventually(lambda: self.online(terminal), 60)

    def online(self, terminal: str) -> State | None:
        state = self.observer.state(terminal)
        return state if state is not None and state.online else None

    def seqs(self, measurement: str, terminal: str) -> list[int]:
        series = influx_query(
            self.stack.influx_url,
            self.server.database,
            f'SELECT "seq" FROM "{measurement}" WHERE "terminal" = \'{terminal}\'',
        )
        if not series:
            return []
        values = series[0]["values"]
        assert isinstance(values, list)
        return sorted(int(v[1]) for v in values)

    def seqs_until(self, measurement: str, terminal: str, seq: int) -> list[int]:
        """The seqs stored once ``seq`` is among them."""

        def reached() -> list[int] | None:
            seqs = self.seqs(measurement, terminal)
            return seqs if seqs and seqs[-1] >= seq else None

        return eventually(reached, 40)

    def reboot_counts(self, terminal: str) -> list[int]:
        series = influx_query(
            self.stack.influx_url,
            self.server.database,
            f'SELECT "reboot_count" FROM "system" WHERE "terminal" = \'{terminal}\'',
        )
        if not series:
            return []
        values = series[0]["values"]
        assert isinstance(values, list)
        return [int(v[1]) for v in values if v[1] is not None]

    def server_view(self, terminal: str) -> dict[str, object]:
        listing = http_json(f"{self.server.api}/api/v1/terminals")
        assert isinstance(listing, dict)
        for view in listing["terminals"]:
            if view["id"] == terminal:
                assert isinstance(view, dict)
                return view
        return {}


@pytest.fixture(scope="module")
def sim_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """A stack of this module's own: faults injected by the hundred (dropped sockets, session
    takeovers) stay on a broker no other test uses."""
    with running_stack(tmp_path_factory.mktemp("sim-stack") / "stack") as info:
        yield info


@pytest.fixture(scope="module")
def sim(sim_stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    stack = sim_stack
    workdir = tmp_path_factory.mktemp("fleet-sim")
    prefix = f"fs{uuid.uuid4().hex[:6]}"
    server = start_server(stack, workdir)
    observer = Observer(stack, prefix).start()
    proc, control = start_sim(
        stack,
        workdir,
        prefix,
        TERMINALS,
        *("--profile", "comprehensive", "--real-devices", "1"),
        *("--interval", "1", "--debounce", "1", "--clock-check", "10"),
        site=SITE,
    )
    sim = Sim(stack, server, proc, control, observer, prefix)
    try:
        for n in range(1, TERMINALS + 1):
            sim.wait_online(sim.terminal(n))
        yield sim
    finally:
        code = proc.stop(timeout=30)
        try:
            observer.stop()
        finally:
            server.stop()
        assert code == 0, f"fleet-sim exited {code}" + sim.log_tail()


def test_every_simulated_kiosk_reports_like_a_real_one(sim: Sim) -> None:
    for n in range(1, TERMINALS + 1):
        terminal = sim.terminal(n)
        state = sim.online(terminal)
        assert state is not None
        assert state.site == SITE
        # Telemetry reaches InfluxDB through the fleet server, numbered from 1 without a gap.
        seqs = sim.seqs_until("system", terminal, 3)
        assert seqs == list(range(1, seqs[-1] + 1))
        assert sim.server_view(terminal)["status"] == "online"
    # The kiosk with device simulators reports its bridge-driven devices as working; the
    # others watch their USB peripherals only.
    with_devices = eventually(lambda: sim.observer.snapshots(sim.terminal(1)), 30)[-1]
    states = {p.id: p.state for p in with_devices.peripherals}
    assert states["receipt-printer"] == "ok"
    assert states["controller-board"] == "ok"
    assert states["id-card-reader"] == "ok"
    usb_only = eventually(lambda: sim.observer.snapshots(sim.terminal(2)), 30)[-1]
    assert {p.state for p in usb_only.peripherals} == {"ok"}
    assert "receipt-printer" not in {p.id for p in usb_only.peripherals}


def test_a_power_cut_leaves_the_will_at_once_and_the_kiosk_boots_again(sim: Sim) -> None:
    terminal = sim.terminal(2)
    before = sim.online(terminal)
    assert before is not None
    reboots = eventually(lambda: sim.reboot_counts(terminal), 30)
    cut = sim.injected(terminal, "power-cut", "5")

    lost_at, lost = eventually(
        lambda: [(at, s) for at, s in sim.observer.timed_states(terminal, cut) if not s.online], 30
    )[0]
    assert lost.reason == "lost"  # the will: no DISCONNECT reached the broker
    assert lost.session == before.session
    assert lost_at - cut < LOST_WITHIN_S, f"the will came {lost_at - cut:.1f} s after the cut"
    # The fleet server takes it for what it is: a terminal lost without a word.
    view = eventually(lambda: _offline(sim.server_view(terminal)), 10)
    assert view["reason"] == "lost"

    back_at, back = eventually(
        lambda: [(at, s) for at, s in sim.observer.timed_states(terminal, lost_at) if s.online],
        60,
    )[0]
    assert back.session > before.session
    assert back_at - cut >= 5.0  # the power was off that long
    # Its next system sample counts one more reboot of the kiosk.
    eventually(lambda: max(sim.reboot_counts(terminal)) == max(reboots) + 1, 30)


def test_a_planned_reboot_says_when_it_will_be_back(sim: Sim) -> None:
    terminal = sim.terminal(3)
    before = sim.online(terminal)
    assert before is not None
    asked = sim.injected(terminal, "reboot", "6")

    offline = eventually(
        lambda: [s for s in sim.observer.states(terminal, asked) if not s.online], 30
    )
    planned = offline[0]
    assert planned.reason == "planned"
    assert planned.expected_back is not None
    assert planned.expected_back >= planned.ts + 5_000
    assert all(s.reason == "planned" for s in offline), "a planned reboot must not look lost"
    # The fleet server takes it as planned, not as a lost terminal.
    view = eventually(lambda: _offline(sim.server_view(terminal)), 10)
    assert view["reason"] == "planned"

    back = eventually(lambda: [s for s in sim.observer.states(terminal, asked) if s.online], 60)
    assert back[0].session > before.session
    eventually(lambda: sim.server_view(terminal)["status"] == "online", 20)


def test_paper_out_shows_the_printer_faulty_with_the_reason(sim: Sim) -> None:
    terminal = sim.terminal(1)
    out = sim.injected(terminal, "paper-out")

    def printer_events(since: float, kind: str) -> list[Event]:
        return [
            e
            for e in sim.observer.events(terminal, since)
            if e.kind == kind and e.attributes.get("peripheral") == "receipt-printer"
        ]

    fault = eventually(lambda: printer_events(out, "peripheral.fault"), 30)[0]
    assert fault.attributes["new"] == "faulty"
    assert "paper_out" in str(fault.attributes["reasons"])
    assert "缺纸" in fault.message
    snapshot = eventually(lambda: _printer_in(sim, terminal, out, "faulty"), 30)
    assert "[paper_out]" in snapshot.reason
    assert "请更换纸卷" in snapshot.reason

    ok = sim.injected(terminal, "paper-ok")
    recovered = eventually(lambda: printer_events(ok, "peripheral.recovered"), 30)[0]
    assert recovered.attributes["new"] == "ok"
    eventually(lambda: _printer_in(sim, terminal, ok, "ok"), 30)


def _offline(view: dict[str, object]) -> dict[str, object] | None:
    return view if view.get("status") == "offline" else None


def _printer_in(sim: Sim, terminal: str, since: float, state: str) -> PeripheralStatus | None:
    for snapshot in reversed(sim.observer.snapshots(terminal, since)):
        for p in snapshot.peripherals:
            if p.id == "receipt-printer" and p.state == state:
                return p
    return None


def test_an_unplugged_usb_peripheral_is_absent_until_plugged_back(sim: Sim) -> None:
    terminal = sim.terminal(1)
    reader = "id-card-reader"

    def reader_events(since: float) -> list[Event]:
        return [
            e
            for e in sim.observer.events(terminal, since)
            if e.attributes.get("peripheral") == reader
        ]

    def reader_state(since: float) -> str | None:
        snapshots = sim.observer.snapshots(terminal, since)
        if not snapshots:
            return None
        return next(p.state for p in snapshots[-1].peripherals if p.id == reader)

    unplugged = sim.injected(terminal, "unplug", reader)
    gone = eventually(lambda: reader_events(unplugged), 30)[0]
    assert gone.kind == "peripheral.unplugged"
    assert gone.attributes["new"] == "absent"
    assert gone.attributes["reasons"] == "usb_unplugged"
    eventually(lambda: reader_state(unplugged) == "absent", 30)

    plugged = sim.injected(terminal, "plug", reader)
    back = eventually(lambda: reader_events(plugged), 30)[0]
    assert back.attributes["new"] == "ok"
    assert back.attributes["old"] == "absent"
    eventually(lambda: reader_state(plugged) == "ok", 30)


def test_a_flapping_network_loses_no_sample(sim: Sim) -> None:
    terminal = sim.terminal(4)
    before = sim.online(terminal)
    assert before is not None
    started = sim.injected(terminal, "flap", "12")

    def losses() -> list[State]:
        return [s for s in sim.observer.states(terminal, started) if not s.online]

    eventually(lambda: len(losses()) >= 2, 40)
    assert {s.reason for s in losses()} == {"lost"}
    time.sleep(max(0.0, started + 12 - time.monotonic()))  # the flapping is over
    now_online = eventually(lambda: sim.online(terminal), 30)
    assert now_online.session >= before.session + 2
    # Every sample taken while the link came and went reaches InfluxDB: no seq is missing.
    until = max(sim.seqs("system", terminal)) + 5
    for measurement in ("system", "power"):
        seqs = sim.seqs_until(measurement, terminal, until)
        assert seqs == list(range(1, seqs[-1] + 1)), f"{measurement}: a sample is missing"


def test_a_clock_off_by_two_minutes_is_reported_and_then_cleared(sim: Sim) -> None:
    terminal = sim.terminal(5)
    skewed = sim.injected(terminal, "clock-skew", "120")
    wrong = eventually(
        lambda: [e for e in sim.observer.events(terminal, skewed) if e.kind == "clock.wrong"], 30
    )[0]
    assert wrong.severity == "error"
    assert 119_000 <= int(str(wrong.attributes["offset_ms"])) <= 121_000
    assert "快 120" in wrong.message

    righted = sim.injected(terminal, "clock-skew", "0")
    eventually(
        lambda: [e for e in sim.observer.events(terminal, righted) if e.kind == "clock.ok"], 30
    )


def test_an_injection_fleet_sim_cannot_do_is_refused_with_the_reason(sim: Sim) -> None:
    unknown_terminal = sim.inject("nobody-0001", "paper-out")
    assert unknown_terminal.returncode == 1
    assert "no simulated terminal 'nobody-0001'" in unknown_terminal.stderr

    unknown_fault = sim.inject(sim.terminal(1), "meltdown")
    assert unknown_fault.returncode == 2
    assert "invalid choice: 'meltdown'" in unknown_fault.stderr

    no_printer = sim.inject(sim.terminal(2), "paper-out")
    assert no_printer.returncode == 1
    assert "has no simulated printer" in no_printer.stderr

    no_such_device = sim.inject(sim.terminal(1), "unplug", "coffee-machine")
    assert no_such_device.returncode == 1
    assert "no peripheral 'coffee-machine'" in no_such_device.stderr

    not_seconds = sim.inject(sim.terminal(5), "clock-skew", "soon")
    assert not_seconds.returncode == 1
    assert "'soon' is not a number of seconds" in not_seconds.stderr

    nothing_there = subprocess.run(
        [str(BIN / "fleet-sim"), "inject", "--control", str(sim.control) + ".x", "x", "flap"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert nothing_there.returncode == 2
    assert "is fleet-sim running with this --control?" in nothing_there.stderr
    for result in (unknown_terminal, unknown_fault, no_printer, no_such_device, nothing_there):
        assert "Traceback" not in result.stderr
    assert sim.proc.popen is not None
    assert sim.proc.popen.poll() is None, "fleet-sim must keep running" + sim.log_tail()


def test_sigterm_stops_every_kiosk_with_a_retained_shutdown(
    sim_stack: StackInfo, tmp_path: Path
) -> None:
    stack = sim_stack
    prefix = f"fx{uuid.uuid4().hex[:6]}"
    observer = Observer(stack, prefix).start()
    proc, _ = start_sim(
        stack,
        tmp_path,
        prefix,
        3,
        *("--profile", "comprehensive", "--real-devices", "1", "--interval", "1"),
        site=SITE,
    )
    terminals = [f"{prefix}-{n:04d}" for n in (1, 2, 3)]
    try:
        eventually(lambda: all(_online(observer, t) for t in terminals), 60)
    finally:
        code = proc.stop(timeout=30)  # SIGTERM
        observer.stop()
    assert code == 0, proc.output()[-3000:]
    assert "fleet-sim: stopped" in proc.output()
    # What the broker keeps for each, as a subscriber arriving now reads it.
    late = Observer(stack, prefix).start()
    try:
        eventually(lambda: all(late.state(t) for t in terminals), 20)
    finally:
        late.stop()
    for terminal in terminals:
        (kept,) = late.seen(terminal, State)
        assert kept.retained
        assert isinstance(kept.message, State)
        assert not kept.message.online
        assert kept.message.reason == "shutdown"


def _online(observer: Observer, terminal: str) -> bool:
    state = observer.state(terminal)
    return state is not None and state.online
