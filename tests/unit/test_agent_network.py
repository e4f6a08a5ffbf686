"""What kind of link each interface is, what the status page lists, and the broker-name check."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from edge_agent.dns import DnsProbe, is_address
from edge_agent.network import (
    InterfaceFacts,
    classify,
    devtype,
    interface_views,
    usb_vendor,
)
from edge_agent.telemetry import InterfaceReading

# (facts as sysfs shows them on real kiosks, expected kind)
CASES: dict[str, tuple[InterfaceFacts, str | None]] = {
    "onboard-nic": (InterfaceFacts(name="enp3s0", driver="r8169", has_device=True), "ethernet"),
    "old-style-eth": (InterfaceFacts(name="eth0", driver="e1000e", has_device=True), "ethernet"),
    "biosdevname-nic": (InterfaceFacts(name="em1", driver="igb", has_device=True), "ethernet"),
    "wifi-by-dir": (
        InterfaceFacts(name="wlp2s0", wireless=True, driver="iwlwifi", has_device=True),
        "wifi",
    ),
    "wifi-by-devtype": (
        InterfaceFacts(name="wlan0", devtype="wlan", driver="rtl8xxxu", has_device=True),
        "wifi",
    ),
    "usb-wifi-dongle-named-like-ethernet": (
        InterfaceFacts(name="enx001122334455", wireless=True, driver="mt7601u", has_device=True),
        "wifi",
    ),
    "qmi-modem": (
        InterfaceFacts(name="wwp0s20u4i4", devtype="wwan", driver="qmi_wwan", has_device=True),
        "cellular",
    ),
    "mbim-modem-without-devtype": (
        InterfaceFacts(name="wwan0", driver="cdc_mbim", has_device=True),
        "cellular",
    ),
    "huawei-hilink-cdc-ether": (
        InterfaceFacts(
            name="enx0c5b8f279a64", driver="cdc_ether", usb_vendor="12d1", has_device=True
        ),
        "cellular",
    ),
    "quectel-rndis": (
        InterfaceFacts(name="usb0", driver="rndis_host", usb_vendor="2c7c", has_device=True),
        "cellular",
    ),
    "usb-ethernet-adapter-cdc-ether": (
        InterfaceFacts(
            name="enx00e04c680001", driver="cdc_ether", usb_vendor="0bda", has_device=True
        ),
        "ethernet",
    ),
    "pcie-5g-modem": (InterfaceFacts(name="mhi_hwip0", driver="mhi_net"), "cellular"),
    "ppp-dialup": (InterfaceFacts(name="ppp0"), "cellular"),
    "openvpn-tunnel": (InterfaceFacts(name="tun0"), "other"),
    "wireguard": (InterfaceFacts(name="gov0", devtype="wireguard"), "other"),
    "vlan": (InterfaceFacts(name="vlan100", devtype="vlan"), "other"),
    "unknown-device": (InterfaceFacts(name="gadget0", devtype="gadget", has_device=True), "other"),
    "loopback": (InterfaceFacts(name="lo"), None),
    "docker-bridge": (InterfaceFacts(name="docker0", devtype="bridge"), None),
    "container-veth": (InterfaceFacts(name="veth1a2b3c"), None),
    "compose-bridge": (InterfaceFacts(name="br-0f1e2d3c4b5a", devtype="bridge"), None),
    "libvirt": (InterfaceFacts(name="virbr0", devtype="bridge"), None),
    "any-bridge": (InterfaceFacts(name="lan", devtype="bridge"), None),
    "traffic-shaping-ifb": (InterfaceFacts(name="ifb0"), None),
    "idle-sit": (InterfaceFacts(name="sit0"), None),
}


@pytest.mark.parametrize(("facts", "kind"), CASES.values(), ids=CASES.keys())
def test_each_interface_is_classified_as_a_person_on_site_would_name_it(
    facts: InterfaceFacts, kind: str | None
) -> None:
    assert classify(facts) == kind


def test_sysfs_uevent_fields_are_read() -> None:
    assert devtype("INTERFACE=wwan0\nIFINDEX=5\nDEVTYPE=wwan\n") == "wwan"
    assert devtype("INTERFACE=eth0\nIFINDEX=2\n") == ""
    usb_interface = "DEVTYPE=usb_interface\nDRIVER=cdc_ether\nPRODUCT=12d1/14db/102\nTYPE=2/0/0\n"
    assert usb_vendor(usb_interface) == "12d1"
    assert usb_vendor("PRODUCT=bda/8153/3000\n") == "0bda"  # uevent drops leading zeros
    assert usb_vendor("DRIVER=e1000e\nPCI_ID=8086:15B8\n") == ""
    assert usb_vendor("") == ""


def test_the_status_page_lists_real_links_first_and_keeps_what_it_shows() -> None:
    views = interface_views(
        [
            InterfaceReading("tun0", "other", up=True),
            InterfaceReading("wwan0", "cellular", up=False),
            InterfaceReading("wlan0", "wifi", up=True),
            InterfaceReading(
                "eth1", "ethernet", up=False, bytes_sent=1, bytes_recv=2, addresses=()
            ),
            InterfaceReading(
                "eth0",
                "ethernet",
                up=True,
                bytes_sent=10,
                bytes_recv=20,
                addresses=("192.0.2.2", "fd00::2"),
            ),
        ]
    )
    assert [(v.name, v.kind, v.up) for v in views] == [
        ("eth0", "ethernet", True),
        ("eth1", "ethernet", False),
        ("wlan0", "wifi", True),
        ("wwan0", "cellular", False),
        ("tun0", "other", True),
    ]
    assert views[0].addresses == ("192.0.2.2", "fd00::2")
    assert (views[0].bytes_sent, views[0].bytes_recv) == (10, 20)


# --- the broker's name -----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "192.0.2.10"])
def test_an_ip_address_is_not_looked_up(host: str) -> None:
    calls: list[str] = []

    def lookup(name: str, port: int) -> object:
        calls.append(name)
        return []

    assert is_address(host)
    assert asyncio.run(DnsProbe(host, lookup=lookup).resolve()) is None
    assert calls == []


def test_a_name_in_the_hosts_file_resolves_with_the_system_resolver() -> None:
    assert not is_address("localhost")
    result = asyncio.run(DnsProbe("localhost", 8883).resolve())
    assert result is not None
    assert result.ok
    assert 0.0 <= result.ms < 5_000


def test_a_name_that_cannot_be_a_host_name_fails_without_crashing() -> None:
    # An empty label cannot be encoded for DNS: the resolver fails locally, no query is sent.
    result = asyncio.run(DnsProbe("broker..example", 8883).resolve())
    assert result is not None
    assert not result.ok


@pytest.fixture
def hanging() -> Iterator[tuple[threading.Event, list[str]]]:
    release = threading.Event()
    calls: list[str] = []
    yield release, calls
    release.set()  # let the worker thread finish so the test leaves nothing behind


@pytest.mark.asyncio
async def test_a_hanging_resolver_times_out_and_is_not_asked_again_while_it_hangs(
    hanging: tuple[threading.Event, list[str]],
) -> None:
    release, calls = hanging

    def lookup(name: str, port: int) -> object:
        calls.append(name)
        if len(calls) == 1:
            release.wait(10)
            raise OSError("name servers unreachable")
        return []

    probe = DnsProbe("fleet.example.gov.cn", 8883, timeout_s=0.05, lookup=lookup)
    first = await probe.resolve()
    assert first is not None
    assert not first.ok
    assert first.ms >= 50
    second = await probe.resolve()
    assert second is not None
    assert not second.ok
    assert second.ms >= first.ms  # still the first lookup's wait
    assert calls == ["fleet.example.gov.cn"]  # no second thread stuck behind the first

    release.set()
    for _ in range(100):  # the hung lookup ends (with its failure, quietly)
        await asyncio.sleep(0.01)
        third = await probe.resolve()
        if third is not None and third.ok:
            break
    assert third is not None
    assert third.ok
    assert calls == ["fleet.example.gov.cn", "fleet.example.gov.cn"]
