"""``fleet-sim``: many simulated kiosks in one process, and faults injected into any of them.

Each terminal is a real :class:`~edge_agent.app.Agent` with its own MQTT connection over mutual
TLS; only the machine it reads is simulated, so the fleet server sees exactly what it would see
from real kiosks:

- the PC: a random walk per terminal (cpu, memory, disk, network counters), an ethernet and a
  4G interface, a boot time that changes when the simulated kiosk reboots;
- USB peripherals: a simulated udev source per terminal (plugged in at start);
- with ``--profile``, the first ``--real-devices`` terminals also get the firmware_bridge
  simulators of the profile (ESC/POS printer on a pty, relay board over Modbus RTU, UPS through
  the real NUT upsd), driven by the real drivers; the others watch their USB peripherals only.

All terminals share one SQLite database for their outboxes and command ledgers (a file per
terminal would be thousands of open files). At start at most ``--booting`` kiosks boot at once,
each until it is connected (or for 10 s): thousands of agents starting together in one process would
otherwise take their turns at every step (database, files, TLS) before the first one connects.
A kiosk whose agent fails is logged and boots again; it never ends the simulation.

Each simulated kiosk connects with its own client certificate, from ``--tls-dir``::

    DIR/ca.pem                  the fleet CA
    DIR/{terminal_id}.pem       that terminal's identity: private key, then certificate chain
                                (mode 0600, as `kiosk-agent enroll` writes it)

Faults, injected through the control socket (``--control PATH``) with
``fleet-sim inject --control PATH TERMINAL FAULT [VALUE]``:

==================  ============================================================================
power-cut [S]       the socket is dropped without DISCONNECT and the agent dies; power is back
                    after S seconds (default 30) and the kiosk boots again. A kiosk that is down
                    already (a reboot under way) boots S seconds after the cut, however soon it
                    would have been back otherwise
reboot [S]          a planned reboot: state "planned" first, back after S seconds (default 20)
paper-out / paper-ok  the receipt printer runs out of paper / gets a new roll
unplug P / plug P   USB peripheral P is unplugged / plugged back in
flap [S]            the network drops the connection every few seconds for S seconds (default 60)
clock-skew S        the kiosk's clock jumps S seconds (negative: behind); 0 puts it right
==================  ============================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Final

from edge_agent.app import Agent, KioskParts, wall_ms
from edge_agent.boots import Boot
from edge_agent.clock import FixedClockReference
from edge_agent.config import (
    MQTTS_PORT,
    AgentConfig,
    BrokerSettings,
    ClockSettings,
    PeripheralSettings,
    StorageSettings,
    TelemetrySettings,
    TerminalSettings,
    TlsSettings,
    parse_config,
    render_config,
)
from edge_agent.errors import AgentError
from edge_agent.identity import check_identity
from edge_agent.peripherals import usb_only
from edge_agent.stopping import sleep_unless_stopped
from edge_agent.store import AgentStore
from edge_agent.telemetry import InterfaceReading, NetworkReading, SystemReading
from edge_agent.usb import SimulatedUsb
from firmware_bridge.errors import BridgeError
from firmware_bridge.kiosk import KioskDevices
from firmware_bridge.profiles import Profile, load_profile
from firmware_bridge.simulation import SimulatedKiosk
from fleet_protocol.errors import InvalidId
from fleet_protocol.ids import site_id, terminal_id

GIB = 1024**3
FAULTS: Final = (
    "power-cut",
    "reboot",
    "paper-out",
    "paper-ok",
    "unplug",
    "plug",
    "flap",
    "clock-skew",
)
FLAP_EVERY_S: Final = 5.0
#: A kiosk that cannot start (its database or state directory) tries again after this long.
RETRY_S: Final = 60.0
#: A booting kiosk holds its place among those booting at once (``--booting``) until it is
#: connected, or this long (so a broker out of reach delays the boots, never stops them).
BOOT_HOLD_S: Final = 10.0
BOOTING: Final = 100


class SimulatedMachine:
    """A plausible kiosk PC: 8 GiB RAM, 128 GiB disk, busy during the day."""

    def __init__(self, seed: int, now_ms: Callable[[], int]) -> None:
        self._rng = random.Random(seed)  # noqa: S311 - simulation, not cryptography
        self._seed = seed
        self._now_ms = now_ms
        self._cpu = self._rng.uniform(5, 30)
        self._mem = self._rng.uniform(30, 60)
        self._disk = self._rng.uniform(20, 70)
        self._sent = self._rng.randrange(10**6, 10**9)
        self._recv = self._rng.randrange(10**6, 10**9)
        self._boots = 0
        self._booted_ms = now_ms() - int(self._rng.uniform(600, 30 * 86400) * 1000)

    def rebooted(self) -> None:
        self._boots += 1
        self._booted_ms = self._now_ms()

    @staticmethod
    def _walk(value: float, step: float, rng: random.Random) -> float:
        return min(100.0, max(0.0, value + rng.uniform(-step, step)))

    async def read(self) -> SystemReading:
        r = self._rng
        self._cpu = self._walk(self._cpu, 8, r)
        self._mem = self._walk(self._mem, 2, r)
        self._disk = min(99.0, self._disk + r.uniform(0, 0.01))
        self._sent += r.randrange(1_000, 200_000)
        self._recv += r.randrange(5_000, 2_000_000)
        return SystemReading(
            cpu_percent=self._cpu,
            memory_percent=self._mem,
            memory_available=int(8 * GIB * (1 - self._mem / 100)),
            disk_percent=self._disk,
            disk_free=int(128 * GIB * (1 - self._disk / 100)),
            uptime_s=max(0.0, (self._now_ms() - self._booted_ms) / 1000),
            net_bytes_sent=self._sent,
            net_bytes_recv=self._recv,
            load_1m=self._cpu / 25,
            temperatures={"coretemp/Package id 0": 40 + self._cpu / 3},
            boot_ms=self._booted_ms,
        )

    async def read_network(self) -> NetworkReading:
        return NetworkReading(
            interfaces=(
                InterfaceReading(
                    "enp1s0", "ethernet", True, self._sent, self._recv, 0, ("192.168.1.20",)
                ),
                InterfaceReading("wwan0", "cellular", False),
            )
        )

    async def boot(self) -> Boot:
        return Boot(boot_ms=self._booted_ms, boot_id=f"sim-{self._seed}-{self._boots}")


class SimulatedPowerButton:
    """The configured reboot and restart commands of a simulated kiosk: a reboot restarts its
    agent after the configured time; an application restart is only recorded."""

    def __init__(self, kiosk: SimulatedTerminal) -> None:
        self._kiosk = kiosk
        self.restarts = 0

    async def run_reboot(self) -> tuple[bool, str]:
        self._kiosk.reboot_requested()
        return True, "simulated reboot"

    async def run_restart_app(self) -> tuple[bool, str]:
        self.restarts += 1
        return True, "simulated application restart"


class SimulatedTerminal:
    """One simulated kiosk through its lives: each boot runs a new agent on the same disk."""

    def __init__(
        self,
        config: AgentConfig,
        index: int,
        store: AgentStore,
        *,
        profile: Profile | None,
        devices_dir: Path | None,
        down_s: float,
        log: logging.Logger,
        boot_gate: asyncio.Semaphore | None = None,
    ) -> None:
        self.config = config
        self._boot_gate = boot_gate or asyncio.Semaphore(1)
        self.id = config.terminal.id
        self._store = store
        self._log = log
        self.skew_ms = 0
        self.machine = SimulatedMachine(index, self.now_ms)
        self.power_button = SimulatedPowerButton(self)
        self._profile = profile
        self._devices_dir = devices_dir
        self.simulators: SimulatedKiosk | None = None
        self.devices: KioskDevices | None = None
        self.usb: SimulatedUsb | None = None
        self.agent: Agent | None = None
        self._life_stopping = asyncio.Event()
        self.down_s = down_s
        self._power_cut = False
        self._life: asyncio.Task[None] | None = None
        self.lives = 0
        #: An agent is running (False while the kiosk is down after a reboot or power cut).
        self.running = False
        #: Between two lives, down (rebooting or without power) until this ``time.monotonic``.
        self._down_until: float | None = None
        self._down_changed = asyncio.Event()

    def now_ms(self) -> int:
        return wall_ms() + self.skew_ms

    async def start_devices(self) -> None:
        profile = self._profile
        if profile is None:
            return
        if self._devices_dir is not None:
            self.simulators = SimulatedKiosk(profile, self._devices_dir)
            await self.simulators.start()
            profile = self.simulators.profile
            self.devices = KioskDevices(profile)
            await self.devices.__aenter__()
        else:
            profile = dataclasses.replace(
                profile, peripherals=tuple(p for p in profile.peripherals if usb_only(p))
            )
        self._profile = profile
        self.usb = SimulatedUsb(profile)

    async def close_devices(self) -> None:
        if self.devices is not None:
            await self.devices.close()
        if self.simulators is not None:
            await self.simulators.aclose()

    async def live(self, stopping: asyncio.Event) -> None:
        """Boot, run, and after a reboot or a power cut boot again, until the fleet stops.

        One kiosk's failure (its agent raising) is logged and that kiosk boots again after its
        down time, so one broken simulated kiosk does not end a simulation of thousands.
        """
        while not stopping.is_set():
            self._life_stopping = asyncio.Event()
            self._power_cut = False
            async with self._boot_gate:
                life = await self._boot()
                if life is not None:
                    try:
                        await self._until_connected(life, stopping)
                    except asyncio.CancelledError:
                        life.cancel()
                        raise
            if life is None:
                await sleep_unless_stopped(stopping, RETRY_S)
                continue
            await self._until_down(life, stopping)
            if stopping.is_set():
                return
            await self._stay_down(stopping)
            self.machine.rebooted()

    async def _boot(self) -> asyncio.Task[None] | None:
        """A new agent on this kiosk's disk, running; None if it cannot start."""
        try:
            agent = await asyncio.to_thread(self._new_agent)
        except AgentError as exc:
            self._log.error("%s cannot start: %s; again in %g s", self.id, exc, RETRY_S)
            return None
        self.agent = agent
        self.lives += 1
        self.running = True
        self._life = asyncio.create_task(
            agent.run(self._life_stopping), name=f"life:{self.id}:{self.lives}"
        )
        return self._life

    async def _until_connected(self, life: asyncio.Task[None], stopping: asyncio.Event) -> None:
        """While booting: until the agent is connected (or has tried for a while), or its life
        is over."""
        assert self.agent is not None
        await _first_of(
            life,
            self.agent.uplink.connected.wait(),
            stopping.wait(),
            self._life_stopping.wait(),
            within_s=BOOT_HOLD_S,
        )

    async def _until_down(self, life: asyncio.Task[None], stopping: asyncio.Event) -> None:
        """Until a power cut, a reboot or the end of the simulation has ended ``life``."""
        try:
            try:
                await _first_of(life, stopping.wait(), self._life_stopping.wait())
            except asyncio.CancelledError:
                life.cancel()
                raise
            if self._power_cut:
                life.cancel()  # no goodbye: the power is gone
            else:
                self._life_stopping.set()
            await life
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # not the power cut: this kiosk itself is being cancelled
            if not self._power_cut:
                self._log.error("%s: its agent was cancelled without a power cut", self.id)
        except Exception:  # noqa: BLE001 - the supervisor of one kiosk: log, boot again
            self._log.exception("%s: its agent failed; booting it again", self.id)
        finally:
            self.running = False

    async def _stay_down(self, stopping: asyncio.Event) -> None:
        """Down for ``down_s``, or until a power cut meanwhile says power is back."""
        self._down_until = time.monotonic() + self.down_s
        try:
            while not stopping.is_set():
                left = self._down_until - time.monotonic()
                if left <= 0:
                    return
                self._down_changed.clear()
                waits = [
                    asyncio.create_task(stopping.wait(), name="sim-wait"),
                    asyncio.create_task(self._down_changed.wait(), name="sim-wait"),
                ]
                try:
                    await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waits:
                        task.cancel()
        finally:
            self._down_until = None

    @property
    def down(self) -> bool:
        """Down between two lives: rebooting, or without power."""
        return self._down_until is not None

    def _new_agent(self) -> Agent:
        return Agent(
            self.config,
            KioskParts(
                machine=self.machine,
                store=self._store,
                machine_commands=self.power_button,
                profile=self._profile,
                devices=self.devices,
                usb=self.usb,
                clock_reference=FixedClockReference(wall_ms),
            ),
            now_ms=self.now_ms,
            logger=self._log.getChild(self.id),
        )

    # --- faults ---------------------------------------------------------------------------

    def reboot_requested(self) -> None:
        self._life_stopping.set()

    def power_cut(self, down_s: float) -> None:
        self.down_s = down_s
        if self._down_until is not None:
            # Down already (a reboot under way): no agent to kill, and power is back in down_s.
            self._down_until = time.monotonic() + down_s
            self._down_changed.set()
            return
        self._power_cut = True
        if self.agent is not None:
            self.agent.uplink.cut_link()
        # The agent is cancelled, never asked to stop: a stop request would run its orderly
        # shutdown (flush, "shutdown" state), which a kiosk without power does not get to do.
        if self._life is not None and not self._life.done():
            self._life.cancel()
        else:
            self._life_stopping.set()


