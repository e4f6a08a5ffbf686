"""How fast the fleet server notices a kiosk that dropped silently, and e-mails its owners.

A local stack (Mosquitto, InfluxDB, SMTP sink) runs in a temporary directory, with one
`fleet-server` (``[mail]`` to the stack's SMTP sink, the server's default alert tick unless
``--tick`` is given) and K kiosks, each in its own `fleet-sim` process (one kiosk each),
each at its own 24-hour site with a short grace (``--grace``), imported with
``fleetctl sites import``. A site per kiosk, in a district of its own, so every drop is one
terminal alert (no site or district alert merges them). Kiosks sample every 10 s and send
each sample at once.

Each kiosk is dropped once per mode, one every ``--spacing`` seconds:

- ``half-open``: the kiosk's fleet-sim process is frozen (SIGSTOP, to our own child's PID).
  Its TCP connection stays open and the kernel still acknowledges, but no MQTT packet comes:
  the broker can only learn of the loss by keep-alive expiry (1.5 x keep-alive after the last
  packet it received), then publishes the will. fleet-sim's own faults cannot make this case:
  ``power-cut`` and ``flap`` shut the socket down (``socket.shutdown``), which sends a FIN, so
  the broker learns of them at once from the socket closing. The frozen process is resumed
  (SIGCONT) once its e-mail is in the maildir (or at the phase's end).
- ``power-cut``: fleet-sim's power-cut fault, sent on its control socket (the line
  ``fleet-sim inject`` sends, written here so the drop is timed to the millisecond): no
  DISCONNECT, the socket is shut down, and the broker learns from the socket closing. Power
  comes back after the grace plus 20 s.

Measured per drop, all on the wall clock of this machine:

- drop -> registry offline: the ``since_ms`` the server stamped when it received the will
  (``GET /api/v1/terminals``, ``status`` offline);
- drop -> presence offline: the first poll of ``GET /api/v1/terminals`` (every
  ``--poll`` s) whose ``presence`` is offline: the alert engine's presence table, which the
  ops view shows; against the goal p95 <= 1.5 x keep-alive + 2 s;
- grace end -> e-mail: grace end as the server defines it (fleet_server.alert_policy: the
  alert opens at the presence transition, stamped with the will's receive time, and is due at
  that time + the site's grace; the opening time is read from the alert id in
  ``GET /api/v1/alerts``) to the modification time of the ``.eml`` file in the SMTP sink's
  maildir (written to a temporary name, then renamed in); against the goal p95 < 5 s. How much
  of it is the wait for the next alert tick is printed too (grace end -> "sent" decision).

Percentiles are nearest-rank. Only the processes started here are stopped, by PID; every phase
is bounded in time.

    .venv/bin/python bench/bench_alert_latency.py [--drops 20] [--keepalive 30] [--grace 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import aiohttp

from provisioning.authority import FleetAuthority
from provisioning.stack import StackInfo, import_sites, run_stoppable, running_stack, server_config

BIN = Path(sys.executable).parent
MODES = ("half-open", "power-cut")
OWNER = "王磊 <wang.lei@bench.example.gov.cn>"
MAIL_GOAL_S = 5.0
#: After the last drop, how long a phase may wait for the last e-mail beyond detection + grace.
PHASE_SLACK_S = 60.0
STOP_TIMEOUT_S = 30.0


# --- small local helpers (bench/ does not import tests/) -----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_open_files() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return soft, hard
    return soft, soft


def wall_ms() -> float:
    return time.time_ns() / 1_000_000


def percentile(values: list[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def stop_process(popen: subprocess.Popen[bytes]) -> int | None:
    """Our own child, by its PID: resumed if frozen, SIGTERM, SIGKILL if it will not go."""
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, signal.SIGCONT)
        popen.terminate()
        try:
            popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(STOP_TIMEOUT_S)
    return popen.returncode


@dataclass
class Kiosk:
    index: int
    terminal: str
    site: str
    control: Path
    popen: subprocess.Popen[bytes] | None = None
    frozen: bool = False


@dataclass
class Drop:
    kiosk: Kiosk
    at_ms: float
    registry_ms: float | None = None
    presence_ms: float | None = None
    opened_ms: int | None = None
    decided_ms: int | None = None
    mail_ms: float | None = None


@dataclass
class Setup:
    info: StackInfo
    workdir: Path
    api: str
    kiosks: list[Kiosk]
    server: subprocess.Popen[bytes]
    seen_mail: set[str] = field(default_factory=set)


# --- the fleet -----------------------------------------------------------------------------


def write_server_config(info: StackInfo, workdir: Path, api_port: int, tick: float | None) -> Path:
    tag = uuid.uuid4().hex[:8]
    alerts = f"\n[alerts]\ntick_s = {tick}\n" if tick is not None else ""
    path = workdir / "fleet-server.toml"
    path.write_text(
        server_config(
            info,
            client_id=f"fleet-server-{tag}",
            database=f"lat_{tag}",
            registry=workdir / "registry.sqlite3",
            api_port=api_port,
            extra=f"""
