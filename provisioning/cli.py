"""``fleetctl``: the ops command line.

Layout, so that a new command group (``terminals``, ``demo``, ...) is three small additions:

- ``_add_<group>_commands(subparsers)`` declares the group's argparse sub-commands and tags
  each with ``set_defaults(command="<group> <action>")``; it is listed in ``_GROUPS``;
- one body per command, ``(args, out) -> exit code``, reads its typed options and does the
  work; it is listed in ``_COMMANDS`` under the same ``"<group> <action>"`` key;
- :func:`main` parses, dispatches through ``_COMMANDS``, and turns a
  :class:`~provisioning.errors.ProvisioningError` into one ``fleetctl: error: ...`` message on
  stderr and exit status 2, without a traceback.

Exit status: 0 success, 1 ``stack status`` found something not running, 2 usage or user error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, TextIO, TypeAlias

from provisioning import demo, ops_client, pki_commands, stack
from provisioning.errors import InvalidSettings, ProvisioningError

PROG: Final = "fleetctl"
EXIT_OK: Final = 0
EXIT_NOT_RUNNING: Final = 1
EXIT_USER_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130

DEFAULT_WORKDIR: Final = Path(".fleet-stack")

Command = Callable[[argparse.Namespace, TextIO], int]
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # noqa: SLF001 -- argparse has no public name for what add_subparsers() returns


# --- argparse setup -----------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not in 1..65535")
    return port


def _add_stack_commands(subparsers: _Subparsers) -> None:
    group = subparsers.add_parser(
        "stack",
        help="local Mosquitto, InfluxDB and SMTP sink for development, demos and tests",
        description="Run real Mosquitto, InfluxDB and an SMTP sink as background processes, "
        "bound to 127.0.0.1, with configs, data and logs under one work dir.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="{up,down,status,reload}")

    def with_workdir(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--workdir",
            type=Path,
            default=DEFAULT_WORKDIR,
            metavar="DIR",
            help=f"the stack's configs, data and logs (default: ./{DEFAULT_WORKDIR})",
        )
        return parser

    up = with_workdir(
        actions.add_parser(
            "up",
            help="start the stack (what is not already running)",
            description="Start the stack. Ports left out reuse the previous run's ports when "
            "free, else free ports are chosen. Data from earlier runs is kept.",
        )
    )
    for name, service in (("mqtt", "Mosquitto"), ("influx", "InfluxDB HTTP"), ("smtp", "SMTP")):
        up.add_argument(
            f"--{name}-port",
            type=_port,
            metavar="PORT",
            help=f"{service} port on 127.0.0.1 (default: previous or a free port)",
        )
    up.add_argument("--json", action="store_true", help="print the stack's info as JSON")
    up.set_defaults(command="stack up")

    down = with_workdir(
        actions.add_parser(
            "down",
            help="stop the stack's processes (data is kept)",
            description="Stop exactly the processes `stack up` started in this work dir.",
        )
    )
    down.set_defaults(command="stack down")

    status = with_workdir(
        actions.add_parser(
            "status",
            help="show endpoints, pids and whether each service runs",
            description="Show the stack. Exit status 1 if any service is not running.",
        )
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(command="stack status")

    reload = with_workdir(
        actions.add_parser(
            "reload",
            help="make the broker reread its CRL and ACL (after a revocation)",
            description="Send SIGHUP to the stack's Mosquitto.",
        )
    )
    reload.set_defaults(command="stack reload")


def _add_terminals_commands(subparsers: _Subparsers) -> None:
    group = subparsers.add_parser(
        "terminals",
        help="the fleet's terminals, as the fleet server knows them",
        description="Ask the fleet server's ops API about terminals.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="{list,revoke}")
    listing = actions.add_parser(
        "list",
        help="every terminal with its status (online/offline) and when it was last seen",
        description="List every terminal with status, site and last seen time.",
    )
    listing.add_argument(
        "--server",
        default=ops_client.default_server(),
        metavar="URL",
        help=f"the fleet server's ops API (default: ${ops_client.SERVER_ENV} "
        f"or {ops_client.DEFAULT_SERVER})",
    )
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(command="terminals list")
    pki_commands.add_revoke_command(actions)


def _add_demo_commands(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole system locally: stack, fleet server, kiosks (what `make demo` runs)",
        description="Start the local stack, a fleet server, kiosk agents at Jinshan town "
        "centres and simulated village kiosks; Ctrl-C stops everything it started.",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        metavar="DIR",
        help="configs, data and logs of the demo (default: ./.demo)",
    )
    parser.add_argument(
        "--sim-terminals",
        type=int,
        default=12,
        metavar="N",
        help="simulated village kiosks besides the real agent processes (default 12)",
    )
    parser.add_argument(
        "--for",
        dest="duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop by itself after this long (default: run until Ctrl-C)",
    )
    parser.set_defaults(command="demo")


_GROUPS: Final[Sequence[Callable[[_Subparsers], None]]] = (
    _add_stack_commands,
    _add_terminals_commands,
    pki_commands.add_ca_commands,
    pki_commands.add_token_commands,
    pki_commands.add_audit_commands,
    _add_demo_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Kiosk fleet operations.")
    subparsers = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for add_commands in _GROUPS:
        add_commands(subparsers)
    return parser


# --- command bodies -----------------------------------------------------------------------


def _stack_up(args: argparse.Namespace, out: TextIO) -> int:
    workdir: Path = args.workdir
    as_json: bool = args.json
    if not as_json:
        print(f"starting the stack in {workdir.resolve()} ...", file=sys.stderr, flush=True)
    info = stack.up(
        workdir,
        mqtt_port=args.mqtt_port,
        influx_port=args.influx_port,
        smtp_port=args.smtp_port,
        detach=True,
    )
    if as_json:
        out.write(info.to_json())
        return EXIT_OK
    out.write(_describe(stack.status(workdir)))
    return EXIT_OK


def _stack_down(args: argparse.Namespace, out: TextIO) -> int:
    workdir: Path = args.workdir
    stopped = stack.down(workdir)
    if stopped:
        out.write("".join(f"stopped {what}\n" for what in stopped))
    else:
        out.write(f"nothing of the stack in {workdir.resolve()} was running\n")
    return EXIT_OK


def _stack_reload(args: argparse.Namespace, out: TextIO) -> int:
    stack.reload(args.workdir)
    out.write("the broker rereads its CRL and ACL\n")
    return EXIT_OK


def _stack_status(args: argparse.Namespace, out: TextIO) -> int:
    workdir: Path = args.workdir
    as_json: bool = args.json
    found = stack.status(workdir)
    out.write(found.to_json() if as_json else _describe(found))
    return EXIT_OK if found.running else EXIT_NOT_RUNNING


def _describe(found: stack.StackStatus) -> str:
    if found.info is None:
        return f"no stack in {found.workdir}; start one with: {PROG} stack up --workdir ...\n"
    info = found.info
    state = "running" if found.running else "NOT fully running"
    lines = [f"stack in {found.workdir}: {state}"]
    for service in found.services:
        extra = (
            f"  database {info.influx_database}" if service.service is stack.Service.INFLUX else ""
        )
        lines.append(
            f"  {service.service:<10} {service.endpoint:<24} pid {service.pid:<8} "
            f"{'running' if service.running else 'stopped'}{extra}"
        )
    lines.append(f"mail sent to the SMTP sink is stored as .eml files in {info.maildir}")
    lines.append("logs:")
    lines.extend(f"  {service.log_file}" for service in found.services)
    workdir_option = (
        ""
        if found.workdir == DEFAULT_WORKDIR.resolve()
        else f" --workdir {shlex.quote(str(found.workdir))}"
    )
    verb = "down" if found.running else "up"
    lines.append(
        f"{'stop' if found.running else 'start'} it with: {PROG} stack {verb}{workdir_option}"
    )
    return "\n".join(lines) + "\n"


def _terminals_list(args: argparse.Namespace, out: TextIO) -> int:
    listing = ops_client.terminals(args.server)
    if args.json:
        out.write(ops_client.to_json(listing) + "\n")
        return EXIT_OK
    if not listing.terminals:
        out.write("no terminals yet / 暂无终端\n")
        return EXIT_OK
    now_ms = time.time() * 1000
    rows = [("终端 terminal", "状态 status", "站点 site", "镇 town", "最后在线 last seen")]
    for t in listing.terminals:
        status = {"online": "在线 online", "offline": "离线 offline"}.get(t.status, "未知 unknown")
        if t.status == "offline" and t.reason:
            status += f" ({t.reason})"
        seen = "-" if t.last_seen_ms is None else _ago(now_ms - t.last_seen_ms)
        rows.append((t.id, status, t.site_name or t.site or "-", t.town or "-", seen))
    widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(_pad(cell, w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
    online = sum(t.status == "online" for t in listing.terminals)
    out.write(f"{online}/{len(listing.terminals)} online\n")
    return EXIT_OK


def _ago(ms: float) -> str:
    s = max(0, int(ms / 1000))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago"


def _width(text: str) -> int:
    # CJK characters take two columns in a terminal.
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    if args.sim_terminals < 0:
        raise InvalidSettings("--sim-terminals must be 0 or more")
    return demo.run(args.workdir, args.sim_terminals, args.duration, out)


_COMMANDS: Final[Mapping[str, Command]] = {
    "terminals list": _terminals_list,
    "demo": _demo,
    "stack up": _stack_up,
    "stack down": _stack_down,
    "stack status": _stack_status,
    "stack reload": _stack_reload,
    **pki_commands.COMMANDS,
}


# --- entry point --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The ``fleetctl`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    command: str = args.command
    try:
        return _COMMANDS[command](args, sys.stdout)
    except ProvisioningError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
