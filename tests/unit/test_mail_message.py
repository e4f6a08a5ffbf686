"""Alert e-mails as their readers get them: subjects, bodies, headers that cannot be injected,
and signed acknowledge links."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from fleet_protocol import terminal_id
from fleet_server.ack_links import AckLinkExpired, AckLinkInvalid, ack_token, verify_ack_token
from fleet_server.mail_message import (
    DistrictOutage,
    Envelope,
    Escalation,
    Flapping,
    Mailbox,
    MessageError,
    Notice,
    PeripheralFault,
    PeripheralFaults,
    Reminder,
    Resolved,
    Site,
    SiteOffline,
    SiteTerminals,
    TerminalBack,
    TerminalOffline,
    clean_text,
    compose,
    duration_words,
    local_time,
    message_id,
)

# 2026-11-21 14:05 in Beijing (06:05 UTC).
T0 = 1_795_240_800_000 + 5 * 60_000
MIN = 60_000
KIOSK = terminal_id("zhujing-dqzx-01")
KIOSK2 = terminal_id("zhujing-dqzx-02")
ZHUJING = Site("朱泾镇党群服务中心", "金山区", "朱泾镇")
OWNER = Mailbox("王主任", "wang@zhujing.example.cn")
SENDER = Mailbox("金山区政务自助终端运维", "noreply@fleet.example.cn")
SECRET = b"0123456789abcdef0123456789abcdef"


def envelope(key: str = "decision-42", **kw: object) -> Envelope:
    values: dict[str, object] = {
        "sender": SENDER,
        "to": (OWNER,),
        "domain": "fleet.example.cn",
        "date_ms": T0 + 65 * MIN,
    }
    values.update(kw)
    return Envelope(key, **values)  # type: ignore[arg-type]


def sent(notice: Notice, env: Envelope | None = None) -> EmailMessage:
    """The message as a mail client parses it from the wire."""
    raw = compose(notice, env or envelope()).as_bytes()
    parsed = message_from_bytes(raw, _class=EmailMessage, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def body(message: EmailMessage) -> str:
    """The decoded text, with the wire's CRLF line ends as newlines."""
    return str(message.get_content()).replace("\r\n", "\n")


def test_offline_subject_is_chinese_first_with_english_after() -> None:
    message = sent(TerminalOffline(ZHUJING, KIOSK, T0))
    assert message["Subject"] == (
        "【离线】朱泾镇党群服务中心 zhujing-dqzx-01 终端离线 / Terminal offline"
    )
    text = body(message)
    assert "于 2026-11-21 14:05 离线" in text
    assert "went offline at 2026-11-21 14:05 (Beijing time)" in text
    assert text.index("离线") < text.index("went offline")


def test_headers_encode_chinese_names_and_mark_the_mail_automatic() -> None:
    raw = compose(TerminalOffline(ZHUJING, KIOSK, T0), envelope()).as_bytes()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()  # RFC 2047 encoded words, no raw UTF-8 in headers
    lines = head.split(b"\r\n")
    assert b"Auto-Submitted: auto-generated" in lines
    assert b"Content-Language: zh-CN, en" in lines
    message = sent(TerminalOffline(ZHUJING, KIOSK, T0))
    assert message["From"].addresses[0].display_name == "金山区政务自助终端运维"
    assert message["To"].addresses[0].display_name == "王主任"
    assert message["To"].addresses[0].addr_spec == "wang@zhujing.example.cn"
    assert message["Date"].datetime.utcoffset().total_seconds() == 8 * 3600
    assert message["Message-ID"] == "<alert.decision-42@fleet.example.cn>"


def test_the_same_key_gives_the_same_message_id_and_odd_keys_are_hashed() -> None:
    assert message_id("decision-42", "d.cn") == message_id("decision-42", "d.cn")
    odd = message_id("决策 42 <x>", "d.cn")
    assert odd == message_id("决策 42 <x>", "d.cn")
    assert odd.startswith("<alert.")
    assert odd.endswith("@d.cn>")
    assert odd.isascii()
    assert " " not in odd
    assert odd.count("<") == 1


