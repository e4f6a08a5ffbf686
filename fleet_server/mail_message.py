"""Alert e-mails: what site owners and district ops read. Pure (standard ``email`` only).

Every message is Chinese first with English below, in the subject and in the body. Times are
Beijing time. Text that comes from files and agents (site names, peripheral reasons, people's
names) is reduced to one line of printable characters before it goes anywhere, so nothing in a
payload can start a new header line.

The mail feature's exception tree lives here too, so the adapters (outbox, SMTP) and the worker
share it without importing each other:

MailError (a FleetServerError)
├── MessageError           a message cannot be composed (an address or key is not valid)
├── OutboxError            the outbox database failed
└── DeliveryError          sending one message failed
    ├── DeliveryDeferred   temporary: not reachable, timed out, 4xx; retry later
    └── DeliveryRefused    permanent: 5xx for this message or recipient; retrying cannot help
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Final

from fleet_protocol.ids import TerminalId
from fleet_server.errors import FleetServerError


class MailError(FleetServerError):
    """Base of the mail feature's errors."""


class MessageError(MailError):
    """A message cannot be composed from these values."""


class OutboxError(MailError):
    """The mail outbox database failed."""


class DeliveryError(MailError):
    """Sending a message failed; unless it is a :class:`DeliveryRefused`, retry later."""


class DeliveryDeferred(DeliveryError):
    """The mail server could not take the message now (down, timeout, 4xx)."""


class DeliveryRefused(DeliveryError):
    """The mail server refused the message for good (5xx for the recipient or content)."""


# China has kept UTC+8 without daylight saving since 1991, so a fixed offset is exact and needs
# no tz database on the server.
BEIJING: Final = timezone(timedelta(hours=8), "CST")
MAX_TEXT: Final = 200
"""Longest piece of outside text (a name, a reason) put in a message; longer is cut."""

