"""Sites files (CSV or TOML) to validated :class:`~fleet_protocol.sites.Site` records.

Ops write these by hand, often in Excel, so the reader forgives what Excel does (a UTF-8 BOM,
GB18030/GBK from Chinese Windows, stray spaces, full-width punctuation, blank rows, 2026/10/1
dates) and nothing that changes meaning. It reports every problem at once, each with its line
and field, so a file is fixed in one round. Pure: the caller reads the file.

CSV: a header row (:data:`CSV_COLUMNS`, :data:`CSV_REQUIRED`), then one site per row;
owners as ``王磊 <wang@x.cn>; 李娜 <li@x.cn>``, hours as ``mon-fri 08:30-12:00,13:30-17:00;
周六 09:00-12:00``, closed as dates, workdays (调休) as ``2026-10-11=mon; 2026-10-12``
(Monday's hours unless a weekday is named).
TOML: ``[[sites]]`` tables with the same keys and a ``[sites.hours]`` table; a top-level
``[calendar]`` applies to every site, merged with a site's own ``[sites.calendar]``. See
:func:`render_sites_toml` for the layout.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tomllib
from collections.abc import Callable, Iterable
from datetime import date, datetime
from types import TracebackType
from typing import Final, TypeVar

import msgspec

from fleet_protocol.errors import ProtocolError
from fleet_protocol.ids import site_id
from fleet_protocol.sites import (
    DAY_NAMES,
    DEFAULT_GRACE_S,
    DEFAULT_TIMEZONE,
    Calendar,
    DayName,
    Interval,
    InvalidSite,
    MakeupDay,
    OpeningHours,
    Owner,
    Schedule,
    Site,
    SiteKind,
    check_coordinate,
    check_grace,
    check_owners,
    check_text,
    check_timezone,
)

CSV_COLUMNS: Final = (
    *("id", "name", "district", "town", "kind", "address", "lat", "lon", "owners", "hours"),
    *("open_24h", "grace_s", "closed", "workdays", "timezone"),
)
CSV_REQUIRED: Final = ("id", "name", "district", "town", "kind", "address", "owners")
SITE_KEYS: Final = frozenset(CSV_COLUMNS) - {"closed", "workdays"} | {"calendar"}
CALENDAR_KEYS: Final = frozenset({"closed", "workdays"})

_FULL_WIDTH: Final = str.maketrans(
    {"：": ":", "，": ",", "；": ";", "、": ",", "～": "-", "~": "-", "－": "-", "–": "-", "—": "-"}
)
_DATE: Final = re.compile(r"(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})")
_NUMBER: Final = r"[+-]?\d+(?:\.\d+)?"
_TRUE: Final = frozenset({"true", "yes", "1", "是"})
_SITES_HEADER: Final = re.compile(r"\s*\[\[\s*sites\s*\]\]\s*(?:#.*)?")
_CALENDAR: Final = re.compile(r"\s*\[\s*calendar\s*\]\s*(?:#.*)?")
#: Stands in for a CSV cell whose problem is already recorded, so it is not reported twice.
_FAILED: Final = object()
T = TypeVar("T")


_DAYS: Final = {"周天": 6, "星期天": 6} | {
    word: index
    for index, (name, zh) in enumerate(zip(DAY_NAMES, "一二三四五六日", strict=True))
    for word in (name, f"周{zh}", f"星期{zh}")
}


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong in a sites file; ``line`` is 1-based, None where the file has none."""

    line: int | None
    field: str | None
    message: str
    site: str | None = None


class SitesFileError(ProtocolError, ValueError):
    """A sites file that cannot be imported; ``problems`` holds all that was found."""

    def __init__(self, filename: str, problems: list[Problem]) -> None:
        self.filename = filename
        order = {field: n for n, field in enumerate(CSV_COLUMNS)}
        self.problems = sorted(problems, key=lambda p: (p.line or 0, order.get(p.field or "", 99)))
        super().__init__("\n".join(self.describe(p) for p in self.problems))

    def describe(self, problem: Problem) -> str:
        where = self.filename
        if problem.line is not None:
            where += f" line {problem.line}"
        if problem.site is not None:
            where += f" (site {problem.site})"
        if problem.field is not None:
            where += f', field "{problem.field}"'
        return f"{where}: {problem.message}"


