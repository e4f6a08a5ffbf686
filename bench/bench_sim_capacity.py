"""How many simulated kiosks one `fleet-sim` process holds connected over mutual TLS.

A local stack (Mosquitto, InfluxDB, SMTP sink) runs in a temporary directory. N terminal
identities are provisioned from its fleet CA (timed: that is what an ops-side factory run of N
kiosks costs), then `fleet-sim --terminals N` runs them with no peripherals, a long sampling
interval and a long keep-alive: the cost measured is that of holding N agents connected. This
bench subscribes as the fleet server would (each terminal's retained ``state``, and its
telemetry and events, so they are acknowledged and leave the outboxes) and counts the terminals
whose state says online. Printed:

- the open-file limits: this process raises its soft limit to the hard one, and Mosquitto and
  fleet-sim (its children) inherit it; each connected kiosk costs about one descriptor in each;
- provisioning: N certificates, the time taken;
- connecting: how many were connected, after how long the first and the last;
- holding: over a steady window after all are connected, the fewest connected at any moment,
  fleet-sim's RSS (per kiosk too) and CPU (% of one core), and Mosquitto's;
- stopping: SIGTERM, the time until fleet-sim exits, and how many kiosks were left with a
  retained "shutdown" state (as they should) or with their will, "lost";
- one kiosk's cost at fleet-sim's default settings (5 s sampling, 30 s keep-alive): the RSS
  and CPU slope between two fleet sizes (``--cost-sizes``), which leaves out what the process
  costs with no kiosk at all.

Only the processes started here are stopped, by PID. Every phase is bounded in time.

    .venv/bin/python bench/bench_sim_capacity.py [--terminals 5000] [--timeout 600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import ssl
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import psutil

from provisioning.authority import FleetAuthority, write_private
from provisioning.stack import StackInfo, run_stoppable, running_stack

BIN = Path(sys.executable).parent
PREFIX = "cap"
SITE = "cap-site"
MIB = 1024 * 1024
GOAL = 5000
#: Descriptors each process needs besides one per kiosk (logs, database, listeners).
FD_MARGIN = 200
STOP_TIMEOUT_S = 120.0


# --- limits ------------------------------------------------------------------------------


def raise_open_files() -> tuple[int, int, int]:
    """Raise this process's soft limit of open files to the hard one; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return soft, wanted, hard


def open_files_limit(pid: int) -> int:
    soft, _hard = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
    return int(soft)


def mosquitto_connection_limit(info: StackInfo) -> str:
    for line in info.layout.mosquitto_config.read_text(encoding="utf-8").splitlines():
        if line.startswith("max_connections"):
            return line.split()[1]
    return "not set (unlimited)"


# --- identities --------------------------------------------------------------------------


def provision(info: StackInfo, tls_dir: Path, count: int) -> float:
    """Identities for PREFIX-0001 .. as fleet-sim reads them; the seconds it took."""
    tls_dir.mkdir(parents=True, mode=0o700)
    authority = FleetAuthority.open(info.pki_dir)
    (tls_dir / "ca.pem").write_bytes(authority.ca_pem)

    def one(i: int) -> None:
        terminal = f"{PREFIX}-{i:04d}"
        authority.provision_identity(terminal, SITE, tls_dir / f"{terminal}.pem", actor="bench")

    started = time.perf_counter()
    # Each certificate is a key, a signature and two fsynced writes (the authority's database
    # and the identity file): threads overlap the waits for the disk.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in pool.map(one, range(1, count + 1)):
            pass
    return time.perf_counter() - started


# --- the fleet as the server sees it -------------------------------------------------------


@dataclass
class Fleet:
    """The latest state of every terminal, from its retained ``state`` topic."""

    online: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def connected(self) -> int:
        return sum(self.online.values())

    def count(self, reason: str) -> int:
        return sum(1 for r in self.reasons.values() if r == reason)


def _service_tls(info: StackInfo, workdir: Path) -> ssl.SSLContext:
    combined = workdir / "fleet-server.combined.pem"
    if not combined.exists():
        key = (info.pki_dir / "fleet-server.key").read_bytes()
        write_private(combined, key + (info.pki_dir / "fleet-server.pem").read_bytes())
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=info.pki_dir / "ca.pem")
    context.load_cert_chain(combined)
    return context


async def watch(info: StackInfo, workdir: Path, fleet: Fleet, client_id: str) -> None:
    async with aiomqtt.Client(
        info.mqtt_host,
        info.mqtt_service_port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=_service_tls(info, workdir),
    ) as client:
        # As the fleet server: telemetry and events are taken (so they leave the outboxes
        # instead of being offered again), states are read.
        for channel in ("state", "telemetry", "events", "peripherals"):
            await client.subscribe(f"kiosk/v1/+/{channel}", qos=1)
        fleet.subscribed.set()
        async for message in client.messages:
            parts = str(message.topic).split("/")
            if parts[3] != "state" or not isinstance(message.payload, bytes):
                continue
            state = json.loads(message.payload)
            fleet.online[parts[2]] = bool(state["online"])
            fleet.reasons[parts[2]] = state.get("reason") or "online"


