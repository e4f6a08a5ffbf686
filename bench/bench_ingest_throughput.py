"""Telemetry ingest throughput of `fleet-server`, against the broker's own QoS 1 throughput.

A local stack (Mosquitto, InfluxDB, SMTP sink) runs in a temporary directory. N realistic
telemetry messages are made the way `fleet-sim` makes them: the real agent code's readings
(``edge_agent.sim.SimulatedMachine``) become samples (``edge_agent.telemetry``), six to a
message (one system, one network and one power sample per interval, two intervals: fleet-sim's
default ``--batch-size``), encoded with the project's codec (``fleet_protocol.codec``), spread
over ``--terminals`` terminals whose retained birth states name a configured site, so every
point carries the full placement tags.

Both figures are for the same N messages, *preloaded*: the consumer's persistent session is
subscribed, goes offline, the N messages are published and queue up in Mosquitto for it, then
the consumer comes back and drains the queue. Draining is what is timed, so neither figure
includes how fast the messages were published. Both consumers use the broker's service
listener (mutual TLS, the fleet server's own certificate from the stack's PKI, as
``tests/integration/fleet.py`` configures the server), the same ``$share/<group>/...``
telemetry filter, QoS 1 and the same Receive Maximum (``--receive-maximum``, by default the
server's default, 1000).

- baseline: Debian's ``mosquitto_sub`` (a C client, package ``mosquitto-clients``) drains the
  queue with ``-C N -F %U``: it prints each message's arrival time (ns resolution) and exits
  after N, acknowledging each one. The rate is N over first to last arrival, the median of
  ``--baseline-runs`` runs (the machine is noisy). The CLI tools are enough, no C program of
  our own is needed: ``mosquitto_pub -l`` pipelines QoS 1 publishes (many in flight, ~20,000
  messages/s measured here), and ``mosquitto_sub`` timestamps every arrival itself.
- server: K `fleet-server` processes (``[broker] client_id`` bench-kK-1 .. K, one
  ``share_group``, one InfluxDB database per K, a registry each, the production defaults of
  ``[influx] batch_points`` and ``flush_interval_s``) first run once to make their sessions
  and registry entries, and are killed (SIGKILL, as in a crash: a planned stop leaves the
  share group, see ``MqttIngest._leave_share_group``). Mosquitto splits the shared
  subscription's messages between the offline sessions. Then they start again; this bench
  polls their ``/api/v1/ingest`` every ``POLL_S``: the drain runs from the first delivery any
  of them counts to the moment their ``points_written`` (counted once InfluxDB accepted a
  write, when the deliveries are acknowledged) add up to every point, each end known to
  within a poll. Startup (Python, registry, InfluxDB check) before the first delivery is
  printed apart, not timed. Then InfluxDB itself is counted per measurement: no message and
  no point may be missing. K is 1, then 2 and 3. (A registry each, not one shared: sharing
  one, a process under load died of "database is locked" taking the alerting lease.)

- InfluxDB alone: the same messages made into lines the way the server makes them
  (``fleet_server.telemetry_lines``), written straight to a new database by 1 .. K writer
  threads, half the Receive Maximum of messages (500 by default; the server writes a quarter
  of it, three writes at once, while draining) a write, but no more than ``batch_points`` points
  (the server's cap on a write, 5,000 by default: 416 messages). The server stores through
  InfluxDB, so on the same machine no number of server processes can beat this; printed with
  its own ratio to the baseline, and each K's ratio to it, so that what is the server's and
  what is InfluxDB's can be told apart. (Here, 2 cores, 100 messages a write:
  InfluxDB 1.6 took 7,300-9,500 messages/s, 0.45-0.55 of the broker's drain, using 1-1.2
  cores itself.)

Printed: the baseline, each K's messages/s and points/s, its ratio to the baseline (the goal
for one process is 0.6), the CPU the server processes, Mosquitto and InfluxDB used during the
drain (% of one core), and the best K. Figures are noisy on a small shared machine.

Last, a CPU budget for the goal: 0.6 x the baseline messages/s times the CPU time per message
of influxd (its cheapest, as measured writing to it alone), of Mosquitto and of one server
process (as measured draining), against this machine's cores, and how much CPU a message
that leaves the server. Where InfluxDB and the broker alone need more than the machine has,
no server can meet the goal here, and the bench says so.

Needs ``/usr/bin/mosquitto_pub`` and ``/usr/bin/mosquitto_sub``: Debian package
``mosquitto-clients`` (from bookworm-backports on Debian 12, like the broker). Only the
processes started here are stopped, by PID. Every phase has a time limit (``--timeout``).

    .venv/bin/python bench/bench_ingest_throughput.py [--messages 20000] [--timeout 120]
        [--receive-maximum 1000] [--max-processes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import aiomqtt
import msgspec
import psutil

from edge_agent.sim import SimulatedMachine
from edge_agent.telemetry import (
    PowerReading,
    to_network_sample,
    to_power_sample,
    to_sample,
)
from fleet_protocol.codec import decode, encode
from fleet_protocol.ids import site_id, terminal_id
from fleet_protocol.messages import Sample, State, Telemetry
from fleet_protocol.topics import Channel, topic
from fleet_server.config import BrokerSettings, InfluxSettings
from fleet_server.telemetry_lines import TerminalLines, sample_points
from provisioning.stack import StackInfo, run_stoppable, running_stack, server_config

BIN = Path(sys.executable).parent
MOSQUITTO_PUB: Final = "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB: Final = "/usr/bin/mosquitto_sub"
CLIENTS_PACKAGE: Final = "mosquitto-clients"
PREFIX: Final = "tput"
#: fleet-sim's defaults: a sample of each kind every 5 s, six samples to a message.
INTERVAL_MS: Final = 5_000
INTERVALS_PER_MESSAGE: Final = 2


def _default(settings: type[msgspec.Struct], name: str) -> int:
    return int(next(f.default for f in msgspec.structs.fields(settings) if f.name == name))


#: The fleet server's default [broker] receive_maximum, the default of --receive-maximum (the
#: servers' [broker] receive_maximum; the baseline asks for the same).
DEFAULT_RECEIVE_MAXIMUM: Final = _default(BrokerSettings, "receive_maximum")
#: The production default of [influx] batch_points, which the servers here run with: the most
#: points the server puts in one write, whatever the Receive Maximum.
BATCH_POINTS: Final = _default(InfluxSettings, "batch_points")
SITES: Final = (
    ("zhujing-dqzx", "朱泾镇党群服务中心", "朱泾镇", "金山区"),
    ("fengjing-dqzx", "枫泾镇党群服务中心", "枫泾镇", "金山区"),
    ("tinglin-dqzx", "亭林镇党群服务中心", "亭林镇", "金山区"),
)
#: Field every point of a measurement has, to count its points in InfluxDB.
COUNTED_FIELD: Final = {
    "system": "seq",
    "temperature": "celsius",
    "network": "seq",
    "link": "seq",
    "power": "seq",
}
POLL_S: Final = 0.05
PUBLISHERS: Final = 16  # mosquitto_pub processes at once (each idles ~0.2 s at the end)
PROCESS_COUNTS: Final = (1, 2, 3)
GOAL: Final = 0.6

# urllib honours http_proxy; everything here is on loopback and must never be proxied.
_http: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- the messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """N telemetry payloads by terminal, in publishing order, and the points they make."""

    by_terminal: dict[str, list[bytes]]
    points: Counter[str]

    @property
    def messages(self) -> int:
        return sum(len(p) for p in self.by_terminal.values())

    @property
    def total_points(self) -> int:
        return sum(self.points.values())

    @property
    def mean_size(self) -> float:
        sizes = [len(p) for ps in self.by_terminal.values() for p in ps]
        return sum(sizes) / len(sizes)


def site_of(index: int) -> str:
    return SITES[index % len(SITES)][0]


def terminals(count: int) -> list[str]:
    return [f"{PREFIX}-{i:04d}" for i in range(1, count + 1)]


async def _make_workload(messages: int, names: Sequence[str], now_ms: int) -> Workload:
    by_terminal: dict[str, list[bytes]] = {name: [] for name in names}
    points: Counter[str] = Counter()
    per_terminal = [messages // len(names) + (i < messages % len(names)) for i in range(len(names))]
    for index, (name, count) in enumerate(zip(names, per_terminal, strict=True)):
        intervals = count * INTERVALS_PER_MESSAGE
        first_ts = now_ms - intervals * INTERVAL_MS  # oldest first, the newest now
        machine = SimulatedMachine(index, lambda: now_ms)
        samples: list[Sample] = []
        for seq in range(1, intervals + 1):
            ts = first_ts + seq * INTERVAL_MS
            network = replace(await machine.read_network(), broker_rtt_ms=8.0 + index % 7)
            samples += [
                to_sample(await machine.read(), seq, ts),
                to_network_sample(network, seq, ts),
                to_power_sample(PowerReading(), seq, ts),
            ]
            if len(samples) == 3 * INTERVALS_PER_MESSAGE:
                payload = encode(Telemetry(samples=samples))
                if b"\n" in payload:  # mosquitto_pub -l sends one message per line
                    raise RuntimeError("a telemetry payload contains a newline")
                decode(Telemetry, payload)  # what the server will do
                by_terminal[name].append(payload)
                for sample in samples:
                    points.update(p.measurement for p in sample_points(sample, {}, False))
                samples = []
    return Workload(by_terminal, points)


def make_workload(messages: int, names: Sequence[str]) -> Workload:
    return asyncio.run(_make_workload(messages, names, time.time_ns() // 1_000_000))


# --- the broker --------------------------------------------------------------------------------


def client_tls_args(info: StackInfo) -> list[str]:
    """mosquitto_pub/sub options for the service listener with the fleet server's identity."""
    pki = info.pki_dir
    return [
        *("-h", info.mqtt_host, "-p", str(info.mqtt_service_port), "-V", "mqttv5"),
        *("--cafile", str(pki / "ca.pem")),
        *("--cert", str(pki / "fleet-server.pem"), "--key", str(pki / "fleet-server.key")),
    ]


