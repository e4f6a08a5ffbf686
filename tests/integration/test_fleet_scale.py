"""The fleet at scale, through the whole real system: Mosquitto over mutual TLS, InfluxDB, the
stack's SMTP sink, fleet-sim kiosks and fleet-server processes.

- Two fleet-server processes share one fleet: the same broker, the same share group, the same
  registry and InfluxDB database. Telemetry is split between them (each sample is stored
  once), and only the process holding the alerting lease decides: a dropped terminal is mailed
  once, not once per process. Stopped, the lease holder hands over to the other process, which
  mails the next drop, once; and it takes no share of the telemetry with it.
- 2,000 simulated kiosks (four fleet-sim processes) and a broker restart: every kiosk is back
  online within a minute of the broker accepting connections again, and no site owner is
  mailed, though their sites are 24-hour sites with a 60 s grace.

Each test runs its own stack: the second restarts the broker.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.bench_sim_capacity import raise_open_files
from provisioning import stack
from provisioning.stack import StackInfo, import_sites, running_stack
from tests.integration.fleet import (
    Proc,
    RunningServer,
    eventually,
    http_json,
    influx_query,
    inject,
    mails_about,
    provision_sim,
    read_mails,
    server_metrics,
    sites_toml,
    start_server,
    start_sim,
    stop_broker,
)

pytestmark = pytest.mark.integration

OWNERS = ("王磊 <wang.lei@zhujing.example.gov.cn>", "李娜 <li.na@zhujing.example.gov.cn>")


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[StackInfo]:
    with running_stack(tmp_path / "stack") as info:
        yield info


def mail_and_alerts(info: StackInfo, tick_s: float) -> str:
    """``[mail]`` to the stack's SMTP sink and ``[alerts]`` ticking every ``tick_s``."""
    return f"""
[mail]
smtp_host = "127.0.0.1"
smtp_port = {info.smtp_port}
security = "none"
from_address = "fleet@jinshan.example.gov.cn"

[alerts]
tick_s = {tick_s}
"""


def terminals(server: RunningServer) -> dict[str, dict[str, object]]:
    """The ops API's terminal list, by id."""
    listing = http_json(f"{server.api}/api/v1/terminals")
    assert isinstance(listing, dict)
    return {str(t["id"]): t for t in listing["terminals"]}


def ingest_stats(server: RunningServer) -> dict[str, object]:
    stats = http_json(f"{server.api}/api/v1/ingest")
    assert isinstance(stats, dict)
    return stats


def telemetry_received(server: RunningServer) -> int:
    received = ingest_stats(server)["received"]
    assert isinstance(received, dict)
    return int(received.get("telemetry", 0))