_ADDRESS_RE: Final = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)
_DOMAIN_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*")
_TOKEN_KEY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def clean_text(value: str, limit: int = MAX_TEXT) -> str:
    """``value`` as one line of printable text: control and format characters and line or
    paragraph separators become spaces, runs of white space one space, and the result is cut
    to ``limit`` characters."""
    spaced = "".join(
        " " if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") else c
        for c in value
    )
    text = " ".join(spaced.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A person or role that mail is from or to: a display name and a plain ASCII address."""

    name: str
    address: str

    def __post_init__(self) -> None:
        if _ADDRESS_RE.fullmatch(self.address) is None:
            raise MessageError(f"not a usable e-mail address: {self.address!r}")

    def header_address(self) -> Address:
        return Address(display_name=clean_text(self.name, 80), addr_spec=self.address)


@dataclass(frozen=True, slots=True)
class Site:
    name: str
    district: str
    town: str = ""


@dataclass(frozen=True, slots=True)
class TerminalOffline:
    site: Site
    terminal: TerminalId
    since_ms: int


@dataclass(frozen=True, slots=True)
class TerminalBack:
    site: Site
    terminal: TerminalId
    offline_since_ms: int
    back_ms: int


@dataclass(frozen=True, slots=True)
class SiteOffline:
    """Every terminal of a site is offline."""

    site: Site
    terminals: tuple[TerminalId, ...]
    since_ms: int


@dataclass(frozen=True, slots=True)
class Flapping:
    """A terminal that keeps dropping off and coming back."""

    site: Site
    terminal: TerminalId
    drops: int
    window_ms: int
    last_drop_ms: int


@dataclass(frozen=True, slots=True)
class PeripheralFault:
    terminal: TerminalId
    peripheral: str
    reason: str
    """The plain-language problem, Chinese (``打印机缺纸``)."""
    reason_en: str = ""
    """The same in English; the Chinese text stands in when empty."""


@dataclass(frozen=True, slots=True)
class PeripheralFaults:
    site: Site
    faults: tuple[PeripheralFault, ...]
    since_ms: int


@dataclass(frozen=True, slots=True)
class SiteTerminals:
    site: Site
    terminals: tuple[TerminalId, ...]


@dataclass(frozen=True, slots=True)
class DistrictOutage:
    """Many terminals of one district offline at once: a network or power problem for ops."""

    district: str
    offline: tuple[SiteTerminals, ...]
    total_terminals: int
    since_ms: int


Alert = TerminalOffline | TerminalBack | SiteOffline | Flapping | PeripheralFaults | DistrictOutage


@dataclass(frozen=True, slots=True)
class Reminder:
    """``alert`` is still open; ``open_since_ms`` is when it was first raised."""

    alert: Alert
    open_since_ms: int


@dataclass(frozen=True, slots=True)
class Escalation:
    """``alert`` was not acknowledged in time and now goes to district ops."""

    alert: Alert
    open_since_ms: int


@dataclass(frozen=True, slots=True)
class Resolved:
    """``alert`` is over; for a terminal coming back, :class:`TerminalBack` says it better."""

    alert: Alert
    open_since_ms: int
    resolved_ms: int


Notice = Alert | Reminder | Escalation | Resolved


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who a message is from and to, and what makes it the same message when sent again."""

    key: str
    """The idempotency key (the alert decision id): the outbox key and the Message-ID."""
    sender: Mailbox
    to: tuple[Mailbox, ...]
    domain: str
    """Right-hand side of the Message-ID: the fleet server's mail domain."""
    date_ms: int
    ack_url: str | None = None

    def __post_init__(self) -> None:
        if not self.to:
            raise MessageError("a message needs at least one recipient")
        if not self.key or clean_text(self.key) != self.key:
            raise MessageError(f"message key must be printable text: {self.key!r}")
        if _DOMAIN_RE.fullmatch(self.domain) is None:
            raise MessageError(f"not a usable mail domain: {self.domain!r}")


def local_time(ms: int) -> str:
    """``ms`` since the epoch as Beijing time, ``2026-11-21 14:05``."""
    return datetime.fromtimestamp(ms / 1000, BEIJING).strftime("%Y-%m-%d %H:%M")


def duration_words(ms: int) -> tuple[str, str]:
    """A duration in words, Chinese and English (``1 小时 5 分钟``, ``1 h 5 min``): the two
    largest units, leaving out zeros."""
    minutes = max(0, ms) // 60_000
    if minutes == 0:
        return "不到 1 分钟", "under 1 min"
    units = (
        (minutes // 1440, "天", "d"),
        (minutes // 60 % 24, "小时", "h"),
        (minutes % 60, "分钟", "min"),
    )
    first = next(i for i, (n, _, _) in enumerate(units) if n)
    shown = [u for u in units[first : first + 2] if u[0]]
    return " ".join(f"{n} {zh}" for n, zh, _ in shown), " ".join(f"{n} {en}" for n, _, en in shown)


def message_id(key: str, domain: str) -> str:
    """The Message-ID for ``key``: the same key always gives the same id."""
    local = key if _TOKEN_KEY_RE.fullmatch(key) else hashlib.sha256(key.encode()).hexdigest()[:40]
    return f"<alert.{local}@{domain}>"


@dataclass(frozen=True, slots=True)
class _Wording:
    """One kind of notice in words: ``{name}`` fields are filled from the notice."""

    tag: str
    subject_zh: str
    subject_en: str
    body_zh: str
    body_en: str


_WORDING: Final[dict[type[Notice], _Wording]] = {
    TerminalOffline: _Wording(
        "离线",
        "{site} {terminal} 终端离线",
        "Terminal offline",
        "{place_zh}的自助终端 {terminal} 于 {since} 离线。\n"
        "请检查终端的电源和网络连接。终端恢复后会另有邮件通知。",
        "Self-service terminal {terminal} at {place_en} went offline at {since} (Beijing time).\n"
        "Please check the terminal's power and network connection.\n"
        "You will get another e-mail when it is back.",
    ),
    TerminalBack: _Wording(
        "恢复",
        "{site} {terminal} 终端已恢复",
        "Terminal back online",
        "{place_zh}的自助终端 {terminal} 已于 {back} 恢复在线，\n"
        "共离线 {outage_zh}（自 {since} 起）。",
        "Self-service terminal {terminal} at {place_en} is back online since {back}\n"
        "(Beijing time), after {outage_en} offline (from {since}).",
    ),
    SiteOffline: _Wording(
        "离线",
        "{site} 全部 {count} 台终端离线",
        "All terminals offline",
        "{place_zh}的全部 {count} 台自助终端自 {since} 起离线：\n{listing}\n"
        "多台终端同时离线，通常是点位的网络或电源故障，请先检查路由器和电源。",
        "All {count} self-service terminals at {place_en} are offline since {since}"
        " (Beijing time):\n{listing}\n"
        "When all terminals drop at once, the site's network or power is the usual cause:\n"
        "check the router and the power supply first.",
    ),
    Flapping: _Wording(
        "不稳定",
        "{site} {terminal} 终端频繁掉线",
        "Terminal connection unstable",
        "{place_zh}的自助终端 {terminal} 在 {window_zh} 内掉线 {drops} 次，最近一次在 {last}。\n"
        "这通常是网线、网络设备或电源接触不良，请检查连接。",
        "Self-service terminal {terminal} at {place_en} dropped offline {drops} times\n"
        "within {window_en}, last at {last} (Beijing time).\n"
        "This usually means a loose network cable, a failing network device or unstable power.",
    ),
    PeripheralFaults: _Wording(
        "外设故障",
        "{site} {count} 项外设故障",
        "Peripheral faults",
        "{place_zh}的自助终端自 {since} 起有以下外设故障：\n{listing_zh}",
        "Self-service terminals at {place_en} report these peripheral faults since {since}"
        " (Beijing time):\n{listing_en}",
    ),
    DistrictOutage: _Wording(
        "区域故障",
        "{district} {count}/{total} 台终端离线",
        "District outage: {count} of {total} terminals offline",
        "自 {since} 起，{district}共 {count} 台自助终端离线（全区 {total} 台），"
        "涉及 {sites} 个点位：\n{listing}\n可能是区域性的网络或电力故障。",
        "Since {since} (Beijing time), {count} of {total} self-service terminals in {district}\n"
        "are offline, at {sites} sites:\n{listing}\n"
        "This points to a network or power problem across the district.",
    ),
    Reminder: _Wording(
        "提醒",
        "{subject_zh}（仍未解决）",
        "Reminder: {subject_en}",
        "提醒：以下问题自 {opened} 起仍未解决（已 {open_zh}）。\n\n{body_zh}",
        "Reminder: this problem is still open since {opened} ({open_en}).\n\n{body_en}",
    ),
    Escalation: _Wording(
        "升级",
        "{subject_zh}",
        "Escalated: {subject_en}",
        "升级：以下问题已 {open_zh} 无人确认（自 {opened} 起），现通知区运维。\n\n{body_zh}",
        "Escalated to district ops: nobody acknowledged this problem for {open_en}\n"
        "(open since {opened}).\n\n{body_en}",
    ),
    Resolved: _Wording(
        "恢复",
        "{subject_zh}（已恢复）",
        "Resolved: {subject_en}",
        "已恢复：以下问题已于 {resolved} 解决，持续 {open_zh}。原告警内容如下：\n\n{body_zh}",
        "Resolved at {resolved} after {open_en}. The alert was:\n\n{body_en}",
    ),
}


def compose(notice: Notice, envelope: Envelope) -> EmailMessage:
    """The e-mail for ``notice``, ready for the outbox."""
    text = _render(notice, envelope.date_ms)
    subject = clean_text(f"【{text.tag}】{text.subject_zh} / {text.subject_en}", 300)
    zh, en = [text.body_zh], [text.body_en]
    if envelope.ack_url:
        ack = clean_text(envelope.ack_url, 500)
        zh.append(f"确认已知晓（确认后不再提醒）：{ack}")
        en.append(f"Acknowledge (stops reminders): {ack}")
    zh.append("此邮件由政务服务自助终端运维系统自动发送，请勿直接回复。")
    en.append("Sent automatically by the self-service kiosk fleet system; please do not reply.")

    message = EmailMessage(policy=policy.SMTP)
    message["Subject"] = subject
    message["From"] = envelope.sender.header_address()
    message["To"] = [m.header_address() for m in envelope.to]
    message["Date"] = format_datetime(datetime.fromtimestamp(envelope.date_ms / 1000, BEIJING))
    message["Message-ID"] = message_id(envelope.key, envelope.domain)
    message["Auto-Submitted"] = "auto-generated"
    body = "\n\n".join([*zh, "-" * 40, *en]) + "\n"
    message.set_content(body, cte="base64")
    message["Content-Language"] = "zh-CN, en"  # after set_content, which resets Content-*
    return message


def _render(notice: Notice, now_ms: int) -> _Wording:
    wording = _WORDING[type(notice)]
    values: dict[str, object]
    if isinstance(notice, Reminder | Escalation | Resolved):
        inner = _render(notice.alert, now_ms)
        end_ms = notice.resolved_ms if isinstance(notice, Resolved) else now_ms
        open_zh, open_en = duration_words(end_ms - notice.open_since_ms)
        values = {
            "resolved": local_time(end_ms),
            "subject_zh": inner.subject_zh,
            "subject_en": inner.subject_en,
            "body_zh": inner.body_zh,
            "body_en": inner.body_en,
            "opened": local_time(notice.open_since_ms),
            "open_zh": open_zh,
            "open_en": open_en,
        }
    else:
        values = _values(notice)
    return _Wording(
        wording.tag,
        wording.subject_zh.format(**values),
        wording.subject_en.format(**values),
        wording.body_zh.format(**values),
        wording.body_en.format(**values),
    )


def _values(alert: Alert) -> dict[str, object]:
    """The fields the wording of ``alert`` may name; outside text is cleaned here."""
    if isinstance(alert, DistrictOutage):
        return {
            "district": clean_text(alert.district),
            "count": sum(len(s.terminals) for s in alert.offline),
            "total": alert.total_terminals,
            "sites": len(alert.offline),
            "since": local_time(alert.since_ms),
            "listing": "\n".join(
                f"  - {_name(s.site)}: {', '.join(s.terminals)}" for s in alert.offline
            ),
        }
    site = alert.site
    area_zh = " ".join(filter(None, (clean_text(site.district), clean_text(site.town))))
    area_en = clean_text(site.district)
    values: dict[str, object] = {
        "site": _name(site),
        "place_zh": f"{_name(site)}（{area_zh}）" if area_zh else _name(site),
        "place_en": f"{_name(site)} ({area_en})" if area_en else _name(site),
    }
    match alert:
        case TerminalOffline(terminal=terminal, since_ms=since_ms):
            values |= {"terminal": terminal, "since": local_time(since_ms)}
        case TerminalBack(terminal=terminal, offline_since_ms=since_ms, back_ms=back_ms):
            outage_zh, outage_en = duration_words(back_ms - since_ms)
            values |= {"terminal": terminal, "since": local_time(since_ms)}
            values |= {"back": local_time(back_ms), "outage_zh": outage_zh, "outage_en": outage_en}
        case SiteOffline(terminals=terminals, since_ms=since_ms):
            listing = "\n".join(f"  - {t}" for t in terminals)
            values |= {"count": len(terminals), "since": local_time(since_ms), "listing": listing}
        case Flapping(terminal=terminal, drops=drops, window_ms=window_ms, last_drop_ms=last):
            window_zh, window_en = duration_words(window_ms)
            values |= {"terminal": terminal, "drops": drops, "last": local_time(last)}
            values |= {"window_zh": window_zh, "window_en": window_en}
        case PeripheralFaults(faults=faults, since_ms=since_ms):
            listing_zh, listing_en = _fault_listing(faults)
            values |= {"count": len(faults), "since": local_time(since_ms)}
            values |= {"listing_zh": listing_zh, "listing_en": listing_en}
    return values


def _fault_listing(faults: Iterable[PeripheralFault]) -> tuple[str, str]:
    """Faults grouped per terminal, terminals in order of first appearance."""
    by_terminal: dict[str, list[PeripheralFault]] = {}
    for fault in faults:
        by_terminal.setdefault(fault.terminal, []).append(fault)
    zh: list[str] = []
    en: list[str] = []
    for terminal, items in by_terminal.items():
        zh.append(f"终端 {terminal}：")
        en.append(f"Terminal {terminal}:")
        for fault in items:
            device, reason = clean_text(fault.peripheral), clean_text(fault.reason)
            zh.append(f"  - {device}：{reason}")
            en.append(f"  - {device}: {clean_text(fault.reason_en) or reason}")
    return "\n".join(zh), "\n".join(en)


def _name(site: Site) -> str:
    return clean_text(site.name)
