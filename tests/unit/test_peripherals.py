"""The peripheral book: one debounced state per peripheral, as staff and the fleet see it.

A flapping cable must not spam events, a real change must arrive once, a cable that keeps
flapping must be reported as such, and what starts up is said at once.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from edge_agent.peripherals import PeripheralBook, PeripheralChange, PeripheralError
from edge_agent.status_model import Words
from edge_agent.usb import SimulatedUsb, UsbEvent, UsbPresence, usb_id_from_udev
from firmware_bridge.profiles import Profile, UsbId, load_profile
from fleet_protocol.codec import decode, encode
from fleet_protocol.messages import Event, Peripherals

DEBOUNCE = 3_000
START = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def profile() -> Profile:
    return load_profile("comprehensive")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(profile: Profile, clock: Clock) -> PeripheralBook:
    return PeripheralBook(profile, debounce_ms=DEBOUNCE, now_ms=clock)


def _summary(changes: list[PeripheralChange]) -> list[tuple[str, str | None, str, tuple[str, ...]]]:
    return [(c.peripheral_id, c.old, c.new, c.reasons) for c in changes]


def _start_printer_ok(book: PeripheralBook) -> None:
    assert _summary(book.observe("receipt-printer", "ok")) == [("receipt-printer", None, "ok", ())]


def test_before_any_observation_usb_devices_are_missing_and_polled_ones_not_checked(
    book: PeripheralBook,
) -> None:
    views = {v.id: v for v in book.views()}
    reader = views["id-card-reader"]
    assert reader.state == "absent"
    assert reader.problem == Words("未检测到身份证阅读器", "The ID-card reader is not detected")
    assert reader.action is not None
    assert reader.action.zh == "请检查 USB 线是否插好，或重新上电"
    printer = views["receipt-printer"]
    assert printer.state == "absent"
    assert printer.problem is not None
    assert printer.problem.zh == "正在检测凭条打印机"
    assert not book.settled


def test_the_first_observation_is_committed_at_once(book: PeripheralBook) -> None:
    changes = book.observe("receipt-printer", "faulty", ("paper_out",), "paper out")
    assert len(changes) == 1
    change = changes[0]
    assert (change.old, change.new, change.reasons, change.at_ms) == (
        None,
        "faulty",
        ("paper_out",),
        START,
    )
    assert change.initial
    assert book.state_of("receipt-printer").state == "faulty"


def test_a_flap_shorter_than_the_debounce_changes_nothing(
    book: PeripheralBook, clock: Clock
) -> None:
    _start_printer_ok(book)
    clock.advance(10_000)
    assert book.observe("receipt-printer", "absent", ("no_answer",)) == []
    clock.advance(DEBOUNCE - 1)
    assert book.tick() == []
    assert book.observe("receipt-printer", "ok") == []
    clock.advance(DEBOUNCE * 5)
    assert book.tick() == []
    assert book.state_of("receipt-printer").state == "ok"


def test_a_change_that_holds_past_the_debounce_is_committed_once(
    book: PeripheralBook, clock: Clock
) -> None:
    _start_printer_ok(book)
    clock.advance(10_000)
    book.observe("receipt-printer", "faulty", ("paper_out",), "paper out")
    began = clock.now
    clock.advance(DEBOUNCE)
    changes = book.tick()
    assert _summary(changes) == [("receipt-printer", "ok", "faulty", ("paper_out",))]
    # The state began when it was first seen, not when the debounce ran out.
    assert changes[0].at_ms == began
    clock.advance(DEBOUNCE)
    assert book.tick() == []
    view = next(v for v in book.views() if v.id == "receipt-printer")
    assert view.since_ms == began
    assert view.problem == Words("打印机缺纸", "The printer is out of paper")
    assert view.action == Words("请更换纸卷", "Load a new paper roll")


def test_a_new_observation_of_a_held_change_commits_it_without_a_tick(
    book: PeripheralBook, clock: Clock
) -> None:
    _start_printer_ok(book)
    book.observe("receipt-printer", "faulty", ("cover_open",))
    clock.advance(DEBOUNCE + 1)
    changes = book.observe("receipt-printer", "faulty", ("cover_open",), "cover open")
    assert _summary(changes) == [("receipt-printer", "ok", "faulty", ("cover_open",))]


def test_a_change_of_reason_alone_is_a_change(book: PeripheralBook, clock: Clock) -> None:
    book.observe("receipt-printer", "faulty", ("paper_out",))
    book.observe("receipt-printer", "faulty", ("cover_open",))
    clock.advance(DEBOUNCE)
    changes = book.tick()
    assert _summary(changes) == [("receipt-printer", "faulty", "faulty", ("cover_open",))]
    assert changes[0].old_reasons == ("paper_out",)


def test_a_new_detail_alone_is_not_a_change(book: PeripheralBook, clock: Clock) -> None:
    book.observe("receipt-printer", "absent", ("no_answer",), "no answer within 1 s")
    clock.advance(DEBOUNCE * 2)
    assert book.observe("receipt-printer", "absent", ("no_answer",), "no answer within 2 s") == []
    assert book.tick() == []


def test_a_cable_that_keeps_flapping_is_reported_as_flapping_then_settles(
    book: PeripheralBook, clock: Clock
) -> None:
    _start_printer_ok(book)
    committed: list[PeripheralChange] = []
    # Five flips within a minute, each shorter than the debounce.
    for state in ("absent", "ok", "absent", "ok", "absent"):
        clock.advance(1_000)
        if state == "ok":
            committed += book.observe("receipt-printer", "ok")
        else:
            committed += book.observe("receipt-printer", "absent", ("port_missing",))
        committed += book.tick()
    assert _summary(committed) == [("receipt-printer", "ok", "degraded", ("flapping",))]
    view = next(v for v in book.views() if v.id == "receipt-printer")
    assert view.problem is not None
    assert "接触不良" in view.problem.zh
    assert view.action is not None
    assert "请检查线缆" in view.action.zh
    # Still flapping: no news.
    for _ in range(6):
        clock.advance(2_000)
        assert book.observe("receipt-printer", "ok") == []
        clock.advance(2_000)
        assert book.observe("receipt-printer", "absent", ("port_missing",)) == []
    # Stable (absent) for the flap window: the real state is committed.
    clock.advance(59_999)
    assert book.tick() == []
    clock.advance(1)
    assert _summary(book.tick()) == [("receipt-printer", "degraded", "absent", ("port_missing",))]
    # And from then on an ordinary debounced change.
    clock.advance(1_000)
    book.observe("receipt-printer", "ok")
    clock.advance(DEBOUNCE)
    assert _summary(book.tick()) == [("receipt-printer", "absent", "ok", ())]


def test_flips_spread_wider_than_the_window_are_not_flapping(
    book: PeripheralBook, clock: Clock
) -> None:
    _start_printer_ok(book)
    states: list[str] = []
    for n in range(10):
        clock.advance(20_000)
        if n % 2:
            book.observe("receipt-printer", "ok")
        else:
            book.observe("receipt-printer", "absent", ("no_answer",))
        clock.advance(DEBOUNCE)
        states += [c.new for c in book.tick()]
    assert states == ["absent", "ok"] * 5


def test_a_clock_set_back_neither_freezes_nor_fires_a_pending_change(
    book: PeripheralBook, clock: Clock
) -> None:
    _start_printer_ok(book)
    book.observe("receipt-printer", "faulty", ("paper_out",))
    clock.advance(1_000)
    assert book.tick() == []
    clock.now -= 3_600_000  # NTP sets the clock back an hour
    assert book.tick() == []
    clock.advance(DEBOUNCE - 1_000)
    assert _summary(book.tick()) == [("receipt-printer", "ok", "faulty", ("paper_out",))]


def test_usb_only_peripherals_are_ok_once_usb_says_present(
    book: PeripheralBook, clock: Clock
) -> None:
    assert _summary(book.observe("id-card-reader", "ok", source="usb")) == [
        ("id-card-reader", None, "ok", ())
    ]
    clock.advance(10_000)
    book.observe("id-card-reader", "absent", ("usb_unplugged",), source="usb")
    clock.advance(DEBOUNCE)
    changes = book.tick()
    assert _summary(changes) == [("id-card-reader", "ok", "absent", ("usb_unplugged",))]
    event = book.event(changes[0], seq=7, ts_ms=clock.now)
    assert event.kind == "peripheral.unplugged"
    assert event.severity == "error"  # the ID-card reader is essential
    assert (
        event.message
        == "身份证阅读器：身份证阅读器的 USB 连接已断开。请检查 USB 线是否插好，或重新上电。"
    )
    book.observe("id-card-reader", "ok", source="usb")
    clock.advance(DEBOUNCE)
    plugged = book.tick()
    assert book.event(plugged[0], seq=8, ts_ms=clock.now).kind == "peripheral.plugged"


def test_usb_removal_overrules_the_bridge_and_plugging_back_hands_over_to_it(
    book: PeripheralBook, clock: Clock
) -> None:
    _start_printer_ok(book)
    book.observe("receipt-printer", "absent", ("usb_unplugged",), source="usb")
    clock.advance(DEBOUNCE)
    assert _summary(book.tick()) == [("receipt-printer", "ok", "absent", ("usb_unplugged",))]
    # Plugged back: the bridge decides, and it has not polled since.
    book.observe("receipt-printer", "ok", source="usb")
    book.observe("receipt-printer", "faulty", ("paper_out",))
    clock.advance(DEBOUNCE)
    assert _summary(book.tick()) == [("receipt-printer", "absent", "faulty", ("paper_out",))]


def test_usb_presence_alone_does_not_vouch_for_a_polled_printer(book: PeripheralBook) -> None:
    assert book.observe("receipt-printer", "ok", source="usb") == []
    assert book.state_of("receipt-printer").reasons == ("not_checked",)


def test_usb_devices_match_peripherals_by_vendor_and_product(profile: Profile) -> None:
    presence = UsbPresence(profile)
    reader = UsbId.parse("0400:c35a")
    first = presence.apply(UsbEvent("add", reader, "/devices/usb1/1-1"))
    assert first is not None
    assert (first.peripheral.id, first.present) == ("id-card-reader", True)
    assert presence.apply(UsbEvent("add", UsbId.parse("dead:beef"), "/devices/usb1/1-2")) is None
    # Two readers of the same model: only the last one leaving makes it absent.
    assert presence.apply(UsbEvent("add", reader, "/devices/usb1/1-3")) is None
    assert presence.apply(UsbEvent("remove", reader, "/devices/usb1/1-1")) is None
    gone = presence.apply(UsbEvent("remove", reader, "/devices/usb1/1-3"))
    assert gone is not None
    assert (gone.peripheral.id, gone.present) == ("id-card-reader", False)


def test_usb_ids_are_read_from_udev_the_kernel_or_sysfs() -> None:
    printer = UsbId.parse("0416:5011")
    assert usb_id_from_udev({"ID_VENDOR_ID": "0416", "ID_MODEL_ID": "5011"}, None, None) == printer
    assert usb_id_from_udev({"PRODUCT": "416/5011/100"}, None, None) == printer
    assert usb_id_from_udev({}, "0416", "5011") == printer
    assert usb_id_from_udev({"PRODUCT": "zz/5011/1"}, None, None) is None


@pytest.mark.asyncio
async def test_simulated_usb_starts_with_every_usb_device_plugged(profile: Profile) -> None:
    usb = SimulatedUsb(profile)
    present = await usb.present()
    presence = UsbPresence(profile)
    for event in present:
        presence.apply(event)
    assert {p.id for p in profile.peripherals if presence.present(p.id)} == {
        p.id for p in profile.peripherals if p.usb_ids
    }
    usb.unplug_peripheral("qr-scanner")
    events = usb.events()
    event = await asyncio.wait_for(anext(events), 1)
    await events.aclose()
    assert (event.action, str(event.usb_id)) == ("remove", "1eab:0c06")


def test_snapshot_and_event_travel_through_the_codec(book: PeripheralBook, clock: Clock) -> None:
    book.observe("receipt-printer", "faulty", ("paper_out", "cover_open"), "paper out; cover")
    book.observe("id-card-reader", "ok", source="usb")
    book.observe("controller-board", "degraded", ("cabinet_door_open",))
    snapshot = book.snapshot(clock.now, ["receipt-printer", "receipt-printer", "nonsense"])
    back = decode(Peripherals, encode(snapshot))
    assert back == snapshot
    assert back.changed == ["receipt-printer"]
    by_id = {s.id: s for s in back.peripherals}
    assert [s.id for s in back.peripherals] == [p.id for p in book.profile.peripherals]
    assert by_id["receipt-printer"].state == "faulty"
    assert by_id["receipt-printer"].reason == (
        "打印机缺纸；打印机盖没有关好：请更换纸卷；请合上打印机盖 [paper_out,cover_open]"
    )
    assert by_id["id-card-reader"].reason == ""
    assert by_id["sscard-reader"].reason.endswith("[usb_missing]")
    assert by_id["controller-board"].role == "controller_board"

    change = book.observe("controller-board", "faulty", ("tilted",))
    clock.advance(DEBOUNCE)
    change = book.tick()
    event = book.event(change[0], seq=42, ts_ms=clock.now)
    back_event = decode(Event, encode(event))
    assert back_event == event
    assert (event.kind, event.severity) == ("peripheral.fault", "critical")
    assert event.message.startswith("控制板：终端被移动或倾倒。")
    assert event.attributes == {
        "peripheral": "controller-board",
        "role": "controller_board",
        "old": "degraded",
        "new": "faulty",
        "reasons": "tilted",
        "essential": False,
    }


def test_event_kinds_and_severities_follow_what_happened(
    book: PeripheralBook, clock: Clock
) -> None:
    first = book.observe("receipt-printer", "ok")
    assert book.event(first[0], 1, clock.now).kind == "peripheral.detected"
    book.observe("receipt-printer", "degraded", ("paper_near_end",))
    clock.advance(DEBOUNCE)
    near_end = book.event(book.tick()[0], 2, clock.now)
    assert (near_end.kind, near_end.severity) == ("peripheral.degraded", "warning")
    book.observe("receipt-printer", "ok")
    clock.advance(DEBOUNCE)
    recovered = book.event(book.tick()[0], 3, clock.now)
    assert (recovered.kind, recovered.severity) == ("peripheral.recovered", "info")
    assert recovered.message == "凭条打印机已恢复正常"
    # A non-essential USB device going missing is only a warning.
    book.observe("qr-scanner", "ok", source="usb")
    book.observe("qr-scanner", "absent", ("usb_unplugged",), source="usb")
    clock.advance(DEBOUNCE)
    gone = book.event(book.tick()[0], 4, clock.now)
    assert (gone.kind, gone.severity) == ("peripheral.unplugged", "warning")


def test_views_carry_what_the_status_page_needs(book: PeripheralBook) -> None:
    views = {v.id: v for v in book.views()}
    printer = views["receipt-printer"]
    assert printer.title == Words("凭条打印机", "Receipt printer")
    assert (printer.printable, printer.essential, printer.power_channel) == (
        True,
        True,
        "receipt_printer",
    )
    assert not views["a4-printer"].printable  # seen through USB only: no test ticket
    assert views["qr-scanner"].power_channel is None
    assert not views["qr-scanner"].essential


def test_nonsense_is_refused(book: PeripheralBook) -> None:
    with pytest.raises(PeripheralError, match="not in profile"):
        book.observe("toaster", "ok")
    with pytest.raises(PeripheralError, match="needs a reason"):
        book.observe("receipt-printer", "faulty", ())
    with pytest.raises(PeripheralError, match="is not one of"):
        book.observe("receipt-printer", "broken", ("x",))  # type: ignore[arg-type]


def test_a_peripheral_id_the_wire_refuses_is_caught_at_start(
    profile: Profile, clock: Clock
) -> None:
    modem = dataclasses.replace(
        profile.peripheral("qr-scanner"), id="4g-modem", usb_ids=(UsbId(0x2C7C, 0x0125),)
    )
    odd = dataclasses.replace(profile, peripherals=(*profile.peripherals, modem))
    with pytest.raises(PeripheralError, match="must start with a letter"):
        PeripheralBook(odd, debounce_ms=DEBOUNCE, now_ms=clock)