# --- one fleet-sim run ---------------------------------------------------------------------


@dataclass
class Usage:
    rss: int
    cpu_s: float
    at: float

    @classmethod
    def of(cls, process: psutil.Process) -> Usage:
        times = process.cpu_times()
        return cls(process.memory_info().rss, times.user + times.system, time.monotonic())


def cpu_percent(before: Usage, after: Usage) -> float:
    return 100 * (after.cpu_s - before.cpu_s) / max(after.at - before.at, 1e-9)


@dataclass
class Run:
    terminals: int
    connected: int = 0
    first_s: float | None = None
    all_s: float | None = None
    fewest_held: int = 0
    sim_rss: int = 0
    sim_cpu: float = 0.0
    broker_rss: int = 0
    broker_cpu: float = 0.0
    stop_s: float | None = None
    shutdown_states: int = 0
    #: Last wills that replaced a kiosk's "shutdown": its DISCONNECT never reached the broker.
    lost_states: int = 0
    log: Path | None = None


async def run_fleet(
    info: StackInfo,
    workdir: Path,
    tls_dir: Path,
    *,
    terminals: int,
    options: list[str],
    timeout_s: float,
    steady_s: float,
    name: str,
) -> Run:
    log = workdir / f"{name}.log"
    run = Run(terminals, log=log)
    fleet = Fleet()
    watcher = asyncio.create_task(watch(info, workdir, fleet, f"bench-{name}"), name="watch")
    await asyncio.wait_for(fleet.subscribed.wait(), 30)
    argv = [
        str(BIN / "fleet-sim"),
        "--terminals", str(terminals),
        "--prefix", PREFIX,
        "--site", SITE,
        "--broker-host", info.mqtt_host,
        "--broker-port", str(info.mqtt_port),
        "--tls-dir", str(tls_dir),
        "--state-dir", str(workdir / name),
        *options,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)
    sim = psutil.Process(proc.pid)
    broker = psutil.Process(info.mqtt_pid)
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout_s:
            if proc.returncode is not None:
                raise RuntimeError(f"fleet-sim exited with {proc.returncode}; see {run.log}")
            if watcher.done():
                watcher.result()  # its error
                raise RuntimeError("the state subscription ended")
            run.connected = max(run.connected, fleet.connected)
            if run.first_s is None and fleet.connected:
                run.first_s = time.monotonic() - started
            if fleet.connected >= terminals:
                run.all_s = time.monotonic() - started
                break
            await asyncio.sleep(0.5)
        if run.all_s is not None:
            await hold(run, fleet, sim, broker, steady_s)
        else:
            run.sim_rss = sim.memory_info().rss
    finally:
        await stop(run, proc, fleet)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await watcher
    return run


async def hold(
    run: Run, fleet: Fleet, sim: psutil.Process, broker: psutil.Process, steady_s: float
) -> None:
    """Watch the whole fleet stay connected for ``steady_s``; what that costs."""
    sim_before, broker_before = Usage.of(sim), Usage.of(broker)
    fewest = fleet.connected
    end = time.monotonic() + steady_s
    while time.monotonic() < end:
        await asyncio.sleep(0.5)
        fewest = min(fewest, fleet.connected)
    sim_after, broker_after = Usage.of(sim), Usage.of(broker)
    run.fewest_held = fewest
    run.sim_rss, run.sim_cpu = sim_after.rss, cpu_percent(sim_before, sim_after)
    run.broker_rss, run.broker_cpu = broker_after.rss, cpu_percent(broker_before, broker_after)


async def stop(run: Run, proc: asyncio.subprocess.Process, fleet: Fleet) -> None:
    fleet.reasons.clear()  # from now on, only what the stop itself publishes
    if proc.returncode is None:
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            run.stop_s = time.monotonic() - stopped
        except TimeoutError:
            proc.kill()  # our own child, by its PID
            await proc.wait()
    # The last states reach this subscriber just after the process is gone: wait for a quiet
    # second.
    seen = -1
    for _ in range(30):
        if fleet.count("shutdown") == seen:
            break
        seen = fleet.count("shutdown")
        await asyncio.sleep(1)
    run.shutdown_states = fleet.count("shutdown")
    run.lost_states = fleet.count("lost")


# --- the bench -----------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / MIB:7.1f} MiB"


