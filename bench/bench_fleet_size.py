"""How many terminals one `fleet-server` process holds with telemetry every 10 s.

A local stack (Mosquitto, InfluxDB, SMTP sink) runs in a temporary directory, with one
fleet server (default settings: 5000-point batches or 1 s, receive maximum 1000, alert tick
1 s) and sites imported with ``fleetctl sites import``. The fleet is ramped in steps
(``--sizes``, default 5,000 / 10,000 / 15,000 / 20,000, the goal being 20,000): each step
starts more kiosk processes (at most ``--per-sim`` kiosks each, what the step adds split
evenly over them; the earlier ones keep running), each kiosk sampling every ``--interval`` s
and sending that interval's three samples (system, network, power) at once in one message
(``--batch-size 3``), so the server should take ``terminals / interval`` telemetry messages
a second.

The kiosks (``--sim``):

- ``light`` (the default): ``bench/light_fleet.py`` processes, one asyncio loop each, every
  kiosk one mutual-TLS connection with its own certificate. They speak the agent's protocol
  exactly (the same CONNECT with client id, keep-alive, ``clean_start=False``, session expiry
  and last will; the retained birth; one QoS 1 telemetry message of three samples an interval,
  built with ``fleet_protocol``; the "shutdown" state and DISCONNECT at stop), so broker and
  server cannot tell them from agents, but they carry none of the agent's machinery (outbox
  and journal in SQLite, collectors, paho). They connect ``--connect-rate`` a second in all
  (with jitter, shared by the processes a step starts), so the broker's listen backlog is not
  overrun. Why: the full agent costs so much CPU that on this 2-core machine fleet-sim
  processes saturate the CPU at about 2,500 kiosks, before the server is loaded, and the bench
  then measures the simulators, not the server; 20,000 agents cannot be held on 2 cores.
- ``agent``: ``fleet-sim`` processes, the real agent code per kiosk (the earlier mode, kept to
  compare with, or to load the server with everything an agent does).

Each step:

1. connect: wait (at most ``--timeout`` s) until the server's presence table counts every
   kiosk online (``fleet_terminals{state="online"}`` on ``/metrics``);
2. catch up: a connect wave of thousands of TLS handshakes takes the CPU the ingest needs, so
   telemetry queues up in the broker meanwhile. Wait (at most ``--catch-up`` s) until that
   backlog is worked off: the probe's lag (below) under 5 s three times running. The time it
   took is printed; a step that does not catch up is measured all the same, and its lag then
   fails it. The steady window measures the fleet held, not the wave it connected in;
3. hold for ``--steady`` s and measure, between the window's two ends:
   - telemetry messages/s the server received (``fleet_ingest_messages_total``) against the
     expected rate, and points/s InfluxDB accepted (``fleet_influx_points_written_total``);
   - ingest lag: a probe terminal of this bench publishes one telemetry sample a second
     (QoS 1, stamped with the time it is sent) through the broker, and InfluxDB is polled for
     its newest sample (every 0.25 s): lag = seen in InfluxDB - sent. It shares the server's
     queue with the whole fleet, so a backlog in the broker or the server shows as lag that
     grows from the window's first third to its last;
   - InfluxDB writes a second and their size (``fleet_influx_batches_written_total``): the
     server acknowledges a delivery only once its batch is written, and the broker sends at
     most Receive Maximum (1000) unacknowledged, so ingest can also be bound by the time a
     write takes, not by CPU;
   - the spool (points waiting because InfluxDB was slow), write retries and slow writes,
     and the clients Mosquitto dropped for keep-alive expiry (its log);
   - CPU (% of one core) and RSS of fleet-server, Mosquitto, InfluxDB and all kiosk
     processes (light-fleet or fleet-sim), the machine's busy CPU, including what other work
     on the machine used, and the CPU pressure (Linux PSI ``some avg60``: how much of the
     time runnable tasks waited for a core);
4. kept up: received >= 97 % of expected, lag not growing (last third <= first third + 2 s)
   and under 10 s, spool not growing. A step that does not connect in time or does not keep
   up ends the ramp; the largest step held is printed, with what was saturated. A step that
   does not connect in time reports the processes' CPU over its last half minute.

Limits: the bench raises its soft open-file limit to the hard one (children inherit it). A
Mosquitto process needs a descriptor per kiosk plus a margin (5 % of the limit: connections
being replaced hold one too), so where the hard limit is below the largest step (here 20,000:
19,000 kiosks fit in one broker) the kiosks are spread over several Mosquitto processes
(``--brokers``, by default as many as needed): the stack's own and edge brokers started here
with the same configuration and PKI, each bridged to the stack's broker (MQTT 5, QoS 1,
``kiosk/v1/#`` out, as the fleet server's identity, over its service listener), as a
deployment past one broker's connections would run them. The one fleet server still reads
everything from the stack's broker: births, last wills and telemetry of the edge kiosks come
to it through the bridges. A step over what the brokers can hold is run at the largest size
that fits instead (printed as such). The kiosk processes run at nice 10, below the broker, the
server and InfluxDB: they are the load, and on a machine too small for both it is the load
that should give way. Provisioning the certificates (one per kiosk, from the stack's fleet CA,
8 threads) is timed.

Only the processes started here are stopped, by PID; every phase is bounded in time.

    .venv/bin/python bench/bench_fleet_size.py [--sizes 5000 10000 15000 20000] [--steady 60] \\
        [--catch-up 600] [--sim light|agent] [--per-sim 2000] [--connect-rate 200] [--brokers 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import aiomqtt
import msgspec
import psutil

from fleet_protocol.codec import encode
from fleet_protocol.ids import TerminalId
from fleet_protocol.messages import SystemSample, Telemetry
from fleet_protocol.topics import Channel, topic
from fleet_server.config import BrokerSettings
from provisioning.authority import FleetAuthority, PkiLayout
from provisioning.broker_config import render_broker_config
from provisioning.stack import (
    Service,
    StackInfo,
    broker_settings,
    import_sites,
    run_stoppable,
    running_stack,
    server_config,
)

BIN = Path(sys.executable).parent
MIB = 1024 * 1024
GOAL = 20_000
#: Descriptors Mosquitto needs besides one per kiosk: listeners, log, database, the server,
#: and the connections being replaced. A kiosk whose connect or PUBACK timed out reconnects
#: before the broker has read its old connection's end, so both hold a descriptor for a while;
#: at the limit Mosquitto cannot accept and spins (seen at a 19,900 step: 19,968 descriptors
#: during a wave of timeouts, then every kiosk lost). 5 % of the limit, at least 100.
BROKER_FD_MARGIN_SHARE = 0.05
#: Nice value of the kiosk processes: they are the load, not the system under test. When the
#: two cores are short, the kiosks are the ones to slow down (which the bench reports as
#: "sent less"), not the broker and the server a real deployment runs on a machine of its own.
GENERATOR_NICE = 10
#: Descriptors each kiosk process needs besides one per kiosk (fleet-sim: database, logs,
#: worker threads; light_fleet much less).
SIM_FD_MARGIN = 200
#: The kiosk processes of each ``--sim``: as named in the report.
GENERATORS = {"light": "light-fleet", "agent": "fleet-sim"}
LIGHT_FLEET = Path(__file__).with_name("light_fleet.py")
STOP_TIMEOUT_S = 180.0
PROBE_EVERY_S = 1.0
LAG_POLL_S = 0.25
#: Caught up after a connect wave: the probe's lag under this, CAUGHT_UP_RUN times running.
CAUGHT_UP_MS = 5_000
CAUGHT_UP_RUN = 3
KEPT_UP_RATIO = 0.97
#: The server's default [broker] receive_maximum (fleet_server.config), which this bench keeps.
RECEIVE_MAXIMUM = next(
    int(f.default) for f in msgspec.structs.fields(BrokerSettings) if f.name == "receive_maximum"
)
BUSY = 90.0  # % of a core (or of all cores, for the machine) counted as saturated
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


# --- small local helpers (bench/ does not import tests/) -----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_open_files() -> tuple[int, int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return soft, wanted, hard


def wall_ms() -> float:
    return time.time_ns() / 1_000_000


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def stop_all(popens: list[subprocess.Popen[bytes]]) -> None:
    """Our own children, by PID: SIGTERM to all, then wait; SIGKILL to any that hangs."""
    for p in popens:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in popens:
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(30)


def metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match[1] + (match[2] or "")] = float(match[3])
    return out


# --- the fleet -----------------------------------------------------------------------------


@dataclass
class Sim:
    prefix: str
    terminals: int
    popen: subprocess.Popen[bytes]


@dataclass
class Broker:
    """A Mosquitto the kiosks connect to: the stack's, or an edge broker bridged to it."""

    port: int
    pid: int
    log: Path
    popen: subprocess.Popen[bytes] | None = None  # None: the stack's, not started here
    kiosks: int = 0


