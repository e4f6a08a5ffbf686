"""``kiosk-agent``: the kiosk daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec

from edge_agent.app import Agent, KioskParts
from edge_agent.config import (
    AgentConfig,
    BrokerSettings,
    EnrolmentSettings,
    StorageSettings,
    TelemetrySettings,
    TerminalSettings,
    TlsSettings,
    load_config,
    parse_config,
    render_config,
)
from edge_agent.dns import DnsProbe
from edge_agent.enrolment_client import (
    HttpsClockReference,
    clock_base_url,
    enroll,
    normalise_fingerprint,
)
from edge_agent.errors import AgentConfigError, AgentError
from edge_agent.identity import (
    Identity,
    TerminalKey,
    check_identity,
    new_key,
    store_ca,
    store_identity,
    write_file_atomically,
)
from edge_agent.logbook import RecentLog
from edge_agent.status_page.staff import hash_passcode
from edge_agent.status_page.web import StatusPageError, make_app, running
from edge_agent.store import AgentStore
from edge_agent.system_commands import SystemCommands
from edge_agent.system_psutil import PsutilSystem
from edge_agent.udev_pyudev import PyudevUsb
from edge_agent.usb import SimulatedUsb, UsbSource
from firmware_bridge.errors import BridgeError
from firmware_bridge.kiosk import KioskDevices
from firmware_bridge.profiles import Profile, load_profile, read_overrides
from fleet_protocol.enrolment import Enrolment
from fleet_protocol.errors import InvalidId
from fleet_protocol.ids import TerminalId, terminal_id

DEFAULT_CONFIG = Path("/etc/kiosk-agent/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/kiosk-agent")
CONFIG_FILE_MODE = 0o644
CONFIG_DIR_MODE = 0o755


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiosk-agent",
        description="政务服务自助终端代理 / the kiosk agent: reports this terminal to the fleet.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    check = sub.add_parser("check-config", help="validate the config file and print it")
    status = sub.add_parser(
        "status",
        help="what waits in the outbox and what was dropped (本机待发送数据)",
        description="本机待发送数据与丢弃统计 / what this kiosk's outbox holds and has dropped; "
        "works whether or not the agent runs.",
    )
    status.add_argument("--json", action="store_true", help="print it as JSON")
    enrol = sub.add_parser(
        "enroll",
        help="enrol this kiosk: key, certificate and config (登记本终端)",
        description=(
            "登记本终端 / enrol this kiosk: generate its key here, get its certificate with a "
            "one-time token from ops, and write the agent's config."
        ),
    )
    for p in (run, check, status, enrol):
        p.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"TOML config file (default {DEFAULT_CONFIG})",
        )
    hashing = sub.add_parser(
        "hash-passcode",
        help="hash a staff passcode for [[status_page.staff]] (工作人员密码)",
        description="读入工作人员密码并输出其散列 / read a staff passcode, print its hash for "
        "the config's [[status_page.staff]] passcode_hash.",
    )
    hashing.add_argument(
        "--stdin",
        action="store_true",
        help="read the passcode from the first line of standard input (for scripts)",
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    enrol.add_argument("--server", required=True, metavar="URL", help="https://HOST:PORT")
    enrol.add_argument("--token", required=True, help="one-time enrolment token from ops")
    enrol.add_argument(
        "--ca-fingerprint",
        required=True,
        metavar="FP",
        help="SHA-256 of the fleet CA, as ops gave it (colons and case do not matter)",
    )
    enrol.add_argument(
        "--terminal",
        metavar="ID",
        help="this terminal's id, as the token was made for (default: terminal.id of --config)",
    )
    enrol.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where the key and certificates go, under tls/ (default {DEFAULT_STATE_DIR})",
    )
    enrol.add_argument(
        "--force", action="store_true", help="replace an existing identity and config"
    )
    enrol.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _local_time(when: dt.datetime) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M %z")


def _check_config(path: Path, config: AgentConfig, identity: Identity) -> None:
    c = config
    now = dt.datetime.now(dt.UTC)
    print(f"{path}: OK")
    print(f"  terminal {c.terminal.id} at site {c.terminal.site}")
    print(f"  broker   {c.broker.host}:{c.broker.port} keep-alive {c.broker.keepalive_s}s")
    print(f"  tls      CA {c.tls.ca_file}, server name {c.broker_server_name}")
    expired = "  (已过期 / EXPIRED)" if identity.expired(now) else ""
    print(
        f"  identity {identity.path}: serial {identity.serial_hex}, "
        f"valid until {_local_time(identity.not_after)}{expired}"
    )
    renew = c.enrolment.renew_url or "never (no enrolment.renew_url)"
    print(f"  renewal  from {_local_time(identity.renew_at)} at {renew}")
    print(f"  telemetry every {c.telemetry.interval_s:g}s, batches of {c.telemetry.batch_size}")
    print(f"  state    {c.state_dir}")


def _profile(config: AgentConfig) -> Profile | None:
    """The kiosk's device profile with its overrides; None when none is configured."""
    pcfg = config.peripherals
    if not pcfg.profile:
        return None
    try:
        overrides = read_overrides(Path(pcfg.overrides)) if pcfg.overrides else []
        return load_profile(pcfg.profile, overrides)
    except BridgeError as exc:
        raise AgentConfigError(f"peripherals: {exc}") from exc


