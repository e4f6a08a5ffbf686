"""Who may act on the status page, and how they prove it. Pure: no web server, no event loop.

- :class:`StatusPageSettings` is the ``[status_page]`` section of the agent's config: where the
  page listens, which names it answers to, how long a login lasts, and the staff accounts.
- Passcodes are stored as scrypt hashes (stdlib ``hashlib.scrypt``), never in clear:
  ``scrypt$n$r$p$salt_b64$hash_b64``. ``kiosk-agent hash-passcode`` prints one for the config.
- :class:`LoginThrottle` locks a staff name, and separately a client address, after repeated
  wrong passcodes; :class:`StaffSessions` holds logged-in sessions in memory. Both run on an
  injected monotonic clock, so they are tested without sleeping.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

#: Shortest passcode accepted: a village kiosk sits in a public hall, so a 4-digit PIN is
#: guessed by anyone who watches twice.
MIN_PASSCODE_CHARS: Final = 8
MAX_PASSCODE_CHARS: Final = 256

# scrypt cost: 16 MiB and ~50 ms per check on a kiosk-class CPU, while making an offline guess
# at a stolen config file expensive. Kept in each hash, so it can be raised later.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16
_HASH_BYTES: Final = 32
# Bounds on the cost a hash in config may ask for: a typo must not make every login take
# minutes or exhaust the kiosk's memory.
_MAX_N: Final = 2**20
_MAX_R: Final = 32
_MAX_P: Final = 16
_MAX_MEM: Final = 256 * 1024 * 1024

HASH_FORMAT: Final = "scrypt$n$r$p$salt_b64$hash_b64"

_HOST_NAME: Final = re.compile(
    r"^(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z"
)

StaffName = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)]


@dataclass(frozen=True, slots=True)
class _Scrypt:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _decode_b64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _parse_hash(encoded: str) -> _Scrypt:
    """The parts of an encoded hash, or ValueError saying what is wrong with it."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError(
            f"a passcode hash looks like {HASH_FORMAT}; "
            "make one with `kiosk-agent hash-passcode` (never put the passcode itself in config)"
        )
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = _decode_b64(parts[4]), _decode_b64(parts[5])
    except (ValueError, binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"the passcode hash is damaged ({exc}); make a new one") from exc
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError(
            f"the passcode hash has unusable scrypt costs n={n} r={r} p={p}; make a new one"
        )
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("the passcode hash is too short to be one of ours; make a new one")
    return _Scrypt(n, r, p, salt, digest)


def _scrypt(passcode: str, *, n: int, r: int, p: int, salt: bytes, size: int) -> bytes:
    return hashlib.scrypt(
        passcode.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAX_MEM, dklen=size
    )


def hash_passcode(passcode: str) -> str:
    """The encoded scrypt hash of ``passcode`` for the config file (a new salt each time)."""
    if len(passcode) < MIN_PASSCODE_CHARS:
        raise ValueError(
            f"the passcode must have at least {MIN_PASSCODE_CHARS} characters "
            f"(it has {len(passcode)}); 口令至少需要 {MIN_PASSCODE_CHARS} 个字符"
        )
    if len(passcode) > MAX_PASSCODE_CHARS:
        raise ValueError(f"the passcode must have at most {MAX_PASSCODE_CHARS} characters")
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(passcode, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, salt=salt, size=_HASH_BYTES)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_passcode(passcode: str, encoded: str) -> bool:
    """Whether ``passcode`` matches ``encoded``; the comparison takes the same time either way.

    CPU-bound (tens of milliseconds): callers on an event loop run it in a thread.
    """
    try:
        parsed = _parse_hash(encoded)
    except ValueError:
        return False
    if len(passcode) > MAX_PASSCODE_CHARS:
        return False
    digest = _scrypt(
        passcode, n=parsed.n, r=parsed.r, p=parsed.p, salt=parsed.salt, size=len(parsed.digest)
    )
    return hmac.compare_digest(digest, parsed.digest)


#: Checked against when a login names nobody, so that a wrong name takes as long as a wrong
#: passcode.
_NOBODY: Final = (
    f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
    f"{base64.b64encode(bytes(_SALT_BYTES)).decode()}${base64.b64encode(bytes(_HASH_BYTES)).decode()}"
)