[mail]
smtp_host = "127.0.0.1"
smtp_port = {info.smtp_port}
security = "none"
from_address = "fleet@bench.example.gov.cn"
{alerts}""",
        ),
        encoding="utf-8",
    )
    return path


def write_sites(path: Path, kiosks: list[Kiosk], grace_s: int) -> Path:
    text = ""
    for k in kiosks:
        text += f"""
[[sites]]
id = "{k.site}"
name = "测试服务点{k.index:02d}"
district = "测试区{k.index:02d}"
town = "测试镇{k.index:02d}"
kind = "village-point"
address = "测试路 {k.index} 号"
owners = ["{OWNER}"]
open_24h = true
grace_s = {grace_s}
"""
    path.write_text(text, encoding="utf-8")
    return path


def provision(info: StackInfo, tls_dir: Path, kiosks: list[Kiosk]) -> None:
    authority = FleetAuthority.open(info.pki_dir)
    tls_dir.mkdir(parents=True, mode=0o700)
    (tls_dir / "ca.pem").write_bytes(authority.ca_pem)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in pool.map(
            lambda k: authority.provision_identity(
                k.terminal, k.site, tls_dir / f"{k.terminal}.pem", actor="bench"
            ),
            kiosks,
        ):
            pass


def start_sim(info: StackInfo, workdir: Path, tls_dir: Path, k: Kiosk, keepalive: int) -> None:
    prefix = k.terminal.removesuffix("-0001")
    argv = [
        str(BIN / "fleet-sim"),
        "--terminals", "1", "--prefix", prefix, "--site", k.site,
        "--broker-host", info.mqtt_host, "--broker-port", str(info.mqtt_port),
        "--tls-dir", str(tls_dir), "--state-dir", str(workdir / "sims" / prefix),
        "--control", str(k.control),
        "--keepalive", str(keepalive), "--interval", "10", "--batch-size", "1",
        "--clock-check", "600", "--log-level", "INFO",
    ]  # fmt: skip
    with (workdir / "sims" / f"{prefix}.log").open("ab") as out:
        k.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
        response.raise_for_status()
        return await response.json()


async def wait_healthy(
    http: aiohttp.ClientSession, api: str, server: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"fleet-server exited with {server.returncode}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(f"{api}/healthz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError("fleet-server did not become healthy within 30 s")


async def terminals(http: aiohttp.ClientSession, api: str) -> dict[str, dict[str, Any]]:
    listing = await get_json(http, f"{api}/api/v1/terminals")
    return {t["id"]: t for t in listing["terminals"]}


async def wait_all(
    http: aiohttp.ClientSession, setup: Setup, presence: str, timeout_s: float
) -> float:
    started = time.monotonic()
    wanted = {k.terminal for k in setup.kiosks}
    while time.monotonic() - started < timeout_s:
        views = await terminals(http, setup.api)
        if all(views.get(t, {}).get("presence") == presence for t in wanted):
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    views = await terminals(http, setup.api)
    missing = sorted(t for t in wanted if views.get(t, {}).get("presence") != presence)
    raise RuntimeError(f"{len(missing)} kiosks not {presence} after {timeout_s:.0f} s: {missing}")


# --- drops ---------------------------------------------------------------------------------


async def inject(k: Kiosk, fault: str, value: str) -> None:
    """What ``fleet-sim inject --control SOCK TERMINAL FAULT VALUE`` sends, and its answer."""
    reader, writer = await asyncio.open_unix_connection(str(k.control))
    try:
        writer.write(f"{k.terminal} {fault} {value}\n".encode())
        await writer.drain()
        answer = (await reader.readline()).decode("utf-8", "replace").strip()
    finally:
        writer.close()
        await writer.wait_closed()
    if not answer.startswith("ok: "):
        raise RuntimeError(f"{k.terminal}: {fault}: {answer}")


async def drop(mode: str, k: Kiosk, down_s: float) -> float:
    """Drop ``k``'s connection silently; the wall time (ms) of the drop."""
    if mode == "half-open":
        assert k.popen is not None
        os.kill(k.popen.pid, signal.SIGSTOP)
        k.frozen = True
        return wall_ms()
    # Stamped before the request: the socket is shut down between it and the answer, so the
    # latencies are overstated by at most the round trip on the control socket.
    at = wall_ms()
    await inject(k, "power-cut", f"{down_s:g}")
    return at


def resume(k: Kiosk) -> None:
    if k.frozen and k.popen is not None:
        os.kill(k.popen.pid, signal.SIGCONT)
        k.frozen = False


