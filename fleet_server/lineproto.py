"""InfluxDB line protocol encoding: `Point` records in, bytes out (sans-IO).

A `Point` validates itself on construction and either encodes exactly (what InfluxDB stores
and returns is what the point holds) or raises `LineProtocolError`. Nothing is silently
mangled: line protocol has places where a value cannot be carried at all, and a point that
would hit one is refused with a message that names the measurement, key and reason.

Wire format, one point per line::

    measurement[,tag_key=tag_value...] field_key=field_value[,field_key=field_value...] ts_ms

The rules below were established by writing raw lines to a real InfluxDB 1.6.7 (the Debian
package) and reading back what it stored (SHOW MEASUREMENTS / TAG KEYS / FIELD KEYS and
SELECT ... GROUP BY *); the integration tests keep checking them with generated values.

Escaping (outside string values the backslash itself is never escaped: the server does not
unescape ``\\\\`` there, so ``a\\b`` is written and stored as it is)

- measurement: ``,`` and space become ``\\,`` and ``\\ ``.
- tag keys, tag values, field keys: ``,``, ``=`` and space become ``\\,``, ``\\=``, ``\\ ``.
- string field values: double-quoted; ``"`` becomes ``\\"`` and ``\\`` becomes ``\\\\``.
  Everything else (spaces, ``,``, ``=``, newlines, tabs, other control characters, CJK text)
  is carried verbatim inside the quotes; the server stores all of it exactly.
- integers: decimal with the ``i`` suffix, within int64 (``9223372036854775808i`` -> 400).
- floats: ``repr`` (shortest round-tripping form, so ``1.0`` stays ``1.0`` and ``1e+16`` is
  accepted by the server's parser); NaN and infinities have no line protocol form (400).
- booleans: ``true`` / ``false``.
- tags are sorted by key (the order the server stores them in; it saves the server a sort).
- the timestamp is in milliseconds (the writer uses ``precision=ms``) and must lie in the
  server's time range, ±9223372036854 ms (one more -> 400 "time outside range").

What is refused, and what the server does without the refusal

- a point without fields -> 400 "invalid field format".
- an empty measurement, tag key or field key -> 400 "invalid field format" / "missing tag
  key" / "missing field key".
- an empty tag value is *omitted* rather than refused: the server rejects ``t=`` (400 "missing
  tag value"), and a tag that is absent reads back as ``""`` in InfluxQL, so dropping it is the
  exact representation of an empty tag.
- a line feed in a measurement, tag key, tag value or field key splits the line (400, or a
  partial write of a truncated series). The other C0/C1 control characters (tab, CR, NUL,
  U+0085, ...) were observed to survive 1.6.7's line protocol, but are refused as well, as a
  policy: InfluxQL cannot quote CR or NUL at all (1.6.7 answers "error parsing query"), so such
  a tag could never be selected again; and none of them is legitimate in a name or a tag, where
  they only make two series look identical.
- a measurement starting with ``#``: the server takes the line for a comment, answers 204 and
  stores nothing. ``\\#`` is not an escape (it is stored as ``\\#``), so it cannot be carried.
- a trailing backslash in a measurement, tag key, tag value or field key: it escapes the
  separator that follows (400 "invalid tag format" / "invalid field format").
- in a measurement or field key, a backslash followed by ``,``, ``=``, space or ``"``: the
  server unescapes these pairs there even when we did not escape them (field key ``a\\"b`` is
  stored as ``a"b``; written as ``a\\\\,b``, measurement ``a\\,b`` is stored as ``a,b`` and
  field key ``a\\,b`` is refused). No spelling tried stores ``\\,``, ``\\=`` or ``\\ `` in
  a field key; the spellings that work elsewhere are irregular (measurements seem to be
  unescaped twice), so all four pairs are refused in both places. Tag keys and tag values *do*
  carry them exactly with the plain rule (``a\\,b`` is written ``a\\\\,b``).
- tag key or field key ``time`` (exactly, case-sensitive): the server refuses the tag key
  (400) and silently *drops* such a field when the point has other fields (204).
- the same key as both a tag and a field: stored, but InfluxQL cannot tell the two apart in
  ``WHERE`` or ``SELECT`` without ``::tag`` / ``::field``; always a modelling mistake here.
- a series key too long: for every field, the escaped UTF-8 series key
  (measurement plus tags) + 4 + the escaped field key must fit in 65535 bytes (the server's
  ``series#!~#field`` limit; one byte more -> 400 "max key length exceeded").
- a lone surrogate anywhere (not encodable as UTF-8).
- non-finite floats, integers outside int64, values of any other type (``None`` included).

String field values have no length limit here; 1.6.7 stored a 1 MB string exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fleet_server.errors import FleetServerError

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_TS_MS",
    "MIN_TS_MS",
    "FieldValue",
    "LineProtocolError",
    "Point",
    "encode_point",
    "encode_points",
    "field_prefix",
    "field_text",
    "series_key",
    "timestamp",
]

FieldValue = float | int | bool | str

MAX_KEY_BYTES = 65535
"""The server's limit on ``series key + "#!~#" + field key`` in bytes, escaped."""

