"""Adapter: the kiosk PC's own state from psutil (the only module that imports psutil).

psutil calls read /proc and /sys and may block, so they run in a worker thread; so do the
reads of ``/sys/class/net`` that tell what kind of link each interface is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import psutil

from edge_agent.boots import Boot, read_boot_id
from edge_agent.network import InterfaceFacts, classify, devtype, usb_vendor
from edge_agent.telemetry import InterfaceReading, NetworkReading, SystemReading

SYS_CLASS_NET: Final = Path("/sys/class/net")


class PsutilSystem:
    """Reads the machine the agent runs on; ``disk_path`` is the volume that matters."""

    def __init__(self, disk_path: Path = Path("/"), sys_class_net: Path = SYS_CLASS_NET) -> None:
        self._disk_path = str(disk_path)
        self._sys_class_net = sys_class_net
        # The first cpu_percent(None) call only primes the counter; prime it now.
        psutil.cpu_percent(interval=None)

    async def read(self) -> SystemReading:
        return await asyncio.to_thread(self._read_blocking)

    async def read_network(self) -> NetworkReading:
        """Every reported interface (see :mod:`edge_agent.network`), without the link checks."""
        return await asyncio.to_thread(self._read_network_blocking)

    async def boot(self) -> Boot:
        """The machine's current boot, for :func:`edge_agent.boots.record_boot`."""
        return await asyncio.to_thread(_boot)

    def _read_blocking(self) -> SystemReading:
        mem = psutil.virtual_memory()
        boot_s = psutil.boot_time()
        disk = psutil.disk_usage(self._disk_path)
        net = psutil.net_io_counters()
        temperatures: dict[str, float] = {}
        sensors = getattr(psutil, "sensors_temperatures", None)
        if sensors is not None:
            # Not every kiosk board exposes sensors; a missing driver must not stop telemetry.
            with contextlib.suppress(OSError, RuntimeError):
                for chip, entries in sensors().items():
                    for i, entry in enumerate(entries):
                        label = entry.label or f"{chip}{i}"
                        temperatures[f"{chip}/{label}"[:64]] = float(entry.current)
        on_ac: bool | None = None
        battery_percent: float | None = None
        with contextlib.suppress(OSError, RuntimeError):
            battery = psutil.sensors_battery()
            if battery is not None:
                on_ac = bool(battery.power_plugged) if battery.power_plugged is not None else None
                battery_percent = float(battery.percent)
        return SystemReading(
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            memory_percent=float(mem.percent),
            memory_available=int(mem.available),
            disk_percent=float(disk.percent),
            disk_free=int(disk.free),
            uptime_s=max(0.0, time.time() - boot_s),
            net_bytes_sent=int(net.bytes_sent) if net is not None else 0,
            net_bytes_recv=int(net.bytes_recv) if net is not None else 0,
            load_1m=os.getloadavg()[0],
            temperatures=temperatures,
            on_ac=on_ac,
            battery_percent=battery_percent,
            boot_ms=round(boot_s * 1000),
        )

    def _read_network_blocking(self) -> NetworkReading:
        stats = psutil.net_if_stats()
        addresses = psutil.net_if_addrs()
        counters = psutil.net_io_counters(pernic=True)
        interfaces: list[InterfaceReading] = []
        for name, stat in stats.items():
            kind = classify(self._facts(name))
            if kind is None:
                continue
            io = counters.get(name)
            interfaces.append(
                InterfaceReading(
                    name=name,
                    kind=kind,
                    up=bool(stat.isup),
                    bytes_sent=int(io.bytes_sent) if io is not None else 0,
                    bytes_recv=int(io.bytes_recv) if io is not None else 0,
                    errors=int(io.errin + io.errout) if io is not None else None,
                    addresses=_shown_addresses(
                        (a.family, a.address) for a in addresses.get(name, [])
                    ),
                )
            )
        return NetworkReading(interfaces=tuple(interfaces))

    def _facts(self, name: str) -> InterfaceFacts:
        base = self._sys_class_net / name
        device = base / "device"
        driver = ""
        with contextlib.suppress(OSError):
            driver = os.path.basename(os.readlink(device / "driver"))
        return InterfaceFacts(
            name=name,
            wireless=(base / "wireless").exists() or (base / "phy80211").exists(),
            devtype=devtype(_read_text(base / "uevent")),
            driver=driver,
            usb_vendor=usb_vendor(_read_text(device / "uevent")),
            has_device=device.exists(),
        )


def _boot() -> Boot:
    return Boot(boot_ms=round(psutil.boot_time() * 1000), boot_id=read_boot_id())


def _read_text(path: Path) -> str:
    # sysfs files vanish with the device (a modem unplugged mid-read): nothing to report then.
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _shown_addresses(entries: Iterable[tuple[int, str]]) -> tuple[str, ...]:
    """IPv4 and IPv6 addresses worth showing on the status page (no link-local IPv6)."""
    shown: list[str] = []
    for family, address in entries:
        if family not in {socket.AF_INET, socket.AF_INET6}:
            continue
        text = address.split("%", 1)[0]
        with contextlib.suppress(ValueError):
            if family == socket.AF_INET6 and ipaddress.ip_address(text).is_link_local:
                continue
        shown.append(text)
    return tuple(shown)
