"""Sites: where terminals stand, who answers for them, and when they are open.

The alerting engine e-mails a site's owners when a terminal drops offline *during opening
hours*; a 党群服务中心 dark at night, or closed for 国庆, is nobody's emergency. So a site carries
a :class:`Schedule` (weekly hours, a holiday calendar with 调休 make-up days, a time zone) that
answers "open at this instant?" in epoch milliseconds, the clock every message uses.

Every record checks itself when built or decoded and raises :class:`InvalidSite` naming the
field, so the import parser, the ops API and code share one set of rules. Pure (zoneinfo aside).
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Final, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from fleet_protocol.errors import InvalidId, ProtocolError
from fleet_protocol.ids import SiteIdField, site_id

DayName = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
#: Monday first, so that ``DAY_NAMES[d.weekday()]`` names the day of ``d``.
DAY_NAMES: Final[tuple[DayName, ...]] = get_args(DayName)
MINUTES_PER_DAY: Final = 24 * 60
DEFAULT_GRACE_S: Final = 300
MAX_GRACE_S: Final = 24 * 3600
DEFAULT_TIMEZONE: Final = "Asia/Shanghai"
#: How far ``next_opening_ms`` looks ahead: longer than any holiday, shorter than forever.
SEARCH_DAYS: Final = 400

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_CLOCK: Final = re.compile(r"(\d{1,2}):(\d{2})")
_ZONE_KEY: Final = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+)*")
# RFC 5322 dot-atom local part, ASCII host names with an alphabetic top-level domain. Nothing
# that needs quoting in a header gets through; internationalised addresses are not supported.
_ATOM: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL: Final = re.compile(rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?:{_LABEL}\.)+[A-Za-z]{{2,63}}")
#: Owner names go into To: headers; these would need quoting or would split the address list.
_NAME_FORBIDDEN: Final = frozenset(',;<>"\\')


class InvalidSite(ProtocolError, ValueError):
    """A site record whose ``field`` breaks a rule; ``problem`` says which, in words."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class SiteKind(enum.StrEnum):
    """Where a terminal stands; the value is the wire name, :attr:`zh` what ops call it."""

    PARTY_MASS_CENTRE = "party-mass-centre"
    VILLAGE_POINT = "village-point"
    COMMUNITY_CENTRE = "community-centre"
    MALL = "mall"
    HOSPITAL = "hospital"
    BANK_BRANCH = "bank-branch"

    @property
    def zh(self) -> str:
        return _KIND_ZH[self]

    @classmethod
    def parse(cls, text: str) -> SiteKind:
        """Accept the wire value or the Chinese name, as ops write either."""
        key = text.strip()
        for kind in cls:
            if key in (kind.value, kind.zh):
                return kind
        choices = ", ".join(f"{kind.value} ({kind.zh})" for kind in cls)
        raise InvalidSite("kind", f'"{text}" is not a site kind; use one of: {choices}')


_KIND_ZH: Final = {
    SiteKind.PARTY_MASS_CENTRE: "党群服务中心",
    SiteKind.VILLAGE_POINT: "村居服务点",
    SiteKind.COMMUNITY_CENTRE: "社区事务受理服务中心",
    SiteKind.MALL: "商场",
    SiteKind.HOSPITAL: "医院",
    SiteKind.BANK_BRANCH: "银行网点",
}


# --- field rules, shared by the records below and by the import parser ----------------------


def check_text(field: str, value: str, max_length: int = 200) -> str:
    """A human-readable value: present, trimmed, one line, bounded."""
    if not value:
        raise InvalidSite(field, "is required and may not be empty")
    if value != value.strip():
        raise InvalidSite(field, f'"{value}" has leading or trailing spaces')
    if len(value) > max_length:
        raise InvalidSite(field, f"is {len(value)} characters long, the limit is {max_length}")
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in value):
        raise InvalidSite(field, f"{value!r} contains a control character or line break")
    return value


def check_coordinate(field: Literal["lat", "lon"], value: float | None) -> float | None:
    """A latitude or longitude in degrees (WGS-84 or GCJ-02 alike), or absent."""
    if value is None:
        return None
    limit = 90.0 if field == "lat" else 180.0
    if not -limit <= value <= limit:  # also rejects NaN
        raise InvalidSite(field, f"{value} is outside -{limit:g}..{limit:g} degrees")
    return float(value)


def check_grace(value: int) -> int:
    """Seconds a terminal may be offline during opening hours before its owners hear of it."""
    if isinstance(value, bool) or not 0 <= value <= MAX_GRACE_S:
        raise InvalidSite("grace_s", f"{value} is not a number of seconds from 0 to {MAX_GRACE_S}")
    return value