@dataclass
class Fleet:
    info: StackInfo
    workdir: Path
    api: str
    influx_db: str
    run: str
    sites: list[str]
    #: The kiosk processes' name: ``light-fleet`` or ``fleet-sim`` (``--sim``).
    generator: str = GENERATORS["light"]
    server: subprocess.Popen[bytes] | None = None
    sims: list[Sim] = field(default_factory=list)
    #: The stack's Mosquitto first, then the edge brokers (``--brokers``).
    brokers: list[Broker] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(s.terminals for s in self.sims)


def prefixes(count: int, run: str) -> list[str]:
    return [f"fs{run}{i:02d}" for i in range(count)]


def layout(steps: list[tuple[int, int]], per_sim: int) -> list[list[int]]:
    """Per step, the kiosk counts of the processes it starts: what the step adds, split evenly
    over as few processes of at most ``per_sim`` as will do (5,000 / 10,000 at 2,000 each:
    1667 + 1667 + 1666 twice). Planned up front: provisioning makes these identities."""
    out: list[list[int]] = []
    size = 0
    for target, _ in steps:
        new = target - size
        n = math.ceil(new / per_sim)
        out.append([new // n + (1 if i < new % n else 0) for i in range(n)])
        size = target
    return out


def provision(info: StackInfo, tls_dir: Path, identities: list[tuple[str, str]]) -> float:
    """Certificates for (terminal, site) pairs, as fleet-sim and light_fleet read them; the
    seconds taken."""
    authority = FleetAuthority.open(info.pki_dir)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (tls_dir / "ca.pem").write_bytes(authority.ca_pem)
    started = time.perf_counter()
    # Each is a key, a signature and fsynced writes: threads overlap the waits for the disk.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in pool.map(
            lambda ts: authority.provision_identity(
                ts[0], ts[1], tls_dir / f"{ts[0]}.pem", actor="bench"
            ),
            identities,
        ):
            pass
    return time.perf_counter() - started


def write_sites(path: Path, sites: list[str]) -> Path:
    text = ""
    for i, site in enumerate(sites):
        text += f"""
[[sites]]
id = "{site}"
name = "规模测试点{i:03d}"
district = "测试区{i % 10}"
town = "测试镇{i % 40:02d}"
kind = "village-point"
address = "测试路 {i} 号"
owners = ["王磊 <wang.lei@bench.example.gov.cn>"]
open_24h = true
"""
    path.write_text(text, encoding="utf-8")
    return path


def start_server(fleet: Fleet, api_port: int) -> None:
    info = fleet.info
    config = fleet.workdir / "fleet-server.toml"
    config.write_text(
        server_config(
            info,
            client_id="fleet-server-bench",
            database=fleet.influx_db,
            registry=fleet.workdir / "registry.sqlite3",
            api_port=api_port,
        ),
        encoding="utf-8",
    )
    with (fleet.workdir / "fleet-server.log").open("ab") as out:
        fleet.server = subprocess.Popen(
            [str(BIN / "fleet-server"), "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start_edge_broker(fleet: Fleet, index: int) -> Broker:
    """Mosquitto number ``index`` for kiosks: the stack's own broker configuration (the same
    CA, certificate, CRL and ACL: kiosks cannot tell it from the stack's) on ports of its own,
    plus an MQTT 5 bridge that forwards everything kiosks publish (``kiosk/v1/#``, QoS 1,
    retained flags and last wills included) to the stack's broker over its service listener,
    as the fleet server's own identity. Nothing is bridged back (no bench kiosk reads its
    ``desired`` or ``cmd`` topics). Started here; stopped at the end by its PID."""
    info = fleet.info
    pki = PkiLayout(info.pki_dir)
    home = fleet.workdir / f"edge-{index}"
    (home / "data").mkdir(parents=True)
    port = free_port()
    log = home / "mosquitto.log"
    settings = replace(
        broker_settings(info.layout, port, free_port()), data_dir=home / "data", log_file=log
    )
    client_id = f"{fleet.run}-edge-{index}"
    bridge = [
        "",
        f"connection {client_id}",
        f"address {info.mqtt_host}:{info.mqtt_service_port}",
        "bridge_protocol_version mqttv50",
        f"remote_clientid {client_id}",
        "cleansession false",
        "try_private true",
        "notifications false",
        f"bridge_cafile {pki.ca_cert}",
        f"bridge_certfile {pki.cert('fleet-server')}",
        f"bridge_keyfile {pki.key('fleet-server')}",
        "bridge_tls_version tlsv1.2",
        "topic kiosk/v1/# out 1",
    ]
    config = home / "mosquitto.conf"
    config.write_text(render_broker_config(settings) + "\n".join(bridge) + "\n", encoding="utf-8")
    binary = psutil.Process(info.mqtt_pid).exe()  # the stack's own Mosquitto
    popen = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    core_log = info.layout.log_file(Service.MQTT)
    deadline = time.monotonic() + 30
    while f" as {client_id} " not in core_log.read_text(encoding="utf-8", errors="replace"):
        if popen.poll() is not None or time.monotonic() > deadline:
            stop_all([popen])
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"edge broker {index}: its bridge did not connect in 30 s\n{tail}")
        time.sleep(0.2)
    return Broker(port, popen.pid, log, popen)


def start_sim(
    fleet: Fleet, prefix: str, count: int, args: argparse.Namespace, connect_rate: float
) -> None:
    """One kiosk process of ``count`` kiosks: light_fleet (connecting ``connect_rate`` a
    second) or, with ``--sim agent``, fleet-sim; on the broker with the fewest kiosks."""
    info = fleet.info
    broker = min(fleet.brokers, key=lambda b: b.kiosks)
    broker.kiosks += count
    site_args = [a for s in fleet.sites for a in ("--site", s)]
    common = [
        "--terminals", str(count), "--prefix", prefix, *site_args,
        "--broker-host", info.mqtt_host, "--broker-port", str(broker.port),
        "--tls-dir", str(fleet.workdir / "tls"), "--interval", str(args.interval),
    ]  # fmt: skip
    if args.sim == "light":
        argv = [sys.executable, str(LIGHT_FLEET), *common, "--connect-rate", f"{connect_rate:g}"]
    else:
        argv = [
            str(BIN / "fleet-sim"), *common,
            "--state-dir", str(fleet.workdir / prefix), "--batch-size", "3",
        ]  # fmt: skip
    with (fleet.workdir / f"{prefix}.log").open("ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    os.setpriority(os.PRIO_PROCESS, popen.pid, GENERATOR_NICE)
    fleet.sims.append(Sim(prefix, count, popen))


async def scrape(http: aiohttp.ClientSession, api: str) -> dict[str, float]:
    async with http.get(f"{api}/metrics", timeout=aiohttp.ClientTimeout(total=30)) as r:
        r.raise_for_status()
        return metrics(await r.text())


def online(m: dict[str, float]) -> int:
    return int(m.get('fleet_terminals{state="online"}', 0))


# --- the probe: ingest lag ----------------------------------------------------------------


@dataclass
class Probe:
    terminal: str
    sent: dict[int, float] = field(default_factory=dict)
    #: (seen at, lag) of each newest sample seen in InfluxDB, in ms.
    lags: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0


async def publish_probes(fleet: Fleet, probe: Probe, stopping: asyncio.Event) -> None:
    tls = fleet.workdir / "tls"
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls / "ca.pem")
    context.load_cert_chain(tls / f"{probe.terminal}.pem")
    where = topic(TerminalId(probe.terminal), Channel.TELEMETRY)
    seq = 0
    while not stopping.is_set():
        try:
            async with aiomqtt.Client(
                fleet.info.mqtt_host,
                fleet.info.mqtt_port,
                identifier=probe.terminal,
                protocol=aiomqtt.ProtocolVersion.V5,
                tls_context=context,
            ) as client:
                while not stopping.is_set():
                    seq += 1
                    now = wall_ms()
                    sample = SystemSample(
                        seq=seq, ts=int(now), cpu_percent=1.0, memory_percent=1.0,
                        memory_available=1, disk_percent=1.0, disk_free=1, uptime_s=1.0,
                        net_bytes_sent=0, net_bytes_recv=0,
                    )  # fmt: skip
                    probe.sent[seq] = now
                    await client.publish(where, encode(Telemetry(samples=[sample])), qos=1)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), PROBE_EVERY_S)
        except aiomqtt.MqttError:
            probe.errors += 1
            await asyncio.sleep(1)


