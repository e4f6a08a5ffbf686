"""Footprint of one real `kiosk-agent run` sampling every 10 s: memory (RSS) and CPU.

A local stack (Mosquitto, InfluxDB, SMTP sink) runs in a temporary directory; the agent gets a
certificate from its fleet CA and reports to its broker, where this bench subscribes as the
fleet server would (so telemetry is acknowledged and leaves the outbox, as in production).
The agent's process is sampled with psutil once a second. Printed:

- RSS: the largest seen, against the goal of under 60 MB; and, measured in the same run, the RSS
  of a bare ``python -c "import asyncio; asyncio.run(asyncio.sleep(N))"`` as the baseline an
  asyncio program cannot go below;
- CPU: the agent's CPU time (user + system) over the steady part of the run (from its first
  telemetry on), as a percentage of one core and as seconds per hour, against the goal of under
  1 % of one core. Start-up CPU (imports, TLS, database) is printed apart.

    .venv/bin/python bench/bench_agent_footprint.py [--seconds 120] [--interval 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import psutil

from provisioning.authority import FleetAuthority
from provisioning.stack import StackInfo, run_stoppable, running_stack

TERMINAL = "bench-footprint-01"
SITE = "bench-site"
MB = 1_000_000
RSS_GOAL_MB = 60.0
CPU_GOAL_PERCENT = 1.0
BIN = Path(sys.executable).parent


@dataclass
class Footprint:
    rss_max: int = 0
    rss_last: int = 0
    #: Unique set size: the memory only this process holds (not the shared libraries).
    uss_max: int = 0
    samples: int = 0

    def see(self, process: psutil.Process) -> None:
        memory = process.memory_full_info()
        self.rss_max = max(self.rss_max, memory.rss)
        self.rss_last = memory.rss
        self.uss_max = max(self.uss_max, memory.uss)
        self.samples += 1


def _agent_config(info: StackInfo, workdir: Path, interval_s: float) -> Path:
    identity = workdir / "tls" / "identity.pem"
    FleetAuthority.open(info.pki_dir).provision_identity(TERMINAL, SITE, identity, actor="bench")
    config = workdir / "agent.toml"
    # Production settings but the sampling interval; the status page on a free port.
    config.write_text(
        f"""
[terminal]
id = "{TERMINAL}"
site = "{SITE}"

[broker]
host = "127.0.0.1"
port = {info.mqtt_port}

[telemetry]
interval_s = {interval_s}

[tls]
ca_file = "{info.pki_dir / "ca.pem"}"
identity_file = "{identity}"

[storage]
state_dir = "{workdir / "state"}"

[status_page]
port = 0
""",
        encoding="utf-8",
    )
    return config


def _fleet_tls(info: StackInfo) -> ssl.SSLContext:
    """The fleet server's identity on the broker's service listener (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=info.pki_dir / "ca.pem")
    context.load_cert_chain(info.pki_dir / "fleet-server.pem", info.pki_dir / "fleet-server.key")
    return context


async def _fleet_side(info: StackInfo, first: asyncio.Event, ready: asyncio.Event) -> None:
    """Subscribe to what the agent publishes, as the fleet server does; ``first`` is set at its
    first telemetry."""
    async with aiomqtt.Client(
        info.mqtt_host,
        info.mqtt_service_port,
        identifier="bench-fleet-side",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=_fleet_tls(info),
    ) as client:
        await client.subscribe(f"kiosk/v1/{TERMINAL}/#", qos=1)
        ready.set()
        async for message in client.messages:
            if str(message.topic).endswith("/telemetry"):
                first.set()


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _measure(info: StackInfo, workdir: Path, seconds: float, interval_s: float) -> None:
    config = _agent_config(info, workdir, interval_s)
    first, ready = asyncio.Event(), asyncio.Event()
    listening = asyncio.create_task(_fleet_side(info, first, ready), name="bench-fleet-side")
    await asyncio.wait_for(ready.wait(), 20)
    log = (workdir / "agent.log").open("ab")
    agent = await asyncio.create_subprocess_exec(
        str(BIN / "kiosk-agent"), "run", "--config", str(config), stdout=log, stderr=log
    )
    baseline = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"import asyncio; asyncio.run(asyncio.sleep({seconds + 60}))"
    )
    started = time.monotonic()
    try:
        agent_ps, baseline_ps = psutil.Process(agent.pid), psutil.Process(baseline.pid)
        ours, bare = Footprint(), Footprint()
        await asyncio.wait_for(first.wait(), 60)
        steady_from, cpu_from = time.monotonic(), _cpu_s(agent_ps)
        print(
            f"agent {TERMINAL}: first telemetry after {steady_from - started:.1f} s, "
            f"start-up CPU {cpu_from:.2f} s; measuring {seconds:.0f} s of {interval_s:g} s "
            "sampling",
            flush=True,
        )
        while time.monotonic() - steady_from < seconds:
            if agent.returncode is not None:
                raise SystemExit(f"kiosk-agent exited {agent.returncode}; see {log.name}")
            ours.see(agent_ps)
            bare.see(baseline_ps)
            await asyncio.sleep(1.0)
        cpu_s = _cpu_s(agent_ps) - cpu_from
        wall_s = time.monotonic() - steady_from
    finally:
        for child in (agent, baseline):
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
        for child in (agent, baseline):
            try:
                await asyncio.wait_for(child.wait(), 15)
            except TimeoutError:
                child.kill()
                await child.wait()
        log.close()
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    percent = cpu_s / wall_s * 100
    rss_mb = ours.rss_max / MB
    print(
        f"RSS max      {rss_mb:6.1f} MB   (at end {ours.rss_last / MB:.1f} MB, USS max "
        f"{ours.uss_max / MB:.1f} MB, {ours.samples} samples; goal under {RSS_GOAL_MB:.0f} MB: "
        f"{'met' if rss_mb < RSS_GOAL_MB else 'NOT met'})"
    )
    print(
        f"baseline RSS {bare.rss_max / MB:6.1f} MB   (USS {bare.uss_max / MB:.1f} MB; bare python "
        f"asyncio.sleep); the agent is {(ours.rss_max - bare.rss_max) / MB:.1f} MB above it"
    )
    print(
        f"CPU          {percent:6.3f} % of one core = {cpu_s / wall_s * 3600:.1f} s CPU per hour "
        f"of {interval_s:g} s sampling ({cpu_s:.2f} s over {wall_s:.0f} s; goal under "
        f"{CPU_GOAL_PERCENT:g} %: {'met' if percent < CPU_GOAL_PERCENT else 'NOT met'})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="steady run to measure")
    parser.add_argument("--interval", type=float, default=10.0, help="telemetry interval, s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_stack(Path(tmp) / "stack") as info:
        asyncio.run(_measure(info, Path(tmp), args.seconds, args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(run_stoppable(main))