async def _first_of(
    life: asyncio.Task[None],
    *waits: Coroutine[object, object, object],
    within_s: float | None = None,
) -> None:
    """Wait until ``life`` ends, one of ``waits`` returns, or ``within_s`` passes; the waits
    that did not return are cancelled (``life`` is not: it is the caller's)."""
    tasks = [asyncio.create_task(w, name="sim-wait") for w in waits]
    try:
        await asyncio.wait([life, *tasks], timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class SimulatedFleet:
    """All simulated kiosks of one process, and the faults injected into them."""

    def __init__(self, terminals: list[SimulatedTerminal]) -> None:
        self.terminals = {t.id: t for t in terminals}
        self._flaps: dict[str, asyncio.Task[None]] = {}

    async def inject(self, terminal: str, fault: str, value: str | None) -> str:
        """Apply a fault; a line saying what was done, or raises ValueError with why not."""
        t = self.terminals.get(terminal_id(terminal)) if _valid_id(terminal) else None
        if t is None:
            raise ValueError(f"no simulated terminal {terminal!r}")
        handlers = {
            "power-cut": self._power_cut,
            "reboot": self._reboot,
            "paper-out": self._paper,
            "paper-ok": self._paper,
            "unplug": self._usb,
            "plug": self._usb,
            "flap": self._flap,
            "clock-skew": self._clock_skew,
        }
        handler = handlers.get(fault)
        if handler is None:
            raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
        return f"{terminal}: " + await handler(t, fault, value)

    async def _power_cut(self, t: SimulatedTerminal, _fault: str, value: str | None) -> str:
        down = _seconds(value, default=30.0)
        if not (t.running or t.down):
            raise ValueError(f"{t.id} is booting; cut its power once it runs or is down")
        while_down = " while it was down" if t.down else ""
        t.power_cut(down)
        return f"power cut{while_down}, back in {down:g} s"

    async def _reboot(self, t: SimulatedTerminal, _fault: str, value: str | None) -> str:
        agent = t.agent
        if agent is None or not t.running:
            raise ValueError(f"{t.id} is down already (rebooting or without power)")
        t.down_s = _seconds(value, default=20.0)  # the simulated reboot is down this long
        await agent.operations.reboot("fleet-sim", 0.0, t.down_s)
        return f"planned reboot, back in {t.down_s:g} s"

    async def _paper(self, t: SimulatedTerminal, fault: str, _value: str | None) -> str:
        sims = t.simulators
        if sims is None or not sims.printers:
            raise ValueError(f"{t.id} has no simulated printer (see --profile and --real-devices)")
        sims.printer().state.paper_out = fault == "paper-out"
        return fault

    async def _usb(self, t: SimulatedTerminal, fault: str, value: str | None) -> str:
        usb = t.usb
        if usb is None:
            raise ValueError(f"{t.id} has no simulated USB peripherals (see --profile)")
        if not value:
            names = ", ".join(p.id for p in usb.profile.peripherals if p.usb_ids)
            raise ValueError(f"{fault} needs the peripheral: one of {names}")
        try:
            if fault == "unplug":
                usb.unplug_peripheral(value)
            else:
                usb.plug_peripheral(value)
        except AgentError as exc:
            raise ValueError(f"{t.id}: {exc}") from exc
        return f"{value} {fault}ged"

    async def _flap(self, t: SimulatedTerminal, _fault: str, value: str | None) -> str:
        seconds = _seconds(value, default=60.0)
        old = self._flaps.pop(t.id, None)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(_flap(t, seconds), name=f"flap:{t.id}")
        self._flaps[t.id] = task
        task.add_done_callback(lambda done: self._flap_ended(t.id, done))
        return f"network flapping for {seconds:g} s"

    def _flap_ended(self, terminal: str, task: asyncio.Task[None]) -> None:
        if self._flaps.get(terminal) is task:
            del self._flaps[terminal]

    async def _clock_skew(self, t: SimulatedTerminal, _fault: str, value: str | None) -> str:
        if value is None:
            raise ValueError("clock-skew needs the seconds (negative: behind; 0 puts it right)")
        seconds = _number(value)
        t.skew_ms = int(seconds * 1000)
        agent = t.agent
        if t.running and agent is not None and agent.parts.clock_reference is not None:
            # Checked at once, so the fault shows without waiting for --clock-check.
            await agent.check_clock(agent.parts.clock_reference)
        return f"clock off by {seconds:g} s"

    async def close(self) -> None:
        """End the faults still running (network flapping)."""
        flaps = list(self._flaps.values())
        for task in flaps:
            task.cancel()
        await asyncio.gather(*flaps, return_exceptions=True)

    async def serve_control(self, path: Path) -> asyncio.Server:
        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = (await reader.readline()).decode("utf-8", "replace").split()
                if len(line) < 2:
                    answer = "error: expected TERMINAL FAULT [VALUE]"
                else:
                    try:
                        answer = "ok: " + await self.inject(
                            line[0], line[1], line[2] if len(line) > 2 else None
                        )
                    except (ValueError, AgentError, BridgeError) as exc:
                        answer = f"error: {exc}"
                writer.write(answer.encode() + b"\n")
                await writer.drain()
            finally:
                writer.close()

        await asyncio.to_thread(path.unlink, missing_ok=True)
        return await asyncio.start_unix_server(client, path=str(path))


def _valid_id(value: str) -> bool:
    try:
        terminal_id(value)
    except InvalidId:
        return False
    return True


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a number of seconds")
    return number


def _seconds(value: str | None, *, default: float) -> float:
    """A duration given to a fault, or its default when none was given."""
    if value is None:
        return default
    seconds = _number(value)
    if seconds < 0:
        raise ValueError(f"{value!r}: a duration cannot be negative")
    return seconds


async def _flap(t: SimulatedTerminal, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if t.agent is not None:
            t.agent.uplink.cut_link()
        await asyncio.sleep(FLAP_EVERY_S)


# --- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet-sim",
        description="模拟多台自助终端 / many simulated kiosks (real agent code) in one process. "
        "`fleet-sim inject --help`: inject a fault into a running simulation.",
    )
    p.add_argument("--terminals", type=int, default=10, help="how many kiosks (default 10)")
    p.add_argument("--prefix", default="sim", help="terminal ids are PREFIX-0001, ...")
    p.add_argument(
        "--site",
        action="append",
        default=[],
        help="site id to spread the terminals over (repeat; default: one site PREFIX-site)",
    )
    p.add_argument("--broker-host", default="127.0.0.1")
    p.add_argument("--broker-port", type=int, default=MQTTS_PORT)
    p.add_argument(
        "--broker-server-name",
        default="",
        help="name in the broker's certificate, if not --broker-host",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        required=True,
        help="DIR/ca.pem (fleet CA) and DIR/TERMINAL_ID.pem (key + certificate) per kiosk",
    )
    p.add_argument("--keepalive", type=int, default=30, help="MQTT keep-alive, seconds")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--batch-size", type=int, default=6, help="samples per telemetry message")
    p.add_argument("--state-dir", type=Path, required=True, help="one sub-directory per kiosk")
    p.add_argument(
        "--profile",
        default="",
        help="device profile of every kiosk (comprehensive, zone24, or a file); default none",
    )
    p.add_argument(
        "--real-devices",
        type=int,
        default=0,
        help="how many kiosks (the first) get the profile's device simulators (default 0)",
    )
    p.add_argument("--debounce", type=float, default=2.0, help="peripheral debounce, seconds")
    p.add_argument("--clock-check", type=float, default=60.0, help="seconds between clock checks")
    p.add_argument("--control", type=Path, help="unix socket for `fleet-sim inject`")
    p.add_argument(
        "--booting",
        type=int,
        default=BOOTING,
        help="how many kiosks boot at once: each holds its place until it is connected, or "
        f"{BOOT_HOLD_S:g} s (default {BOOTING})",
    )
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING"])
    return p


def _inject_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet-sim inject",
        description="向运行中的模拟终端注入故障 / inject a fault into a running fleet-sim.",
    )
    p.add_argument("--control", type=Path, required=True, help="the simulation's --control")
    p.add_argument("terminal")
    p.add_argument("fault", choices=FAULTS)
    p.add_argument("value", nargs="?", help="seconds, or the USB peripheral for plug/unplug")
    return p