async def watch_probes(
    http: aiohttp.ClientSession, fleet: Fleet, probe: Probe, stopping: asyncio.Event
) -> None:
    query = (
        f'SELECT last("seq") FROM "system" WHERE "terminal" = \'{probe.terminal}\' '
        "AND time > now() - 30m"
    )
    url = f"{fleet.info.influx_url}/query"
    newest = 0
    while not stopping.is_set():
        try:
            params = {"db": fleet.influx_db, "q": query, "epoch": "ms"}
            async with http.get(url, params=params) as r:
                body = await r.json()
            seen = wall_ms()
            series = body["results"][0].get("series") or []
            if series:
                seq = int(series[0]["values"][0][1])
                if seq > newest and seq in probe.sent:
                    newest = seq
                    probe.lags.append((seen, seen - probe.sent[seq]))
        except (aiohttp.ClientError, KeyError, ValueError, TimeoutError):
            probe.errors += 1
        await asyncio.sleep(LAG_POLL_S)


# --- one step ------------------------------------------------------------------------------


@dataclass
class Usage:
    cpu_s: float
    rss: int


def usage(pids: list[int]) -> Usage:
    cpu, rss = 0.0, 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss
    return Usage(cpu, rss)


def machine_busy_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def cpu_pressure() -> float | None:
    """Linux PSI: the share of the last 60 s in which runnable tasks waited for a CPU."""
    try:
        first = Path("/proc/pressure/cpu").read_text(encoding="ascii").splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(f.split("=", 1) for f in first.split()[1:])
    return float(fields["avg60"]) if "avg60" in fields else None