def parse_sites(data: bytes, filename: str) -> list[Site]:
    """Parse a ``.csv`` or ``.toml`` sites file, or raise :class:`SitesFileError` listing all
    problems. CSV may be UTF-8 (with or without BOM) or GB18030/GBK, as Excel saves it."""
    suffix = filename.rpartition(".")[2].lower() if "." in filename else ""
    if suffix not in ("csv", "toml"):
        shown = f'".{suffix}"' if suffix else "no extension"
        problem = f"{shown} is not a sites file type: use .csv or .toml"
        raise SitesFileError(filename, [Problem(None, None, problem)])
    records = _read_csv(data) if suffix == "csv" else _read_toml(data)
    problems = [p for record in records for p in record.problems]
    first_line: dict[str, int | None] = {}
    for record in records:
        if record.site is not None and record.site in first_line:
            problem = f"site id {record.site} is already used on line {first_line[record.site]}"
            problems.append(Problem(record.line, "id", problem, record.label))
        elif record.site is not None:
            first_line[record.site] = record.line
    if problems:
        raise SitesFileError(filename, problems)
    return [record.result for record in records if record.result is not None]


# --- one record: collect every problem instead of stopping at the first ---------------------


class _Reported(ValueError):
    """A value whose problem is already recorded."""


class _Record:
    """The problems of one site (or of the file as a whole) and the site, if it is valid."""

    def __init__(self, line: int | None) -> None:
        self.line = line
        self.site: str | None = None  # the id once valid, to find duplicates
        self.label: str | None = None  # names the site in TOML messages, whose lines are vague
        self.problems: list[Problem] = []
        self.result: Site | None = None
        self._field: str | None = None

    def add(self, field: str | None, message: str) -> None:
        self.problems.append(Problem(self.line, field, message, self.label))

    def check(self, field: str | None) -> _Record:
        """``with record.check(field):`` records a ValueError under ``field`` and goes on."""
        self._field = field
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if isinstance(exc, InvalidSite):
            self.add(self._field or exc.field, exc.problem)
        elif isinstance(exc, ValueError) and not isinstance(exc, _Reported):
            self.add(self._field, str(exc))
        return isinstance(exc, ValueError)


def _build(record: _Record, table: dict[str, object], base: Calendar, prefix: str) -> None:
    """Check every field of one site's table (TOML types), then the site as a whole."""
    with record.check("id"):
        ident = record.site = site_id(_text(table, "id"))
    with record.check("name"):
        name = check_text("name", _text(table, "name"), 100)
    with record.check("district"):
        district = check_text("district", _text(table, "district"), 50)
    with record.check("town"):
        town = check_text("town", _text(table, "town"), 50)
    with record.check("address"):
        address = check_text("address", _text(table, "address"))
    with record.check("kind"):
        kind = SiteKind.parse(_text(table, "kind"))
    with record.check("owners"):
        owners = check_owners([_owner(item) for item in _list(_get(table, "owners", []))])
    with record.check("lat"):
        lat = check_coordinate("lat", _number(table, "lat"))
    with record.check("lon"):
        lon = check_coordinate("lon", _number(table, "lon"))
    with record.check("grace_s"):
        grace_s = check_grace(_typed(table, "grace_s", int, "a whole number", DEFAULT_GRACE_S))
    with record.check("open_24h"):
        open_24h = _typed(table, "open_24h", bool, "true or false", False)
    with record.check("timezone"):
        timezone = check_timezone(_text(table, "timezone", DEFAULT_TIMEZONE))
    with record.check("hours"):
        hours = _opening_hours(_get(table, "hours", {}))
    calendar = _calendar(record, _get(table, "calendar", {}), prefix, base)
    if record.problems or calendar is None:
        return
    with record.check(None):
        if not open_24h and hours.is_empty():
            raise InvalidSite("hours", "no opening hours: give hours or set open_24h true")
        schedule = Schedule(hours=hours, calendar=calendar, open_24h=open_24h, timezone=timezone)
        record.result = Site(
            id=ident,
            name=name,
            district=district,
            town=town,
            kind=kind,
            address=address,
            owners=owners,
            schedule=schedule,
            lat=lat,
            lon=lon,
            grace_s=grace_s,
        )


