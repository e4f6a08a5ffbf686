"""USB hotplug through udev (pyudev): the only module that imports pyudev.

Enumeration reads sysfs (in a thread); hotplug events come from a udev netlink monitor whose
socket the event loop watches (``loop.add_reader``), so nothing polls and nothing blocks. The
monitor starts before the enumeration, so a device plugged in between is delivered as an event.

Where the udev daemon does not run (a container, a minimal image) the monitor listens to the
kernel's events instead, which carry ``PRODUCT`` but not udev's ``ID_*`` properties. Where
USB cannot be watched at all — no libudev, no ``/sys/bus/usb`` (a container that does not see
the host's hardware), no netlink socket — :class:`~edge_agent.usb.UsbUnavailable` says why,
and the agent reports its USB-only peripherals as not checked instead of crashing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Final

import pyudev

from edge_agent.usb import UsbEvent, UsbUnavailable, usb_id_from_udev
from firmware_bridge.profiles import UsbId

log = logging.getLogger(__name__)

SUBSYSTEM: Final = "usb"
DEVICE_TYPE: Final = "usb_device"
#: The udev daemon's control socket: present while udevd (systemd-udevd) runs.
UDEV_CONTROL: Final = Path("/run/udev/control")


class PyudevUsb:
    """A :class:`~edge_agent.usb.UsbSource` on the machine's udev."""

    def __init__(self, *, usb_bus: Path | None = None, udev_control: Path = UDEV_CONTROL) -> None:
        self._usb_bus = usb_bus
        self._udev_control = udev_control
        self._context: Any = None
        self._monitor: Any = None
        # What each devpath was when it came: a removal may no longer say its ids.
        self._seen: dict[str, UsbId] = {}
        self.source = ""

    async def present(self) -> list[UsbEvent]:
        return await asyncio.to_thread(self._open_and_enumerate)

    def _open_and_enumerate(self) -> list[UsbEvent]:
        if self._monitor is None:
            self._open()
        try:
            devices = list(self._context.list_devices(subsystem=SUBSYSTEM, DEVTYPE=DEVICE_TYPE))
        except OSError as exc:
            raise UsbUnavailable(f"cannot list USB devices: {exc}") from exc
        events = [e for e in (self._event("add", d, sysfs=True) for d in devices) if e is not None]
        log.info("udev (%s events): %d USB devices present", self.source, len(events))
        return events

    def _open(self) -> None:
        try:
            context = pyudev.Context()
        except ImportError as exc:
            raise UsbUnavailable(f"libudev is not installed ({exc})") from exc
        usb_bus = self._usb_bus or Path(context.sys_path) / "bus" / "usb"
        if not usb_bus.is_dir():
            raise UsbUnavailable(
                f"no USB bus at {usb_bus}: this system does not show its USB devices "
                "(a container without the host's /sys?)"
            )
        # Without the daemon nothing rebroadcasts the kernel's events as udev events.
        self.source = "udev" if self._udev_control.exists() else "kernel"
        try:
            monitor = pyudev.Monitor.from_netlink(context, source=self.source)
            monitor.filter_by(SUBSYSTEM, DEVICE_TYPE)
            monitor.start()
        except OSError as exc:
            raise UsbUnavailable(f"cannot listen to USB hotplug events: {exc}") from exc
        self._context, self._monitor = context, monitor

    async def events(self) -> AsyncGenerator[UsbEvent, None]:
        if self._monitor is None:
            await asyncio.to_thread(self._open)
        monitor = self._monitor
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd: int = monitor.fileno()
        loop.add_reader(fd, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                # The socket is non-blocking: read what is queued, then wait again.
                while (device := self._receive()) is not None:
                    action = str(device.action or "")
                    if action in ("add", "remove"):
                        event = self._event(action, device)
                        if event is not None:
                            yield event
        finally:
            loop.remove_reader(fd)

    def _receive(self) -> Any:
        try:
            return self._monitor.poll(timeout=0)
        except OSError as exc:
            raise UsbUnavailable(f"USB hotplug events failed: {exc}") from exc

    def _event(self, action: str, device: Any, *, sysfs: bool = False) -> UsbEvent | None:
        """The event of a udev device; ``sysfs``: may read its attributes (in a thread only)."""
        if device.device_type != DEVICE_TYPE:
            return None
        devpath = str(device.device_path)
        properties = {str(k): str(v) for k, v in device.properties.items()}
        usb_id = usb_id_from_udev(properties, None, None)
        if action == "remove":
            usb_id = usb_id or self._seen.get(devpath)
            self._seen.pop(devpath, None)
            return UsbEvent("remove", usb_id, devpath) if usb_id is not None else None
        if usb_id is None and sysfs:
            usb_id = usb_id_from_udev(
                properties, _attribute(device, "idVendor"), _attribute(device, "idProduct")
            )
        if usb_id is None:
            log.debug("USB device %s: no vendor:product id", devpath)
            return None
        self._seen[devpath] = usb_id
        return UsbEvent("add", usb_id, devpath)

    def close(self) -> None:
        self._monitor = None
        self._context = None


def _attribute(device: Any, name: str) -> str | None:
    try:
        value = device.attributes.get(name)
    except (OSError, KeyError):
        return None
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    return None