def keepalive_timeouts(fleet: Fleet) -> int:
    """Clients the brokers disconnected for keep-alive expiry so far (from their logs)."""
    count = 0
    for broker in fleet.brokers:
        with contextlib.suppress(OSError):
            count += broker.log.read_text(encoding="utf-8", errors="replace").count(
                "has exceeded timeout"
            )
    return count


@dataclass
class Snapshot:
    """CPU and memory of every process group, and the machine, at one moment."""

    at: float
    groups: dict[str, Usage]
    sims: list[float]
    busy: float

    @classmethod
    def take(cls, fleet: Fleet) -> Snapshot:
        return cls(
            time.monotonic(),
            {name: usage(p) for name, p in groups(fleet).items()},
            [usage([s.popen.pid]).cpu_s for s in fleet.sims],
            machine_busy_s(),
        )


def record_usage(step: Step, before: Snapshot, after: Snapshot) -> None:
    window = max(after.at - before.at, 1e-9)
    for name, used in after.groups.items():
        step.cpu[name] = 100 * (used.cpu_s - before.groups[name].cpu_s) / window
        step.rss[name] = used.rss
    step.busiest_sim = max(
        (100 * (a - b) / window for a, b in zip(after.sims, before.sims, strict=False)),
        default=0.0,
    )
    step.machine = 100 * (after.busy - before.busy) / window
    step.others = step.machine - sum(step.cpu.values())
    step.pressure = cpu_pressure()