def offline_mails(setup: Setup) -> Iterable[tuple[float, str]]:
    """(modification time in ms, text) of each offline e-mail new since the last call."""
    for path in sorted(setup.info.maildir.glob("*.eml")):
        if path.name in setup.seen_mail:
            continue
        setup.seen_mail.add(path.name)
        message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        assert isinstance(message, EmailMessage)
        subject = str(message["Subject"])
        if "Terminal offline" not in subject or "Reminder" in subject:
            continue
        body = message.get_body(preferencelist=("plain",))
        text = body.get_content() if isinstance(body, EmailMessage) else ""
        yield path.stat().st_mtime_ns / 1_000_000, subject + "\n" + text


async def run_phase(
    http: aiohttp.ClientSession, setup: Setup, mode: str, args: argparse.Namespace
) -> list[Drop]:
    list(offline_mails(setup))  # what is already there is not about this phase
    down_s = args.grace + 20.0
    drops: dict[str, Drop] = {}

    async def schedule() -> None:
        start = time.monotonic()
        for i, k in enumerate(setup.kiosks):
            await asyncio.sleep(max(0.0, start + i * args.spacing - time.monotonic()))
            at = await drop(mode, k, down_s)
            drops[k.terminal] = Drop(k, at)

    dropper = asyncio.create_task(schedule(), name=f"drops:{mode}")
    bound = len(setup.kiosks) * args.spacing + 1.5 * args.keepalive + args.grace + PHASE_SLACK_S
    deadline = time.monotonic() + bound
    last_alerts = 0.0
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(args.poll)
            views = await terminals(http, setup.api)
            polled = wall_ms()
            for t, d in drops.items():
                view = views.get(t, {})
                since = view.get("since_ms")
                if d.registry_ms is None and view.get("status") == "offline" and since:
                    d.registry_ms = float(since)
                if d.presence_ms is None and view.get("presence") == "offline":
                    d.presence_ms = polled
            for mtime, text in offline_mails(setup):
                for t, d in drops.items():
                    if d.mail_ms is None and t in text and mtime >= d.at_ms:
                        d.mail_ms = mtime
                        resume(d.kiosk)
            if time.monotonic() - last_alerts >= 1.0:
                last_alerts = time.monotonic()
                await read_alert_log(http, setup, drops)
            if dropper.done() and all(d.mail_ms is not None for d in drops.values()):
                break
        await read_alert_log(http, setup, drops)
        if not dropper.done():
            dropper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dropper
    finally:
        for k in setup.kiosks:
            resume(k)
    return list(drops.values())


async def read_alert_log(http: aiohttp.ClientSession, setup: Setup, drops: dict[str, Drop]) -> None:
    log = await get_json(http, f"{setup.api}/api/v1/alerts?limit=5000")
    for entry in log["entries"]:
        d = drops.get(entry["subject"])
        if d is None or entry["kind"] != "terminal-offline" or entry["action"] != "sent":
            continue
        opened = int(entry["alert_id"].rsplit(":", 1)[1])
        if opened >= d.at_ms - 1000 and d.opened_ms is None:
            d.opened_ms, d.decided_ms = opened, int(entry["at_ms"])


# --- report --------------------------------------------------------------------------------


def _line(label: str, values: list[float], goal: str = "") -> None:
    if not values:
        print(f"  {label:34s} no sample")
        return
    s = [v / 1000 for v in values]
    print(
        f"  {label:34s} n={len(s):3d}  p50 {percentile(s, 50):6.2f} s  "
        f"p95 {percentile(s, 95):6.2f} s  max {max(s):6.2f} s{goal}"
    )


def report(mode: str, drops: list[Drop], args: argparse.Namespace) -> bool:
    how = {
        "half-open": "SIGSTOP of the kiosk's process: the broker learns by keep-alive expiry",
        "power-cut": "fleet-sim power-cut: the socket is shut down, the broker sees it close",
    }[mode]
    print(f"{mode}: {how}")
    grace_ms = args.grace * 1000
    registry = [d.registry_ms - d.at_ms for d in drops if d.registry_ms is not None]
    presence = [d.presence_ms - d.at_ms for d in drops if d.presence_ms is not None]
    decided = [
        d.decided_ms - (d.opened_ms + grace_ms)
        for d in drops
        if d.decided_ms is not None and d.opened_ms is not None
    ]
    mailed = [
        d.mail_ms - (d.opened_ms + grace_ms)
        for d in drops
        if d.mail_ms is not None and d.opened_ms is not None
    ]
    print(
        f"  drops {len(drops)}: {len(registry)} offline in the registry, {len(presence)} in "
        f"presence, {len(mailed)} e-mailed"
    )
    offline_goal_s = 1.5 * args.keepalive + 2
    offline_ok = len(presence) == len(drops) and percentile(presence, 95) / 1000 <= offline_goal_s
    mail_ok = len(mailed) == len(drops) and percentile(mailed, 95) / 1000 < MAIL_GOAL_S
    _line("drop -> registry offline (will in)", registry)
    _line(
        "drop -> presence offline",
        presence,
        f"   goal p95 <= {offline_goal_s:.1f} s: {'met' if offline_ok else 'NOT met'}",
    )
    _line("grace end -> 'sent' decision", decided)
    _line(
        "grace end -> e-mail in maildir",
        mailed,
        f"   goal p95 < {MAIL_GOAL_S:.0f} s: {'met' if mail_ok else 'NOT met'}",
    )
    return offline_ok and mail_ok