async def _run(config: AgentConfig, recent: RecentLog) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log = logging.getLogger("kiosk-agent")
    profile = _profile(config)
    store = await asyncio.to_thread(
        AgentStore.open, config.database_path, synchronous=config.outbox.synchronous
    )
    reference_url = config.clock.reference_url or (
        clock_base_url(config.enrolment.renew_url) if config.enrolment.renew_url else ""
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(store.close)
        devices = None
        if profile is not None:
            devices = await stack.enter_async_context(KioskDevices(profile))
        usb: UsbSource | None = None
        if profile is not None and config.peripherals.usb == "udev":
            udev = PyudevUsb()
            stack.callback(udev.close)
            usb = udev
        elif profile is not None and config.peripherals.usb == "simulated":
            usb = SimulatedUsb(profile)
        clock = None
        if reference_url:
            clock = await stack.enter_async_context(
                HttpsClockReference(reference_url, config.tls.ca_path)
            )
        parts = KioskParts(
            machine=PsutilSystem(),
            store=store,
            machine_commands=SystemCommands(config.system_commands),
            profile=profile,
            devices=devices,
            usb=usb,
            clock_reference=clock,
            dns=DnsProbe(config.broker.host, config.broker.port),
            recent_log=recent.tail,
        )
        agent = await asyncio.to_thread(Agent, config, parts)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(agent.run(stopping), name="agent")
            tg.create_task(_status_page(config, agent, stopping, log), name="status-page")


async def _status_page(
    config: AgentConfig, agent: Agent, stopping: asyncio.Event, log: logging.Logger
) -> None:
    settings = config.status_page
    app = make_app(settings, agent, agent.operations, log.getChild("status-page"))
    try:
        async with running(app, settings) as listening:
            log.info("status page at %s", ", ".join(listening.urls))
            await stopping.wait()
    except StatusPageError as exc:
        # The agent keeps reporting without its page; the log says why there is none.
        log.error("no status page: %s", exc)  # noqa: TRY400 - the reason is the message


def _status(config: AgentConfig, *, as_json: bool) -> int:
    path = config.database_path
    if not path.exists():
        print(
            f"kiosk-agent: error: {path} does not exist: the agent has not run here yet",
            file=sys.stderr,
        )
        return 2
    store = AgentStore.open(path)
    try:
        outbox = store.outbox(config.terminal.id, config.outbox.limits)
        report = {
            "terminal": config.terminal.id,
            "database": str(path),
            "pending": len(outbox),
            "pending_bytes": outbox.pending_bytes,
            "oldest_ms": outbox.oldest_ms,
            "dropped": outbox.dropped,
        }
    finally:
        store.close()
    if as_json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    oldest = outbox.oldest_ms
    print(f"{config.terminal.id}: {path}")
    print(f"  待发送 pending  {len(outbox)} messages, {outbox.pending_bytes} bytes")
    if oldest is not None:
        when = dt.datetime.fromtimestamp(oldest / 1000, dt.UTC)
        print(f"  最早 oldest     {_local_time(when)}")
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(outbox.dropped.items())) or "none"
    print(f"  已丢弃 dropped  {dropped}")
    return 0


