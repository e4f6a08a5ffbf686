"""``kiosk-bridge``: the installer's tool for a kiosk's peripherals and controller board.

    kiosk-bridge profiles                         the shipped profiles
    kiosk-bridge show PROFILE                     what a profile declares, validated
    kiosk-bridge probe PROFILE [--json]           ask every device once: ok / … / absent
    kiosk-bridge print-test PROFILE               print a test ticket
    kiosk-bridge power-cycle PROFILE TARGET       power-cycle a peripheral's channel (or a channel)
    kiosk-bridge simulate PROFILE --dir DIR       run simulators for the profile's devices

PROFILE is a shipped profile's name (``comprehensive``, ``zone24``) or a TOML file; ``--overrides
FILE`` adjusts it for one kiosk (ports, ids, devices not fitted). Exit status: 0 when everything
asked for worked, 1 when a device is not ok or refused, 2 for a bad profile or arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import json
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Final

from firmware_bridge.errors import BridgeError, ConfigError
from firmware_bridge.health import Health
from firmware_bridge.kiosk import KioskDevices, Status
from firmware_bridge.profiles import (
    BUILTIN,
    DeviceProtocol,
    Profile,
    load_profile,
    read_overrides,
    render_overrides,
)
from firmware_bridge.simulation import SimulatedKiosk
from firmware_bridge.watch import Observation

HEALTH_TITLES: Final = {
    Health.OK: "正常",
    Health.DEGRADED: "需注意",
    Health.FAULTY: "故障",
    Health.ABSENT: "无响应",
}


def _profile(args: argparse.Namespace) -> Profile:
    overrides = read_overrides(Path(args.overrides)) if args.overrides else []
    return load_profile(args.profile, overrides)


def cmd_profiles(_: argparse.Namespace) -> int:
    for name in BUILTIN:
        profile = load_profile(name)
        print(f"{name:15} {profile.title} / {profile.title_en} ({len(profile.peripherals)} 台设备)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    profile = _profile(args)
    print(f"{profile.title} / {profile.title_en}  [{profile.id}]")
    for p in profile.peripherals:
        how = p.endpoint.url if p.endpoint else "USB " + ", ".join(str(u) for u in p.usb_ids)
        power = f"  电源通道 power: {p.power_channel}" if p.power_channel else ""
        essential = "  必需 essential" if p.essential else ""
        print(f"  {p.id:20} {p.title} / {p.title_en}")
        print(f"  {'':20} {p.protocol} over {p.transport}: {how}{power}{essential}")
    return 0


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


async def _probe(profile: Profile) -> dict[str, Observation[Status]]:
    async with KioskDevices(profile) as devices:
        return await devices.poll_all()


def cmd_probe(args: argparse.Namespace) -> int:
    profile = _profile(args)
    seen = asyncio.run(_probe(profile))
    rows = []
    for p in profile.peripherals:
        o = seen.get(p.id)
        rows.append(
            {
                "id": p.id,
                "role": p.role.value,
                "title": p.title,
                "title_en": p.title_en,
                "health": o.assessment.health.value if o else None,
                "reasons": list(o.assessment.reasons) if o else [],
                "detail": o.assessment.detail if o else "watched by kiosk-agent through udev",
                "status": _jsonable(o.status) if o else None,
            }
        )
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        for p in profile.peripherals:
            o = seen.get(p.id)
            if o is None:
                print(f"{p.id:20} {'USB':8} 由 kiosk-agent 经 udev 检测 / seen by the agent")
                continue
            health = o.assessment.health
            reasons = ", ".join(o.assessment.reasons)
            print(f"{p.id:20} {HEALTH_TITLES[health]:6} {health.value:9} {reasons}")
            if health is not Health.OK and o.assessment.detail:
                print(f"{'':20} {o.assessment.detail}")
    bad = any(o.assessment.health in (Health.FAULTY, Health.ABSENT) for o in seen.values())
    return 1 if bad else 0


async def _print_test(profile: Profile, printer: str | None, terminal: str) -> int:
    now = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
    async with KioskDevices(profile) as devices:
        result = await devices.print_test_ticket(terminal, now, printer)
    print(f"已发送 sent {result.bytes_sent} bytes; 无法打印的字符 replaced: {result.replaced}")
    if not result.confirmed:
        print(f"打印后打印机状态 after printing: {', '.join(result.assessment_after.reasons)}")
        return 1
    print("打印机状态正常 printer still ok")
    return 0


def cmd_print_test(args: argparse.Namespace) -> int:
    return asyncio.run(_print_test(_profile(args), args.printer, args.terminal))


async def _power_cycle(profile: Profile, target: str, off_s: float | None) -> int:
    async with KioskDevices(profile) as devices:
        report = await devices.power_cycle(target, off_s)
    for step in report.steps:
        mark = "✓" if step.ok else "✗"
        print(f"  {mark} {step.kind.value:12} +{step.started_s:6.2f} s  {step.detail}")
    if report.outcome == "done":
        print(f"{report.channel}: 断电重启完成 power-cycled in {report.duration_s:.1f} s")
        return 0
    print(f"{report.channel}: 失败 failed at {report.failed_step}: {report.reason}")
    return 1


def cmd_power_cycle(args: argparse.Namespace) -> int:
    return asyncio.run(_power_cycle(_profile(args), args.target, args.off_s))


async def _simulate(profile: Profile, workdir: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with SimulatedKiosk(profile, workdir) as kiosk:
        path = workdir / "overrides.toml"
        text = "# kiosk-bridge simulate: the profile's devices, simulated\n"
        await asyncio.to_thread(path.write_text, text + render_overrides(kiosk.overrides), "utf-8")
        for item in kiosk.overrides:
            print(f"  {item['id']:20} {item['url']}")
        print(f"模拟设备已就绪 simulators ready; overrides in {path}", flush=True)
        await stop.wait()
    print("模拟设备已停止 simulators stopped")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    profile = _profile(args)
    talked = [p for p in profile.peripherals if p.protocol is not DeviceProtocol.NONE]
    if not talked:
        raise ConfigError(f"{args.profile}: no device the bridge talks to; nothing to simulate")
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_simulate(profile, workdir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiosk-bridge", description="The kiosk's peripherals and controller board."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("profiles", help="list the shipped profiles").set_defaults(func=cmd_profiles)

    def with_profile(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("profile", help="a shipped profile's name or a profile TOML file")
        p.add_argument("--overrides", help="TOML file of [[peripherals]] changes for this kiosk")
        return p

    with_profile("show", "what a profile declares").set_defaults(func=cmd_show)
    probe = with_profile("probe", "ask every device once")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=cmd_probe)
    ticket = with_profile("print-test", "print a test ticket")
    ticket.add_argument("--printer", help="peripheral id (default: the first ESC/POS printer)")
    ticket.add_argument("--terminal", default="(未注册 unenrolled)", help="name on the ticket")
    ticket.set_defaults(func=cmd_print_test)
    cycle = with_profile("power-cycle", "switch a peripheral's power off and on again")
    cycle.add_argument("target", help="peripheral id or power channel name")
    cycle.add_argument("--off-s", type=float, default=None, help="seconds off (board default)")
    cycle.set_defaults(func=cmd_power_cycle)
    simulate = with_profile("simulate", "run simulators for the profile's devices")
    simulate.add_argument("--dir", required=True, help="work dir (pty links, upsd, overrides)")
    simulate.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"kiosk-bridge: {exc}", file=sys.stderr)
        return 2
    except BridgeError as exc:
        print(f"kiosk-bridge: {exc} ({exc.reason})", file=sys.stderr)
        return 1
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