def report_capacity(run: Run) -> None:
    n = run.terminals
    first = "-" if run.first_s is None else f"{run.first_s:.1f} s"
    last = "not all" if run.all_s is None else f"{run.all_s:.1f} s"
    print(
        f"connected     {run.connected} of {n} (goal {GOAL}); first after {first}, all after {last}"
    )
    if run.all_s is not None:
        print(f"held          fewest connected during the steady window: {run.fewest_held}")
        print(
            f"fleet-sim     RSS {_mib(run.sim_rss)} ({run.sim_rss / n / 1024:.0f} KiB per kiosk)"
            f", CPU {run.sim_cpu:5.1f} % of one core"
        )
        print(
            f"mosquitto     RSS {_mib(run.broker_rss)} "
            f"({run.broker_rss / n / 1024:.0f} KiB per kiosk), CPU {run.broker_cpu:5.1f} %"
        )
    stop = "killed" if run.stop_s is None else f"{run.stop_s:.1f} s"
    print(
        f"stopped       SIGTERM: exited after {stop}; retained states: {run.shutdown_states} "
        f"'shutdown', {run.lost_states} 'lost' (a will: the DISCONNECT never arrived)"
    )
    verdict = "met" if run.all_s is not None and run.fewest_held >= GOAL else "NOT met"
    print(f"goal          {GOAL} kiosks held connected by one fleet-sim: {verdict}")


async def bench(args: argparse.Namespace) -> int:
    soft, raised, hard = raise_open_files()
    needed = max(args.terminals, *args.cost_sizes) + FD_MARGIN
    print(
        f"open files    soft limit {soft} -> {raised} (hard {hard}); about {needed} needed "
        f"by fleet-sim and by Mosquitto each"
    )
    if raised < needed:
        print(
            f"bench: error: {args.terminals} kiosks need {needed} open files; raise the hard "
            "limit (ulimit -Hn, or LimitNOFILE= in a systemd unit)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        workdir = Path(tmp)
        with running_stack(workdir / "stack") as info:
            print(
                f"mosquitto     pid {info.mqtt_pid}: open files {open_files_limit(info.mqtt_pid)}"
                f", max_connections {mosquitto_connection_limit(info)}"
            )
            tls_dir = workdir / "tls"
            most = max(args.terminals, *args.cost_sizes)
            elapsed = await asyncio.to_thread(provision, info, tls_dir, most)
            print(
                f"provisioned   {most} certificates in {elapsed:.1f} s "
                f"({1000 * elapsed / most:.1f} ms each, 8 threads)",
                flush=True,
            )
            capacity = await run_fleet(
                info,
                workdir,
                tls_dir,
                terminals=args.terminals,
                options=[
                    *("--interval", str(args.interval)),
                    *("--keepalive", str(args.keepalive)),
                    *("--clock-check", "600"),
                ],
                timeout_s=args.timeout,
                steady_s=args.steady,
                name="capacity",
            )
            report_capacity(capacity)
            await report_cost(args, info, workdir, tls_dir)
    return 0 if capacity.all_s is not None else 1


async def report_cost(
    args: argparse.Namespace, info: StackInfo, workdir: Path, tls_dir: Path
) -> None:
    small, large = sorted(args.cost_sizes)
    runs = []
    for size in (small, large):
        runs.append(
            await run_fleet(
                info,
                workdir,
                tls_dir,
                terminals=size,
                options=[],  # fleet-sim's defaults
                timeout_s=args.timeout,
                steady_s=args.steady,
                name=f"defaults-{size}",
            )
        )
    a, b = runs
    if a.all_s is None or b.all_s is None:
        print(
            f"per kiosk     not measured: {a.connected}/{small} and {b.connected}/{large} connected"
        )
        return
    rss = (b.sim_rss - a.sim_rss) / (large - small)
    cpu = (b.sim_cpu - a.sim_cpu) / (large - small)
    print(
        f"per kiosk     at fleet-sim's defaults (5 s sampling, 30 s keep-alive), from "
        f"{small} to {large} kiosks:"
    )
    print(
        f"              RSS {rss / 1024:.0f} KiB, CPU {1000 * cpu:.2f} % of one core per 1000 "
        f"kiosks ({a.sim_rss / MIB:.0f} MiB with {small}, {b.sim_rss / MIB:.0f} MiB with "
        f"{large})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terminals", type=int, default=GOAL, help=f"default {GOAL}")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds for all to connect (default 600)"
    )
    parser.add_argument(
        "--steady", type=float, default=60.0, help="seconds held connected (default 60)"
    )
    parser.add_argument("--interval", type=float, default=60.0, help="sampling, s (default 60)")
    parser.add_argument("--keepalive", type=int, default=60, help="MQTT keep-alive (default 60)")
    parser.add_argument(
        "--cost-sizes",
        type=int,
        nargs=2,
        default=[200, 1000],
        help="two fleet sizes for one kiosk's cost at the defaults (default 200 1000)",
    )
    args = parser.parse_args()
    if args.terminals < 1 or min(args.cost_sizes) < 1 or len(set(args.cost_sizes)) < 2:
        parser.error("--terminals and --cost-sizes must be positive, the two sizes different")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(run_stoppable(main))
