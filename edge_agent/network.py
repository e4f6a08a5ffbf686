"""What kind of link each network interface is, from its name and what sysfs says about it.

Pure: the system adapter gathers :class:`InterfaceFacts` (``/sys/class/net/<name>``) and asks
:func:`classify`; the status page gets :class:`~edge_agent.status_model.InterfaceView` records
from :func:`interface_views`.

Rules, first match wins:

1. Not reported at all (None): the loopback, and the plumbing of containers and virtual
   machines on the kiosk itself (``docker*``, ``veth*``, ``br-*``, ``virbr*``, ``vnet*``,
   ``lxc*``, ``cni*``, ``flannel*``, ``cali*``, bridges by DEVTYPE). They carry no traffic of
   their own to the fleet, and would only bury the real links on a small screen.
2. ``wifi``: the interface has a ``wireless`` (or ``phy80211``) directory, or DEVTYPE=wlan.
3. ``cellular`` (a 4G/5G modem): DEVTYPE=wwan; a modem driver (``qmi_wwan``, ``cdc_mbim``,
   ``huawei_cdc_ncm``, ``option``, ``sierra_net``, ``mhi_net``, ``rmnet``, ``ipheth``); a
   USB network driver that modems and phones also use (``cdc_ether``, ``cdc_ncm``,
   ``rndis_host``) on a device of a modem maker's USB vendor id; or a name ``wwan*``,
   ``ppp*``, ``usb*`` or ``rmnet*``. A ``cdc_ether`` dongle of another vendor is a USB
   Ethernet adapter.
4. ``ethernet``: a name ``eth*`` or ``en*``, or any other interface backed by a device with
   no DEVTYPE (how Linux shows a wired NIC, whatever its name).
5. ``other``: VPN tunnels (``tun*``, ``tap*``, ``wg*``, ``ipsec*``, ``vti*``, ``ovpn*``, or
   DEVTYPE wireguard/tun), VLANs and bonds, and devices of an unknown DEVTYPE. Tunnels are
   reported because the link to the 政务外网 often runs through one, so its being down
   matters.
6. Any other virtual interface (no device behind it: ``ifb*``, ``dummy*``, the idle
   ``sit0``/``gre0`` the kernel creates with its tunnel modules) is not reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from edge_agent.status_model import InterfaceKind, InterfaceView
from edge_agent.telemetry import InterfaceReading

_PLUMBING_PREFIXES: Final = (
    "docker",
    "veth",
    "br-",
    "virbr",
    "vnet",
    "lxc",
    "cni",
    "flannel",
    "cali",
)
_PLUMBING_DEVTYPES: Final = frozenset({"bridge"})
_MODEM_DRIVERS: Final = frozenset(
    {
        "qmi_wwan",
        "cdc_mbim",
        "huawei_cdc_ncm",
        "option",
        "sierra_net",
        "mhi_net",
        "rmnet",
        "ipheth",
    }
)
#: Drivers shared by modems, phones and plain USB Ethernet adapters: the vendor decides.
_SHARED_USB_DRIVERS: Final = frozenset({"cdc_ether", "cdc_ncm", "rndis_host"})
#: USB vendor ids (lower-case hex) of modem makers common in Chinese kiosks: Huawei, ZTE,
#: Quectel, Fibocom, SIMCom, Meig, Sierra Wireless, Telit, Longcheer, Neoway.
MODEM_VENDORS: Final = frozenset(
    {"12d1", "19d2", "2c7c", "2cb7", "1e0e", "2dee", "1199", "1bc7", "1c9e", "2949"}
)
_CELLULAR_PREFIXES: Final = ("wwan", "ppp", "usb", "rmnet")
_ETHERNET_PREFIXES: Final = ("eth", "en")
_TUNNEL_PREFIXES: Final = ("tun", "tap", "wg", "ipsec", "vti", "ovpn")
_VIRTUAL_LINK_DEVTYPES: Final = frozenset({"wireguard", "tun", "vlan", "bond"})


@dataclass(frozen=True, slots=True)
class InterfaceFacts:
    """What ``/sys/class/net/<name>`` says about one interface (empty: not there)."""

    name: str
    #: A ``wireless`` or ``phy80211`` entry exists.
    wireless: bool = False
    #: DEVTYPE= from ``uevent`` (wlan, wwan, bridge, vlan, ...).
    devtype: str = ""
    #: The name of the driver behind ``device/driver``.
    driver: str = ""
    #: The USB vendor id of the device (from PRODUCT= in ``device/uevent``), lower-case hex.
    usb_vendor: str = ""
    #: Backed by a device (``device`` link present), not a purely virtual interface.
    has_device: bool = False


def classify(facts: InterfaceFacts) -> InterfaceKind | None:
    """The interface's kind, or None for the loopback and virtual plumbing (not reported)."""
    name = facts.name
    devtype = facts.devtype.lower()
    driver = facts.driver.lower()
    if name == "lo" or name.startswith(_PLUMBING_PREFIXES) or devtype in _PLUMBING_DEVTYPES:
        return None
    if facts.wireless or devtype == "wlan":
        return "wifi"
    if (
        devtype == "wwan"
        or driver in _MODEM_DRIVERS
        or (driver in _SHARED_USB_DRIVERS and facts.usb_vendor.lower() in MODEM_VENDORS)
        or name.startswith(_CELLULAR_PREFIXES)
    ):
        return "cellular"
    if name.startswith(_ETHERNET_PREFIXES) or (facts.has_device and not devtype):
        return "ethernet"
    if facts.has_device or name.startswith(_TUNNEL_PREFIXES) or devtype in _VIRTUAL_LINK_DEVTYPES:
        return "other"
    return None


def usb_vendor(device_uevent: str) -> str:
    """The vendor id in a USB device's ``uevent`` (``PRODUCT=12d1/14db/102``), or ""."""
    for line in device_uevent.splitlines():
        key, _, value = line.partition("=")
        if key == "PRODUCT":
            vendor = value.split("/", 1)[0].strip().lower()
            # uevent writes ids without leading zeros; sysfs idVendor and lsusb show four digits.
            return vendor.zfill(4) if vendor else ""
    return ""


def devtype(uevent: str) -> str:
    """DEVTYPE= from an interface's ``uevent``, or ""."""
    for line in uevent.splitlines():
        key, _, value = line.partition("=")
        if key == "DEVTYPE":
            return value.strip()
    return ""


def interface_view(reading: InterfaceReading) -> InterfaceView:
    return InterfaceView(
        name=reading.name,
        kind=reading.kind,
        up=reading.up,
        addresses=reading.addresses,
        bytes_sent=reading.bytes_sent,
        bytes_recv=reading.bytes_recv,
    )


_KIND_ORDER: Final[dict[InterfaceKind, int]] = {"ethernet": 0, "wifi": 1, "cellular": 2, "other": 3}


def interface_views(readings: Iterable[InterfaceReading]) -> tuple[InterfaceView, ...]:
    """The interfaces as the status page lists them: real links first, then by name."""
    ordered = sorted(readings, key=lambda r: (_KIND_ORDER[r.kind], r.name))
    return tuple(interface_view(r) for r in ordered)
