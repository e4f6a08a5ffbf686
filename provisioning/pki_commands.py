"""``fleetctl ca``, ``token``, ``audit`` and ``terminals revoke``: the fleet PKI for ops.

Each ``add_*`` declares argparse sub-commands (tagged with ``command=...``) and :data:`COMMANDS`
maps those tags to bodies ``(args, out) -> exit code``; :mod:`provisioning.cli` wires both in.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, TextIO, TypeAlias

import msgspec
import segno

from provisioning.authority import (
    AuditEntry,
    FleetAuthority,
    PkiSettings,
    default_actor,
    init_pki,
    load_settings,
)
from provisioning.broker_control import enforce_revocation
from provisioning.errors import InvalidSettings

PKI_ENV: Final = "FLEET_PKI_DIR"
DEFAULT_PKI: Final = Path(".fleet-stack/pki")

Command = Callable[[argparse.Namespace, TextIO], int]
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # noqa: SLF001 -- argparse has no public name for it

_DURATION = re.compile(r"([1-9][0-9]*)([smhd])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> dt.timedelta:
    """``30s``, ``15m``, ``24h`` or ``90d``."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write a number and a unit: 30s, 15m, 24h, 90d"
        )
    return dt.timedelta(seconds=int(match[1]) * _UNIT_S[match[2]])


def default_pki_dir() -> Path:
    return Path(os.environ.get(PKI_ENV) or DEFAULT_PKI)


def _with_pki(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--pki",
        type=Path,
        default=default_pki_dir(),
        metavar="DIR",
        help=f"the PKI directory (default: ${PKI_ENV} or ./{DEFAULT_PKI}, the local stack's)",
    )
    return parser