@dataclass
class Step:
    size: int
    asked: int
    connected: int = 0
    connect_s: float | None = None
    #: From all online until the connect wave's backlog was worked off; None: not in time.
    catch_up_s: float | None = None
    catch_up_limit_s: float = 0.0
    fewest_online: int = 0
    window_s: float = 0.0
    received: float = 0.0
    points: float = 0.0
    batches: float = 0.0
    expected: float = 0.0
    lag_first: float | None = None
    lag_last: float | None = None
    lag_p50: float | None = None
    lag_max: float | None = None
    lag_n: int = 0
    spool_before: float = 0.0
    spool_after: float = 0.0
    retries: float = 0.0
    slow: float = 0.0
    #: Messages the server dropped as undecodable, samples it quarantined (wrong clock).
    rejected: float = 0.0
    quarantined: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    busiest_sim: float = 0.0
    #: The kiosk processes' name in the report (``Fleet.generator``).
    generator: str = GENERATORS["light"]
    machine: float = 0.0
    others: float = 0.0
    pressure: float | None = None
    keepalive_drops: int = 0
    window_interval: float = 10.0
    kept_up: bool = False
    why: list[str] = field(default_factory=list)


def groups(fleet: Fleet) -> dict[str, list[int]]:
    assert fleet.server is not None
    return {
        "fleet-server": [fleet.server.pid],
        "mosquitto": [b.pid for b in fleet.brokers],
        "influxd": [fleet.info.influx_pid],
        fleet.generator: [s.popen.pid for s in fleet.sims],
        "bench": [psutil.Process().pid],
    }


async def connect(http: aiohttp.ClientSession, fleet: Fleet, step: Step, timeout_s: float) -> None:
    """Until every kiosk is online; if they are not in time, what the processes used over the
    last half minute or so (to tell what was saturated)."""
    started = time.monotonic()
    drops_before = keepalive_timeouts(fleet)
    older = newer = Snapshot.take(fleet)
    while time.monotonic() - started < timeout_s:
        for s in fleet.sims:
            if s.popen.poll() is not None:
                raise RuntimeError(f"{fleet.generator} {s.prefix} exited with {s.popen.returncode}")
        now_online = online(await scrape(http, fleet.api))
        step.connected = max(step.connected, now_online)
        if now_online >= step.size:
            step.connect_s = time.monotonic() - started
            break
        await asyncio.sleep(2)
        if time.monotonic() - newer.at >= 30:
            older, newer = newer, Snapshot.take(fleet)
    else:
        record_usage(step, older, Snapshot.take(fleet))
        step.fewest_online = now_online
    step.keepalive_drops = keepalive_timeouts(fleet) - drops_before


async def catch_up(probe: Probe, step: Step, limit_s: float) -> None:
    """Until the probe's lag is under `CAUGHT_UP_MS` `CAUGHT_UP_RUN` times running (lags seen
    from now on), at most ``limit_s``."""
    started = time.monotonic()
    step.catch_up_limit_s = limit_s
    seen = len(probe.lags)
    while time.monotonic() - started < limit_s:
        recent = probe.lags[seen:][-CAUGHT_UP_RUN:]
        if len(recent) == CAUGHT_UP_RUN and all(lag < CAUGHT_UP_MS for _, lag in recent):
            step.catch_up_s = time.monotonic() - started
            return
        await asyncio.sleep(1)