def verify_staff(passcode: str, account: StaffAccount | None) -> bool:
    """Whether ``account`` exists and ``passcode`` is its passcode, in the same time either way."""
    matched = verify_passcode(passcode, account.passcode_hash if account else _NOBODY)
    return matched and account is not None


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Unknown keys are errors in config: a typo must not silently fall back to a default."""


class StaffAccount(_Section, frozen=True, kw_only=True):
    """One member of the village staff who may act on this kiosk from its status page."""

    #: As shown on the login page, e.g. 王芳.
    name: StaffName
    #: From ``kiosk-agent hash-passcode``.
    passcode_hash: Annotated[str, msgspec.Meta(max_length=512)]

    def __post_init__(self) -> None:
        if self.name != self.name.strip() or not self.name.isprintable():
            raise ValueError(
                f"staff name {self.name!r} must be printable, without spaces at either end"
            )
        _parse_hash(self.passcode_hash)


def _listen_address(text: str) -> str:
    """``text`` if the page may listen on it, else ValueError saying why not and what to do."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"listen address {text!r} is not an IP address; "
            "use 127.0.0.1, ::1 or the kiosk's address on the site LAN"
        ) from None
    if address.is_unspecified:
        raise ValueError(
            f"listen address {text} would open the status page on every network, the internet "
            "side included; list 127.0.0.1 and the kiosk's address on the site LAN instead"
        )
    if address.is_loopback:
        if address not in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")):
            raise ValueError(f"listen address {text}: of the loopback addresses use 127.0.0.1")
        return text
    if address.is_link_local or address.is_multicast or not address.is_private:
        raise ValueError(
            f"listen address {text} is not a site LAN address (private range such as "
            "192.168.x.x, 10.x.x.x or 172.16-31.x.x, or an IPv6 fd00::/8 address); "
            "the status page must not be reachable from outside the site"
        )
    return text


class StatusPageSettings(_Section, frozen=True, kw_only=True):
    """``[status_page]``: the page village staff open on the kiosk or from the site LAN."""

    #: 127.0.0.1 / ::1 and the kiosk's LAN addresses; never 0.0.0.0 or ::.
    listen: tuple[str, ...] = ("127.0.0.1",)
    #: 0: any free port (tests).
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    #: More names the page answers to besides its addresses and localhost, e.g. kiosk-01.local.
    server_names: tuple[str, ...] = ()
    #: A login ends after this long without a staff action ...
    session_idle_s: Seconds = 600.0
    #: ... and this long after it began, whatever happens.
    session_max_s: Seconds = 3600.0
    #: Wrong passcodes in a row (per staff name, and per client address) before a lock.
    lockout_after: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    lockout_s: Seconds = 300.0
    #: Empty: nobody can log in and the page is read-only.
    staff: tuple[StaffAccount, ...] = ()

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError('listen must name at least one address, e.g. ["127.0.0.1"]')
        canonical = [ipaddress.ip_address(_listen_address(a)) for a in self.listen]
        if len(set(canonical)) != len(canonical):
            raise ValueError("listen names the same address twice")
        for name in self.server_names:
            if _HOST_NAME.fullmatch(name) is None:
                raise ValueError(
                    f"server name {name!r} is not a lower-case host name such as kiosk-01.local"
                )
        if self.session_idle_s > self.session_max_s:
            raise ValueError("session_idle_s must not be longer than session_max_s")
        names = [account.name for account in self.staff]
        if len(set(names)) != len(names):
            raise ValueError("two staff accounts have the same name")

    @property
    def read_only(self) -> bool:
        return not self.staff

    def account(self, name: str) -> StaffAccount | None:
        return next((a for a in self.staff if a.name == name), None)


