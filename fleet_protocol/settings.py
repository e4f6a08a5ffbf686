"""Typed settings from TOML, validated once at the edge.

Both daemons describe their configuration as msgspec Structs; this turns TOML bytes into such a
record or a :class:`SettingsError` that names the file, the field and what is wrong, so an
operator can fix it without reading a traceback. Pure: the caller reads the file.
"""

from __future__ import annotations

import re
import tomllib
from typing import Final, TypeVar

import msgspec

from fleet_protocol.errors import ProtocolError
from fleet_protocol.ids import COMMAND_ID_PATTERN, COMMAND_ID_RULE, ID_RULE, TERMINAL_ID_PATTERN

T = TypeVar("T")

#: msgspec names the regex a string failed; operators get the rule in words instead.
_PATTERN_RULES: Final = {TERMINAL_ID_PATTERN: ID_RULE, COMMAND_ID_PATTERN: COMMAND_ID_RULE}
_REGEX_PROBLEM: Final = re.compile(r"matching regex '(?P<regex>.*)'")

_AT_PATH: Final = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


class SettingsError(ProtocolError):
    """A settings file that cannot be used."""

    def __init__(self, source: str, field: str | None, problem: str) -> None:
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.field = field
        self.problem = problem


def _field_path(path: str) -> str:
    # msgspec reports "$.broker.port" or "$.sites[2].town"; operators think "broker.port".
    return path.removeprefix(".")


def parse_toml(kind: type[T], data: bytes, source: str) -> T:
    """Decode TOML ``data`` (read from ``source``) into a ``kind`` record."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SettingsError(source, None, f"not UTF-8 text ({exc.reason})") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(source, None, f"not valid TOML: {exc}") from exc
    try:
        return msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        match = _AT_PATH.match(str(exc))
        if match is None:  # pragma: no cover - the pattern matches every string
            raise SettingsError(source, None, str(exc)) from exc
        path = match.group("path")
        field = _field_path(path) if path else None
        problem = match.group("problem")
        regex = _REGEX_PROBLEM.search(problem)
        # msgspec doubles the backslashes of the pattern it quotes.
        rule = regex and _PATTERN_RULES.get(regex["regex"].replace("\\\\", "\\"))
        if regex and rule:
            problem = f"{problem[: regex.start()]}of {rule}{problem[regex.end() :]}"
        raise SettingsError(source, field, problem) from exc
