"""``kiosk-agent``: the kiosk daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from edge_agent.app import Agent
from edge_agent.config import AgentConfig, load_config
from edge_agent.errors import AgentError
from edge_agent.system_psutil import PsutilSystem

DEFAULT_CONFIG = Path("/etc/kiosk-agent/agent.toml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiosk-agent",
        description="政务服务自助终端代理 / the kiosk agent: reports this terminal to the fleet.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    check = sub.add_parser("check-config", help="validate the config file and print it")
    for p in (run, check):
        p.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"TOML config file (default {DEFAULT_CONFIG})",
        )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


async def _run(config: AgentConfig) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    agent = Agent(config, PsutilSystem())
    await agent.run(stopping)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command == "check-config":
            c = config
            print(f"{args.config}: OK")
            print(f"  terminal {c.terminal.id} at site {c.terminal.site}")
            print(f"  broker   {c.broker.host}:{c.broker.port} keep-alive {c.broker.keepalive_s}s")
            print(
                f"  telemetry every {c.telemetry.interval_s:g}s, "
                f"batches of {c.telemetry.batch_size}"
            )
            print(f"  state    {c.state_dir}")
            return 0
        logging.basicConfig(
            level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        asyncio.run(_run(config))
    except AgentError as exc:
        print(f"kiosk-agent: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
