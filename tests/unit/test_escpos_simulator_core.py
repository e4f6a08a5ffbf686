"""The simulated printer's core, without I/O: it answers DLE EOT from its sensors the way the
driver's decoders read them, prints what a real printer would print (and no more), and is
strict enough that a wrong encoder shows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.escpos.protocol import (
    ALL_STATUS_REQUESTS,
    PrinterStatus,
    assess,
    encode_ticket,
)
from firmware_bridge.escpos.simulator import PrintedTicket, PrinterState, SimulatedPrinterCore
from firmware_bridge.health import Health


def _status(core: SimulatedPrinterCore) -> PrinterStatus:
    answer = core.feed(ALL_STATUS_REQUESTS)
    return PrinterStatus.decode(answer)


@pytest.mark.parametrize(
    ("condition", "health", "reasons"),
    [
        ({}, Health.OK, ()),
        ({"paper_near_end": True}, Health.DEGRADED, ("paper_near_end",)),
        ({"paper_out": True}, Health.FAULTY, ("paper_out",)),
        ({"cover_open": True}, Health.FAULTY, ("cover_open",)),
        ({"cutter_error": True}, Health.FAULTY, ("cutter_error",)),
        ({"recoverable_error": True}, Health.FAULTY, ("recoverable_error",)),
        ({"unrecoverable_error": True}, Health.FAULTY, ("unrecoverable_error",)),
        ({"auto_recoverable_error": True}, Health.DEGRADED, ("auto_recoverable_error",)),
        ({"offline": True}, Health.FAULTY, ("offline",)),
        ({"feed_button": True}, Health.DEGRADED, ("feed_button",)),
        ({"paper_out": True, "single_bit_sensors": True}, Health.FAULTY, ("paper_out",)),
        ({"paper_near_end": True, "single_bit_sensors": True}, Health.DEGRADED,
         ("paper_near_end",)),
    ],
)  # fmt: skip
def test_sensors_are_answered_as_the_driver_reads_them(
    condition: dict[str, bool], health: Health, reasons: tuple[str, ...]
) -> None:
    state = PrinterState()
    for name, value in condition.items():
        setattr(state, name, value)
    core = SimulatedPrinterCore(state)
    assessment = assess(_status(core))
    assert (assessment.health, assessment.reasons) == (health, reasons)
    assert core.status_requests == 4


def test_paper_out_is_reported_by_every_answer_that_carries_it() -> None:
    core = SimulatedPrinterCore(PrinterState(paper_out=True))
    assert core.feed(ALL_STATUS_REQUESTS) == bytes((0x1A, 0x32, 0x12, 0x7E))


def test_drawer_pin_is_reported() -> None:
    assert _status(SimulatedPrinterCore(PrinterState(drawer_pin3_high=True))).drawer_pin3_high


def test_requests_split_across_reads_are_answered_once_complete() -> None:
    core = SimulatedPrinterCore(PrinterState(cover_open=True))
    assert core.feed(b"\x10") == b""
    assert core.feed(b"\x04") == b""
    assert core.feed(b"\x02") == b"\x16"


def test_silent_printer_answers_nothing() -> None:
    core = SimulatedPrinterCore(PrinterState(silent=True))
    assert core.feed(ALL_STATUS_REQUESTS) == b""
    core.feed(encode_ticket(["x"], "gb18030").data)
    assert core.printed == []


def test_garbling_knobs() -> None:
    core = SimulatedPrinterCore(PrinterState(broken_fixed_bits=True))
    assert all(b & 0x93 != 0x12 for b in core.feed(ALL_STATUS_REQUESTS))
    core = SimulatedPrinterCore(PrinterState(extra_reply_bytes=b"\x00"))
    assert core.feed(b"\x10\x04\x01") == b"\x12\x00"


def test_a_ticket_is_printed_and_cut() -> None:
    core = SimulatedPrinterCore()
    core.feed(encode_ticket(["排队号 A018", "请到 3 号窗口"], "gb18030").data)
    assert core.printed == [PrintedTicket(("排队号 A018", "请到 3 号窗口"), "partial")]
    assert core.tickets == ["排队号 A018\n请到 3 号窗口"]
    assert core.anomalies == []


def test_a_ticket_fed_one_byte_at_a_time_prints_the_same() -> None:
    data = encode_ticket(["𠀀 扩展B", "办理 ok"], "gb18030").data  # a four-byte character too
    core = SimulatedPrinterCore()
    for i in range(len(data)):
        core.feed(data[i : i + 1])
    assert core.tickets == ["𠀀 扩展B\n办理 ok"]
    assert core.anomalies == []


def test_status_requests_between_tickets_do_not_disturb_the_text() -> None:
    core = SimulatedPrinterCore()
    data = encode_ticket(["第一行", "第二行"], "gb18030").data
    middle = data.index(b"\n") + 1
    answer = core.feed(data[:middle] + ALL_STATUS_REQUESTS + data[middle:])
    assert answer == b"\x12" * 4
    assert core.tickets == ["第一行\n第二行"]


def test_uncut_lines_wait_for_the_cut() -> None:
    core = SimulatedPrinterCore()
    core.feed(encode_ticket(["a", "b"], "cp437", cut=False).data)
    assert core.printed == []
    assert core.uncut_lines == ("a", "b")


@pytest.mark.parametrize(("table", "char"), [(0, "Ç"), (17, "А"), (16, "€")])
def test_the_selected_table_decides_what_a_byte_prints(table: int, char: str) -> None:
    core = SimulatedPrinterCore()
    core.feed(b"\x1b@\x1b\x74" + bytes((table,)) + b"\x80\n\x1dV\x01")
    assert core.tickets == [char]


# --- a wrong encoder shows ----------------------------------------------------------------


def test_chinese_without_fs_ampersand_prints_garbage() -> None:
    core = SimulatedPrinterCore()
    core.feed(b"\x1b@" + "打印".encode("gb18030") + b"\n\x1dV\x01")
    assert core.tickets != ["打印"]
    assert core.tickets == ["┤≥╙í"]  # what a PC437 printer makes of it


def test_init_returns_to_plain_mode() -> None:
    core = SimulatedPrinterCore()
    core.feed(b"\x1c&\x1b@" + "打印".encode("gb18030") + b"\n\x1dV\x01")
    assert core.tickets != ["打印"]


def test_a_cut_in_the_middle_of_a_line_is_ignored() -> None:
    core = SimulatedPrinterCore()
    core.feed(b"\x1b@text without LF\x1dV\x01")
    assert core.printed == []
    assert core.anomalies == ["GS V in the middle of a line was ignored"]


@pytest.mark.parametrize(
    ("data", "anomaly"),
    [
        (b"\x1b!\x00", "unknown command ESC 0x21"),
        (b"\x1bt\x63", "ESC t 99: no such code table"),
        (b"\x1dV\x07", "GS V 7: no such cut"),
        (b"\x10\x04\x09", "DLE EOT 9: no such status"),
        (b"a\x07b", "control byte 0x07 in text"),
        (b"\x1c&\xb4\n", "0xb4 0x0a is not a Chinese character"),
        (b"\x1c&\x80", "0x80 cannot start a Chinese character"),
        (b"\x1bt\x10\x81", "81 is not text in cp1252"),
    ],
)
def test_what_the_printer_does_not_understand_is_recorded(data: bytes, anomaly: str) -> None:
    core = SimulatedPrinterCore()
    core.feed(data)
    assert anomaly in core.anomalies


# --- paper ----------------------------------------------------------------------------


def test_nothing_is_printed_without_paper() -> None:
    core = SimulatedPrinterCore(PrinterState(paper_out=True))
    data = encode_ticket(["lost"], "cp437").data
    core.feed(data)
    assert core.printed == []
    assert core.lost_bytes > 0


def test_the_roll_runs_out_after_its_last_ticket() -> None:
    core = SimulatedPrinterCore(PrinterState(paper_left_tickets=2))
    for text in ("one", "two", "three"):
        core.feed(encode_ticket([text], "cp437").data)
    assert core.tickets == ["one", "two"]
    assert core.state.paper_out
    assert assess(_status(core)).reasons == ("paper_out",)


@settings(max_examples=200, deadline=None, database=None)
@given(chunks=st.lists(st.binary(max_size=12), max_size=8))
def test_any_bytes_are_taken_and_every_answer_is_a_status_byte(chunks: list[bytes]) -> None:
    core = SimulatedPrinterCore()
    for chunk in chunks:
        for byte in core.feed(chunk):
            assert byte & 0x93 == 0x12