def alert_log(server: RunningServer) -> list[dict[str, object]]:
    log = http_json(f"{server.api}/api/v1/alerts?limit=5000")
    assert isinstance(log, dict)
    entries: list[dict[str, object]] = log["entries"]
    return entries


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def lease_holder(registry: Path) -> str | None:
    """Who holds the alerting lease now, read from the shared registry (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{registry}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT holder, expires_ms FROM leases WHERE name = 'alerting'").fetchone()
    if row is None or row[1] < now_ms():
        return None
    return str(row[0])


def points_stored(info: StackInfo, database: str) -> int:
    """How many points the database holds, over every measurement."""
    total = 0
    for series in influx_query(info.influx_url, database, "SELECT count(*) FROM /.*/"):
        values = series["values"]
        assert isinstance(values, list)
        # One column per field; every point of a measurement has its always-sent fields.
        total += max(int(v) for v in values[0][1:] if v is not None)
    return total


def system_seqs(info: StackInfo, database: str, terminal: str, *, since_ms: int) -> list[int]:
    """The seq of every ``system`` sample of ``terminal`` stored, taken after ``since_ms``."""
    series = influx_query(
        info.influx_url,
        database,
        f'SELECT "seq" FROM "system" WHERE "terminal" = \'{terminal}\' '
        f"AND time > {since_ms}ms ORDER BY time",
    )
    if not series:
        return []
    values = series[0]["values"]
    assert isinstance(values, list)
    return [int(v[1]) for v in values]


def leads(server: RunningServer) -> bool:
    """Whether the process says on /metrics that it holds the alerting lease."""
    return server_metrics(server.api)[1]["fleet_alerting_leader"] == 1


def points_written(*servers: RunningServer) -> int:
    return sum(int(str(ingest_stats(s)["points_written"])) for s in servers)


# --- two server processes -------------------------------------------------------------------

GRACE_S = 6
#: A drop long enough to be mailed GRACE_S after it, with room to spare on a busy machine.
CUT_S = 2 * GRACE_S


def _dropped_and_back(maildir: Path, control: Path, terminal: str, server: RunningServer) -> None:
    """Cut ``terminal``'s power for CUT_S: one offline e-mail after the grace, one when back,
    nothing more."""
    cut = time.monotonic()
    inject(control, terminal, "power-cut", str(CUT_S))
    [offline] = eventually(lambda: mails_about(maildir, terminal), 40)
    assert time.monotonic() - cut >= GRACE_S
    assert "Terminal offline" in str(offline["Subject"]), offline["Subject"]
    eventually(lambda: terminals(server)[terminal]["presence"] == "online", 60)
    eventually(lambda: len(mails_about(maildir, terminal)) >= 2, 30)
    time.sleep(3)  # a second process mailing too would have done so by now
    mails = mails_about(maildir, terminal)
    assert len(mails) == 2, [str(m["Subject"]) for m in mails]
    back = str(mails[1]["Subject"])
    assert "恢复" in back or "back" in back.lower(), back


def test_two_server_processes_share_the_telemetry_and_mail_each_drop_once(
    own_stack: StackInfo, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    registry = tmp_path / "registry.sqlite3"
    database = f"t_{tag}"
    servers: list[RunningServer] = []
    try:
        for _ in range(2):
            servers.append(
                start_server(
                    own_stack,
                    tmp_path,
                    extra=mail_and_alerts(own_stack, tick_s=0.2),
                    registry=registry,
                    database=database,
                    share_group=f"g{tag}",
                )
            )
        _share_and_take_over(own_stack, tmp_path, servers, registry=registry, database=database)
    finally:
        for server in servers:
            server.proc.stop()  # every one, whatever happened
        for server in servers:
            server.stop()  # each exited cleanly


def _share_and_take_over(
    own_stack: StackInfo,
    tmp_path: Path,
    servers: list[RunningServer],
    *,
    registry: Path,
    database: str,
) -> None:
    tag = database.removeprefix("t_")
    assert servers[0].client_id != servers[1].client_id
    site = f"cun-{tag}"
    import_sites(
        servers[0].api,
        sites_toml(tmp_path / "sites.toml", {site: "测试村服务点"}, owners=OWNERS, grace_s=GRACE_S),
    )
    maildir = own_stack.layout.maildir
    prefix = f"k{tag}"
    kiosks = [f"{prefix}-{n:04d}" for n in (1, 2, 3)]
    (tmp_path / "sim").mkdir()
    sim, control = start_sim(own_stack, tmp_path / "sim", prefix, 3, "--interval", "1", site=site)
    try:
        for server in servers:
            eventually(
                lambda s=server: all(  # type: ignore[misc]
                    terminals(s).get(k, {}).get("presence") == "online" for k in kiosks
                ),
                60,
            )

        # Telemetry: both processes take a share, and no point is stored twice. The counters
        # are read before and after counting the database, while samples keep coming.
        eventually(lambda: all(telemetry_received(s) >= 5 for s in servers), 30)
        before = points_written(*servers)
        stored = points_stored(own_stack, database)
        after = points_written(*servers)
        print(f"points written {before}..{after} by the two processes, stored {stored}")
        assert before <= stored <= after, (before, stored, after)

        # One process decides; a drop is mailed once, whichever process heard it.
        holder = eventually(lambda: lease_holder(registry), 10)
        [leader] = [s for s in servers if s.client_id == holder]
        [other] = [s for s in servers if s is not leader]
        assert leads(leader)
        assert not leads(other)
        _dropped_and_back(maildir, control, kiosks[0], other)
        assert f"alert terminal-offline:{kiosks[0]}:" in leader.proc.output()
        assert f"alert terminal-offline:{kiosks[0]}:" not in other.proc.output()

        # The lease holder stops (SIGTERM to its PID, exits cleanly): the other one takes
        # over and mails the next drop, once.
        leader.stop()
        stopped_ms = now_ms()
        eventually(lambda: lease_holder(registry) == other.client_id, 30)
        eventually(lambda: leads(other), 10)
        _dropped_and_back(maildir, control, kiosks[1], other)
        assert f"alert terminal-offline:{kiosks[1]}:" in other.proc.output()
        assert len(mails_about(maildir, kiosks[0])) == 2
        assert mails_about(maildir, kiosks[2]) == []

        # The stopped process took no share of the telemetry with it: every sample taken
        # since, by the kiosk that kept running, reached the database through the other one.
        seqs = system_seqs(own_stack, database, kiosks[2], since_ms=stopped_ms)
        print(f"{len(seqs)} system samples of {kiosks[2]} since the stop: {seqs[:3]}..{seqs[-3:]}")
        assert len(seqs) >= 10, seqs
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    finally:
        sim.stop(timeout=30)


# --- 2,000 kiosks and a broker restart ------------------------------------------------------

KIOSKS = 2000
SIM_PROCESSES = 4
KIOSKS_PER_SITE = 10
DISTRICTS = (
    "金山区",
    "松江区",
    "青浦区",
    "奉贤区",
    "嘉定区",
    "宝山区",
    "闵行区",
    "浦东新区",
    "崇明区",
    "徐汇区",
)
SCALE_GRACE_S = 60
BACK_WITHIN_S = 60.0
#: Descriptors each process needs besides one per kiosk (logs, databases, listeners).
FD_MARGIN = 200
SIM_LOG_LEVEL = "WARNING"
#: The fleet server's MQTT keep-alive: the product's default, not the other tests' short one.
SERVER_KEEPALIVE_S = 30


def _stop_all(sims: list[Proc], timeout: float) -> None:
    """SIGTERM to every simulation at once (each says goodbye for its kiosks), then wait."""
    for sim in sims:
        sim.signal(signal.SIGTERM)
    for sim in sims:
        sim.stop(timeout=timeout)


@pytest.mark.timeout(600)
def test_2000_kiosks_are_back_within_a_minute_of_a_broker_restart_and_nobody_is_mailed(
    own_stack: StackInfo, tmp_path: Path
) -> None:
    _soft, raised, _hard = raise_open_files()
    assert raised >= KIOSKS + FD_MARGIN, f"{KIOSKS} kiosks need {KIOSKS + FD_MARGIN} open files"
    server = start_server(
        own_stack,
        tmp_path,
        extra=mail_and_alerts(own_stack, tick_s=1.0),
        keepalive_s=SERVER_KEEPALIVE_S,
    )
    sims: list[Proc] = []
    try:
        tag = uuid.uuid4().hex[:4]
        site_ids = [f"zx-{tag}-{n:03d}" for n in range(KIOSKS // KIOSKS_PER_SITE)]
        imported = import_sites(
            server.api,
            sites_toml(
                tmp_path / "sites.toml",
                {s: f"测试村{n}号服务点" for n, s in enumerate(site_ids)},
                owners=OWNERS,
                grace_s=SCALE_GRACE_S,
                # A city's fleet: a couple of hundred kiosks in each district.
                district={s: DISTRICTS[n % len(DISTRICTS)] for n, s in enumerate(site_ids)},
            ),
        )
        assert f"导入 {len(site_ids)} 个点位" in imported, imported

        per_sim = KIOSKS // SIM_PROCESSES
        sites_per_sim = len(site_ids) // SIM_PROCESSES
        plan = [
            (
                tmp_path / f"sim{k}",
                f"s{k}{tag}",
                site_ids[k * sites_per_sim : (k + 1) * sites_per_sim],
            )
            for k in range(SIM_PROCESSES)
        ]
        started = time.monotonic()
        for simdir, prefix, sites in plan:
            provision_sim(own_stack, simdir / "tls", prefix, per_sim, sites, threads=8)
        provisioning_s = time.monotonic() - started
        print(f"provisioned {KIOSKS} certificates in {provisioning_s:.1f} s")

        kiosks = {f"{prefix}-{i:04d}" for _, prefix, _ in plan for i in range(1, per_sim + 1)}
        started = time.monotonic()
        for simdir, prefix, sites in plan:
            sim, _ = start_sim(
                own_stack,
                simdir,
                prefix,
                per_sim,
                # Holding thousands of kiosks: a sample a minute, a long keep-alive.
                *("--interval", "60", "--batch-size", "1", "--keepalive", "60"),
                *("--clock-check", "600"),
                site=sites,
                provision=False,
                log_level=SIM_LOG_LEVEL,
            )
            sims.append(sim)

        def online() -> dict[str, dict[str, object]] | None:
            for sim in sims:
                assert sim.popen is not None
                assert sim.popen.poll() is None, sim.output()[-3000:]
            found = terminals(server)
            up = {t: v for t, v in found.items() if t in kiosks and v["presence"] == "online"}
            return up if len(up) == KIOSKS else None

        before = eventually(online, 240, every=2.0)
        print(f"all {KIOSKS} online after {time.monotonic() - started:.1f} s")

        down_at = time.monotonic()
        stop_broker(own_stack, signal.SIGTERM)
        restarted = stack.up(own_stack.workdir, detach=False)
        accepting_at = time.monotonic()
        assert restarted.mqtt_port == own_stack.mqtt_port
        print(f"broker away for {accepting_at - down_at:.1f} s")

        # Back: online, in a connection newer than the one before the restart.
        def back() -> int:
            found = terminals(server)
            return sum(
                1
                for t in kiosks
                if found[t]["presence"] == "online"
                and int(str(found[t]["session"])) > int(str(before[t]["session"]))
            )

        progress: list[str] = []
        back_s: float | None = None
        while (waited := time.monotonic() - accepting_at) < 2 * BACK_WITHIN_S:
            n = back()
            progress.append(f"{n}@{waited:.0f}s")
            if n == KIOSKS:
                back_s = waited
                break
            time.sleep(1.0)
        print(f"all {KIOSKS} back online after {back_s} s; back over time: {', '.join(progress)}")

        # Past the grace since the broker went away: no owner was mailed, no alert opened.
        time.sleep(max(0.0, down_at + SCALE_GRACE_S + 10 - time.monotonic()))
        mails = read_mails(own_stack.layout.maildir)
        alerts = alert_log(server)
        outcome = (
            f"back after {back_s} s (of {BACK_WITHIN_S:g}), over time: {', '.join(progress)}; "
            f"{len(mails)} e-mails, {len(alerts)} alert decisions"
        )
        assert back_s is not None, outcome
        assert back_s <= BACK_WITHIN_S, outcome
        assert [str(m["Subject"]) for m in mails] == [], outcome
        assert alerts == [], outcome
        found = terminals(server)
        assert sum(1 for t in kiosks if found[t]["presence"] == "online") == KIOSKS
    finally:
        stopping = time.monotonic()
        _stop_all(sims, timeout=120)
        print(f"{len(sims)} fleet-sim processes stopped in {time.monotonic() - stopping:.1f} s")
        server.stop()