def _calendar(record: _Record, table: object, prefix: str, base: Calendar) -> Calendar | None:
    """``closed`` and ``workdays`` of a calendar table, added to ``base``."""
    where, before = prefix.rstrip(".") or None, len(record.problems)
    if not isinstance(table, dict):
        record.add(where, "expected a table with closed and workdays")
        return None
    if unknown := sorted(set(table) - CALENDAR_KEYS):
        record.add(where, f"unknown keys {', '.join(unknown)}; expected closed and workdays")
    with record.check(f"{prefix}closed"):
        closed = frozenset(_date(item) for item in _list(_get(table, "closed", [])))
    with record.check(f"{prefix}workdays"):
        workdays = frozenset(_workday(item) for item in _list(_get(table, "workdays", [])))
    if len(record.problems) > before:
        return None
    with record.check(f"{prefix}workdays"):
        return Calendar(closed=base.closed | closed, workdays=base.workdays | workdays)
    return None


# --- values, as TOML types: CSV cells are converted to these first --------------------------


def _get(table: dict[str, object], key: str, default: object) -> object:
    value = table.get(key, default)
    if value is _FAILED:
        raise _Reported
    return value


def _typed(table: dict[str, object], key: str, kind: type[T], what: str, default: T) -> T:
    value = _get(table, key, default)
    # bool is an int to Python, but true is no number of seconds.
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise _expected(what, value)
    return value


def _text(table: dict[str, object], key: str, default: str = "") -> str:
    return _typed(table, key, str, "text", default).strip()