def publish(info: StackInfo, work: Workload, timeout_s: float) -> float:
    """Publish every message at QoS 1 (one ``mosquitto_pub -l`` per terminal, a few at once);
    the seconds it took. Returns once the broker acknowledged them all."""

    def one(name: str) -> None:
        argv = [
            MOSQUITTO_PUB,
            *client_tls_args(info),
            *("-q", "1", "-t", topic(terminal_id(name), Channel.TELEMETRY), "-l"),
        ]
        body = b"".join(p + b"\n" for p in work.by_terminal[name])
        done = subprocess.run(argv, input=body, capture_output=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"mosquitto_pub for {name} exited {done.returncode}: {done.stderr!r}"
            )

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=PUBLISHERS) as pool:
        for _ in pool.map(one, work.by_terminal):
            pass
    return time.perf_counter() - started


def _service_tls(info: StackInfo) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=info.pki_dir / "ca.pem")
    context.load_cert_chain(info.pki_dir / "fleet-server.pem", info.pki_dir / "fleet-server.key")
    return context


async def _births(info: StackInfo, names: Sequence[str]) -> None:
    now_ms = time.time_ns() // 1_000_000
    async with aiomqtt.Client(
        info.mqtt_host,
        info.mqtt_service_port,
        identifier="bench-births",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=_service_tls(info),
    ) as client:
        for index, name in enumerate(names):
            state = State(online=True, session=1, ts=now_ms, site=site_id(site_of(index)))
            await client.publish(
                topic(terminal_id(name), Channel.STATE), encode(state), qos=1, retain=True
            )