def check_timezone(value: str) -> str:
    """An IANA zone name that the time-zone database knows."""
    problem = InvalidSite("timezone", f'"{value}" is not a known time zone')
    if _ZONE_KEY.fullmatch(value) is None:
        raise problem
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise problem from None
    return value


def check_owners(owners: Sequence[Owner]) -> tuple[Owner, ...]:
    """At least one owner, each address once: an alert nobody receives is no alert."""
    if not owners:
        raise InvalidSite("owners", "at least one owner is required, like 王磊 <wang@example.cn>")
    seen: set[str] = set()
    for owner in owners:
        if owner.email.casefold() in seen:
            raise InvalidSite("owners", f"{owner.email} is listed twice")
        seen.add(owner.email.casefold())
    return tuple(owners)


def parse_clock(text: str) -> int:
    """``"08:30"`` as minutes after midnight; ``"24:00"`` is allowed (as an end)."""
    match = _CLOCK.fullmatch(text.strip())
    minutes = int(match[1]) * 60 + int(match[2]) if match else -1
    if match is None or int(match[2]) > 59 or not 0 <= minutes <= MINUTES_PER_DAY:
        raise InvalidSite("hours", f'"{text.strip()}" is not a time of day (00:00 to 24:00)')
    return minutes


def format_clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


# --- records --------------------------------------------------------------------------------


class Owner(msgspec.Struct, frozen=True):
    """A 点位负责人 who is e-mailed when the site's terminals go offline and come back."""

    name: str
    email: str

    def __post_init__(self) -> None:
        check_text("owners", self.name, 64)
        if _NAME_FORBIDDEN.intersection(self.name):
            problem = f'owner name "{self.name}" may not contain , ; < > " or \\'
            raise InvalidSite("owners", problem)
        match = _EMAIL.fullmatch(self.email)
        if match is None or len(self.email) > 254 or len(match["local"]) > 64:
            raise InvalidSite("owners", f'"{self.email}" is not an e-mail address')

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"


class Interval(msgspec.Struct, frozen=True):
    """Open from ``start`` up to (not including) ``end``, in minutes after local midnight."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= MINUTES_PER_DAY:
            raise InvalidSite("hours", f"{self} is not an interval within one day")

    @classmethod
    def parse(cls, text: str) -> Interval:
        """``"08:30-12:00"``; the end must come after the start, ``24:00`` ends the day."""
        parts = text.split("-")
        if len(parts) != 2:
            raise InvalidSite("hours", f'"{text.strip()}" is not an interval like 08:30-12:00')
        start, end = parse_clock(parts[0]), parse_clock(parts[1])
        if end <= start:
            raise InvalidSite("hours", f"{text.strip()} does not end after it starts")
        return cls(start, end)

    def __str__(self) -> str:
        return f"{format_clock(self.start)}-{format_clock(self.end)}"


class OpeningHours(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The weekly pattern; a day without intervals is a closed day."""

    mon: tuple[Interval, ...] = ()
    tue: tuple[Interval, ...] = ()
    wed: tuple[Interval, ...] = ()
    thu: tuple[Interval, ...] = ()
    fri: tuple[Interval, ...] = ()
    sat: tuple[Interval, ...] = ()
    sun: tuple[Interval, ...] = ()

    def __post_init__(self) -> None:
        for day in DAY_NAMES:
            intervals = self.on(day)
            for before, after in pairwise(intervals):
                if after.end <= before.start:
                    problem = f"{after} comes after {before}; list intervals in order"
                elif after.start < before.end:
                    problem = f"{before} and {after} overlap"
                elif after.start == before.end:
                    merged = Interval(before.start, after.end)
                    problem = f"{before} and {after} touch; write them as one, {merged}"
                else:
                    continue
                raise InvalidSite("hours", f"{day}: {problem}")

    def on(self, day: DayName) -> tuple[Interval, ...]:
        intervals: tuple[Interval, ...] = getattr(self, day)
        return intervals

    def is_empty(self) -> bool:
        return not any(self.on(day) for day in DAY_NAMES)


class MakeupDay(msgspec.Struct, frozen=True):
    """A 调休 day: a date, usually a weekend, worked with the hours of ``works_as``."""

    day: date
    works_as: DayName = "mon"

    def __post_init__(self) -> None:
        if self.works_as not in DAY_NAMES:
            raise InvalidSite("workdays", f'"{self.works_as}" is not one of {DAY_NAMES}')


