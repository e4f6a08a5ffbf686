"""``fleet-sim``: many simulated kiosks in one process.

Each terminal is a real :class:`~edge_agent.app.Agent` with its own MQTT connection; only the
machine it reads is simulated (a random walk per terminal), so the fleet server sees exactly
what it would see from real kiosks.

Each simulated kiosk connects with its own client certificate, from ``--tls-dir``::

    DIR/ca.pem                  the fleet CA
    DIR/{terminal_id}.pem       that terminal's identity: private key, then certificate chain
                                (mode 0600, as `kiosk-agent enroll` writes it)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys
import time
from pathlib import Path

from edge_agent.app import Agent
from edge_agent.config import (
    MQTTS_PORT,
    AgentConfig,
    BrokerSettings,
    StorageSettings,
    TelemetrySettings,
    TerminalSettings,
    TlsSettings,
)
from edge_agent.errors import AgentError
from edge_agent.identity import check_identity
from edge_agent.telemetry import SystemReading
from fleet_protocol.errors import InvalidId
from fleet_protocol.ids import site_id, terminal_id

GIB = 1024**3


class SimulatedSystem:
    """A plausible kiosk PC: 8 GiB RAM, 128 GiB disk, busy during the day."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)  # noqa: S311 - simulation, not cryptography
        self._cpu = self._rng.uniform(5, 30)
        self._mem = self._rng.uniform(30, 60)
        self._disk = self._rng.uniform(20, 70)
        self._sent = self._rng.randrange(10**6, 10**9)
        self._recv = self._rng.randrange(10**6, 10**9)
        self._booted = time.time() - self._rng.uniform(600, 30 * 86400)

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
            uptime_s=time.time() - self._booted,
            net_bytes_sent=self._sent,
            net_bytes_recv=self._recv,
            load_1m=self._cpu / 25,
            temperatures={"coretemp/Package id 0": 40 + self._cpu / 3},
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet-sim",
        description="模拟多台自助终端 / many simulated kiosks (real agent code) in one process.",
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
    p.add_argument("--batch-size", type=int, default=2, help="samples per telemetry message")
    p.add_argument("--state-dir", type=Path, required=True, help="one sub-directory per kiosk")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING"])
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
                    max_batch_age_s=max(args.interval * args.batch_size, 1.0),
                ),
                storage=StorageSettings(state_dir=str(args.state_dir / tid)),
            )
        )
    return configs


async def _run(configs: list[AgentConfig]) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    agents = [Agent(c, SimulatedSystem(seed=i)) for i, c in enumerate(configs)]
    async with asyncio.TaskGroup() as tg:
        for agent in agents:
            tg.create_task(agent.run(stopping), name=f"agent:{agent.config.terminal.id}")
        print(f"fleet-sim: {len(agents)} simulated kiosks running; Ctrl-C to stop", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.terminals < 1:
        print("fleet-sim: error: --terminals must be at least 1", file=sys.stderr)
        return 2
    try:
        configs = build_configs(args)
        # Every identity is checked before the first connection, so a missing or unsafe file
        # stops the simulation with its name instead of one kiosk retrying forever.
        for config in configs:
            check_identity(config)
    except (InvalidId, AgentError) as exc:
        print(f"fleet-sim: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_run(configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
