"""The NUT network protocol (``upsd``, TCP port 3493), sans-IO.

Requests are built as bytes (:func:`list_var`, :func:`get_var`, :func:`list_ups`,
:func:`username`, :func:`password`, :func:`logout`); each answer is read by a receiver that is
fed whatever chunks the socket returned and gives back the decoded answer once it is complete
(:class:`firmware_bridge.link.Receiver`). Lines are bounded (:data:`MAX_LINE_BYTES`), lists too
(:data:`MAX_LIST_LINES`), so a confused or hostile peer cannot make us buffer without end.

What ``upsd`` sends and what it becomes:

* ``BEGIN LIST VAR <ups>`` … ``VAR <ups> <name> "<value>"`` … ``END LIST VAR <ups>``: the
  variables, checked to be about the UPS we asked for; values are quoted with ``\\"`` and
  ``\\\\`` escapes.
* ``ERR <code>``: the UPS is not there or upsd refused. Three codes say something about the UPS
  rather than about our request:

  - ``UNKNOWN-UPS`` → :class:`DeviceUnavailable` ``ups_unknown`` (*absent*: upsd has no such
    UPS configured; usually a wrong name in the kiosk profile);
  - ``DRIVER-NOT-CONNECTED`` → :class:`DeviceUnavailable` ``ups_driver_not_connected``
    (*absent*: the driver that talks to the UPS is not running — unplugged USB cable, stopped
    service);
  - ``DATA-STALE`` → :class:`RequestRefused` ``ups_data_stale`` (*faulty*, not absent): the
    driver runs but has lost contact with the UPS hardware, and upsd refuses to hand out old
    readings. Village staff should hear "the UPS is connected but not reporting" — a faulty
    link to a UPS that is there, to be checked on site — rather than "no UPS". It is not a
    :class:`ProtocolViolation` because upsd's bytes are perfectly correct.

  Every other code → :class:`RequestRefused` ``nut_<code>`` (``ACCESS-DENIED`` →
  ``nut_access_denied``).
* Anything else that breaks the protocol → :class:`ProtocolViolation` with a specific reason:
  ``overlong``, ``too_many_lines``, ``bad_encoding``, ``bad_quoting``, ``bad_escape``,
  ``unexpected_line``, ``wrong_ups``, ``bad_variable_name``, ``duplicate_variable``,
  ``bad_error_line``, ``trailing_data``, and for variable values ``bad_number`` /
  ``number_out_of_range`` (the message names the variable).

:func:`status_from_variables` turns the variables into an :class:`UpsStatus`, :func:`assess`
into a health, and :func:`events_between` / :class:`UpsEventTracker` into the events the agent
reports on change.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from firmware_bridge.errors import (
    BridgeError,
    ConfigError,
    DeviceUnavailable,
    ProtocolViolation,
    RequestRefused,
)
from firmware_bridge.health import Assessment, Health, worst

MAX_LINE_BYTES: Final = 1024
"""Longest line accepted, without its newline; upsd's own limit for a value is far below."""
MAX_LIST_LINES: Final = 1024
"""Most lines in one list; a real UPS has fewer than 150 variables."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9\-]{0,39}")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_BARE_SAFE = re.compile(r"[^\s\"\\]+")

# ERR codes that say the UPS itself cannot be read, with the error each becomes; see the module
# docstring for why stale data is faulty and not absent.
_UPS_ERRORS: Final[Mapping[str, tuple[type[BridgeError], str, str]]] = {
    "UNKNOWN-UPS": (DeviceUnavailable, "ups_unknown", "upsd does not know this UPS"),
    "DRIVER-NOT-CONNECTED": (
        DeviceUnavailable,
        "ups_driver_not_connected",
        "the UPS driver is not running or not connected to upsd",
    ),
    "DATA-STALE": (
        RequestRefused,
        "ups_data_stale",
        "the UPS driver has lost contact with the UPS; upsd withholds stale data",
    ),
}


# --- requests ---------------------------------------------------------------------------------


def check_name(value: str, field: str) -> str:
    """A UPS or variable name as upsd spells it; ``ConfigError`` naming ``field`` otherwise."""
    if not _NAME.fullmatch(value):
        raise ConfigError(
            f"{field}: {value!r} is not a NUT name (letters, digits, '_', '-', '.'; at most 128)"
        )
    return value


def list_var(ups: str) -> bytes:
    """``LIST VAR <ups>``: every variable of one UPS."""
    return f"LIST VAR {check_name(ups, 'ups_name')}\n".encode("ascii")


def get_var(ups: str, variable: str) -> bytes:
    """``GET VAR <ups> <variable>``: one variable."""
    ups, variable = check_name(ups, "ups_name"), check_name(variable, "variable")
    return f"GET VAR {ups} {variable}\n".encode("ascii")


def list_ups() -> bytes:
    """``LIST UPS``: the UPSes upsd serves, with their descriptions."""
    return b"LIST UPS\n"


def username(name: str) -> bytes:
    """``USERNAME <name>``; only needed for writes and instant commands, never for reads."""
    return f"USERNAME {_argument(name, 'username')}\n".encode()


def password(secret: str) -> bytes:
    """``PASSWORD <secret>``, sent after :func:`username`."""
    return f"PASSWORD {_argument(secret, 'password')}\n".encode()


def logout() -> bytes:
    """``LOGOUT``: upsd answers ``OK Goodbye`` and closes the connection."""
    return b"LOGOUT\n"


def quote(value: str) -> str:
    """``value`` as a NUT quoted string: ``"`` and ``\\`` escaped with a backslash."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _argument(value: str, field: str) -> str:
    if not value or len(value.encode()) > 255 or any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ConfigError(f"{field}: must be 1 to 255 bytes without control characters")
    return value if _BARE_SAFE.fullmatch(value) else quote(value)