def publish_births(info: StackInfo, names: Sequence[str]) -> None:
    """Each terminal's retained birth state, naming its site, as an agent publishes it."""
    asyncio.run(_births(info, names))


def forget_session(info: StackInfo, client_id: str, timeout_s: float) -> None:
    """End the persistent session ``client_id``: a clean start with no session expiry.

    Otherwise its subscription would keep queueing a copy of every later message."""
    argv = [MOSQUITTO_SUB, *client_tls_args(info), "-i", client_id, "-t", "bench/none", "-E"]
    subprocess.run(argv, capture_output=True, timeout=timeout_s, check=True)


# --- baseline: mosquitto_sub -------------------------------------------------------------------


@dataclass
class BaselineRun:
    received: int
    drain_s: float
    wall_s: float
    publish_s: float

    @property
    def rate(self) -> float:
        return self.received / self.drain_s if self.drain_s > 0 else 0.0


def baseline_run(
    info: StackInfo, work: Workload, run: int, receive_maximum: int, timeout_s: float
) -> BaselineRun:
    """Subscribe a persistent session, leave, queue the messages for it, drain them, with
    ``receive_maximum`` as the connection's Receive Maximum."""
    group = f"base{run}"
    sub = [
        MOSQUITTO_SUB,
        *client_tls_args(info),
        *("-i", f"bench-base-{run}", "-c", "-x", "600", "-q", "1"),
        *("-D", "connect", "receive-maximum", str(receive_maximum)),
        *("-t", f"$share/{group}/kiosk/v1/+/telemetry"),
    ]
    subprocess.run([*sub, "-E"], capture_output=True, timeout=timeout_s, check=True)
    publish_s = publish(info, work, timeout_s)
    started = time.perf_counter()
    done = subprocess.run(
        [*sub, "-C", str(work.messages), "-F", "%U", "-W", str(int(timeout_s))],
        capture_output=True,
        timeout=timeout_s + 10,
        check=False,
        text=True,
    )
    wall_s = time.perf_counter() - started
    forget_session(info, f"bench-base-{run}", timeout_s)
    stamps = [float(line) for line in done.stdout.split()]
    drain_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return BaselineRun(len(stamps), drain_s, wall_s, publish_s)