@dataclass(slots=True)
class _Strikes:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Wrong passcodes counted per staff name and per client address.

    After ``limit`` wrong passcodes in a row the name (or the address) is locked for ``lock_s``:
    every attempt meanwhile is refused before its passcode is looked at, so the right passcode
    does not get through either. Counting by address too means one machine cannot try a few
    passcodes on every name in turn. A success clears both counts; wrong attempts are also
    forgotten ``lock_s`` after the last one, so a mistyped passcode once a day never adds up.
    """

    #: Addresses and names remembered at most (a LAN has few; this bounds a flood).
    MAX_TRACKED: Final = 4096

    def __init__(self, *, limit: int, lock_s: float, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._lock_s = lock_s
        self._clock = clock
        self._names: dict[str, _Strikes] = {}
        self._addresses: dict[str, _Strikes] = {}

    def locked_for(self, name: str | None, address: str) -> float:
        """Seconds until ``name`` may try again from ``address``; 0.0 when it may now."""
        now = self._clock()
        left = 0.0
        for table, key in self._keys(name, address):
            strikes = table.get(key)
            if strikes is not None:
                left = max(left, strikes.locked_until - now)
        return max(left, 0.0)

    def attempts_left(self, name: str | None, address: str) -> int:
        """Wrong passcodes still allowed before a lock."""
        self._forget_stale(self._clock())
        used = max((t[k].count for t, k in self._keys(name, address) if k in t), default=0)
        return max(self._limit - used, 0)

    def failed(self, name: str | None, address: str) -> float:
        """Count a wrong passcode (``name`` None: a name nobody has, counted by address only);
        the seconds of the lock it started, or 0.0."""
        now = self._clock()
        self._forget_stale(now)
        locked = 0.0
        for table, key in self._keys(name, address):
            strikes = table.setdefault(key, _Strikes())
            strikes.count += 1
            strikes.last = now
            if strikes.count >= self._limit:
                strikes.locked_until = now + self._lock_s
                strikes.count = 0
                locked = self._lock_s
        for table in (self._names, self._addresses):
            while len(table) > self.MAX_TRACKED:
                del table[min(table, key=lambda k: table[k].last)]
        return locked

    def succeeded(self, name: str, address: str) -> None:
        self._names.pop(name, None)
        self._addresses.pop(address, None)

    def _keys(self, name: str | None, address: str) -> list[tuple[dict[str, _Strikes], str]]:
        keys = [(self._addresses, address)]
        if name is not None:
            keys.append((self._names, name))
        return keys

    def _forget_stale(self, now: float) -> None:
        for table in (self._names, self._addresses):
            stale = [
                key
                for key, s in table.items()
                if s.locked_until <= now and now - s.last >= self._lock_s
            ]
            for key in stale:
                del table[key]


@dataclass(frozen=True, slots=True)
class StaffSession:
    """A staff member's login: the cookie ``token`` and its form token ``csrf``."""

    token: str
    csrf: str
    staff: str
    started: float


@dataclass(slots=True)
class _Live:
    session: StaffSession
    last_active: float


class StaffSessions:
    """Logged-in staff, in memory: a restart of the agent logs everybody out, which is fine.

    A session ends ``idle_s`` after the last staff action (looking at the page, which refreshes
    itself, is not an action) or ``max_s`` after login, whichever comes first.
    """

    #: Sessions kept at most; the oldest goes first (a kiosk has a handful of staff).
    MAX_SESSIONS: Final = 64

    def __init__(self, *, idle_s: float, max_s: float, clock: Callable[[], float]) -> None:
        self._idle_s = idle_s
        self._max_s = max_s
        self._clock = clock
        self._live: dict[str, _Live] = {}

    def open(self, staff: str) -> StaffSession:
        """A new session for ``staff`` (always a new token: a login never reuses one)."""
        now = self._clock()
        self._expire(now)
        while len(self._live) >= self.MAX_SESSIONS:
            del self._live[min(self._live, key=lambda t: self._live[t].session.started)]
        session = StaffSession(
            token=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            staff=staff,
            started=now,
        )
        self._live[session.token] = _Live(session, now)
        return session

    def get(self, token: str | None, *, activity: bool = False) -> StaffSession | None:
        """The live session of ``token``, or None; ``activity`` restarts the idle time."""
        now = self._clock()
        self._expire(now)
        live = self._live.get(token) if token else None
        if live is None:
            return None
        if activity:
            live.last_active = now
        return live.session

    def close(self, token: str) -> None:
        self._live.pop(token, None)

    def __len__(self) -> int:
        return len(self._live)

    def _expire(self, now: float) -> None:
        ended = [
            token
            for token, live in self._live.items()
            if now - live.last_active >= self._idle_s or now - live.session.started >= self._max_s
        ]
        for token in ended:
            del self._live[token]