# --- reading lines ----------------------------------------------------------------------------


def split_line(line: str) -> tuple[str, ...]:
    """The words of one line: separated by blanks; a quoted word may hold blanks and escapes."""
    words: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] in " \t":
            i += 1
            continue
        if line[i] == '"':
            i += 1
            word: list[str] = []
            while True:
                if i >= n:
                    raise ProtocolViolation(f"unterminated quote in {line!r}", reason="bad_quoting")
                c = line[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    if i + 1 >= n or line[i + 1] not in '"\\':
                        raise ProtocolViolation(
                            f"undefined escape at column {i} of {line!r}", reason="bad_escape"
                        )
                    word.append(line[i + 1])
                    i += 2
                    continue
                word.append(c)
                i += 1
            if i < n and line[i] not in " \t":
                raise ProtocolViolation(
                    f"no blank after a quoted word in {line!r}", reason="bad_quoting"
                )
            words.append("".join(word))
            continue
        start = i
        while i < n and line[i] not in " \t":
            if line[i] in '"\\':
                raise ProtocolViolation(
                    f"quote or backslash inside a bare word in {line!r}", reason="bad_quoting"
                )
            i += 1
        words.append(line[start:i])
    return tuple(words)


class _Lines:
    """Cuts a byte stream into bounded, decoded lines."""

    def __init__(self, max_line_bytes: int) -> None:
        self._max = max_line_bytes
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        lines: list[str] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max:
                    raise ProtocolViolation(
                        f"a line longer than {self._max} bytes", reason="overlong"
                    )
                return lines
            if end > self._max:
                raise ProtocolViolation(
                    f"a line of {end} bytes, more than {self._max}", reason="overlong"
                )
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if raw.endswith(b"\r"):  # tolerated: some proxies in front of upsd send CRLF
                raw = raw[:-1]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtocolViolation(
                    f"a line that is not UTF-8: {raw!r}", reason="bad_encoding"
                ) from exc
            if any(ord(c) < 0x20 and c != "\t" for c in text):
                raise ProtocolViolation(f"a control character in {text!r}", reason="bad_encoding")
            lines.append(text)


def error_from(words: tuple[str, ...]) -> BridgeError:
    """The error an ``ERR <code> [<extra>…]`` line means (see the module docstring)."""
    if len(words) < 2 or words[0] != "ERR" or not _ERROR_CODE.fullmatch(words[1]):
        raise ProtocolViolation(
            f"malformed error line {' '.join(words)!r}", reason="bad_error_line"
        )
    code, extra = words[1], " ".join(words[2:])
    suffix = f" ({extra})" if extra else ""
    if code in _UPS_ERRORS:
        cls, reason, text = _UPS_ERRORS[code]
        return cls(f"upsd: ERR {code}: {text}{suffix}", reason=reason)
    return RequestRefused(
        f"upsd refused the request: ERR {code}{suffix}",
        reason="nut_" + code.lower().replace("-", "_"),
    )


class _Answer:
    """Shared core of the receivers: bounded lines, one answer, nothing after it."""

    def __init__(self, max_line_bytes: int) -> None:
        self._lines = _Lines(max_line_bytes)
        self._done = False

    def _feed_lines(self, data: bytes) -> bool:
        """Feed ``data`` line by line to ``_line``; true once the answer is complete."""
        if self._done:
            raise ProtocolViolation("bytes after the complete answer", reason="trailing_data")
        for line in self._lines.feed(data):
            if self._done:
                raise ProtocolViolation(
                    f"a line after the answer: {line!r}", reason="trailing_data"
                )
            words = split_line(line)
            if words and words[0] == "ERR" and self._error_allowed():
                raise error_from(words)
            self._done = self._line(line, words)
        if self._done and self._lines.pending:
            raise ProtocolViolation("bytes after the complete answer", reason="trailing_data")
        return self._done

    def _error_allowed(self) -> bool:
        return True

    def _line(self, line: str, words: tuple[str, ...]) -> bool:
        raise NotImplementedError


class _ListAnswer(_Answer):
    """``BEGIN LIST <query>`` … items … ``END LIST <query>``, with a bound on the lines."""

    def __init__(self, query: tuple[str, ...], max_line_bytes: int, max_lines: int) -> None:
        super().__init__(max_line_bytes)
        self._query = query
        self._max_lines = max_lines
        self._count = 0
        self._open = False

    def _error_allowed(self) -> bool:
        # upsd answers a request either with an error or with a list, never an error inside one.
        return not self._open

    def _line(self, line: str, words: tuple[str, ...]) -> bool:
        self._count += 1
        if self._count > self._max_lines:
            raise ProtocolViolation(
                f"a list of more than {self._max_lines} lines", reason="too_many_lines"
            )
        query = " ".join(self._query)
        if not self._open:
            if words[:2] != ("BEGIN", "LIST") or words[2:3] != self._query[:1]:
                raise ProtocolViolation(
                    f"expected 'BEGIN LIST {query}', got {line!r}", reason="unexpected_line"
                )
            self._check_query(words[2:], line)
            self._open = True
            return False
        if words[:2] == ("END", "LIST"):
            if words[2:3] != self._query[:1]:
                raise ProtocolViolation(
                    f"expected 'END LIST {query}', got {line!r}", reason="unexpected_line"
                )
            self._check_query(words[2:], line)
            return True
        self._item(line, words)
        return False

    def _check_query(self, words: tuple[str, ...], line: str) -> None:
        if len(words) != len(self._query):
            raise ProtocolViolation(f"malformed list frame {line!r}", reason="unexpected_line")
        if words != self._query:
            raise ProtocolViolation(
                f"a list about {' '.join(words[1:])!r}, not {' '.join(self._query[1:])!r}: "
                f"{line!r}",
                reason="wrong_ups",
            )

    def _item(self, line: str, words: tuple[str, ...]) -> None:
        raise NotImplementedError


class VarListReceiver(_ListAnswer):
    """Reads the answer to :func:`list_var`: the UPS's variables by name."""

    def __init__(
        self,
        ups: str,
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_lines: int = MAX_LIST_LINES,
    ) -> None:
        super().__init__(("VAR", check_name(ups, "ups_name")), max_line_bytes, max_lines)
        self.ups = ups
        self._variables: dict[str, str] = {}

    def feed(self, data: bytes) -> dict[str, str] | None:
        return dict(self._variables) if self._feed_lines(data) else None

    def _item(self, line: str, words: tuple[str, ...]) -> None:
        if len(words) != 4 or words[0] != "VAR":
            raise ProtocolViolation(
                f"expected 'VAR {self.ups} <name> \"<value>\"', got {line!r}",
                reason="unexpected_line",
            )
        if words[1] != self.ups:
            raise ProtocolViolation(
                f"a variable of UPS {words[1]!r}, not {self.ups!r}: {line!r}", reason="wrong_ups"
            )
        name = words[2]
        if not _NAME.fullmatch(name):
            raise ProtocolViolation(f"variable name {name!r}", reason="bad_variable_name")
        if name in self._variables:
            raise ProtocolViolation(f"variable {name} sent twice", reason="duplicate_variable")
        self._variables[name] = words[3]


@dataclass(frozen=True, slots=True)
class UpsEntry:
    """One line of ``LIST UPS``."""

    name: str
    description: str


class UpsListReceiver(_ListAnswer):
    """Reads the answer to :func:`list_ups`."""

    def __init__(
        self, *, max_line_bytes: int = MAX_LINE_BYTES, max_lines: int = MAX_LIST_LINES
    ) -> None:
        super().__init__(("UPS",), max_line_bytes, max_lines)
        self._entries: list[UpsEntry] = []

    def feed(self, data: bytes) -> tuple[UpsEntry, ...] | None:
        return tuple(self._entries) if self._feed_lines(data) else None

    def _item(self, line: str, words: tuple[str, ...]) -> None:
        if len(words) != 3 or words[0] != "UPS" or not _NAME.fullmatch(words[1]):
            raise ProtocolViolation(
                f"expected 'UPS <name> \"<description>\"', got {line!r}", reason="unexpected_line"
            )
        self._entries.append(UpsEntry(words[1], words[2]))


class VarReceiver(_Answer):
    """Reads the answer to :func:`get_var`: ``VAR <ups> <variable> "<value>"``."""

    def __init__(self, ups: str, variable: str, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        super().__init__(max_line_bytes)
        self.ups = check_name(ups, "ups_name")
        self.variable = check_name(variable, "variable")
        self._value: str | None = None

    def feed(self, data: bytes) -> str | None:
        return self._value if self._feed_lines(data) else None

    def _line(self, line: str, words: tuple[str, ...]) -> bool:
        if len(words) != 4 or words[0] != "VAR":
            raise ProtocolViolation(
                f"expected 'VAR {self.ups} {self.variable} \"<value>\"', got {line!r}",
                reason="unexpected_line",
            )
        if words[1] != self.ups:
            raise ProtocolViolation(f"an answer about UPS {words[1]!r}", reason="wrong_ups")
        if words[2] != self.variable:
            raise ProtocolViolation(
                f"an answer about {words[2]!r}, not {self.variable!r}", reason="unexpected_line"
            )
        self._value = words[3]
        return True


class OkReceiver(_Answer):
    """Reads ``OK …`` (USERNAME, PASSWORD) or, for LOGOUT, also the older ``Goodbye...``."""

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        super().__init__(max_line_bytes)
        self._text = ""

    def feed(self, data: bytes) -> str | None:
        return self._text if self._feed_lines(data) else None

    def _line(self, line: str, words: tuple[str, ...]) -> bool:
        if words[:1] not in (("OK",), ("Goodbye...",)):
            raise ProtocolViolation(f"expected 'OK', got {line!r}", reason="unexpected_line")
        self._text = line
        return True


# --- status -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpsStatus:
    """What one ``LIST VAR`` says about a UPS. Numbers a UPS does not report are ``None``."""

    ups: str
    flags: tuple[str, ...]
    """``ups.status`` as sent, word by word (``("OB", "DISCHRG", "LB")``)."""
    on_mains: bool
    on_battery: bool
    low_battery: bool
    replace_battery: bool
    charging: bool
    overload: bool
    bypass: bool
    off: bool
    fsd: bool
    battery_charge: float | None = None
    """Percent."""
    runtime_s: float | None = None
    """Estimated runtime on battery, seconds."""
    load: float | None = None
    """Percent of the rated output."""
    input_voltage: float | None = None
    output_voltage: float | None = None
    manufacturer: str | None = None
    model: str | None = None

    @property
    def power_known(self) -> bool:
        """Whether the UPS says where its power comes from (``OL`` or ``OB``)."""
        return self.on_mains or self.on_battery


# flag → field of UpsStatus; see the NUT developer guide, "status data".
_FLAGS: Final[Mapping[str, str]] = {
    "OL": "on_mains",
    "OB": "on_battery",
    "LB": "low_battery",
    "RB": "replace_battery",
    "CHRG": "charging",
    "OVER": "overload",
    "BYPASS": "bypass",
    "OFF": "off",
    "FSD": "fsd",
}

# variable, field, lowest, highest
_NUMBERS: Final = (
    ("battery.charge", "battery_charge", 0.0, 100.0),
    ("battery.runtime", "runtime_s", 0.0, None),
    ("ups.load", "load", 0.0, None),
    ("input.voltage", "input_voltage", 0.0, None),
    ("output.voltage", "output_voltage", 0.0, None),
)


def status_from_variables(ups: str, variables: Mapping[str, str]) -> UpsStatus:
    """The typed status in ``variables`` (from :class:`VarListReceiver`).

    A missing ``ups.status`` gives no flags, which :func:`assess` reports as unknown; a number
    that does not parse or is out of its range is a ``ProtocolViolation`` naming the variable.
    """
    flags = tuple(variables.get("ups.status", "").split())
    present = {field: flag in flags for flag, field in _FLAGS.items()}
    numbers = {field: _number(variables, name, low, high) for name, field, low, high in _NUMBERS}
    return UpsStatus(
        ups=ups,
        flags=flags,
        on_mains=present["on_mains"],
        on_battery=present["on_battery"],
        low_battery=present["low_battery"],
        replace_battery=present["replace_battery"],
        charging=present["charging"],
        overload=present["overload"],
        bypass=present["bypass"],
        off=present["off"],
        fsd=present["fsd"],
        battery_charge=numbers["battery_charge"],
        runtime_s=numbers["runtime_s"],
        load=numbers["load"],
        input_voltage=numbers["input_voltage"],
        output_voltage=numbers["output_voltage"],
        manufacturer=variables.get("ups.mfr", variables.get("device.mfr")),
        model=variables.get("ups.model", variables.get("device.model")),
    )


def _number(
    variables: Mapping[str, str], name: str, low: float, high: float | None
) -> float | None:
    text = variables.get(name)
    if text is None:
        return None
    # NUT numbers are plain decimals with a dot: no exponent, no thousands separator.
    if not _NUMBER.fullmatch(text.strip()):
        raise ProtocolViolation(f"{name}: {text!r} is not a number", reason="bad_number")
    value = float(text)
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bounds = f"[{low:g}, {high:g}]" if high is not None else f"at least {low:g}"
        raise ProtocolViolation(f"{name}: {text} is outside {bounds}", reason="number_out_of_range")
    return value


def assess(status: UpsStatus) -> Assessment:
    """The UPS's health; several conditions give the worst of them with all its reasons.

    On battery, replace battery, overload and bypass are *degraded* (the kiosk still runs);
    low battery or forced shutdown, output off and an unknown power source are *faulty*.
    """
    found: list[Assessment] = []
    if not status.power_known:
        shown = " ".join(status.flags) or "missing"
        detail = f"ups.status {shown}: neither on mains (OL) nor on battery (OB)"
        if "WAIT" in status.flags:
            detail += "; upsd is waiting for the driver's first data"
        found.append(Assessment(Health.FAULTY, ("ups_status_unknown",), detail))
    if status.on_battery:
        found.append(Assessment(Health.DEGRADED, ("on_battery",), "on battery" + _reserve(status)))
    if status.low_battery or status.fsd:
        what = "forced shutdown" if status.fsd else "battery low"
        found.append(Assessment(Health.FAULTY, ("low_battery",), what + _reserve(status)))
    if status.replace_battery:
        found.append(Assessment(Health.DEGRADED, ("replace_battery",), "battery needs replacing"))
    if status.overload:
        load = f" ({status.load:g}%)" if status.load is not None else ""
        found.append(Assessment(Health.DEGRADED, ("overload",), f"output overloaded{load}"))
    if status.bypass:
        found.append(Assessment(Health.DEGRADED, ("bypass",), "on bypass: load not protected"))
    if status.off:
        found.append(Assessment(Health.FAULTY, ("ups_off",), "UPS output is off"))
    if not found:
        return Assessment(Health.OK, (), "on mains" + _reserve(status))
    return worst(*found)


def _reserve(status: UpsStatus) -> str:
    parts = []
    if status.battery_charge is not None:
        parts.append(f"{status.battery_charge:g}% charge")
    if status.runtime_s is not None:
        parts.append(f"{status.runtime_s:g} s runtime")
    return f", {', '.join(parts)}" if parts else ""


# --- events -----------------------------------------------------------------------------------


class UpsEvent(enum.StrEnum):
    """A change the agent reports once, when it happens; values are stable codes."""

    MAINS_LOST = "mains_lost"
    MAINS_RESTORED = "mains_restored"
    LOW_BATTERY = "low_battery"
    BATTERY_RECOVERED = "battery_recovered"
    REPLACE_BATTERY = "replace_battery"
    OVERLOAD = "overload"
    OVERLOAD_CLEARED = "overload_cleared"


def _low(status: UpsStatus) -> bool:
    return status.low_battery or status.fsd


# condition, event when it starts, event when it ends (None: not reported)
_CONDITIONS: Final[tuple[tuple[Callable[[UpsStatus], bool], UpsEvent, UpsEvent | None], ...]] = (
    (lambda s: s.on_battery, UpsEvent.MAINS_LOST, UpsEvent.MAINS_RESTORED),
    (_low, UpsEvent.LOW_BATTERY, UpsEvent.BATTERY_RECOVERED),
    (lambda s: s.replace_battery, UpsEvent.REPLACE_BATTERY, None),
    (lambda s: s.overload, UpsEvent.OVERLOAD, UpsEvent.OVERLOAD_CLEARED),
)


def events_between(previous: UpsStatus | None, current: UpsStatus) -> tuple[UpsEvent, ...]:
    """The events from one reading to the next, in a fixed order.

    A reading without a known power source (``WAIT``, empty status) says nothing about the
    UPS and gives no events. With no usable previous reading, only the conditions present now
    are reported (a kiosk that starts during an outage reports ``mains_lost``), never their
    ends.
    """
    if not current.power_known:
        return ()
    baseline = previous if previous is not None and previous.power_known else None
    events: list[UpsEvent] = []
    for condition, starts, ends in _CONDITIONS:
        now = condition(current)
        before = condition(baseline) if baseline is not None else False
        if now and not before:
            events.append(starts)
        elif before and not now and ends is not None:
            events.append(ends)
    return tuple(events)


class UpsEventTracker:
    """Events over a sequence of readings; ``None`` (a failed poll) and unknown readings are
    skipped, so an outage is ended by ``mains_restored`` even if upsd restarted in between."""

    def __init__(self) -> None:
        self._baseline: UpsStatus | None = None

    def update(self, status: UpsStatus | None) -> tuple[UpsEvent, ...]:
        if status is None or not status.power_known:
            return ()
        events = events_between(self._baseline, status)
        self._baseline = status
        return events