# --- the bench -----------------------------------------------------------------------------


async def measure(setup: Setup, args: argparse.Namespace) -> bool:
    ok = True
    async with aiohttp.ClientSession() as http:
        await wait_healthy(http, setup.api, setup.server)
        sites = write_sites(setup.workdir / "sites.toml", setup.kiosks, args.grace)
        await asyncio.to_thread(import_sites, setup.api, sites)
        for k in setup.kiosks:
            start_sim(setup.info, setup.workdir, setup.workdir / "tls", k, args.keepalive)
        took = await wait_all(http, setup, "online", args.timeout)
        print(f"online        all {len(setup.kiosks)} kiosks online in presence after {took:.1f} s")
        for mode in args.modes:
            drops = await run_phase(http, setup, mode, args)
            ok = report(mode, drops, args) and ok
            took = await wait_all(http, setup, "online", args.timeout)
            print(f"  all back online in presence {took:.1f} s after the phase", flush=True)
    return ok


def bench(args: argparse.Namespace) -> int:
    soft, raised = raise_open_files()
    print(
        f"settings      {args.drops} drops per mode, one every {args.spacing:g} s; keep-alive "
        f"{args.keepalive} s; grace {args.grace} s; alert tick "
        f"{'server default (1 s)' if args.tick is None else f'{args.tick:g} s'}; telemetry "
        f"every 10 s; ops API polled every {args.poll:g} s; open files {soft} -> {raised}"
    )
    print(
        f"goals         drop -> presence offline p95 <= 1.5 x {args.keepalive} + 2 = "
        f"{1.5 * args.keepalive + 2:.1f} s; grace end -> e-mail p95 < {MAIL_GOAL_S:.0f} s"
    )
    run = uuid.uuid4().hex[:4]
    kiosks = [
        Kiosk(
            index=i,
            terminal=f"lat{run}-{i:02d}-0001",
            site=f"lat{run}-site-{i:02d}",
            control=Path(),
        )
        for i in range(1, args.drops + 1)
    ]
    with tempfile.TemporaryDirectory(prefix="bench-alert-") as tmp:
        workdir = Path(tmp)
        (workdir / "sims").mkdir()
        for k in kiosks:
            k.control = workdir / "sims" / f"{k.index:02d}.sock"
        with running_stack(workdir / "stack") as info:
            provision(info, workdir / "tls", kiosks)
            api_port = free_port()
            config = write_server_config(info, workdir, api_port, args.tick)
            with (workdir / "fleet-server.log").open("ab") as out:
                server = subprocess.Popen(
                    [str(BIN / "fleet-server"), "run", "--config", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            setup = Setup(info, workdir, f"http://127.0.0.1:{api_port}", kiosks, server)
            try:
                ok = asyncio.run(measure(setup, args))
            finally:
                for k in kiosks:
                    if k.popen is not None:
                        stop_process(k.popen)
                code = stop_process(server)
                if code != 0:
                    print(f"fleet-server exited with {code}; see its log", file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=20, help="kiosks, each dropped once per mode")
    parser.add_argument("--keepalive", type=int, default=30, help="MQTT keep-alive (default 30)")
    parser.add_argument("--grace", type=int, default=5, help="sites' grace, s (default 5)")
    parser.add_argument("--tick", type=float, help="[alerts] tick_s (default: the server's)")
    parser.add_argument("--spacing", type=float, default=1.3, help="s between drops (1.3)")
    parser.add_argument("--poll", type=float, default=0.1, help="ops API poll period, s (0.1)")
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="default: both"
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="s for all kiosks to be online (180)"
    )
    args = parser.parse_args()
    if not 1 <= args.drops <= 99:
        parser.error("--drops must be from 1 to 99")
    if args.keepalive < 2 or args.grace < 1 or args.spacing <= 0 or args.poll <= 0:
        parser.error("--keepalive >= 2, --grace >= 1, --spacing and --poll > 0")
    return bench(args)


if __name__ == "__main__":
    sys.exit(run_stoppable(main))
