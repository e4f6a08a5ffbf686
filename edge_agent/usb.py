"""USB hotplug: which of the profile's peripherals are plugged in, from add/remove events.

A :class:`UsbSource` gives the devices plugged in now (:meth:`~UsbSource.present`) and then
every add and remove (:meth:`~UsbSource.events`). On a kiosk that is udev
(:mod:`edge_agent.udev_pyudev`); in tests and ``fleet-sim`` it is :class:`SimulatedUsb`.
:class:`UsbPresence` matches events to peripherals by vendor:product id
(:meth:`Profile.match_usb`) and counts each device by its devpath, so a repeated add, or one
of two identical devices going, is not taken for a change.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from edge_agent.errors import AgentError
from firmware_bridge.profiles import Peripheral, Profile, UsbId

UsbAction = Literal["add", "remove"]


class UsbUnavailable(AgentError):
    """USB devices cannot be watched here (no libudev, no USB bus visible, no netlink socket).

    The agent keeps running and reports its USB-only peripherals as not checked (``unwatched``).
    """


@dataclass(frozen=True, slots=True)
class UsbEvent:
    """A USB device came (``add``) or went (``remove``); ``devpath`` tells devices apart."""

    action: UsbAction
    usb_id: UsbId
    devpath: str


class UsbSource(Protocol):
    async def present(self) -> list[UsbEvent]:
        """An ``add`` for every device plugged in now. Call it before :meth:`events`: what
        happens after it started is delivered by :meth:`events`, so nothing falls between."""
        ...

    def events(self) -> AsyncIterator[UsbEvent]:
        """Every add and remove from now on; raises :class:`UsbUnavailable` if watching fails."""
        ...


@dataclass(frozen=True, slots=True)
class UsbSighting:
    """A peripheral of the profile that has just become plugged in or not."""

    peripheral: Peripheral
    present: bool


class UsbPresence:
    """Which of the profile's USB peripherals are plugged in, from the events seen so far."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._owner: dict[str, str] = {}  # devpath -> peripheral id

    def present(self, peripheral_id: str) -> bool:
        return peripheral_id in self._owner.values()

    def apply(self, event: UsbEvent) -> UsbSighting | None:
        """The change ``event`` makes, if it is a profile peripheral's and changes anything."""
        if event.action == "add":
            peripheral = self.profile.match_usb(event.usb_id)
            if peripheral is None:
                return None
            was = self.present(peripheral.id)
            self._owner[event.devpath] = peripheral.id
            return None if was else UsbSighting(peripheral, True)
        owner = self._owner.pop(event.devpath, None)
        if owner is None:
            return None
        if self.present(owner):
            return None
        return UsbSighting(self.profile.peripheral(owner), False)


def usb_id_from_udev(
    properties: Mapping[str, str], vendor_attr: str | None, product_attr: str | None
) -> UsbId | None:
    """The vendor:product id of a udev ``usb_device``, from what udev and the kernel tell.

    udev's database gives ``ID_VENDOR_ID``/``ID_MODEL_ID``; a kernel event (no udev daemon)
    gives ``PRODUCT`` as ``vendor/product/bcdDevice`` in hex without leading zeros; sysfs
    gives the ``idVendor``/``idProduct`` attributes, but only while the device is there, so
    not on removal.
    """
    vendor, product = properties.get("ID_VENDOR_ID"), properties.get("ID_MODEL_ID")
    if vendor and product:
        found = _parse(vendor, product)
        if found is not None:
            return found
    parts = properties.get("PRODUCT", "").split("/")
    if len(parts) >= 2:
        found = _parse(parts[0], parts[1])
        if found is not None:
            return found
    if vendor_attr and product_attr:
        return _parse(vendor_attr, product_attr)
    return None


def _parse(vendor: str, product: str) -> UsbId | None:
    try:
        return UsbId.parse(f"{int(vendor, 16):04x}:{int(product, 16):04x}")
    except ValueError:
        return None


class SimulatedUsb:
    """USB in memory: starts with every USB peripheral of the profile plugged in (or those of
    ``plugged``); :meth:`plug` and :meth:`unplug` deliver events like a real hotplug.

    One consumer of :meth:`events` at a time. ``unavailable`` makes :meth:`present` fail as
    it does where udev is missing.
    """

    def __init__(
        self,
        profile: Profile,
        *,
        plugged: Iterable[UsbId] | None = None,
        unavailable: str | None = None,
    ) -> None:
        self.profile = profile
        self.unavailable = unavailable
        self._serial = itertools.count(1)
        self._devices: dict[str, UsbId] = {}
        self._queue: asyncio.Queue[UsbEvent] = asyncio.Queue()
        if plugged is None:
            plugged = [p.usb_ids[0] for p in profile.peripherals if p.usb_ids]
        for usb_id in plugged:
            self._devices[self._devpath()] = usb_id

    def _devpath(self) -> str:
        return f"/devices/simulated/usb1/1-{next(self._serial)}"

    def plug(self, usb_id: UsbId) -> UsbEvent:
        event = UsbEvent("add", usb_id, self._devpath())
        self._devices[event.devpath] = usb_id
        self._queue.put_nowait(event)
        return event

    def unplug(self, usb_id: UsbId) -> list[UsbEvent]:
        """Remove every device with that id (none plugged: no event)."""
        events = [UsbEvent("remove", i, path) for path, i in self._devices.items() if i == usb_id]
        for event in events:
            del self._devices[event.devpath]
            self._queue.put_nowait(event)
        return events

    def plug_peripheral(self, peripheral_id: str) -> UsbEvent:
        """Plug in the device of a profile peripheral (its first USB id)."""
        return self.plug(self._usb_id_of(peripheral_id))

    def unplug_peripheral(self, peripheral_id: str) -> list[UsbEvent]:
        return self.unplug(self._usb_id_of(peripheral_id))

    def _usb_id_of(self, peripheral_id: str) -> UsbId:
        try:
            peripheral = self.profile.peripheral(peripheral_id)
        except KeyError:
            raise UsbUnavailable(f"no peripheral {peripheral_id!r} in the profile") from None
        if not peripheral.usb_ids:
            raise UsbUnavailable(f"peripheral {peripheral_id!r} has no USB id")
        return peripheral.usb_ids[0]

    @property
    def plugged(self) -> tuple[UsbId, ...]:
        return tuple(self._devices.values())

    async def present(self) -> list[UsbEvent]:
        if self.unavailable is not None:
            raise UsbUnavailable(self.unavailable)
        return [UsbEvent("add", usb_id, path) for path, usb_id in self._devices.items()]

    async def events(self) -> AsyncGenerator[UsbEvent, None]:
        while True:
            yield await self._queue.get()