def build_configs(args: argparse.Namespace) -> list[AgentConfig]:
    sites = [site_id(s) for s in args.site] or [site_id(f"{args.prefix}-site")]
    configs = []
    for i in range(1, args.terminals + 1):
        tid = terminal_id(f"{args.prefix}-{i:04d}")
        configs.append(
            AgentConfig(
                terminal=TerminalSettings(id=tid, site=sites[(i - 1) % len(sites)]),
                broker=BrokerSettings(
                    host=args.broker_host,
                    port=args.broker_port,
                    keepalive_s=args.keepalive,
                ),
                tls=TlsSettings(
                    ca_file=str(args.tls_dir / "ca.pem"),
                    identity_file=str(args.tls_dir / f"{tid}.pem"),
                    server_name=args.broker_server_name,
                ),
                telemetry=TelemetrySettings(
                    interval_s=args.interval,
                    batch_size=args.batch_size,
                    max_batch_age_s=max(args.interval * args.batch_size / 3, 1.0),
                ),
                storage=StorageSettings(state_dir=str(args.state_dir / tid)),
                peripherals=PeripheralSettings(
                    profile=args.profile, debounce_s=args.debounce, usb="off"
                ),
                clock=ClockSettings(check_interval_s=max(10.0, args.clock_check)),
            )
        )
    return configs