# --- fleet-server processes ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """One fleet-server process of the bench, with its config, log and ops API."""

    client_id: str
    config: Path
    log: Path
    api: str
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [str(BIN / "fleet-server"), "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM this process (our own child, by PID); SIGKILL if it does not exit."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout_s)
        return self.popen.returncode

    def kill(self, timeout_s: float = 30.0) -> None:
        """SIGKILL this process (our own child, by PID): its session stays as it was."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout_s)

    def get(self, path: str) -> object:
        with _http.open(f"{self.api}{path}", timeout=5) as response:
            return json.load(response)

    def healthy(self) -> bool:
        try:
            return bool(self.get("/healthz"))
        except OSError:
            return False

    def up_or_exited(self) -> bool:
        return self.healthy() or not self.running()

    def ingest(self) -> tuple[int, int, int]:
        """Telemetry messages received, points written and InfluxDB writes so far."""
        stats = self.get("/api/v1/ingest")
        assert isinstance(stats, dict)
        return (
            int(stats["received"].get("telemetry", 0)),
            int(stats["points_written"]),
            int(stats["batches_written"]),
        )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def write_config(
    info: StackInfo,
    workdir: Path,
    *,
    client_id: str,
    group: str,
    database: str,
    receive_maximum: int,
) -> Server:
    api_port = free_port()
    (workdir / client_id).mkdir(exist_ok=True)
    sites = "".join(
        f'\n[[sites]]\nid = "{i}"\nname = "{n}"\ntown = "{t}"\ndistrict = "{d}"\n'
        for i, n, t, d in SITES
    )
    config = workdir / f"{client_id}.toml"
    config.write_text(
        server_config(
            info,
            client_id=client_id,
            database=database,
            registry=workdir / client_id / "registry.sqlite3",
            api_port=api_port,
            broker={
                "share_group": group,
                "session_expiry_s": 600,
                "receive_maximum": receive_maximum,
            },
            extra=sites,
        ),
        encoding="utf-8",
    )
    return Server(client_id, config, workdir / f"{client_id}.log", f"http://127.0.0.1:{api_port}")


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.1)


@contextlib.contextmanager
def started(servers: Sequence[Server]) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            code = server.stop()
            if code not in (0, None):
                print(f"{server.client_id} exited {code}; its log ends:\n{server.tail()}")


def prepare_sessions(servers: Sequence[Server], names: Sequence[str], timeout_s: float) -> None:
    """Run the servers once: their persistent sessions subscribe and the registry learns every
    terminal's site from its retained state. Then kill them (SIGKILL, as a crash would: a
    planned stop leaves the share group), so their sessions stay subscribed, offline."""
    for server in servers:
        server.start()
    try:
        for server in servers:
            wait_until(server.up_or_exited, timeout_s, f"{server.client_id} subscribed")
            if not server.running():
                raise RuntimeError(f"{server.client_id} exited:\n{server.tail()}")

        def all_known() -> bool:
            for server in servers:
                listed = server.get("/api/v1/terminals")
                assert isinstance(listed, dict)
                if not {t["id"] for t in listed["terminals"] if t.get("site")} >= set(names):
                    return False
            return True

        wait_until(all_known, timeout_s, "every terminal's site in the registries")
    finally:
        for server in servers:
            server.kill()


@dataclass
class Drain:
    processes: int
    received: int = 0
    written: int = 0
    batches: int = 0  # InfluxDB writes
    startup_s: float | None = None  # process start to the first delivery
    drain_s: float | None = None  # first delivery to the last point written
    in_influx: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core during the drain
    cpu_us: dict[str, float] = field(default_factory=dict)  # CPU time per message
    error: str = ""

    def rate(self, count: int) -> float:
        return count / self.drain_s if self.drain_s else 0.0


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def drain(
    info: StackInfo, servers: Sequence[Server], work: Workload, database: str, timeout_s: float
) -> Drain:
    result = Drain(len(servers))
    others = {
        "mosquitto": psutil.Process(info.mqtt_pid),
        "influxd": psutil.Process(info.influx_pid),
    }
    with started(servers):
        launched = time.perf_counter()
        procs = [psutil.Process(s.pid) for s in servers]
        first: float | None = None
        cpu0: dict[str, float] = {}
        deadline = launched + timeout_s
        while time.perf_counter() < deadline:
            if not all(s.running() for s in servers):
                result.error = "a fleet-server exited during the drain"
                break
            counts = []
            for server in servers:
                try:
                    counts.append(server.ingest())
                except OSError:  # its API is not up yet
                    counts.append((0, 0, 0))
            now = time.perf_counter()
            result.received = sum(c[0] for c in counts)
            result.written = sum(c[1] for c in counts)
            result.batches = sum(c[2] for c in counts)
            if first is None and result.received:
                first = now
                result.startup_s = first - launched
                cpu0 = {"fleet-server": sum(_cpu_s(p) for p in procs)}
                cpu0.update({name: _cpu_s(p) for name, p in others.items()})
            if result.written >= work.total_points:
                assert first is not None
                result.drain_s = now - first
                span = max(now - first, 1e-9)
                cpu1 = {"fleet-server": sum(_cpu_s(p) for p in procs)}
                cpu1.update({name: _cpu_s(p) for name, p in others.items()})
                result.cpu = {k: 100 * (cpu1[k] - cpu0[k]) / span for k in cpu0}
                break
            time.sleep(POLL_S)
        else:
            result.error = f"not drained within --timeout {timeout_s:g} s"
        if result.error:
            for server in servers:
                print(f"--- {server.log} ends:\n{server.tail()}")
    result.in_influx = count_points(info, database)
    return result


def count_points(info: StackInfo, database: str) -> Counter[str]:
    statements = ";".join(
        f'SELECT count("{fld}") FROM "{measurement}"' for measurement, fld in COUNTED_FIELD.items()
    )
    query = urllib.parse.urlencode({"db": database, "q": statements})
    with _http.open(f"{info.influx_url}/query?{query}", timeout=30) as response:
        body = json.load(response)
    found: Counter[str] = Counter()
    for result in body["results"]:
        for series in result.get("series", []):
            found[series["name"]] += int(series["values"][0][1])
    return found


def run_servers(
    info: StackInfo,
    workdir: Path,
    work: Workload,
    processes: int,
    timeout_s: float,
    *,
    receive_maximum: int,
) -> Drain:
    database = f"bench_k{processes}"
    group = f"bench-k{processes}"
    servers = [
        write_config(
            info,
            workdir,
            client_id=f"bench-k{processes}-{i}",
            group=group,
            database=database,
            receive_maximum=receive_maximum,
        )
        for i in range(1, processes + 1)
    ]
    prepare_sessions(servers, list(work.by_terminal), timeout_s)
    publish(info, work, timeout_s)
    try:
        return drain(info, servers, work, database, timeout_s)
    finally:
        for server in servers:
            forget_session(info, server.client_id, timeout_s)


# --- InfluxDB alone ------------------------------------------------------------------------


@dataclass(frozen=True)
class Alone:
    rate: float  # messages/s
    influxd_cpu_us: float  # influxd CPU time per message


def influx_alone(
    info: StackInfo, work: Workload, writers: int, batch: int, timeout_s: float
) -> Alone:
    """Write the workload's lines, made as the server makes them (placement tags, the
    server's own line writer), straight to a new database: ``writers`` threads with a
    keep-alive connection each, a write per ``batch`` messages (the bench uses half the
    Receive Maximum: about the server's batch while draining). Messages/s and influxd's CPU
    per message; no number of server processes can store faster than this on the same
    machine."""
    database = f"bench_direct_{writers}"
    _influx_query(info, f'CREATE DATABASE "{database}"')
    bodies: list[bytes] = []
    for index, (name, payloads) in enumerate(work.by_terminal.items()):
        site, _, town, district = SITES[index % len(SITES)]
        writer = TerminalLines({"terminal": name, "site": site, "town": town, "district": district})
        for payload in payloads:
            lines: list[str] = []
            for sample in decode(Telemetry, payload).samples:
                writer.lines(sample, False, lines)
            bodies.append("\n".join(lines).encode())
    batches = [b"\n".join(bodies[i : i + batch]) for i in range(0, len(bodies), batch)]
    url = urllib.parse.urlsplit(info.influx_url)

    def write(share: list[bytes]) -> None:
        connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout_s)
        try:
            for body in share:
                connection.request("POST", f"/write?db={database}&precision=ms", body=body)
                response = connection.getresponse()
                response.read()
                if response.status != 204:
                    raise RuntimeError(f"InfluxDB answered {response.status} to a direct write")
        finally:
            connection.close()

    influxd = psutil.Process(info.influx_pid)
    cpu0 = _cpu_s(influxd)
    started = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, [batches[i::writers] for i in range(writers)]))
    elapsed = time.perf_counter() - started
    cpu_s = _cpu_s(influxd) - cpu0
    stored = count_points(info, database)
    if stored != work.points:
        raise RuntimeError(f"direct writes: expected {dict(work.points)}, found {dict(stored)}")
    return Alone(work.messages / elapsed, cpu_s / work.messages * 1e6)


def _influx_query(info: StackInfo, statement: str) -> None:
    data = urllib.parse.urlencode({"q": statement}).encode()
    with _http.open(f"{info.influx_url}/query", data=data, timeout=30) as response:
        response.read()


# --- report -------------------------------------------------------------------------------------


def report_drain(result: Drain, work: Workload, baseline: float, alone: float) -> float:
    """Print one K's figures; its messages/s (0 if it failed). ``result.cpu_us`` gets each
    process's CPU time per message."""
    k = result.processes
    name = f"server x{k}"
    missing_points = work.total_points - sum(result.in_influx.values())
    lost = work.messages - result.received
    if result.drain_s is None:
        print(
            f"{name:13s} FAILED: {result.error}; received {result.received}/{work.messages}, "
            f"written {result.written}/{work.total_points} points"
        )
        return 0.0
    msgs = result.rate(work.messages)
    pts = result.rate(work.total_points)
    cpu = ", ".join(f"{name} {pct:.0f} %" for name, pct in result.cpu.items())
    print(
        f"{name:13s} {msgs:8.0f} messages/s {pts:9.0f} points/s  drain {result.drain_s:5.2f} s"
        f"  (startup {result.startup_s or 0:.2f} s before the first delivery, not timed)"
    )
    result.cpu_us = {
        name: pct / 100 * result.drain_s / work.messages * 1e6 for name, pct in result.cpu.items()
    }
    server_us = result.cpu_us.get("fleet-server", 0.0)
    print(
        f"{'':13s} ratio to baseline {msgs / baseline:.3f}, to InfluxDB alone "
        f"{msgs / alone:.3f}   CPU during the drain: {cpu}"
    )
    print(f"{'':13s} fleet-server CPU time per message: {server_us:.0f} us (all processes)")
    if result.batches:
        print(
            f"{'':13s} {result.batches} InfluxDB writes, {result.written / result.batches:.0f} "
            f"points ({work.messages / result.batches:.0f} messages) a write on average"
        )
    influx = sum(result.in_influx.values())
    print(
        f"{'':13s} received {result.received}/{work.messages} messages, InfluxDB holds "
        f"{influx}/{work.total_points} points: "
        + ("nothing lost" if lost == 0 and missing_points == 0 else f"LOST {missing_points} points")
    )
    if result.in_influx != work.points:
        print(
            f"{'':13s} by measurement: expected {dict(work.points)}, found {dict(result.in_influx)}"
        )
    return msgs


def print_cpu_budget(rate: float, influxd_us: float, drained_us: dict[str, float]) -> None:
    """What storing ``rate`` messages/s costs in CPU, from the CPU time per message measured
    above: InfluxDB's cheapest (written to alone), the broker's and one server process's (one
    process draining), against the cores of this machine; and what that leaves the server."""
    server_us = drained_us.get("fleet-server", 0.0)
    broker_us = drained_us.get("mosquitto", 0.0)
    have = os.cpu_count() or 1
    storing = rate * (influxd_us + broker_us) / 1e6
    need = storing + rate * server_us / 1e6
    left_us = (have - storing) / rate * 1e6
    print(
        f"CPU budget    the goal, {rate:.0f} messages/s, needs {need:.2f} of this machine's "
        f"{have} cores: influxd {rate * influxd_us / 1e6:.2f} ({influxd_us:.0f} us a message, "
        f"its cheapest: written to alone), mosquitto {rate * broker_us / 1e6:.2f}, one "
        f"fleet-server {rate * server_us / 1e6:.2f} ({server_us:.0f} us a message)"
    )
    print(
        f"{'':13s} "
        + (
            "InfluxDB and the broker alone need more than the machine has: out of reach here"
            if left_us <= 0
            else f"that leaves the server {left_us:.0f} us of CPU a message, all stages included"
        )
    )


def bench(args: argparse.Namespace) -> int:
    names = terminals(args.terminals)
    work = make_workload(args.messages, names)
    print(
        f"workload      {work.messages} telemetry messages from {len(names)} terminals, "
        f"{3 * INTERVALS_PER_MESSAGE} samples ({work.total_points // work.messages} points) "
        f"each, {work.mean_size:.0f} B mean; {work.total_points} points"
    )
    with tempfile.TemporaryDirectory(prefix="bench-tput-") as tmp:
        workdir = Path(tmp)
        with running_stack(workdir / "stack") as info:
            publish_births(info, names)
            runs = []
            for run in range(1, args.baseline_runs + 1):
                runs.append(baseline_run(info, work, run, args.receive_maximum, args.timeout))
                r = runs[-1]
                print(
                    f"baseline #{run}   mosquitto_sub drained {r.received}/{work.messages} in "
                    f"{r.drain_s:.2f} s: {r.rate:8.0f} messages/s  (process {r.wall_s:.2f} s; "
                    f"queued in {r.publish_s:.1f} s by {len(names)} mosquitto_pub)",
                    flush=True,
                )
            if any(r.received != work.messages for r in runs):
                print("baseline      FAILED: mosquitto_sub did not receive every message")
                return 1
            baseline = statistics.median(r.rate for r in runs)
            print(
                f"baseline      {baseline:8.0f} messages/s (median of {len(runs)}), QoS 1, "
                f"Receive Maximum {args.receive_maximum}, mutual TLS on the service listener",
                flush=True,
            )
            alone = 0.0
            influxd_us: list[float] = []
            # Half the window, as the server's batches while draining, but no more points than
            # the server writes at once (batch_points; InfluxDB also refuses huge bodies).
            per_message = work.total_points // work.messages
            batch = max(1, min(args.receive_maximum // 2, BATCH_POINTS // per_message))
            for writers in PROCESS_COUNTS[: args.max_processes]:
                measured = influx_alone(info, work, writers, batch, args.timeout)
                rate = measured.rate
                alone = max(alone, rate)
                influxd_us.append(measured.influxd_cpu_us)
                print(
                    f"InfluxDB alone {rate:7.0f} messages/s "
                    f"{rate * work.total_points / work.messages:9.0f} points/s  the same lines "
                    f"straight from {writers} writer{'s' if writers > 1 else ''}, "
                    f"{batch} messages a write: ratio to baseline "
                    f"{rate / baseline:.3f}; influxd CPU {measured.influxd_cpu_us:.0f} us a "
                    "message",
                    flush=True,
                )
            print(
                f"{'':13s} best {alone:.0f} messages/s: no number of server processes can store "
                "faster on this machine",
                flush=True,
            )
            rates: dict[int, float] = {}
            one_process: Drain | None = None
            failed = False
            for k in PROCESS_COUNTS[: args.max_processes]:
                result = run_servers(
                    info, workdir, work, k, args.timeout, receive_maximum=args.receive_maximum
                )
                rates[k] = report_drain(result, work, baseline, alone)
                failed |= result.drain_s is None or result.in_influx != work.points
                one_process = one_process or result
                sys.stdout.flush()
    best = max(rates, key=lambda k: rates[k])
    one = rates.get(1, 0.0) / baseline
    print(f"one process   ratio {one:.3f} (goal {GOAL}): {'met' if one >= GOAL else 'NOT met'}")
    if one_process is not None and one_process.cpu_us:
        print_cpu_budget(GOAL * baseline, min(influxd_us), one_process.cpu_us)
    print(
        f"best          {best} process{'es' if best > 1 else ''}: {rates[best]:.0f} messages/s, "
        f"ratio to baseline {rates[best] / baseline:.3f}"
    )
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="default 20000")
    parser.add_argument("--terminals", type=int, default=100, help="default 100")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per phase (default 120)"
    )
    parser.add_argument("--baseline-runs", type=int, default=3, help="default 3")
    parser.add_argument(
        "--receive-maximum",
        type=int,
        default=DEFAULT_RECEIVE_MAXIMUM,
        help="MQTT 5 Receive Maximum of the server processes ([broker] receive_maximum) and "
        f"of the baseline's mosquitto_sub, 1 .. 65535 (default {DEFAULT_RECEIVE_MAXIMUM})",
    )
    parser.add_argument(
        "--max-processes",
        type=int,
        default=len(PROCESS_COUNTS),
        choices=range(1, len(PROCESS_COUNTS) + 1),
        help=f"server processes tried: 1 .. this (default {len(PROCESS_COUNTS)})",
    )
    args = parser.parse_args()
    if args.messages < args.terminals or args.terminals < 1 or args.baseline_runs < 1:
        parser.error("need --terminals >= 1, --messages >= --terminals, --baseline-runs >= 1")
    if not 1 <= args.receive_maximum <= 65535:
        parser.error("--receive-maximum must be in 1 .. 65535")
    for binary in (MOSQUITTO_PUB, MOSQUITTO_SUB):
        if shutil.which(binary) is None:
            print(
                f"bench: error: {binary} is missing: apt-get install -y {CLIENTS_PACKAGE}",
                file=sys.stderr,
            )
            return 2
    return bench(args)


if __name__ == "__main__":
    sys.exit(run_stoppable(main))
