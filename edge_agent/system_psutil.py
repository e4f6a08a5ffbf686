"""Adapter: the kiosk PC's own state from psutil (the only module that imports psutil).

psutil calls read /proc and /sys and may block, so they run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import psutil

from edge_agent.telemetry import SystemReading


class PsutilSystem:
    """Reads the machine the agent runs on; ``disk_path`` is the volume that matters."""

    def __init__(self, disk_path: Path = Path("/")) -> None:
        self._disk_path = str(disk_path)
        # The first cpu_percent(None) call only primes the counter; prime it now.
        psutil.cpu_percent(interval=None)

    async def read(self) -> SystemReading:
        return await asyncio.to_thread(self._read_blocking)

    def _read_blocking(self) -> SystemReading:
        mem = psutil.virtual_memory()
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
            uptime_s=max(0.0, time.time() - psutil.boot_time()),
            net_bytes_sent=int(net.bytes_sent) if net is not None else 0,
            net_bytes_recv=int(net.bytes_recv) if net is not None else 0,
            load_1m=os.getloadavg()[0],
            temperatures=temperatures,
            on_ac=on_ac,
            battery_percent=battery_percent,
        )