async def _run(
    args: argparse.Namespace, configs: list[AgentConfig], profile: Profile | None
) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(stopping.set)

    # Not loop.add_signal_handler: that learns of a signal through the loop's self-pipe, which
    # thousands of agents' worker threads fill when the loop is busy (a connect storm), and a
    # signal that finds it full is lost: fleet-sim then ignored SIGTERM. A Python handler
    # always runs, in this thread.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return await _simulate(args, configs, profile, stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _simulate(
    args: argparse.Namespace,
    configs: list[AgentConfig],
    profile: Profile | None,
    stopping: asyncio.Event,
) -> int:
    loop = asyncio.get_running_loop()
    # Every agent does its file and database work, and aiomqtt its connect (TCP and the TLS
    # handshake), in the default executor. Its default of a handful of threads makes thousands
    # of kiosks queue behind each other's fsyncs at start and after a broker restart.
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=_worker_threads(args.booting), thread_name_prefix="sim")
    )
    log = logging.getLogger("fleet-sim")
    store = await asyncio.to_thread(AgentStore.open, args.state_dir / "fleet-sim.db")
    boot_gate = asyncio.Semaphore(args.booting)
    terminals = [
        SimulatedTerminal(
            c,
            i,
            store,
            profile=profile,
            devices_dir=args.state_dir / c.terminal.id
            if profile is not None and i < args.real_devices
            else None,
            down_s=30.0,
            log=log,
            boot_gate=boot_gate,
        )
        for i, c in enumerate(configs)
    ]
    fleet = SimulatedFleet(terminals)
    server: asyncio.Server | None = None
    try:
        try:
            for t in terminals:
                await t.start_devices()
            if args.control:
                server = await fleet.serve_control(args.control)
        except (BridgeError, OSError) as exc:
            print(f"fleet-sim: error: {exc}", file=sys.stderr)
            return 2
        async with asyncio.TaskGroup() as tg:
            for t in terminals:
                tg.create_task(t.live(stopping), name=f"kiosk:{t.id}")
            print(
                f"fleet-sim: {len(terminals)} simulated kiosks running; Ctrl-C to stop", flush=True
            )
            await stopping.wait()
            print(f"fleet-sim: stopping {len(terminals)} kiosks ...", flush=True)
            await fleet.close()
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
            await asyncio.to_thread(args.control.unlink, missing_ok=True)
        for t in terminals:
            await t.close_devices()
        await asyncio.to_thread(store.close)
    print("fleet-sim: stopped", flush=True)
    return 0