MAX_TS_MS = 9_223_372_036_854
"""The latest timestamp the server stores, in ms (its limit is int64 ns minus 2)."""

MIN_TS_MS = -MAX_TS_MS

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_FIELD_KEY_SUFFIX_BYTES = len("#!~#")
_RESERVED_KEY = "time"
_SHOW_CHARS = 60

_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_STRING_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\"})
# Pairs the server unescapes in measurements and field keys whether or not we escaped them.
_UNCARRIED_PAIRS = ("\\,", "\\=", "\\ ", '\\"')
# Unicode category Cc (C0 and C1 controls), and lone surrogates (not encodable as UTF-8).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


#: A point's series key (measurement and tags) and its fields' ``key=`` prefixes, checked.
_Shape = tuple[bytes, tuple[str, ...]]


class LineProtocolError(FleetServerError, ValueError):
    """A point that line protocol cannot carry exactly; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class Point:
    """One sample: a measurement, its tags and fields, at the agent's timestamp (ms).

    Tags and fields are copied into read-only mappings, so a point cannot change after it was
    checked. Raises `LineProtocolError` if the point cannot be written exactly.
    """

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    ts_ms: int
    _line: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", MappingProxyType(dict(self.tags)))
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))
        object.__setattr__(self, "_line", _encode(self))


def encode_point(point: Point) -> bytes:
    """The point as one line of line protocol, UTF-8, without a trailing newline."""
    return point._line  # noqa: SLF001 - encoded and checked once, by Point itself


def encode_points(points: Iterable[Point]) -> bytes:
    """The points as a write body: lines separated by newlines (empty input -> b"")."""
    return b"\n".join(point._line for point in points)  # noqa: SLF001


# --- pieces of lines, for encoders that know their schema (fleet_server.telemetry_lines) ------
#
# `Point` checks everything about every point it is given. An encoder whose measurements and
# field keys are fixed, and whose values are typed by a decoded schema, can check the names
# once and then build lines from these pieces, with the same rules and the same refusals.

_SERIES: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}


def series_key(measurement: str, tags: tuple[tuple[str, str], ...]) -> str:
    """The escaped series key (measurement and tags, sorted) exactly as `Point` writes it.

    Raises `LineProtocolError` as `Point` would. Checked once per distinct key and kept, up to
    `MAX_CACHED_SHAPES` of them (past that, checked every time)."""
    key = (measurement, tags)
    known = _SERIES.get(key)
    if known is None:
        known = _check_series_key(measurement, tags).decode()
        if len(_SERIES) < MAX_CACHED_SHAPES:
            _SERIES[key] = known
    return known


def field_prefix(key: str, measurement: str) -> str:
    """``key=`` with the key checked and escaped, for a field of ``measurement``."""
    where = _where(measurement)
    checked = _check_key(key, "field key", where, pairs_uncarried=True)
    return f"{checked.translate(_KEY_ESCAPES)}="


def field_text(value: object, key: str, measurement: str) -> str:
    """A field value as line protocol, or `LineProtocolError` naming the field and why."""
    return _field_value(value, key, _where(measurement))


def timestamp(ts_ms: int, measurement: str) -> int:
    """``ts_ms`` if InfluxDB can store it, else `LineProtocolError`."""
    return _checked_ts_value(ts_ms, measurement)


def _encode(point: Point) -> bytes:
    fields = point.fields
    shape = (point.measurement, tuple(point.tags.items()), tuple(fields))
    try:
        known = _SHAPES.get(shape)
    except TypeError:  # something unhashable, so not text: the full check refuses it
        known = _check_shape(point)
    if known is None:
        known = _check_shape(point)
        if len(_SHAPES) < MAX_CACHED_SHAPES:
            _SHAPES[shape] = known
    series_key, prefixes = known
    # The keys are known to be good: only the values are left to check, in the same order.
    encoded_fields: list[str] = []
    for prefix, (key, value) in zip(prefixes, fields.items(), strict=True):
        # The common types first; anything else (and every refusal) takes the general path.
        if type(value) is float and math.isfinite(value):
            encoded_fields.append(f"{prefix}{value!r}")
        elif type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
            encoded_fields.append(f"{prefix}{value}i")
        elif type(value) is bool:
            encoded_fields.append(prefix + ("true" if value else "false"))
        else:
            encoded_fields.append(prefix + _field_value(value, key, _where(point.measurement)))
    return series_key + f" {','.join(encoded_fields)} {_checked_ts(point)}".encode()


# A fleet has few measurements and field keys, and one tag set per terminal and series: the
# names of each such shape are checked and escaped once and kept (up to a bound; past it, the
# rest is checked every time). Only what passed is kept, so anything refused is refused the
# same way every time.
_SHAPES: dict[tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]], _Shape] = {}
_PREFIXES: dict[tuple[str, ...], tuple[str, ...]] = {}
MAX_CACHED_SHAPES = 32_768


def _check_shape(point: Point) -> _Shape:
    """Check the whole point, in order: measurement, tags, each field key and its value, the
    timestamp; raise the first problem found. Its series key and its ``key=`` prefixes."""
    series_key = _check_series_key(point.measurement, tuple(point.tags.items()))
    where = _where(point.measurement)
    if not point.fields:
        raise LineProtocolError(f"{where}: a point needs at least one field")
    prefixes: list[str] = []
    for raw_key, value in point.fields.items():
        key = _check_key(raw_key, "field key", where, pairs_uncarried=True)
        if key in point.tags:
            raise LineProtocolError(
                f"{where}: {_show(key)} is both a tag and a field key; InfluxQL cannot tell "
                "them apart"
            )
        escaped_key = key.translate(_KEY_ESCAPES)
        key_bytes = len(series_key) + _FIELD_KEY_SUFFIX_BYTES + len(escaped_key.encode())
        if key_bytes > MAX_KEY_BYTES:
            raise LineProtocolError(
                f"{where}: series key with field {_show(key)} is {key_bytes} bytes, "
                f"more than InfluxDB's {MAX_KEY_BYTES}"
            )
        _field_value(value, key, where)
        prefixes.append(f"{escaped_key}=")
    _checked_ts(point)
    shared = tuple(prefixes)
    return series_key, _PREFIXES.setdefault(shared, shared)


def _checked_ts(point: Point) -> int:
    return _checked_ts_value(point.ts_ms, point.measurement)


def _checked_ts_value(ts_ms: object, measurement: str) -> int:
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int):
        raise LineProtocolError(
            f"{_where(measurement)}: ts_ms must be an int, not {type(ts_ms).__name__}"
        )
    if not MIN_TS_MS <= ts_ms <= MAX_TS_MS:
        raise LineProtocolError(
            f"{_where(measurement)}: ts_ms {ts_ms} is outside InfluxDB's range "
            f"{MIN_TS_MS}..{MAX_TS_MS}"
        )
    return int(ts_ms)


def _check_series_key(measurement: str, tags: tuple[tuple[str, str], ...]) -> bytes:
    name = _check_name(measurement, "measurement", "point", pairs_uncarried=True)
    where = _where(name)
    if name.startswith("#"):
        raise LineProtocolError(
            f"{where}: starts with '#', so InfluxDB would take the line for a comment"
        )
    checked: dict[str, str] = {}
    for raw_key, raw_value in tags:
        key = _check_key(raw_key, "tag key", where, pairs_uncarried=False)
        value: object = raw_value
        if not isinstance(value, str):
            raise LineProtocolError(
                f"{where}: tag {_show(key)} must be a str, not {type(value).__name__}"
            )
        if value == "":
            continue  # an absent tag reads back as "", and the server refuses "t="
        label = f"tag {_show(key)} value {_show(value)}"
        _check_text(value, label, where, names=True)
        if value.endswith("\\"):
            raise LineProtocolError(
                f"{where}: {label} ends with a backslash, which would escape the separator after it"
            )
        checked[key] = value
    return "".join(
        [
            name.translate(_MEASUREMENT_ESCAPES),
            *(
                f",{key.translate(_KEY_ESCAPES)}={checked[key].translate(_KEY_ESCAPES)}"
                for key in sorted(checked)
            ),
        ]
    ).encode()


def _where(measurement: str) -> str:
    """How error messages name the point: by its measurement (checked before anything else)."""
    return f"measurement {_show(measurement)}"


def _field_value(value: object, key: str, where: str) -> str:
    # bool before int: bool is an int subclass.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise LineProtocolError(f"{where}: field {_show(key)} integer {value} is outside int64")
        return f"{int(value)}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LineProtocolError(
                f"{where}: field {_show(key)} is {value!r}; line protocol has no NaN or infinity"
            )
        return repr(float(value))
    if isinstance(value, str):
        _check_text(value, f"field {_show(key)} string value", where, names=False)
        return f'"{value.translate(_STRING_ESCAPES)}"'
    raise LineProtocolError(
        f"{where}: field {_show(key)} must be float, int, bool or str, not {type(value).__name__}"
    )


def _check_name(name: object, what: str, where: str, *, pairs_uncarried: bool) -> str:
    """Check a measurement, tag key or field key; return it typed as str."""
    if not isinstance(name, str):
        raise LineProtocolError(f"{where}: {what} must be a str, not {type(name).__name__}")
    if name == "":
        raise LineProtocolError(f"{where}: empty {what}")
    label = f"{what} {_show(name)}"
    _check_text(name, label, where, names=True)
    if name.endswith("\\"):
        raise LineProtocolError(
            f"{where}: {label} ends with a backslash, which would escape the separator after it"
        )
    if pairs_uncarried:
        for pair in _UNCARRIED_PAIRS:
            if pair in name:
                raise LineProtocolError(
                    f"{where}: {label} contains {pair!r}, which InfluxDB unescapes on its own "
                    "and cannot store"
                )
    return name


def _check_key(key: object, what: str, where: str, *, pairs_uncarried: bool) -> str:
    """Check a tag key or field key: a name that must not be InfluxDB's own "time"."""
    name = _check_name(key, what, where, pairs_uncarried=pairs_uncarried)
    if name == _RESERVED_KEY:
        raise LineProtocolError(f"{where}: {what} 'time' is reserved by InfluxDB")
    return name


def _check_text(text: str, label: str, where: str, *, names: bool) -> None:
    """Refuse text that is not UTF-8, and control characters in names and tag values."""
    surrogate = _SURROGATE.search(text)
    if surrogate is not None:
        raise LineProtocolError(
            f"{where}: {label} has a lone surrogate at {surrogate.start()}; not UTF-8 text"
        )
    if names:
        control = _CONTROL.search(text)
        if control is not None:
            raise LineProtocolError(
                f"{where}: {label} contains control character {control.group()!r} at "
                f"{control.start()}; line protocol names and tag values cannot carry them"
            )


def _show(text: str) -> str:
    """repr() of a possibly huge user value, cut to a readable length for messages."""
    if len(text) <= _SHOW_CHARS:
        return repr(text)
    return repr(text[:_SHOW_CHARS]) + f"... ({len(text)} chars)"