class Calendar(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Exceptions to the weekly pattern: closed dates (holidays) and make-up working days."""

    closed: frozenset[date] = frozenset()
    workdays: frozenset[MakeupDay] = frozenset()

    def __post_init__(self) -> None:
        seen: set[date] = set()
        for makeup in sorted(self.workdays, key=lambda m: (m.day, m.works_as)):
            if makeup.day in self.closed:
                raise InvalidSite("workdays", f"{makeup.day} is both closed and a make-up day")
            if makeup.day in seen:
                raise InvalidSite("workdays", f"{makeup.day} is a make-up day twice")
            seen.add(makeup.day)

    def weekday_of(self, day: date) -> DayName | None:
        """Whose hours apply on ``day``: None when closed, else its own or the 调休 weekday."""
        if day in self.closed:
            return None
        for makeup in self.workdays:
            if makeup.day == day:
                return makeup.works_as
        return DAY_NAMES[day.weekday()]

    def is_empty(self) -> bool:
        return not self.closed and not self.workdays


class Schedule(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """When a site is open, answered in epoch milliseconds.

    ``open_24h`` sites (a 24小时自助服务区) are open at every instant, holidays included: the
    calendar does not apply to them, and they have no weekly hours. Intervals are local wall
    time in ``timezone``; no interval crosses midnight, so an instant is only ever inside an
    interval of its own local date.
    """

    hours: OpeningHours = OpeningHours()
    calendar: Calendar = Calendar()
    open_24h: bool = False
    timezone: str = DEFAULT_TIMEZONE

    def __post_init__(self) -> None:
        check_timezone(self.timezone)
        if self.open_24h and not self.hours.is_empty():
            problem = "a 24-hour site has no opening hours; remove them or set open_24h false"
            raise InvalidSite("hours", problem)

    def is_open(self, at_ms: int) -> bool:
        return self.open_24h or self.open_interval_at(at_ms) is not None

    def open_interval_at(self, at_ms: int) -> tuple[int, int] | None:
        """``(start_ms, end_ms)`` of the interval containing ``at_ms``, None when closed.

        A 24-hour site answers with the local day around ``at_ms``: it never closes, and a
        caller that re-checks at the end of the interval does so once a day.
        """
        zone = ZoneInfo(self.timezone)
        day = _local_date(at_ms, zone)
        if self.open_24h:
            return _instant(day, 0, zone), _instant(day, MINUTES_PER_DAY, zone)
        for start, end in self._spans(day, zone):
            if start <= at_ms < end:
                return start, end
        return None

    def next_opening_ms(self, after_ms: int) -> int | None:
        """Start of the first interval beginning strictly after ``after_ms``.

        When open, that is the *next* interval, not the current one. None when the site does
        not open within :data:`SEARCH_DAYS`, and always for a 24-hour site, which never opens
        because it never closes.
        """
        if self.open_24h:
            return None
        zone = ZoneInfo(self.timezone)
        first = _local_date(after_ms, zone)
        for offset in range(SEARCH_DAYS + 1):
            for start, _ in self._spans(first + timedelta(days=offset), zone):
                if start > after_ms:
                    return start
        return None

    def _spans(self, day: date, zone: ZoneInfo) -> Iterator[tuple[int, int]]:
        weekday = self.calendar.weekday_of(day)
        for interval in self.hours.on(weekday) if weekday else ():
            yield _instant(day, interval.start, zone), _instant(day, interval.end, zone)


def _local_date(at_ms: int, zone: ZoneInfo) -> date:
    return (_EPOCH + at_ms * _MS).astimezone(zone).date()


def _instant(day: date, minutes: int, zone: ZoneInfo) -> int:
    # Aware datetime + timedelta is wall-clock arithmetic, so 24:00 is the next local midnight.
    local = datetime.combine(day, time(), tzinfo=zone) + timedelta(minutes=minutes)
    return (local - _EPOCH) // _MS


class Site(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A place with terminals: identity, whom to tell, and when it is open."""

    id: SiteIdField
    name: str
    district: str
    town: str
    kind: SiteKind
    address: str
    owners: tuple[Owner, ...]
    schedule: Schedule
    lat: float | None = None
    lon: float | None = None
    grace_s: int = DEFAULT_GRACE_S

    def __post_init__(self) -> None:
        try:
            site_id(self.id)
        except InvalidId as exc:
            raise InvalidSite("id", str(exc)) from None
        check_text("name", self.name, 100)
        check_text("district", self.district, 50)
        check_text("town", self.town, 50)
        check_text("address", self.address)
        check_owners(self.owners)
        check_coordinate("lat", self.lat)
        check_coordinate("lon", self.lon)
        if (self.lat is None) != (self.lon is None):
            missing = "lon" if self.lon is None else "lat"
            raise InvalidSite(missing, "lat and lon go together: give both or neither")
        check_grace(self.grace_s)