def _hash_passcode(from_stdin: bool) -> int:
    if from_stdin:
        first = again = sys.stdin.readline().rstrip("\r\n")
    else:
        first = getpass.getpass("工作人员密码 / staff passcode (8+ characters): ")
        again = getpass.getpass("再输入一次 / again: ")
    if first != again:
        print("kiosk-agent: error: the two passcodes differ; nothing written", file=sys.stderr)
        return 2
    try:
        print(hash_passcode(first))
    except ValueError as exc:
        print(f"kiosk-agent: error: {exc}", file=sys.stderr)
        return 2
    return 0


# -- enroll ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EnrolPaths:
    config: Path
    tls_dir: Path

    @property
    def identity(self) -> Path:
        return self.tls_dir / "identity.pem"

    @property
    def ca(self) -> Path:
        return self.tls_dir / "ca.pem"


def _progress(text: str) -> None:
    # Progress goes to stderr, so --json output stays machine-readable.
    print(text, file=sys.stderr, flush=True)


def _existing_config(path: Path) -> AgentConfig | None:
    """The config already there, if it is valid: re-enrolling keeps its other settings."""
    if not path.exists():
        return None
    try:
        return load_config(path)
    except AgentConfigError:
        return None


def _terminal(args: argparse.Namespace, existing: AgentConfig | None) -> TerminalId:
    if args.terminal is not None:
        try:
            return terminal_id(args.terminal)
        except InvalidId as exc:
            raise AgentConfigError(f"--terminal: {exc}") from exc
    if existing is not None:
        return existing.terminal.id
    raise AgentConfigError(
        "需要终端编号 / --terminal ID is required: the token was made for one terminal id "
        f"(fleetctl token create shows it), and {args.config} does not name one"
    )


def _prepare(paths: _EnrolPaths, *, force: bool) -> None:
    """Refuse to overwrite, and make sure we can write, before the token is spent."""
    if not force:
        taken = [p for p in (paths.identity, paths.config) if p.exists()]
        if taken:
            raise AgentConfigError(
                f"已登记过 / already enrolled: {', '.join(map(str, taken))} exists; enrolling "
                "again replaces this kiosk's identity: add --force"
            )
    for directory, mode in ((paths.tls_dir, 0o700), (paths.config.parent, CONFIG_DIR_MODE)):
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=mode)
        except OSError as exc:
            raise AgentConfigError(f"{directory}: cannot create: {exc.strerror}") from exc
        if not os.access(directory, os.W_OK | os.X_OK):
            raise AgentConfigError(
                f"{directory}: not writable by this user; run enroll as the agent's user or root"
            )


def _enrolled_config(
    answer: Enrolment, paths: _EnrolPaths, state_dir: Path, existing: AgentConfig | None
) -> AgentConfig:
    base_broker = existing.broker if existing is not None else BrokerSettings()
    base_enrol = existing.enrolment if existing is not None else EnrolmentSettings()
    draft = AgentConfig(
        terminal=TerminalSettings(id=answer.terminal, site=answer.site),
        broker=msgspec.structs.replace(
            base_broker, host=answer.broker.host, port=answer.broker.port
        ),
        tls=TlsSettings(ca_file=str(paths.ca), identity_file=str(paths.identity)),
        enrolment=msgspec.structs.replace(base_enrol, renew_url=answer.renew_url),
        storage=StorageSettings(state_dir=str(state_dir)),
        telemetry=existing.telemetry if existing is not None else TelemetrySettings(),
    )
    # Struct constructors do not check constraints; reading the text back does.
    return parse_config(render_config(draft).encode(), str(paths.config))