def add_ca_commands(subparsers: _Subparsers) -> None:
    group = subparsers.add_parser(
        "ca",
        help="the fleet CA: create it, show its fingerprint",
        description="Create and inspect the fleet's certificate authorities.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="{init,show}")
    init = actions.add_parser(
        "init",
        help="create the fleet CA, the service CA and the servers' certificates",
        description="Create DIR (mode 0700) with the fleet CA (terminals and servers), the "
        "service CA (the fleet's own MQTT clients), the broker's and the fleet server's TLS "
        "certificates, and the service identities. Private keys are written 0600.",
    )
    init.add_argument("--dir", type=Path, required=True, metavar="DIR")
    init.add_argument(
        "--broker-name",
        action="append",
        metavar="NAME",
        help="a host name or address terminals use for the broker (repeat; default "
        "localhost, 127.0.0.1, ::1)",
    )
    init.add_argument(
        "--server-name",
        action="append",
        metavar="NAME",
        help="a host name or address of the fleet server's HTTPS (repeat; default as broker)",
    )
    init.add_argument(
        "--enrol-url", metavar="URL", help="the fleet server's enrolment URL, as kiosks reach it"
    )
    init.add_argument("--broker-port", type=int, metavar="PORT", help="terminal listener port")
    init.add_argument(
        "--device-validity",
        type=duration,
        metavar="DURATION",
        help="lifetime of terminal certificates (default 90d); renewed at two thirds",
    )
    init.add_argument(
        "--renewal-grace",
        type=duration,
        metavar="DURATION",
        help="how long a renewed-away certificate stays valid (default 7d)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--json", action="store_true")
    init.set_defaults(command="ca init")
    show = _with_pki(actions.add_parser("show", help="fingerprints and settings"))
    show.add_argument("--json", action="store_true")
    show.set_defaults(command="ca show")


def add_token_commands(subparsers: _Subparsers) -> None:
    group = subparsers.add_parser(
        "token",
        help="one-time enrolment tokens for new terminals",
        description="Create enrolment tokens. A token is bound to one terminal id and site, "
        "works once, and expires.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="{create}")
    create = _with_pki(
        actions.add_parser(
            "create",
            help="create a token and print it with the enrolment command and a QR code",
        )
    )
    create.add_argument("--terminal", required=True, metavar="ID")
    create.add_argument("--site", required=True, metavar="SITE")
    create.add_argument(
        "--ttl",
        type=duration,
        default=None,
        metavar="DURATION",
        help="how long the token works (default 24h)",
    )
    create.add_argument("--json", action="store_true", help="print the token as JSON")
    create.add_argument("--no-qr", action="store_true", help="do not draw the QR code")
    create.set_defaults(command="token create")


def add_audit_commands(subparsers: _Subparsers) -> None:
    parser = _with_pki(
        subparsers.add_parser(
            "audit",
            help="every enrolment, renewal, issue and revocation, issued or refused",
            description="Show the PKI's audit log, oldest first.",
        )
    )
    parser.add_argument("--terminal", metavar="ID", help="only this terminal")
    parser.add_argument("--limit", type=int, default=200, metavar="N")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(command="audit")


def add_revoke_command(actions: _Subparsers) -> None:
    revoke = _with_pki(
        actions.add_parser(
            "revoke",
            help="revoke a terminal's certificates and cut its open session off",
            description="Revoke every certificate of the terminal (CRL), reload the broker so "
            "no new session can start and the open one loses all access, then end the open "
            "session. Other terminals are not disturbed.",
        )
    )
    revoke.add_argument("terminal", metavar="ID")
    revoke.add_argument("--reason", default="revoked by ops", help="recorded in the audit log")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(command="terminals revoke")


# --- bodies -------------------------------------------------------------------------------


def _ca_init(args: argparse.Namespace, out: TextIO) -> int:
    names: list[str] = args.broker_name or ["localhost", "127.0.0.1", "::1"]
    server_names: list[str] = args.server_name or names
    settings = PkiSettings()
    changes: dict[str, object] = {}
    if args.enrol_url:
        changes["enrol_url"] = _https_url(args.enrol_url)
    if args.broker_port:
        changes["broker_port"] = args.broker_port
    changes["broker_host"] = names[0]
    if args.device_validity:
        changes["device_validity_s"] = int(args.device_validity.total_seconds())
    if args.renewal_grace:
        changes["renewal_grace_s"] = int(args.renewal_grace.total_seconds())
    try:
        settings = msgspec.structs.replace(settings, **changes)
    except ValueError as exc:
        raise InvalidSettings(str(exc)) from exc
    result = init_pki(
        args.dir,
        broker_names=names,
        server_names=server_names,
        settings=settings,
        force=args.force,
    )
    if args.json:
        out.write(
            json.dumps(
                {
                    "dir": str(result.root.resolve()),
                    "ca_fingerprint": result.ca_fingerprint,
                    "service_ca_fingerprint": result.service_ca_fingerprint,
                },
                indent=2,
            )
            + "\n"
        )
        return 0
    out.write(
        f"已创建证书颁发机构 / fleet PKI created in {result.root.resolve()}\n"
        f"  fleet CA fingerprint (SHA-256): {result.ca_fingerprint}\n"
        f"  service CA fingerprint:         {result.service_ca_fingerprint}\n"
        "Keep this directory private: it holds the CA keys (0600, directory 0700).\n"
    )
    return 0


def _https_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidSettings(f"--enrol-url {text!r} must be an https:// URL with a host")
    return text.rstrip("/")


def _ca_show(args: argparse.Namespace, out: TextIO) -> int:
    authority = FleetAuthority.open(args.pki)
    s = authority.settings
    record = {
        "dir": str(args.pki.resolve()),
        "ca_fingerprint": authority.ca_fingerprint,
        "enrol_url": s.enrol_url,
        "broker": f"{s.broker_host}:{s.broker_port}",
        "device_validity_s": s.device_validity_s,
        "renewal_grace_s": s.renewal_grace_s,
    }
    if args.json:
        out.write(json.dumps(record, indent=2) + "\n")
        return 0
    out.write("".join(f"{key:<18} {value}\n" for key, value in record.items()))
    return 0


def _token_create(args: argparse.Namespace, out: TextIO) -> int:
    authority = FleetAuthority.open(args.pki)
    token = authority.create_token(args.terminal, args.site, ttl=args.ttl, actor=default_actor())
    command = (
        f"kiosk-agent enroll --server {token.enrol_url} --terminal {token.terminal} "
        f"--token {token.secret} --ca-fingerprint {token.ca_fingerprint}"
    )
    if args.json:
        out.write(
            json.dumps(
                {
                    "terminal": token.terminal,
                    "site": token.site,
                    "token": token.secret,
                    "expires_at": token.expires_at.isoformat(timespec="seconds"),
                    "enrol_url": token.enrol_url,
                    "ca_fingerprint": token.ca_fingerprint,
                    "command": command,
                },
                indent=2,
            )
            + "\n"
        )
        return 0
    expires = token.expires_at.astimezone().strftime("%Y-%m-%d %H:%M %Z")
    out.write(
        f"终端 terminal  {token.terminal}\n"
        f"站点 site      {token.site}\n"
        f"有效期至 valid until  {expires} (仅可使用一次 / works once)\n"
        f"注册地址 enrolment URL  {token.enrol_url}\n"
        f"CA 指纹 fingerprint     {token.ca_fingerprint}\n"
        f"令牌 token     {token.secret}\n\n"
        "在终端上运行 / run on the kiosk:\n"
        f"  {command}\n"
    )
    if not args.no_qr:
        query = urllib.parse.urlencode(
            {
                "server": token.enrol_url,
                "terminal": token.terminal,
                "token": token.secret,
                "fp": token.ca_fingerprint,
            }
        )
        out.write("\n扫码注册 / scan to enrol:\n")
        segno.make(f"kiosk-enrol:?{query}", error="m").terminal(out=out, compact=True)
    return 0


def _audit(args: argparse.Namespace, out: TextIO) -> int:
    entries = FleetAuthority.open(args.pki).audit(terminal=args.terminal, limit=args.limit)
    if args.json:
        out.write(json.dumps([_entry_json(e) for e in entries], indent=2, ensure_ascii=False))
        out.write("\n")
        return 0
    if not entries:
        out.write("审计日志为空 / the audit log is empty\n")
        return 0
    for e in entries:
        when = e.ts.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        why = f" [{e.reason}]" if e.reason else ""
        out.write(
            f"{when}  {e.action:<12} {e.outcome:<8} {e.terminal or '-':<20} {e.actor}{why}"
            f"  {e.detail}\n"
        )
    return 0


def _entry_json(e: AuditEntry) -> dict[str, str]:
    return {
        "ts": e.ts.isoformat(timespec="seconds"),
        "action": e.action,
        "outcome": e.outcome,
        "terminal": e.terminal,
        "reason": e.reason,
        "actor": e.actor,
        "detail": e.detail,
    }


def _terminals_revoke(args: argparse.Namespace, out: TextIO) -> int:
    authority = FleetAuthority.open(args.pki)
    serials = authority.revoke(args.terminal, actor=default_actor(), reason=args.reason)
    s = load_settings(args.pki)
    enforce_revocation(
        args.terminal,
        reload_command=s.reload_command,
        host=s.service_host,
        port=s.service_port,
        pki_dir=args.pki,
    )
    if args.json:
        out.write(
            json.dumps(
                {
                    "terminal": args.terminal,
                    "revoked_serials": [f"{x:x}" for x in serials],
                    "session_cut_off": True,
                }
            )
            + "\n"
        )
        return 0
    out.write(
        f"已吊销 revoked {args.terminal}: {len(serials)} certificate(s); the broker reloaded "
        "its CRL and ACL and the terminal's open session was ended.\n"
        "To bring the kiosk back, create a new token for it: fleetctl token create ...\n"
    )
    return 0


COMMANDS: Final[Mapping[str, Command]] = {
    "ca init": _ca_init,
    "ca show": _ca_show,
    "token create": _token_create,
    "audit": _audit,
    "terminals revoke": _terminals_revoke,
}