def _worker_threads(booting: int) -> int:
    return max(8, min(32, booting // 4))


def _inject(argv: list[str]) -> int:
    args = _inject_parser().parse_args(argv)

    async def ask() -> str:
        reader, writer = await asyncio.open_unix_connection(str(args.control))
        try:
            writer.write(f"{args.terminal} {args.fault} {args.value or ''}\n".encode())
            await writer.drain()
            return (await reader.readline()).decode("utf-8", "replace").strip()
        finally:
            writer.close()
            await writer.wait_closed()

    try:
        answer = asyncio.run(ask())
    except OSError as exc:
        print(
            f"fleet-sim inject: error: {args.control}: {exc.strerror}; is fleet-sim running "
            "with this --control?",
            file=sys.stderr,
        )
        return 2
    if answer.startswith("ok: "):
        print(answer.removeprefix("ok: "))
        return 0
    print(f"fleet-sim inject: {answer or 'error: no answer from the simulation'}", file=sys.stderr)
    return 1


def _check_identities(configs: list[AgentConfig]) -> None:
    """Every kiosk's identity, checked before the first connection, so a missing or unsafe
    file stops the simulation with its name instead of one kiosk retrying forever."""
    if len(configs) > 100:
        print(f"fleet-sim: checking {len(configs)} identities ...", flush=True)
    # The checks parse certificates and build TLS contexts; threads overlap the file reads.
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="identity") as pool:
        for _ in pool.map(check_identity, configs):
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inject"]:
        return _inject(argv[1:])
    args = _parser().parse_args(argv)
    for name in ("terminals", "booting"):
        if getattr(args, name) < 1:
            print(f"fleet-sim: error: --{name} must be at least 1", file=sys.stderr)
            return 2
    # Absolute, so the simulators' device paths and the agents' files do not depend on where
    # the process happens to be.
    args.state_dir = args.state_dir.absolute()
    args.tls_dir = args.tls_dir.absolute()
    try:
        configs = build_configs(args)
        # Records built in code skip the checks a config file gets; the options are the same
        # for every kiosk, so one round trip through the parser checks them all.
        parse_config(render_config(configs[0]).encode(), "fleet-sim options")
        profile = load_profile(args.profile) if args.profile else None
        _check_identities(configs)
    except (InvalidId, AgentError, BridgeError) as exc:
        print(f"fleet-sim: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_run(args, configs, profile))


if __name__ == "__main__":
    sys.exit(main())
