"""``fleet-server``: run the fleet server, or bring its registry schema up to date."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from fleet_server import app
from fleet_server.config import ServerConfig, load_config
from fleet_server.errors import FleetServerError

DEFAULT_CONFIG = Path("/etc/fleet-server/server.toml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-server",
        description="政务服务自助终端运维平台服务端 / the kiosk fleet server.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="ingest telemetry and presence until SIGTERM/SIGINT")
    mig = sub.add_parser("migrate", help="create or upgrade the registry database, then exit")
    for p in (run, mig):
        p.add_argument(
            "--config", type=Path, default=DEFAULT_CONFIG, help=f"TOML file ({DEFAULT_CONFIG})"
        )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


async def _run(config: ServerConfig) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await app.run(config, stopping)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command == "migrate":
            before, after = asyncio.run(app.migrate(config))
            print(f"registry {config.registry_path}: schema {before} -> {after}")
            return 0
        logging.basicConfig(
            level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        asyncio.run(_run(config))
    except FleetServerError as exc:
        print(f"fleet-server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