async def hold(
    http: aiohttp.ClientSession, fleet: Fleet, step: Step, probe: Probe, args: argparse.Namespace
) -> None:
    before = Snapshot.take(fleet)
    drops_before = keepalive_timeouts(fleet)
    m0 = await scrape(http, fleet.api)
    t0 = time.monotonic()
    lag_from = len(probe.lags)
    fewest = online(m0)
    while time.monotonic() - t0 < args.steady:
        await asyncio.sleep(5)
        fewest = min(fewest, online(await scrape(http, fleet.api)))
    m1 = await scrape(http, fleet.api)
    window = time.monotonic() - t0
    record_usage(step, before, Snapshot.take(fleet))
    step.keepalive_drops = keepalive_timeouts(fleet) - drops_before

    def delta(name: str) -> float:
        return m1.get(name, 0.0) - m0.get(name, 0.0)

    step.fewest_online = fewest
    step.window_s = window
    step.expected = step.size / args.interval
    step.window_interval = args.interval
    step.received = delta('fleet_ingest_messages_total{channel="telemetry"}') / window
    step.points = delta("fleet_influx_points_written_total") / window
    step.batches = delta("fleet_influx_batches_written_total") / window
    step.spool_before = m0.get("fleet_spool_points", 0.0)
    step.spool_after = m1.get("fleet_spool_points", 0.0)
    step.retries = delta("fleet_influx_write_retries_total")
    step.slow = delta("fleet_influx_slow_writes_total")
    step.rejected = sum(delta(k) for k in m1 if k.startswith("fleet_ingest_rejected_total"))
    step.quarantined = sum(
        delta(k) for k in m1 if k.startswith("fleet_ingest_quarantined_samples_total")
    )
    lags = probe.lags[lag_from:]
    if lags:
        values = [lag for _, lag in lags]
        third = max(1, len(values) // 3)
        step.lag_n = len(values)
        step.lag_p50, step.lag_max = percentile(values, 50), max(values)
        step.lag_first = percentile(values[:third], 50)
        step.lag_last = percentile(values[-third:], 50)
    judge(step)


def judge(step: Step) -> None:
    why = step.why
    if step.received < KEPT_UP_RATIO * step.expected:
        why.append(f"received {step.received / step.expected:.0%} of the expected messages")
    if step.lag_first is None or step.lag_last is None or step.lag_max is None:
        why.append("no probe sample reached InfluxDB in the window")
    else:
        if step.lag_last > step.lag_first + 2000:
            why.append("ingest lag grew over the window (a backlog)")
        if step.lag_last > 10_000:
            why.append("ingest lag over 10 s")
    if step.spool_after > step.spool_before:
        why.append("the spool grew (InfluxDB writes fell behind)")
    if step.fewest_online < step.size:
        why.append(f"only {step.fewest_online} online at the lowest")
    backlog = any("lag" in w or "spool" in w for w in why)
    if why and why[0].startswith("received") and not backlog:
        # Nothing queued up in front of the server: the kiosks sent less than they should.
        why.append(f"no backlog (lag flat): the {step.generator} processes sent less, short of CPU")
    step.kept_up = not why


def saturated(step: Step, cores: int) -> list[str]:
    found = [
        f"{name} at {step.cpu[name]:.0f} % of one core (its event loop is one thread)"
        for name in ("fleet-server", "mosquitto")
        if step.cpu.get(name, 0.0) >= BUSY
    ]
    if step.busiest_sim >= BUSY:
        found.append(f"the busiest {step.generator} at {step.busiest_sim:.0f} % of one core")
    if step.machine >= BUSY * cores:
        found.append(
            f"the machine: {step.machine:.0f} % of {100 * cores} % busy "
            f"({step.others:.0f} % of it other work)"
        )
    return found


def report_usage(step: Step, cores: int) -> None:
    for name in ("fleet-server", "mosquitto", "influxd", step.generator):
        extra = f" (busiest process {step.busiest_sim:.0f} %)" if name == step.generator else ""
        print(
            f"  {name:13s} CPU {step.cpu[name]:6.1f} % of one core{extra}, RSS "
            f"{step.rss[name] / MIB:8.1f} MiB"
        )
    pressure = "" if step.pressure is None else f"; CPU pressure {step.pressure:.0f} %"
    print(
        f"  machine       {step.machine:.0f} % of {100 * cores} % busy; other work (not "
        f"started here) {step.others:.0f} %; this bench {step.cpu['bench']:.0f} %{pressure}"
    )


def report_step(step: Step, nsims: int, cores: int) -> None:
    label = f"{step.size}" + (f" (asked {step.asked})" if step.asked != step.size else "")
    if step.connect_s is None:
        print(
            f"step {label}: {step.fewest_online} online in presence at the timeout, at most "
            f"{step.connected} ({nsims} {step.generator} processes); Mosquitto dropped "
            f"{step.keepalive_drops} clients for keep-alive expiry meanwhile; the last half "
            "minute:"
        )
        if step.cpu:
            report_usage(step, cores)
        return
    caught = (
        f"backlog worked off {step.catch_up_s:.0f} s later"
        if step.catch_up_s is not None
        else f"lag still over {CAUGHT_UP_MS / 1000:.0f} s {step.catch_up_limit_s:.0f} s later"
    )
    print(
        f"step {label}: all online in presence after {step.connect_s:.0f} s "
        f"({nsims} {step.generator} processes), {caught}; steady window {step.window_s:.0f} s"
    )
    per_msg = step.points / step.received if step.received else 0.0
    print(
        f"  ingest        telemetry {step.received:7.1f} msg/s, expected {step.expected:7.1f} "
        f"({step.received / step.expected:.1%}); InfluxDB {step.points:7.1f} points/s "
        f"({per_msg:.1f} per message)"
    )
    if step.batches > 0:
        print(
            f"  writes        {step.batches:5.2f} batches/s, {step.points / step.batches:6.0f} "
            f"points ({step.received / step.batches:.0f} messages) each: the server acknowledges "
            f"after each write, at most {RECEIVE_MAXIMUM} unacknowledged, a batch due at half "
            f"of them; one write every {1000 / step.batches:.0f} ms on average"
        )
    if step.lag_p50 is not None and step.lag_first is not None and step.lag_last is not None:
        assert step.lag_max is not None
        print(
            f"  ingest lag    probe sent -> in InfluxDB: p50 {step.lag_p50 / 1000:.2f} s, max "
            f"{step.lag_max / 1000:.2f} s (n={step.lag_n}); first third {step.lag_first / 1000:.2f}"
            f" s, last third {step.lag_last / 1000:.2f} s"
        )
    print(
        f"  backlog       spool {step.spool_before:.0f} -> {step.spool_after:.0f} points; write "
        f"retries +{step.retries:.0f}, slow writes +{step.slow:.0f}; fewest online "
        f"{step.fewest_online}; keep-alive drops {step.keepalive_drops}; messages rejected "
        f"+{step.rejected:.0f}, samples quarantined +{step.quarantined:.0f}"
    )
    report_usage(step, cores)
    server = step.cpu["fleet-server"]
    if server > 0 and step.received > 0:
        rate = step.received * 100 / server
        print(
            f"  server CPU    {server / step.received * 1000:.2f} % of a core per 1000 msg/s: "
            f"were CPU its only limit, one core would take about {rate:.0f} msg/s = "
            f"{rate * step.window_interval:.0f} terminals (extrapolated, not measured)"
        )
    verdict = "yes" if step.kept_up else "NO: " + "; ".join(step.why)
    print(f"  kept up       {verdict}", flush=True)


# --- the bench -----------------------------------------------------------------------------


def broker_fd_margin(hard: int) -> int:
    return max(100, math.ceil(hard * BROKER_FD_MARGIN_SHARE))


def broker_capacity(hard: int) -> int:
    """Kiosks one Mosquitto process holds under the hard open-file limit, with its margin."""
    return (hard - broker_fd_margin(hard)) // 100 * 100


def broker_count(args: argparse.Namespace, hard: int) -> int:
    """``--brokers``, or (0) as many as the largest step needs under the open-file limit."""
    if args.brokers:
        return int(args.brokers)
    largest: int = max(args.sizes)
    return max(1, math.ceil(largest / broker_capacity(hard)))


def plan(args: argparse.Namespace, hard: int) -> list[tuple[int, int]]:
    """(size, asked) per step: a size the brokers cannot hold under the hard limit is capped.
    Kiosk processes go to the broker with the fewest kiosks, so with several brokers one may
    hold up to ``--per-sim`` more than its share."""
    brokers = broker_count(args, hard)
    cap = broker_capacity(hard)
    if brokers > 1:
        cap = brokers * (cap - args.per_sim)
    out: list[tuple[int, int]] = []
    for asked in sorted(set(args.sizes)):
        size = min(asked, cap)
        if not out or size > out[-1][0]:
            out.append((size, asked))
    return out


async def ramp(fleet: Fleet, steps: list[tuple[int, int]], args: argparse.Namespace) -> int:
    cores = psutil.cpu_count() or 1
    plan = layout(steps, args.per_sim)
    names = prefixes(sum(len(counts) for counts in plan), fleet.run)
    held: Step | None = None
    failed: Step | None = None
    probe = Probe(f"{fleet.run}-probe")
    stopping = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        await wait_healthy(http, fleet)
        tasks = [
            asyncio.create_task(publish_probes(fleet, probe, stopping), name="probe"),
            asyncio.create_task(watch_probes(http, fleet, probe, stopping), name="lag"),
        ]
        try:
            for (size, asked), counts in zip(steps, plan, strict=True):
                for count in counts:
                    # The step's new processes share --connect-rate between them.
                    rate = args.connect_rate / len(counts)
                    start_sim(fleet, names[len(fleet.sims)], count, args, rate)
                assert fleet.size == size
                step = Step(size, asked, generator=fleet.generator)
                await connect(http, fleet, step, args.timeout)
                if step.connect_s is not None:
                    await catch_up(probe, step, args.catch_up)
                    await hold(http, fleet, step, probe, args)
                report_step(step, len(fleet.sims), cores)
                if step.connect_s is None or not step.kept_up:
                    failed = step
                    break
                held = step
        finally:
            stopping.set()
            for task in tasks:
                task.cancel()
            # Bounded: an MQTT client stuck in its handshake must not hold the bench.
            await asyncio.wait(tasks, timeout=15)
    summary(held, failed, cores)
    return 0 if held is not None and held.size >= GOAL else 1


def summary(held: Step | None, failed: Step | None, cores: int) -> None:
    print(f"largest held  {held.size if held else 0} terminals (goal {GOAL})")
    if failed is None:
        return
    found = saturated(failed, cores) if failed.cpu else []
    if failed.pressure is not None and failed.pressure >= 50:
        found.append(f"CPU pressure {failed.pressure:.0f} % (runnable tasks waiting for a core)")
    print(
        f"at {failed.size}     "
        + ("; ".join(failed.why) if failed.why else "not all connected within the timeout")
    )
    print("saturated     " + ("; ".join(found) if found else "no process at a full core"))


async def wait_healthy(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    assert fleet.server is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if fleet.server.poll() is not None:
            raise RuntimeError(f"fleet-server exited with {fleet.server.returncode}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(f"{fleet.api}/healthz") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.5)
    raise RuntimeError("fleet-server not healthy within 60 s")


def bench(args: argparse.Namespace) -> int:
    soft, raised, hard = raise_open_files()
    steps = plan(args, hard)
    top = steps[-1][0]
    brokers = broker_count(args, hard)
    generator = GENERATORS[args.sim]
    per_broker = math.ceil(top / brokers)
    print(
        f"open files    soft limit {soft} -> {raised} (hard {hard}); each Mosquitto needs about "
        f"{per_broker + broker_fd_margin(hard)} at {per_broker} terminals, each {generator} "
        f"about {min(top, args.per_sim) + SIM_FD_MARGIN}"
    )
    if brokers > 1:
        print(
            f"brokers       {brokers}: the stack's Mosquitto and {brokers - 1} edge Mosquitto "
            f"bridged to it (MQTT 5, QoS 1); one process holds at most "
            f"{broker_capacity(hard)} kiosks under the hard open-file limit {hard}, which this "
            f"process may not raise. The server connects to the stack's broker only"
        )
    for size, asked in steps:
        if size != asked:
            print(
                f"capped        {asked} -> {size}: {brokers} Mosquitto process(es) would need "
                f"more descriptors than the hard limit {hard} allows each (--brokers)"
            )
    kiosks = (
        f"light kiosks (bench/light_fleet.py), connecting {args.connect_rate:g}/s"
        if args.sim == "light"
        else "full agents (fleet-sim)"
    )
    print(
        f"settings      steps {' / '.join(str(s) for s, _ in steps)}; {kiosks}, {args.per_sim} "
        f"per {generator} process; telemetry every {args.interval:g} s (one message of 3 "
        f"samples); keep-alive 30 s; steady window {args.steady:g} s; connect timeout "
        f"{args.timeout:g} s",
        flush=True,
    )
    run = uuid.uuid4().hex[:4]
    counts = [count for step in layout(steps, args.per_sim) for count in step]
    names = prefixes(len(counts), run)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        workdir = Path(tmp)
        with running_stack(workdir / "stack") as info:
            sites = [f"fs-{run}-{i:03d}" for i in range(args.sites)]
            identities = [
                # fleet-sim and light_fleet spread their kiosks over the sites in this order
                (f"{prefix}-{i:04d}", sites[(i - 1) % len(sites)])
                for prefix, count in zip(names, counts, strict=True)
                for i in range(1, count + 1)
            ]
            elapsed = provision(info, workdir / "tls", [*identities, (f"{run}-probe", sites[0])])
            print(
                f"provisioned   {len(identities) + 1} certificates in {elapsed:.1f} s "
                f"({1000 * elapsed / (len(identities) + 1):.1f} ms each, 8 threads)",
                flush=True,
            )
            api_port = free_port()
            fleet = Fleet(
                info,
                workdir,
                f"http://127.0.0.1:{api_port}",
                f"fs_{run}",
                run,
                sites,
                generator,
            )
            fleet.brokers.append(
                Broker(info.mqtt_port, info.mqtt_pid, info.layout.log_file(Service.MQTT))
            )
            start_server(fleet, api_port)
            try:
                for index in range(1, brokers):
                    fleet.brokers.append(start_edge_broker(fleet, index))
                asyncio.run(import_sites_when_up(fleet))
                return asyncio.run(ramp(fleet, steps, args))
            finally:
                stop_all([s.popen for s in fleet.sims])
                if fleet.server is not None:
                    stop_all([fleet.server])
                stop_all([b.popen for b in fleet.brokers if b.popen is not None])


async def import_sites_when_up(fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as http:
        await wait_healthy(http, fleet)
    sites = write_sites(fleet.workdir / "sites.toml", fleet.sites)
    await asyncio.to_thread(import_sites, fleet.api, sites, timeout_s=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[5000, 10_000, 15_000, GOAL], help="fleet sizes"
    )
    parser.add_argument(
        "--sim",
        choices=sorted(GENERATORS),
        default="light",
        help="the kiosks: light (bench/light_fleet.py, the default) or agent (fleet-sim)",
    )
    parser.add_argument(
        "--per-sim", type=int, default=2000, help="kiosks per light-fleet or fleet-sim (2000)"
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=200.0,
        help="light kiosks connecting a second, shared by a step's new processes (200)",
    )
    parser.add_argument("--interval", type=float, default=10.0, help="telemetry period, s (10)")
    parser.add_argument(
        "--catch-up",
        type=float,
        default=600.0,
        help="s at most for the connect wave's backlog to be worked off before the window (600)",
    )
    parser.add_argument("--steady", type=float, default=60.0, help="steady window, s (60)")
    parser.add_argument("--sites", type=int, default=200, help="sites imported (200)")
    parser.add_argument(
        "--brokers",
        type=int,
        default=0,
        help="Mosquitto processes for the kiosks: the stack's and edge brokers bridged to it "
        "(0, the default: as many as the largest step needs under the open-file limit)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="s for a step to be all online (900)"
    )
    args = parser.parse_args()
    if min(args.sizes) < 1 or args.per_sim < 1 or args.interval <= 0 or args.steady < 15:
        parser.error("sizes and --per-sim positive, --interval > 0, --steady >= 15")
    if args.connect_rate <= 0:
        parser.error("--connect-rate must be positive")
    if args.brokers < 0:
        parser.error("--brokers must be 0 (as needed) or more")
    if not 1 <= args.sites <= 999:
        parser.error("--sites from 1 to 999")
    return bench(args)


if __name__ == "__main__":
    sys.exit(run_stoppable(main))