def _number(table: dict[str, object], key: str) -> float | None:
    value = _get(table, key, None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise _expected("a number of degrees", value)
    return None if value is None else float(value)


def _list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise _expected("a list", value)
    return value


def _expected(what: str, value: object) -> ValueError:
    """A value of the wrong type in the file: the user's mistake, so a ValueError."""
    shown = f'"{value}"' if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    return ValueError(f"expected {what}, got {shown}")


def _split(text: str, separators: str = r"[;；\n]") -> list[str]:
    return [part.strip() for part in re.split(separators, text) if part.strip()]


def _owner(item: object) -> Owner:
    """``王磊 <wang@x.cn>``, forgivingly ``王磊 wang@x.cn``, or ``{ name = .., email = .. }``."""
    if isinstance(item, dict) and set(item) == {"name", "email"}:
        name, email = item["name"], item["email"]
        if isinstance(name, str) and isinstance(email, str):
            return Owner(name.strip(), email.strip())
    if not isinstance(item, str):
        raise _expected('王磊 <wang@x.cn> or { name = "...", email = "..." }', item)
    match = re.fullmatch(r"([^<>]*)<([^<>]*)>", item.strip())
    name, email = (match[1], match[2]) if match else (item.strip().rpartition(" ")[::2])
    if not name.strip():
        raise ValueError(f'"{item}" has no name; write it as 王磊 <{email.strip()}>')
    try:
        return Owner(name.strip(), email.strip())
    except InvalidSite as exc:
        raise ValueError(f'"{item}": {exc.problem}') from None


def _days(spec: str) -> list[int]:
    """``mon``, ``mon-fri``, ``sat,sun``, ``周一至周五``: the weekdays (0 is Monday) meant."""
    days: list[int] = []
    for part in _split(spec.translate(_FULL_WIDTH).lower(), ","):
        ends = [end.strip() for end in re.split(r"-|至|到", part)]
        if len(ends) > 2 or any(end not in _DAYS for end in ends):
            raise ValueError(f'"{spec}" is not a day or range of days like mon-fri or 周一至周五')
        first, last = _DAYS[ends[0]], _DAYS[ends[-1]]
        if last < first:
            raise ValueError(f'"{spec}": a range of days runs forward from Monday to Sunday')
        days.extend(range(first, last + 1))
    return days


def _opening_hours(table: object) -> OpeningHours:
    """Day specs to interval texts (a list, or one comma-separated string); a day given twice
    is a mistake, not a merge."""
    if not isinstance(table, dict):
        raise _expected("a table of days", table)
    week: dict[DayName, tuple[Interval, ...]] = {}
    for spec, value in table.items():
        texts = _split(value, ",") if isinstance(value, str) else _list(value)
        if not all(isinstance(text, str) for text in texts):
            raise _expected('intervals like ["08:30-12:00"]', value)
        try:
            intervals = tuple(Interval.parse(str(text).translate(_FULL_WIDTH)) for text in texts)
        except InvalidSite as exc:
            raise ValueError(f"{spec}: {exc.problem}") from None
        for day in _days(spec):
            if DAY_NAMES[day] in week:
                raise ValueError(f"{DAY_NAMES[day]} is given twice")
            week[DAY_NAMES[day]] = intervals
    return OpeningHours(**week)


def _date(value: object) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value  # TOML has dates of its own
    match = _DATE.fullmatch(value.strip()) if isinstance(value, str) else None
    try:
        if match:
            return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        pass
    raise _expected("a date like 2026-10-01", value)


def _workday(item: object) -> MakeupDay:
    """``2026-10-11=mon``, ``2026-10-11`` (Monday's hours) or ``{ date = .., as = "mon" }``."""
    if isinstance(item, str):
        day, _, works_as = item.partition("=")
        item = {"date": day, "as": works_as.strip() or "mon"}
    if not isinstance(item, dict) or "date" not in item or not set(item) <= {"date", "as"}:
        raise _expected('{ date = "2026-10-11", as = "mon" }', item)
    name = item.get("as", "mon")
    if not isinstance(name, str) or name.strip().lower() not in _DAYS:
        raise _expected("a day of the week like mon or 周一", name)
    return MakeupDay(_date(item["date"]), DAY_NAMES[_DAYS[name.strip().lower()]])


# --- CSV ------------------------------------------------------------------------------------


def _csv_cell(pattern: str, convert: Callable[[str], object], what: str) -> Callable[[str], object]:
    """A converter for cells that must match ``pattern`` (ASCII, case-insensitive)."""

    def parse(cell: str) -> object:
        if re.fullmatch(pattern, cell, re.IGNORECASE | re.ASCII) is None:
            raise _expected(what, cell)
        return convert(cell)

    return parse


def _csv_hours(cell: str) -> dict[str, object]:
    table: dict[str, object] = {}
    for entry in _split(cell.translate(_FULL_WIDTH)):
        match = re.fullmatch(r"(\D+?)\s*(\d.*)", entry)
        if match is None:
            raise _expected("days and times like mon-fri 08:30-12:00,13:30-17:00", entry)
        if match[1] in table:
            raise ValueError(f"{match[1]} is given twice")
        table[match[1]] = match[2]
    return table


_CSV_CELLS: Final[dict[str, Callable[[str], object]]] = {
    "lat": _csv_cell(_NUMBER, float, "a number of degrees"),
    "lon": _csv_cell(_NUMBER, float, "a number of degrees"),
    "grace_s": _csv_cell(r"\d+", int, "a whole number"),
    "open_24h": _csv_cell(
        "true|yes|1|是|false|no|0|否", lambda c: c.lower() in _TRUE, "true or false"
    ),
    "owners": _split,
    "hours": _csv_hours,
    "closed": lambda cell: _split(cell, r"[;；,，\s]+"),
    "workdays": lambda cell: _split(cell, r"[;；,，\s]+"),
}


def _read_csv(data: bytes) -> list[_Record]:
    head = _Record(None)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = data.decode("gb18030")  # what Excel on Chinese Windows saves as "CSV"
        except UnicodeDecodeError:
            head.add(None, "not UTF-8 or GB18030 text; save it as CSV UTF-8")
            return [head]
    reader = csv.reader(io.StringIO(text, newline=""))
    columns = [cell.strip().lower() for cell in next(reader, [])]
    if not any(columns):
        head.add(None, f"no header row; the first row names the columns {','.join(CSV_COLUMNS)}")
        return [head]
    head.line = 1
    if unknown := [c for c in columns if c and c not in CSV_COLUMNS]:
        head.add(None, f"unknown columns {', '.join(unknown)}; use {', '.join(CSV_COLUMNS)}")
    if twice := sorted({c for c in columns if c and columns.count(c) > 1}):
        head.add(None, f"columns {', '.join(twice)} appear more than once")
    if missing := [c for c in CSV_REQUIRED if c not in columns]:
        head.add(None, f"missing required columns {', '.join(missing)}")
    if head.problems:
        return [head]
    records, end = [head], reader.line_num
    try:
        for cells in reader:  # line_num counts physical lines, quoted line breaks included
            record, end = _Record(end + 1), reader.line_num
            if any(cell.strip() for cell in cells):
                records.append(record)
                _build(record, _csv_table(record, columns, cells), Calendar(), "")
    except csv.Error as exc:
        head.add(None, f"not readable as CSV after line {end}: {exc}")
    return records


def _csv_table(record: _Record, columns: list[str], cells: list[str]) -> dict[str, object]:
    """A row as the TOML table it stands for; an empty cell is a missing key."""
    if any(c.strip() for c in cells[len(columns) :]) or any(
        cell.strip() for column, cell in zip(columns, cells, strict=False) if not column
    ):
        record.add(None, "a value in a column that has no name in the header row")
    table: dict[str, object] = {}
    for column, cell in zip(columns, (cell.strip() for cell in cells), strict=False):
        if column and cell:
            with record.check(column):
                table[column] = _FAILED
                table[column] = _CSV_CELLS.get(column, str)(cell)
    table["calendar"] = {key: table.pop(key) for key in CALENDAR_KEYS if key in table}
    return table


# --- TOML -----------------------------------------------------------------------------------


def _read_toml(data: bytes) -> list[_Record]:
    head = _Record(None)
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
        raw = tomllib.loads(text)
    except UnicodeDecodeError:
        head.add(None, "not UTF-8 text (TOML files are always UTF-8)")
        return [head]
    except tomllib.TOMLDecodeError as exc:
        head.add(None, f"not valid TOML: {exc}")
        return [head]
    for key in sorted(set(raw) - {"sites", "calendar"}):
        head.add(key, "unknown key; a sites file has [[sites]] tables and one [calendar]")
    # tomllib keeps no positions: the n-th [[sites]] header is where the n-th site starts.
    # Split on "\n" only, as TOML does: a string may hold other line separators.
    lines = [n for n, line in enumerate(text.split("\n"), 1) if _SITES_HEADER.fullmatch(line)]
    calendar_at = [n for n, ln in enumerate(text.split("\n"), 1) if _CALENDAR.fullmatch(ln)]
    file_calendar = _Record(calendar_at[0] if calendar_at else None)
    base = _calendar(file_calendar, raw.get("calendar", {}), "calendar.", Calendar())
    sites, records = raw.get("sites", []), [head, file_calendar]
    if not isinstance(sites, list) or not all(isinstance(t, dict) for t in sites):
        head.add("sites", "expected [[sites]] tables")
        return records
    for index, table in enumerate(sites):
        record = _Record(lines[index] if len(lines) == len(sites) else None)
        records.append(record)
        ident = table.get("id")
        record.label = ident.strip() if isinstance(ident, str) else f"#{index + 1}"
        for key in sorted(set(table) - SITE_KEYS):
            record.add(key, f"unknown key; expected one of {', '.join(sorted(SITE_KEYS))}")
        _build(record, table, base or Calendar(), "calendar.")
    return records


# --- export ---------------------------------------------------------------------------------


def render_sites_toml(sites: Iterable[Site]) -> str:
    """The TOML layout :func:`parse_sites` reads, one complete table per site, so that
    ``parse_sites(render_sites_toml(sites)) == sites``."""
    out: list[str] = []
    for site in sites:
        schedule, calendar = site.schedule, site.schedule.calendar
        out += ["[[sites]]", f"id = {_q(site.id)}"]
        out += [f"{key} = {_q(getattr(site, key))}" for key in ("name", "district", "town")]
        out += [f"kind = {_q(site.kind.zh)}", f"address = {_q(site.address)}"]
        if site.lat is not None and site.lon is not None:
            out += [f"lat = {site.lat!r}", f"lon = {site.lon!r}"]
        owners = (f"{{ name = {_q(o.name)}, email = {_q(o.email)} }}" for o in site.owners)
        out += [f"owners = [{', '.join(owners)}]", f"grace_s = {site.grace_s}"]
        out += [f"open_24h = {str(schedule.open_24h).lower()}"]
        out += [f"timezone = {_q(schedule.timezone)}"]
        if not schedule.hours.is_empty():
            out.append("[sites.hours]")
            for day in DAY_NAMES:
                if intervals := schedule.hours.on(day):
                    out.append(f"{day} = [{', '.join(_q(str(i)) for i in intervals)}]")
        if not calendar.is_empty():
            closed = ", ".join(_q(str(day)) for day in sorted(calendar.closed))
            workdays = (
                f"{{ date = {_q(str(m.day))}, as = {_q(m.works_as)} }}"
                for m in sorted(calendar.workdays, key=lambda m: m.day)
            )
            out += ["[sites.calendar]", f"closed = [{closed}]"]
            out += [f"workdays = [{', '.join(workdays)}]"]
        out.append("")
    return "\n".join(out)


def _q(text: str) -> str:
    # A JSON string is a TOML basic string when, as here, it holds no control character.
    return json.dumps(text, ensure_ascii=False)
