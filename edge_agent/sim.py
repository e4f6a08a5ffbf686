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
terminal would be thousands of open files).

Each simulated kiosk connects with its own client certificate, from ``--tls-dir``::

    DIR/ca.pem                  the fleet CA
    DIR/{terminal_id}.pem       that terminal's identity: private key, then certificate chain
                                (mode 0600, as `kiosk-agent enroll` writes it)

Faults, injected through the control socket (``--control PATH``) with
``fleet-sim inject --control PATH TERMINAL FAULT [VALUE]``:

==================  ============================================================================
power-cut [S]       the socket is dropped without DISCONNECT and the agent dies; power is back
                    after S seconds (default 30) and the kiosk boots again
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
import contextlib
import dataclasses
import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
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
)
from edge_agent.errors import AgentError
from edge_agent.identity import check_identity
from edge_agent.peripherals import usb_only
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
    ) -> None:
        self.config = config
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
        self.lives = 0

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
        """Boot, run, and after a reboot or a power cut boot again, until the fleet stops."""
        while not stopping.is_set():
            self._life_stopping = asyncio.Event()
            self._power_cut = False
            self.agent = await asyncio.to_thread(self._new_agent)
            self.lives += 1
            life = asyncio.create_task(
                self.agent.run(self._life_stopping), name=f"life:{self.id}:{self.lives}"
            )
            stop = asyncio.create_task(stopping.wait(), name=f"life-stop:{self.id}")
            down = asyncio.create_task(self._life_stopping.wait(), name=f"life-down:{self.id}")
            await asyncio.wait({life, stop, down}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            down.cancel()
            if self._power_cut:
                life.cancel()  # no goodbye: the power is gone
            else:
                self._life_stopping.set()
            with contextlib.suppress(asyncio.CancelledError):
                await life
            if stopping.is_set():
                return
            await _sleep_unless(stopping, self.down_s)
            self.machine.rebooted()

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
        self._power_cut = True
        if self.agent is not None:
            self.agent.uplink.cut_link()
        self._life_stopping.set()


async def _sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=max(0.0, seconds))


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
        down = _number(value) or 30.0
        t.power_cut(down)
        return f"power cut, back in {down:g} s"

    async def _reboot(self, t: SimulatedTerminal, _fault: str, value: str | None) -> str:
        agent = t.agent
        if agent is None:
            raise ValueError(f"{t.id} is not running")
        t.down_s = _number(value) or 20.0  # the simulated reboot command is down this long
        await agent.operations.reboot("fleet-sim", 0.0, t.down_s)
        return f"planned reboot, back in {t.down_s:g} s"

    async def _paper(self, t: SimulatedTerminal, fault: str, _value: str | None) -> str:
        sims = t.simulators
        if sims is None or not sims.printers:
            raise ValueError(f"{t.id} has no simulated printer (see --real-devices)")
        sims.printer().state.paper_out = fault == "paper-out"
        return fault

    async def _usb(self, t: SimulatedTerminal, fault: str, value: str | None) -> str:
        if t.usb is None or not value:
            raise ValueError(f"{fault} needs a USB peripheral of {t.id}'s profile")
        try:
            if fault == "unplug":
                t.usb.unplug_peripheral(value)
            else:
                t.usb.plug_peripheral(value)
        except (KeyError, ValueError, AgentError, BridgeError) as exc:
            raise ValueError(f"{t.id}: {exc}") from exc
        return f"{value} {fault}ged"

    async def _flap(self, t: SimulatedTerminal, _fault: str, value: str | None) -> str:
        seconds = _number(value) or 60.0
        old = self._flaps.pop(t.id, None)
        if old is not None:
            old.cancel()
        self._flaps[t.id] = asyncio.create_task(_flap(t, seconds), name=f"flap:{t.id}")
        return f"network flapping for {seconds:g} s"

    async def _clock_skew(self, t: SimulatedTerminal, _fault: str, value: str | None) -> str:
        seconds = _number(value)
        t.skew_ms = int(seconds * 1000)
        agent = t.agent
        if agent is not None and agent.parts.clock_reference is not None:
            await agent.check_clock(agent.parts.clock_reference)
        return f"clock off by {seconds:g} s"

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
                    except ValueError as exc:
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


def _number(value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None


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
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log = logging.getLogger("fleet-sim")
    store = await asyncio.to_thread(AgentStore.open, args.state_dir / "fleet-sim.db")
    terminals = [
        SimulatedTerminal(
            c,
            i,
            store,
            profile=profile,
            devices_dir=(args.state_dir / c.terminal.id / "dev")
            if profile is not None and i < args.real_devices
            else None,
            down_s=30.0,
            log=log,
        )
        for i, c in enumerate(configs)
    ]
    try:
        for t in terminals:
            await t.start_devices()
        fleet = SimulatedFleet(terminals)
        server = await fleet.serve_control(args.control) if args.control else None
        async with asyncio.TaskGroup() as tg:
            for t in terminals:
                tg.create_task(t.live(stopping), name=f"kiosk:{t.id}")
            print(
                f"fleet-sim: {len(terminals)} simulated kiosks running; Ctrl-C to stop", flush=True
            )
        if server is not None:
            server.close()
            await server.wait_closed()
    finally:
        for t in terminals:
            await t.close_devices()
        await asyncio.to_thread(store.close)
    return 0


def _inject(argv: list[str]) -> int:
    args = _inject_parser().parse_args(argv)

    async def ask() -> str:
        reader, writer = await asyncio.open_unix_connection(str(args.control))
        writer.write(f"{args.terminal} {args.fault} {args.value or ''}\n".encode())
        await writer.drain()
        answer = (await reader.readline()).decode().strip()
        writer.close()
        return answer

    try:
        answer = asyncio.run(ask())
    except OSError as exc:
        print(f"fleet-sim inject: error: {args.control}: {exc.strerror}", file=sys.stderr)
        return 2
    print(answer)
    return 0 if answer.startswith("ok") else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inject"]:
        return _inject(argv[1:])
    args = _parser().parse_args(argv)
    if args.terminals < 1:
        print("fleet-sim: error: --terminals must be at least 1", file=sys.stderr)
        return 2
    try:
        configs = build_configs(args)
        profile = load_profile(args.profile) if args.profile else None
        # Every identity is checked before the first connection, so a missing or unsafe file
        # stops the simulation with its name instead of one kiosk retrying forever.
        for config in configs:
            check_identity(config)
    except (InvalidId, AgentError, BridgeError) as exc:
        print(f"fleet-sim: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_run(args, configs, profile))


if __name__ == "__main__":
    sys.exit(main())