def _save(answer: Enrolment, key: TerminalKey, paths: _EnrolPaths, config: AgentConfig) -> Identity:
    identity = store_identity(
        paths.identity, key, answer.certificate_pem, ca_pem=answer.ca_pem, cn=answer.terminal
    )
    store_ca(paths.ca, answer.ca_pem)
    try:
        write_file_atomically(
            paths.config,
            render_config(config).encode(),
            mode=CONFIG_FILE_MODE,
            dir_mode=CONFIG_DIR_MODE,
        )
    except OSError as exc:
        raise AgentConfigError(f"{paths.config}: cannot write: {exc.strerror}") from exc
    return identity


def _enrol(args: argparse.Namespace) -> int:
    state_dir = args.state_dir.absolute()
    paths = _EnrolPaths(config=args.config.absolute(), tls_dir=state_dir / "tls")
    fingerprint = normalise_fingerprint(args.ca_fingerprint)
    existing = _existing_config(paths.config)
    terminal = _terminal(args, existing)
    _prepare(paths, force=args.force)
    _progress(f"生成密钥 / generating this kiosk's key (it never leaves the kiosk) for {terminal}")
    key = new_key()
    _progress(
        f"连接 / contacting {args.server}: checking the fleet CA, then asking for a certificate"
    )
    answer = asyncio.run(enroll(args.server, args.token, fingerprint, key, terminal=terminal))
    try:
        config = _enrolled_config(answer, paths, state_dir, existing)
        identity = _save(answer, key, paths, config)
    except AgentError as exc:
        raise AgentError(
            f"{exc}\n  证书已签发但未能保存 / the certificate was issued but not saved, and the "
            "token is spent: fix the problem above and ask ops for a new token"
        ) from exc
    if args.json:
        print(
            json.dumps(
                {
                    "terminal": answer.terminal,
                    "site": answer.site,
                    "serial": identity.serial_hex,
                    "not_after": identity.not_after.isoformat(timespec="seconds"),
                    "broker": {"host": answer.broker.host, "port": answer.broker.port},
                    "renew_url": answer.renew_url,
                    "config": str(paths.config),
                    "identity": str(paths.identity),
                    "ca": str(paths.ca),
                },
                indent=2,
            )
        )
        return 0
    print(
        "登记完成 / enrolled\n"
        f"  终端 terminal              {answer.terminal}\n"
        f"  站点 site                  {answer.site}\n"
        f"  证书有效期至 valid until   {_local_time(identity.not_after)}\n"
        f"  broker                     {answer.broker.host}:{answer.broker.port}\n"
        f"  配置 config                {paths.config}\n"
        f"  身份 identity              {paths.identity}\n"
        f"下一步 / next: kiosk-agent run --config {paths.config}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "hash-passcode":
            return _hash_passcode(args.stdin)
        if args.command == "enroll":
            return _enrol(args)
        config = load_config(args.config)
        if args.command == "status":
            return _status(config, as_json=args.json)
        identity = check_identity(config)
        if args.command == "check-config":
            _check_config(args.config, config, identity)
            return 0
        logging.basicConfig(
            level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # The newest lines stay in memory for diagnostics and the upload-logs command.
        recent = RecentLog()
        recent.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(recent)
        log = logging.getLogger("kiosk-agent")
        log.info(
            "identity %s: serial %s, valid until %s",
            identity.cn,
            identity.serial_hex,
            identity.not_after.isoformat(timespec="seconds"),
        )
        if identity.expired(dt.datetime.now(dt.UTC)):
            # Still start: the local status page works without the broker, and the clock
            # may be the one that is wrong.
            log.error(
                "the certificate expired at %s; the broker will refuse it: enrol again "
                "(kiosk-agent enroll --force)",
                identity.not_after.isoformat(timespec="seconds"),
            )
        asyncio.run(_run(config, recent))
    except AgentError as exc:
        print(f"kiosk-agent: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
