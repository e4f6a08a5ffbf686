"""ESC/POS byte by byte: every status bit of DLE EOT 1..4, the fixed bits that tell a status
byte from line noise, answers that are too long or not there yet, and the bytes of a ticket in
GB18030 and in single-byte code pages — with what the printer would print (the simulator core
reads them back)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.errors import BridgeError, ConfigError, ProtocolViolation
from firmware_bridge.escpos import protocol
from firmware_bridge.escpos.protocol import (
    ALL_STATUS_REQUESTS,
    ERROR_CAUSE_QUERY,
    OFFLINE_CAUSE_QUERY,
    PRINTER_QUERY,
    ROLL_PAPER_QUERY,
    ErrorCauseReply,
    OfflineCauseReply,
    PrinterReply,
    PrinterStatus,
    ReplyReceiver,
    RollPaperReply,
    StatusQuery,
    StatusReceiver,
    StatusRequest,
    assess,
    decode_error_cause,
    decode_offline_cause,
    decode_printer,
    decode_roll_paper,
    encode_ticket,
)
from firmware_bridge.escpos.simulator import SimulatedPrinterCore
from firmware_bridge.health import Health

QUIET = 0x12  # only the fixed bits: nothing to report
FUZZ = settings(max_examples=200, deadline=None, database=None)
ROUND_TRIP = settings(max_examples=80, deadline=None, database=None)

Decoder = Callable[[int], Any]
DECODERS: list[tuple[StatusRequest, Decoder]] = [
    (StatusRequest.PRINTER, decode_printer),
    (StatusRequest.OFFLINE_CAUSE, decode_offline_cause),
    (StatusRequest.ERROR_CAUSE, decode_error_cause),
    (StatusRequest.ROLL_PAPER, decode_roll_paper),
]
QUERIES: list[StatusQuery[object]] = [
    PRINTER_QUERY,
    OFFLINE_CAUSE_QUERY,
    ERROR_CAUSE_QUERY,
    ROLL_PAPER_QUERY,
]


# --- requests -----------------------------------------------------------------------------


def test_requests_are_dle_eot_n() -> None:
    assert [q.request for q in QUERIES] == [
        b"\x10\x04\x01",
        b"\x10\x04\x02",
        b"\x10\x04\x03",
        b"\x10\x04\x04",
    ]
    assert ALL_STATUS_REQUESTS == b"\x10\x04\x01\x10\x04\x02\x10\x04\x03\x10\x04\x04"


# --- every status bit ---------------------------------------------------------------------

BITS = [
    # (decoder, bit value, the one field it sets)
    (decode_printer, 0x04, "drawer_pin3_high"),
    (decode_printer, 0x08, "offline"),
    (decode_printer, 0x20, "waiting_online_recovery"),
    (decode_printer, 0x40, "feed_button_pressed"),
    (decode_offline_cause, 0x04, "cover_open"),
    (decode_offline_cause, 0x08, "feeding_by_button"),
    (decode_offline_cause, 0x20, "stopped_by_paper_end"),
    (decode_offline_cause, 0x40, "error"),
    (decode_error_cause, 0x04, "recoverable_error"),
    (decode_error_cause, 0x08, "cutter_error"),
    (decode_error_cause, 0x20, "unrecoverable_error"),
    (decode_error_cause, 0x40, "auto_recoverable_error"),
    (decode_roll_paper, 0x0C, "near_end"),
    (decode_roll_paper, 0x60, "paper_out"),
]


@pytest.mark.parametrize(
    ("decode", "bit", "field"), BITS, ids=[f"{d.__name__}-{f}" for d, _, f in BITS]
)
def test_each_status_bit_sets_exactly_its_field(decode: Decoder, bit: int, field: str) -> None:
    flags = asdict(decode(QUIET | bit))
    assert flags == {name: name == field for name in flags}


@pytest.mark.parametrize(("request_", "decode"), DECODERS, ids=[r.name for r, _ in DECODERS])
def test_quiet_byte_reports_nothing(request_: StatusRequest, decode: Decoder) -> None:
    assert not any(asdict(decode(QUIET)).values())


@pytest.mark.parametrize(
    ("byte", "near_end", "paper_out"),
    [
        (0x12, False, False),
        (0x16, True, False),  # bit 2 only
        (0x1A, True, False),  # bit 3 only
        (0x1E, True, False),
        (0x32, False, True),  # bit 5 only
        (0x52, False, True),  # bit 6 only
        (0x72, False, True),
        (0x7E, True, True),
    ],
)
def test_roll_paper_pairs_count_when_either_bit_is_set(
    byte: int, near_end: bool, paper_out: bool
) -> None:
    """Printers that set only one bit of a pair are believed (see decode_roll_paper)."""
    assert decode_roll_paper(byte) == RollPaperReply(near_end=near_end, paper_out=paper_out)


FIXED_BITS = [
    (0x01, "bit 0 set"),
    (0x02, "bit 1 clear"),
    (0x10, "bit 4 clear"),
    (0x80, "bit 7 set"),
]


@pytest.mark.parametrize(("request_", "decode"), DECODERS, ids=[r.name for r, _ in DECODERS])
@pytest.mark.parametrize(("flip", "what"), FIXED_BITS, ids=[w for _, w in FIXED_BITS])
def test_a_broken_fixed_bit_is_a_violation(
    request_: StatusRequest, decode: Decoder, flip: int, what: str
) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        decode(QUIET ^ flip)
    assert caught.value.reason == "bad_fixed_bits"
    assert f"DLE EOT {request_.value}" in str(caught.value)


@pytest.mark.parametrize("byte", [0x00, 0xFF, 0x0A, 0x41])
def test_line_noise_is_not_a_status(byte: int) -> None:
    for _, decode in DECODERS:
        with pytest.raises(ProtocolViolation):
            decode(byte)


@FUZZ
@given(byte=st.integers(0, 255))
def test_a_byte_decodes_exactly_when_its_fixed_bits_hold(byte: int) -> None:
    for _, decode in DECODERS:
        if byte & 0b1001_0011 == 0b0001_0010:
            decode(byte)
        else:
            with pytest.raises(ProtocolViolation) as caught:
                decode(byte)
            assert caught.value.reason == "bad_fixed_bits"


# --- receivers ----------------------------------------------------------------------------


def test_reply_receiver_takes_one_byte() -> None:
    receiver = ReplyReceiver(OFFLINE_CAUSE_QUERY)
    assert receiver.feed(b"") is None  # nothing yet: the link's deadline decides
    assert receiver.feed(b"\x16") == OfflineCauseReply(
        cover_open=True, feeding_by_button=False, stopped_by_paper_end=False, error=False
    )


@pytest.mark.parametrize("query", QUERIES, ids=[q.number.name for q in QUERIES])
def test_reply_receiver_refuses_an_overlong_answer(query: StatusQuery[object]) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        ReplyReceiver(query).feed(b"\x12\x12")
    assert caught.value.reason == "overlong"


def test_reply_receiver_refuses_bytes_after_its_answer() -> None:
    receiver = ReplyReceiver(PRINTER_QUERY)
    assert receiver.feed(b"\x12") == PrinterReply(False, False, False, False)
    with pytest.raises(ProtocolViolation) as caught:
        receiver.feed(b"\x12")
    assert caught.value.reason == "overlong"


def test_reply_receiver_checks_fixed_bits() -> None:
    with pytest.raises(ProtocolViolation) as caught:
        ReplyReceiver(ERROR_CAUSE_QUERY).feed(b"\x00")
    assert caught.value.reason == "bad_fixed_bits"


def test_status_receiver_assembles_four_answers_from_chunks() -> None:
    receiver = StatusReceiver()
    # A printer out of paper with its cover closed: offline, stopped by paper end, both pairs.
    assert receiver.feed(b"\x1a") is None
    assert receiver.feed(b"\x32\x12") is None
    status = receiver.feed(b"\x7e")
    assert status == PrinterStatus(online=False, paper_out=True, paper_near_end=True)


def test_status_receiver_short_answer_is_incomplete_not_an_error() -> None:
    receiver = StatusReceiver()
    assert receiver.feed(b"\x12\x12\x12") is None


def test_status_receiver_refuses_a_fifth_byte() -> None:
    with pytest.raises(ProtocolViolation) as caught:
        StatusReceiver().feed(b"\x12" * 5)
    assert caught.value.reason == "overlong"
    receiver = StatusReceiver()
    assert receiver.feed(b"\x12" * 4) == PrinterStatus()
    with pytest.raises(ProtocolViolation) as caught:
        receiver.feed(b"\x12")
    assert caught.value.reason == "overlong"


def test_status_receiver_rejects_a_bad_byte_as_soon_as_it_arrives() -> None:
    receiver = StatusReceiver()
    with pytest.raises(ProtocolViolation) as caught:
        receiver.feed(b"\x12\xff")
    assert caught.value.reason == "bad_fixed_bits"
    assert "DLE EOT 2" in str(caught.value)


@pytest.mark.parametrize(("data", "reason"), [(b"\x12" * 3, "short"), (b"\x12" * 5, "overlong")])
def test_printer_status_decode_needs_four_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        PrinterStatus.decode(data)
    assert caught.value.reason == reason


@FUZZ
@given(chunks=st.lists(st.binary(max_size=6), max_size=5))
def test_random_bytes_never_escape_the_error_tree(chunks: list[bytes]) -> None:
    receivers: list[ReplyReceiver[object] | StatusReceiver] = [ReplyReceiver(q) for q in QUERIES]
    receivers.append(StatusReceiver())
    for receiver in receivers:
        try:
            for chunk in chunks:
                receiver.feed(chunk)
        except BridgeError:
            pass


# --- assessment ---------------------------------------------------------------------------

OFFLINE = {"online": False}
ASSESSMENTS = [
    (PrinterStatus(), Health.OK, ()),
    (PrinterStatus(paper_near_end=True), Health.DEGRADED, ("paper_near_end",)),
    (
        PrinterStatus(auto_recoverable_error=True, error=True, **OFFLINE),
        Health.DEGRADED,
        ("auto_recoverable_error",),
    ),
    (PrinterStatus(feed_button=True, **OFFLINE), Health.DEGRADED, ("feed_button",)),
    (PrinterStatus(paper_out=True, paper_near_end=True, **OFFLINE), Health.FAULTY, ("paper_out",)),
    (PrinterStatus(cover_open=True, **OFFLINE), Health.FAULTY, ("cover_open",)),
    (PrinterStatus(cutter_error=True, error=True, **OFFLINE), Health.FAULTY, ("cutter_error",)),
    (
        PrinterStatus(unrecoverable_error=True, error=True, **OFFLINE),
        Health.FAULTY,
        ("unrecoverable_error",),
    ),
    (
        PrinterStatus(recoverable_error=True, error=True, **OFFLINE),
        Health.FAULTY,
        ("recoverable_error",),
    ),
    (PrinterStatus(error=True, **OFFLINE), Health.FAULTY, ("unspecified_error",)),
    (PrinterStatus(**OFFLINE), Health.FAULTY, ("offline",)),
    (
        PrinterStatus(cover_open=True, paper_out=True, cutter_error=True, **OFFLINE),
        Health.FAULTY,
        ("paper_out", "cover_open", "cutter_error"),
    ),
]


@pytest.mark.parametrize(("status", "health", "reasons"), ASSESSMENTS)
def test_assessment_reasons(
    status: PrinterStatus, health: Health, reasons: tuple[str, ...]
) -> None:
    assessment = assess(status)
    assert (assessment.health, assessment.reasons) == (health, reasons)
    if health is not Health.OK:
        assert assessment.detail


def test_status_merges_the_four_answers() -> None:
    status = PrinterStatus.from_replies(
        PrinterReply(drawer_pin3_high=True, offline=True, waiting_online_recovery=True,
                     feed_button_pressed=False),
        OfflineCauseReply(cover_open=False, feeding_by_button=True, stopped_by_paper_end=True,
                          error=False),
        ErrorCauseReply(recoverable_error=False, cutter_error=False, unrecoverable_error=False,
                        auto_recoverable_error=False),
        RollPaperReply(near_end=False, paper_out=False),
    )  # fmt: skip
    assert status == PrinterStatus(
        online=False,
        paper_out=True,  # stopped by a paper end counts as paper out
        feed_button=True,
        waiting_online_recovery=True,
        drawer_pin3_high=True,
    )


# --- tickets ------------------------------------------------------------------------------


def test_gb18030_ticket_bytes() -> None:
    ticket = encode_ticket(["No.7", "打印"], "gb18030")
    assert ticket.data == bytes.fromhex(
        "1b40"  # ESC @
        "1c26"  # FS &: Chinese mode
        "4e6f2e37 0a"  # No.7 LF
        "b4f2d3a1 0a"  # 打印 LF
        "1b6404"  # ESC d 4
        "1d5601"  # GS V 1: partial cut
    )
    assert (ticket.replaced, ticket.lines, ticket.code_page) == (0, 2, "gb18030")


def test_single_byte_ticket_bytes_without_cut() -> None:
    ticket = encode_ticket(["Grüße"], "cp437", cut=False)
    assert ticket.data == bytes.fromhex(
        "1b40"  # ESC @
        "1c2e"  # FS .: leave Chinese mode
        "1b7400"  # ESC t 0: PC437
        "477281e165 0a"  # Grüße LF
        "1b6404"  # ESC d 4, no cut
    )
    assert ticket.replaced == 0


@pytest.mark.parametrize(
    ("page", "table"),
    [("cp850", 2), ("cp860", 3), ("cp863", 4), ("cp865", 5), ("cp1252", 16), ("cp866", 17),
     ("cp852", 18), ("cp858", 19)],
)  # fmt: skip
def test_code_table_numbers_are_epsons(page: str, table: int) -> None:
    assert encode_ticket([], page).data.startswith(b"\x1b@\x1c.\x1bt" + bytes((table,)))


@pytest.mark.parametrize(
    ("page", "text", "printed", "replaced"),
    [
        ("cp437", "价格 €5", b"?? ?5", 3),
        ("cp858", "€5", b"\xd55", 0),
        ("cp866", "Привет, 世界", "Привет, ".encode("cp866") + b"??", 2),
        ("gbk", "笑😀", "笑".encode("gbk") + b"?", 1),
        ("gb18030", "笑😀", bytes.fromhex("d0a6 9439fc36"), 0),
        ("gb18030", "a\x1bd\x00b\tc\x85", b"a?d?b?c?", 4),
        ("gb18030", "\ud800", b"?", 1),
    ],
)
def test_unrepresentable_characters_become_question_marks(
    page: str, text: str, printed: bytes, replaced: int
) -> None:
    ticket = encode_ticket([text], page, cut=False)
    header = len(encode_ticket([], page, cut=False).data) - len(b"\x1bd\x04")
    assert ticket.data[header:] == printed + b"\n\x1bd\x04"
    assert ticket.replaced == replaced


def test_control_characters_never_reach_the_printer_as_commands() -> None:
    ticket = encode_ticket(["\x1d\x56\x00\x1b\x40\x10\x04\x01"], "gb18030")
    assert ticket.data.count(b"\x1dV") == 1  # only the ticket's own cut
    assert ticket.data.count(b"\x1b@") == 1
    assert b"\x10\x04" not in ticket.data


def test_one_string_is_split_into_lines() -> None:
    assert encode_ticket("一\n二", "gb18030").data == encode_ticket(["一", "二"], "gb18030").data


def test_unknown_code_page_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        encode_ticket(["x"], "utf-8")
    assert caught.value.reason == "unknown_code_page"
    assert str(caught.value).startswith("code_page:")
    assert "gb18030" in str(caught.value)  # says what would work


def test_code_page_names_are_case_insensitive() -> None:
    assert protocol.code_page_named(" GB18030 ").name == "gb18030"
    assert set(protocol.CODE_PAGES) >= {"gb18030", "gbk", "cp437", "cp850", "cp858", "cp866"}


def test_chinese_test_ticket_says_what_a_person_checks() -> None:
    lines = protocol.self_test_ticket("城关镇便民服务中心-01", "2025-03-01 09:30", "gb18030")
    assert lines[0] == "打印测试 / Print test"
    text = "\n".join(lines)
    for expected in (
        "城关镇便民服务中心-01",
        "2025-03-01 09:30",
        "gb18030",
        *protocol.COMMON_HANZI,
    ):
        assert expected in text
    assert encode_ticket(lines, "gb18030").replaced == 0


def test_single_byte_test_ticket_prints_the_upper_half_of_its_page() -> None:
    lines = protocol.self_test_ticket("kiosk-01", "09:30", "cp866")
    assert "Code page: cp866 (ESC t 17)" in lines
    assert "АБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ" in lines
    ticket = encode_ticket(lines, "cp866")
    assert ticket.replaced == 0
    assert bytes(range(0x80, 0xA0)) in ticket.data


def test_single_byte_test_ticket_counts_a_chinese_terminal_name() -> None:
    lines = protocol.self_test_ticket("城关镇-01", "09:30", "cp437")
    assert "Terminal: 城关镇-01" in lines
    assert encode_ticket(lines, "cp437").replaced == 3


# --- round trip through the simulated printer ---------------------------------------------


def _expected(line: str, codec: str) -> str:
    """What the printer should print for ``line``: '?' for what the page cannot carry."""
    out = []
    for char in line:
        try:
            ok = not (char < " " or "\x7f" <= char <= "\x9f") and char.encode(codec)
        except UnicodeEncodeError:
            ok = False
        out.append(char if ok else "?")
    return "".join(out)


def _print(lines: list[str], page: str) -> tuple[str, ...]:
    core = SimulatedPrinterCore()
    core.feed(encode_ticket(lines, page).data)
    assert core.anomalies == []
    assert len(core.printed) == 1
    assert core.printed[0].cut == "partial"
    return core.printed[0].lines


HANZI = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
ANY = st.characters(codec="utf-8") | st.characters(max_codepoint=0xFF)


@ROUND_TRIP
@given(lines=st.lists(st.text(HANZI | ANY, max_size=20), max_size=6))
def test_gb18030_round_trip(lines: list[str]) -> None:
    assert _print(lines, "gb18030") == tuple(_expected(line, "gb18030") for line in lines)


@ROUND_TRIP
@pytest.mark.parametrize("page", ["cp437", "cp866", "cp858", "cp1252"])
@given(lines=st.lists(st.text(ANY | st.characters(max_codepoint=0x4FF), max_size=20), max_size=6))
def test_single_byte_round_trip(page: str, lines: list[str]) -> None:
    assert _print(lines, page) == tuple(_expected(line, page) for line in lines)