def test_a_site_name_cannot_inject_headers() -> None:
    evil = Site("朱泾镇\r\nBcc: evil@x.example\r\nX-Evil: 1", "金山区\n", "朱泾镇")
    raw = compose(
        TerminalOffline(evil, KIOSK, T0),
        envelope(to=(Mailbox("王\r\nCc: evil@x.example", "wang@zhujing.example.cn"),)),
    ).as_bytes()
    message = message_from_bytes(raw, _class=EmailMessage, policy=policy.default)
    assert message["Bcc"] is None
    assert message["Cc"] is None
    assert message["X-Evil"] is None
    assert len(message.get_all("Subject") or []) == 1
    assert "Bcc: evil@x.example" in str(message["Subject"])  # kept as harmless text
    assert [a.addr_spec for a in message["To"].addresses] == ["wang@zhujing.example.cn"]
    header_lines = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert not [line for line in header_lines if line.lower().startswith((b"bcc", b"cc", b"x-"))]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\r\nb", "a b"),
        ("a\x00b\x1bc", "a b c"),
        ("a\u2028b\u2029c\u0085d", "a b c d"),
        ("a\u202eb\u200bc", "a b c"),  # bidi override, zero-width space
        ("  朱泾镇\t党群  ", "朱泾镇 党群"),
    ],
)
def test_clean_text_leaves_one_printable_line(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


def test_clean_text_cuts_long_text() -> None:
    assert clean_text("长" * 500, 10) == "长" * 9 + "…"


@pytest.mark.parametrize(
    "address",
    ["no-at-sign", "a@b", "a b@c.cn", "a@b.cn\r\nBcc: x@y.cn", "张三@例子.中国", "<a@b.cn>"],
)
def test_unusable_addresses_are_refused(address: str) -> None:
    with pytest.raises(MessageError):
        Mailbox("x", address)


def test_an_envelope_needs_a_recipient_a_printable_key_and_a_domain() -> None:
    with pytest.raises(MessageError, match="recipient"):
        envelope(to=())
    with pytest.raises(MessageError, match="key"):
        envelope(key="a\nb")
    with pytest.raises(MessageError, match="domain"):
        envelope(domain="x.cn>\r\nBcc: y")


@pytest.mark.parametrize(
    ("ms", "zh", "en"),
    [
        (0, "不到 1 分钟", "under 1 min"),
        (59_999, "不到 1 分钟", "under 1 min"),
        (5 * MIN, "5 分钟", "5 min"),
        (65 * MIN, "1 小时 5 分钟", "1 h 5 min"),
        (120 * MIN, "2 小时", "2 h"),
        ((2 * 1440 + 3 * 60 + 7) * MIN, "2 天 3 小时", "2 d 3 h"),
        ((1440 + 7) * MIN, "1 天", "1 d"),
    ],
)
def test_durations_in_words(ms: int, zh: str, en: str) -> None:
    assert duration_words(ms) == (zh, en)


def test_terminal_back_tells_how_long_it_was_away() -> None:
    message = sent(TerminalBack(ZHUJING, KIOSK, T0, T0 + 65 * MIN))
    assert message["Subject"] == (
        "【恢复】朱泾镇党群服务中心 zhujing-dqzx-01 终端已恢复 / Terminal back online"
    )
    text = body(message)
    assert "共离线 1 小时 5 分钟" in text
    assert "after 1 h 5 min offline" in text
    assert local_time(T0 + 65 * MIN) == "2026-11-21 15:10"


def test_site_offline_lists_every_terminal() -> None:
    message = sent(SiteOffline(ZHUJING, (KIOSK, KIOSK2), T0))
    assert message["Subject"].startswith("【离线】朱泾镇党群服务中心 全部 2 台终端离线 / ")
    assert "  - zhujing-dqzx-01\n  - zhujing-dqzx-02" in body(message)


def test_peripheral_faults_are_grouped_per_terminal() -> None:
    faults = (
        PeripheralFault(KIOSK, "票据打印机", "缺纸", "Out of paper"),
        PeripheralFault(KIOSK2, "身份证阅读器", "没有响应"),
        PeripheralFault(KIOSK, "柜门", "柜门打开", "Cabinet door open"),
    )
    text = body(sent(PeripheralFaults(ZHUJING, faults, T0)))
    assert (
        "终端 zhujing-dqzx-01：\n  - 票据打印机：缺纸\n  - 柜门：柜门打开\n终端 zhujing-dqzx-02："
        in text
    )
    assert "  - 票据打印机: Out of paper\n  - 柜门: Cabinet door open" in text
    assert "  - 身份证阅读器: 没有响应" in text  # no English text: the Chinese stands in


def test_flapping_names_the_count_and_window() -> None:
    message = sent(Flapping(ZHUJING, KIOSK, 6, 30 * MIN, T0))
    assert message["Subject"].startswith("【不稳定】朱泾镇党群服务中心 zhujing-dqzx-01 ")
    assert "在 30 分钟 内掉线 6 次" in body(message)
    assert "dropped offline 6 times" in body(message)


def test_reminder_and_escalation_are_prefixed_and_say_how_long_it_is_open() -> None:
    offline = TerminalOffline(ZHUJING, KIOSK, T0)
    reminder = sent(Reminder(offline, T0))
    assert reminder["Subject"].startswith("【提醒】朱泾镇党群服务中心 zhujing-dqzx-01 终端离线")
    assert "Reminder: Terminal offline" in reminder["Subject"]
    assert "已 1 小时 5 分钟" in body(reminder)
    escalation = sent(Escalation(offline, T0))
    assert escalation["Subject"].startswith("【升级】")
    assert "Escalated: Terminal offline" in escalation["Subject"]
    assert "现通知区运维" in body(escalation)
    assert "zhujing-dqzx-01" in body(escalation)


def test_a_resolved_alert_says_when_and_after_how_long() -> None:
    faults = (PeripheralFault(KIOSK, "票据打印机", "缺纸", "Out of paper"),)
    message = sent(Resolved(PeripheralFaults(ZHUJING, faults, T0), T0, T0 + 125 * MIN))
    assert message["Subject"] == (
        "【恢复】朱泾镇党群服务中心 1 项外设故障（已恢复） / Resolved: Peripheral faults"
    )
    assert "已于 2026-11-21 16:10 解决，持续 2 小时 5 分钟" in body(message)
    assert "Resolved at 2026-11-21 16:10 after 2 h 5 min" in body(message)


def test_district_outage_counts_terminals_and_sites() -> None:
    other = Site("亭林镇社区事务受理服务中心", "金山区", "亭林镇")
    outage = DistrictOutage(
        "金山区",
        (SiteTerminals(ZHUJING, (KIOSK, KIOSK2)), SiteTerminals(other, (terminal_id("tl-01"),))),
        40,
        T0,
    )
    message = sent(outage)
    assert message["Subject"] == (
        "【区域故障】金山区 3/40 台终端离线 / District outage: 3 of 40 terminals offline"
    )
    assert "涉及 2 个点位" in body(message)
    assert "  - 朱泾镇党群服务中心: zhujing-dqzx-01, zhujing-dqzx-02" in body(message)


def test_acknowledge_link_appears_in_both_languages() -> None:
    url = "https://fleet.example.cn/ack/" + ack_token("decision-42", SECRET, T0 + 86_400_000)
    text = body(sent(TerminalOffline(ZHUJING, KIOSK, T0), envelope(ack_url=url)))
    assert text.count(url) == 2


def test_ack_token_round_trip_and_url_safe() -> None:
    token = ack_token("决策/42 +x", SECRET, T0 + MIN)
    assert all(c.isalnum() or c in "-_." for c in token)
    assert verify_ack_token(token, SECRET, T0) == "决策/42 +x"


def test_tampered_or_foreign_ack_tokens_are_refused() -> None:
    token = ack_token("decision-42", SECRET, T0 + MIN)
    version, alert, expiry, mac = token.split(".")
    later = f"{version}.{alert}.{int(expiry) + 10**9}.{mac}"
    other = ack_token("decision-43", SECRET, T0 + MIN).split(".")[1]
    for bad in (later, f"{version}.{other}.{expiry}.{mac}", token[:-2], "garbage", ""):
        with pytest.raises(AckLinkInvalid):
            verify_ack_token(bad, SECRET, T0)
    with pytest.raises(AckLinkInvalid, match="altered or signed with another key"):
        verify_ack_token(token, b"another secret of 32 bytes......", T0)


def test_expired_ack_token_is_refused_as_expired() -> None:
    token = ack_token("decision-42", SECRET, T0 + MIN)
    with pytest.raises(AckLinkExpired, match="expired at 2026-11-21 14:06"):
        verify_ack_token(token, SECRET, T0 + MIN)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        ack_token("decision-42", b"short", T0)
