"""A real ``upsd`` with ``dummy-ups`` drivers, for tests, the demo and the fleet simulator.

:class:`UpsDaemon` runs NUT 2.8 (Debian ``nut-server``) as child processes, everything under one
work dir, upsd on a free loopback port::

    WORKDIR/etc/            NUT_CONFPATH: nut.conf, ups.conf, upsd.conf, upsd.users,
                            <ups>.dev (each simulated UPS's variables)
    WORKDIR/state/          NUT_STATEPATH: the drivers' sockets to upsd
    WORKDIR/log/upsd.log, WORKDIR/log/dummy-ups-<ups>.log

A UPS's state is driven by rewriting its ``.dev`` file (:meth:`UpsDaemon.set`,
:meth:`UpsDaemon.set_variables`). dummy-ups 2.8.0 (mode ``dummy-once``) re-reads the file when
its mtime changes, checking about once a second with ``pollinterval = 1``; measured here, a
change reaches upsd 0.3 to 0.9 s after the write (:data:`REREAD_BOUND_S` is the bound tests
allow). Two details of that check are handled here: the mtime is compared in whole seconds, so
each write sets a new whole-second mtime (a second write within the same second would
otherwise go unseen), and the file is replaced atomically (temp file + rename) so the driver
never reads half of it.

Faults to simulate: :meth:`~UpsDaemon.stop_driver` (upsd then answers
``ERR DRIVER-NOT-CONNECTED``), :meth:`~UpsDaemon.freeze_driver` (SIGSTOP: upsd answers
``ERR DATA-STALE`` after ``maxage_s``), and :meth:`~UpsDaemon.stop` / :meth:`~UpsDaemon.start`
of upsd itself (connection refused, then back on the same port).

Notes on NUT 2.8.0 as packaged by Debian: ``/usr/sbin/upsd`` is a shell wrapper that reads
``/etc/nut/nut.conf`` and refuses to start under ``MODE=none``, so the real binaries in
``/lib/nut`` are run. Started as root, NUT drops to user ``nut``, which cannot enter a test's
private work dir; so as root both run with ``-u root`` (as another user they keep that user).
Right after upsd or a driver starts, upsd reports ``ups.status`` ``WAIT`` for 1 to 2 s; the
start methods return only once upsd serves the state file's values.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, TypedDict, TypeVar, Unpack

from firmware_bridge.errors import BridgeError, ConfigError
from firmware_bridge.link import Receiver
from firmware_bridge.nut import protocol

T = TypeVar("T")

LOOPBACK: Final = "127.0.0.1"
REREAD_BOUND_S: Final = 2.0
"""How long after :meth:`UpsDaemon.set` upsd may still serve the old values."""
STOP_TIMEOUT_S: Final = 5.0
LOG_TAIL_LINES: Final = 20

#: Where distributions put NUT's daemons and drivers (Debian: /lib/nut).
NUT_DIRS: Final = (Path("/lib/nut"), Path("/usr/lib/nut"), Path("/usr/libexec/nut"))

DEFAULT_VARIABLES: Final[Mapping[str, str]] = {
    "ups.status": "OL",
    "battery.charge": "100",
    "battery.runtime": "1800",
    "ups.load": "20",
    "input.voltage": "230",
    "output.voltage": "230",
    "ups.mfr": "Kiosk Fleet",
    "ups.model": "Simulated UPS",
}

_MAX_VALUE_CHARS = 100  # dummy-ups cuts values at 128 bytes; stay clear of it
_REPRESENTABLE = re.compile(r"[ !#-\[\]-~]*")
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with its terminating NUL
_PROBE_INTERVAL_S = 0.05
_PROBE_TIMEOUT_S = 1.0


class UpsChange(TypedDict, total=False):
    """What a test or the demo changes on a simulated UPS; left out keeps its value."""

    on_battery: bool
    low_battery: bool
    replace_battery: bool
    overload: bool
    charge: float
    runtime_s: float
    load: float
    input_voltage: float
    output_voltage: float


class UpsDaemon:
    """``upsd`` plus one ``dummy-ups`` per simulated UPS; a context manager.

    Synchronous on purpose (``subprocess``): it is test and demo tooling; from async code,
    call the slow methods (``start``, ``start_driver``) through ``asyncio.to_thread``.
    """

    def __init__(
        self,
        workdir: Path,
        ups_names: Sequence[str] = ("kiosk",),
        *,
        description: str = "Simulated kiosk UPS",
        maxage_s: int = 5,
        port: int = 0,
        ready_timeout_s: float = 20.0,
        nut_dir: Path | None = None,
    ) -> None:
        if not ups_names or len(set(ups_names)) != len(ups_names):
            raise ConfigError(f"ups_names: {ups_names!r} must be distinct and not empty")
        for name in ups_names:
            protocol.check_name(name, "ups_names")
        if not 1 <= maxage_s <= 3600:
            raise ConfigError(f"maxage_s: {maxage_s} is not in [1, 3600]")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port: {port} is not a TCP port (0: a free one)")
        _check_value(description, "description")
        self.workdir = workdir.resolve()
        self.ups_names = tuple(ups_names)
        self.description = description
        self.maxage_s = maxage_s
        self.ready_timeout_s = ready_timeout_s
        self.upsd_binary, self.driver_binary = _binaries(nut_dir)
        self.etc = self.workdir / "etc"
        self.state = self.workdir / "state"
        self.logs = self.workdir / "log"
        longest = max(len(str(self.state / f"dummy-ups-{name}")) for name in ups_names)
        if longest > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"workdir: {self.workdir} is too deep; the drivers' sockets under it would "
                f"need {longest} characters, a Unix socket path has at most {_MAX_SOCKET_PATH}"
            )
        self.port = port
        self._variables = {name: dict(DEFAULT_VARIABLES) for name in ups_names}
        # Variables set to None: written as empty values, which make dummy-ups delete them.
        self._removed: dict[str, set[str]] = {name: set() for name in ups_names}
        self._mtimes = dict.fromkeys(ups_names, 0)
        self._upsd: subprocess.Popen[bytes] | None = None
        self._drivers: dict[str, subprocess.Popen[bytes]] = {}
        self._frozen: set[str] = set()
        self._configured = False

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> UpsDaemon:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Write the configuration, start the drivers and upsd, wait until upsd serves data."""
        try:
            self._configure()
            for name in self.ups_names:
                self._spawn_driver(name)
            self._spawn_upsd()
            self._wait_ready(self.ups_names)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop upsd and every driver this object started."""
        self.stop()
        for name in list(self._drivers):
            self.stop_driver(name)

    @property
    def url(self) -> str:
        """Where :class:`~firmware_bridge.nut.driver.NutUps` reaches upsd."""
        return f"tcp://{LOOPBACK}:{self.port}"

    @property
    def upsd_pid(self) -> int | None:
        return self._upsd.pid if self._upsd is not None and self._upsd.poll() is None else None

    def driver_pid(self, ups: str | None = None) -> int | None:
        proc = self._drivers.get(self._ups(ups))
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start upsd again (same port) and wait until it serves every UPS."""
        if self.upsd_pid is None:
            self._spawn_upsd()
            running = (n for n in self.ups_names if n in self._drivers and n not in self._frozen)
            self._wait_ready(tuple(running))

    def stop(self) -> None:
        """Stop upsd: clients see the connection close, then connection refused."""
        if self._upsd is not None:
            _terminate(self._upsd)
            self._upsd = None

    def start_driver(self, ups: str | None = None) -> None:
        """Start a stopped driver; wait until upsd serves its data (if upsd runs)."""
        name = self._ups(ups)
        if self.driver_pid(name) is None:
            self._spawn_driver(name)
            if self.upsd_pid is not None:
                self._wait_ready((name,))

    def stop_driver(self, ups: str | None = None) -> None:
        """Stop a driver: upsd answers ``ERR DRIVER-NOT-CONNECTED`` for that UPS."""
        name = self._ups(ups)
        proc = self._drivers.pop(name, None)
        if proc is not None:
            _terminate(proc)
        self._frozen.discard(name)

    def freeze_driver(self, ups: str | None = None) -> None:
        """Suspend a driver (SIGSTOP), as one that lost its UPS: ``ERR DATA-STALE`` after
        ``maxage_s``."""
        name = self._ups(ups)
        proc = self._drivers.get(name)
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"the driver of {name} is not running")
        proc.send_signal(signal.SIGSTOP)
        self._frozen.add(name)

    def thaw_driver(self, ups: str | None = None) -> None:
        """Resume a frozen driver (SIGCONT)."""
        name = self._ups(ups)
        proc = self._drivers.get(name)
        if proc is not None and name in self._frozen:
            proc.send_signal(signal.SIGCONT)
        self._frozen.discard(name)

    def reset(self, ups: str | None = None) -> None:
        """Back to the start for one UPS (all if ``None``): default variables, its driver
        running, upsd running; returns once upsd serves that state."""
        names = self.ups_names if ups is None else (self._ups(ups),)
        for name in names:
            self.thaw_driver(name)
            if self._variables[name] != DEFAULT_VARIABLES:
                added = set(self._variables[name]) - set(DEFAULT_VARIABLES)
                self._removed[name] = (self._removed[name] | added) - set(DEFAULT_VARIABLES)
                self._variables[name] = dict(DEFAULT_VARIABLES)
                self._write_state(name)
            if self.driver_pid(name) is None:
                self._spawn_driver(name)
        if self.upsd_pid is None:
            self._spawn_upsd()
            names = tuple(n for n in self.ups_names if n in self._drivers and n not in self._frozen)
        self._wait_ready(names)

    def simulated_ups(self, ups: str | None = None) -> SimulatedUps:
        """A handle on one of the simulated UPSes (the first if ``None``)."""
        return SimulatedUps(self, self._ups(ups))

    # --- state --------------------------------------------------------------------------------

    def variables(self, ups: str | None = None) -> dict[str, str]:
        """The variables the state file holds now."""
        return dict(self._variables[self._ups(ups)])

    def set_variables(self, changes: Mapping[str, str | None], ups: str | None = None) -> None:
        """Change variables (``None`` removes one) and rewrite the state file atomically."""
        name = self._ups(ups)
        for variable, value in changes.items():
            protocol.check_name(variable, "variable")
            if value is None:
                self._variables[name].pop(variable, None)
                self._removed[name].add(variable)
            else:
                _check_value(value, variable)
                if variable == "ups.status" and not all(w.isalnum() for w in value.split()):
                    raise ConfigError(f"ups.status: {value!r} must be status words (OL OB LB …)")
                self._variables[name][variable] = value
                self._removed[name].discard(variable)
        if self._configured:
            self._write_state(name)

    def set(self, ups: str | None = None, **change: Unpack[UpsChange]) -> None:
        """Change what the UPS reports; arguments left out keep their value."""
        name = self._ups(ups)
        flags = self._variables[name].get("ups.status", "").split()
        for flag, wanted in (
            ("LB", change.get("low_battery")),
            ("RB", change.get("replace_battery")),
            ("OVER", change.get("overload")),
        ):
            if wanted is not None:
                flags = [f for f in flags if f != flag] + ([flag] if wanted else [])
        on_battery = change.get("on_battery")
        if on_battery is not None:
            rest = [f for f in flags if f not in ("OL", "OB", "CHRG", "DISCHRG")]
            flags = (["OB", "DISCHRG"] if on_battery else ["OL"]) + rest
        changes: dict[str, str | None] = {"ups.status": " ".join(flags)}
        for variable, number in (
            ("battery.charge", change.get("charge")),
            ("battery.runtime", change.get("runtime_s")),
            ("ups.load", change.get("load")),
            ("input.voltage", change.get("input_voltage")),
            ("output.voltage", change.get("output_voltage")),
        ):
            if number is not None:
                changes[variable] = f"{number:g}"
        self.set_variables(changes, name)

    def served_variables(self, ups: str | None = None) -> dict[str, str]:
        """What upsd serves for the UPS now (``LIST VAR``); raises BridgeError or OSError."""
        name = self._ups(ups)
        return self._ask(protocol.list_var(name), protocol.VarListReceiver(name))

    def wait_served(self, ups: str | None = None, timeout_s: float | None = None) -> None:
        """Wait until upsd serves the state file's values (after a driver re-read)."""
        self._wait_ready((self._ups(ups),), timeout_s)

    # --- internals ----------------------------------------------------------------------------

    def _ups(self, ups: str | None) -> str:
        if ups is None:
            return self.ups_names[0]
        if ups not in self._variables:
            raise ConfigError(f"ups: {ups!r} is not one of {self.ups_names}")
        return ups

    def _configure(self) -> None:
        for path in (self.etc, self.state, self.logs):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o700)
        if self.port == 0:
            self.port = _free_port()
        # Only the wrappers and upsdrvctl read nut.conf; written so the dir is a complete
        # NUT configuration that those tools accept too.
        _write(self.etc / "nut.conf", "MODE=standalone\n")
        sections = "".join(
            f"[{name}]\n"
            "\tdriver = dummy-ups\n"
            f"\tport = {name}.dev\n"
            f"\tdesc = {protocol.quote(self.description)}\n"
            # dummy-ups checks the state file's mtime once per poll.
            "\tpollinterval = 1\n"
            for name in self.ups_names
        )
        _write(self.etc / "ups.conf", sections)
        _write(
            self.etc / "upsd.conf",
            f"LISTEN {LOOPBACK} {self.port}\n"
            f"STATEPATH {self.state}\n"
            # Seconds without an update from a driver before upsd calls its data stale.
            f"MAXAGE {self.maxage_s}\n",
        )
        # No users: reading needs none, and nothing here writes to a UPS.
        _write(self.etc / "upsd.users", "")
        for name in self.ups_names:
            self._write_state(name)
        self._configured = True

    def _write_state(self, name: str) -> None:
        lines = [f"{variable}: {protocol.quote('')}" for variable in sorted(self._removed[name])]
        for variable, value in self._variables[name].items():
            # ups.status stays bare: dummy-ups takes each word as one status flag.
            shown = value if variable == "ups.status" else protocol.quote(value)
            lines.append(f"{variable}: {shown}")
        path = self.etc / f"{name}.dev"
        temporary = path.with_name(path.name + ".tmp")
        _write(temporary, "".join(line + "\n" for line in lines))
        # dummy-ups compares whole-second mtimes: give every version a second of its own.
        mtime = max(int(time.time()), self._mtimes[name] + 1)
        os.utime(temporary, (mtime, mtime))
        self._mtimes[name] = mtime
        temporary.replace(path)

    def _environment(self) -> dict[str, str]:
        return {**os.environ, "NUT_CONFPATH": str(self.etc), "NUT_STATEPATH": str(self.state)}

    def _user_flags(self) -> list[str]:
        return ["-u", "root"] if os.geteuid() == 0 else []

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with (self.logs / log_name).open("ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=self.workdir,
            )

    def _spawn_driver(self, name: str) -> None:
        argv = [str(self.driver_binary), "-a", name, "-F", *self._user_flags()]
        self._drivers[name] = self._spawn(argv, f"dummy-ups-{name}.log")

    def _spawn_upsd(self) -> None:
        self._upsd = self._spawn([str(self.upsd_binary), "-F", *self._user_flags()], "upsd.log")

    def _wait_ready(self, names: Sequence[str], timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.ready_timeout_s)
        waiting = list(names)
        last = "no answer yet"
        while True:
            self._check_alive()
            try:
                self._ask(protocol.list_ups(), protocol.UpsListReceiver())
                while waiting and self._serves_state(waiting[0]):
                    waiting.pop(0)
                if not waiting:
                    return
                last = f"upsd does not serve the state of {waiting[0]} yet"
            except (OSError, BridgeError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"upsd on {self.url} not ready: {last}\n{self._log_tails()}")
            time.sleep(_PROBE_INTERVAL_S)

    def _serves_state(self, name: str) -> bool:
        served = self.served_variables(name)
        expected = self._variables[name]
        return all(served.get(k) == v for k, v in expected.items()) and not any(
            k in served for k in self._removed[name]
        )

    def _check_alive(self) -> None:
        procs = [("upsd", self._upsd), *((f"dummy-ups {n}", p) for n, p in self._drivers.items())]
        for what, proc in procs:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with status {proc.returncode}\n{self._log_tails()}"
                )

    def _ask(self, request: bytes, receiver: Receiver[T]) -> T:
        with socket.create_connection((LOOPBACK, self.port), timeout=_PROBE_TIMEOUT_S) as sock:
            sock.sendall(request)
            while True:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError("upsd closed the connection")
                result = receiver.feed(data)
                if result is not None:
                    return result

    def _log_tails(self) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            parts.append(f"--- {log} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


@dataclass(frozen=True, slots=True)
class SimulatedUps:
    """One UPS of a :class:`UpsDaemon`: the methods of the daemon, for this UPS."""

    daemon: UpsDaemon
    name: str

    @property
    def url(self) -> str:
        return self.daemon.url

    def set(self, **change: Unpack[UpsChange]) -> None:
        self.daemon.set(self.name, **change)

    def set_variables(self, changes: Mapping[str, str | None]) -> None:
        self.daemon.set_variables(changes, self.name)

    def variables(self) -> dict[str, str]:
        return self.daemon.variables(self.name)

    def served_variables(self) -> dict[str, str]:
        return self.daemon.served_variables(self.name)

    def wait_served(self, timeout_s: float | None = None) -> None:
        self.daemon.wait_served(self.name, timeout_s)

    def stop_driver(self) -> None:
        self.daemon.stop_driver(self.name)

    def start_driver(self) -> None:
        self.daemon.start_driver(self.name)

    def freeze_driver(self) -> None:
        self.daemon.freeze_driver(self.name)

    def thaw_driver(self) -> None:
        self.daemon.thaw_driver(self.name)

    def reset(self) -> None:
        self.daemon.reset(self.name)


def _binaries(nut_dir: Path | None) -> tuple[Path, Path]:
    dirs = (nut_dir,) if nut_dir is not None else NUT_DIRS
    for directory in dirs:
        upsd, driver = directory / "upsd", directory / "dummy-ups"
        if os.access(upsd, os.X_OK) and os.access(driver, os.X_OK):
            return upsd, driver
    searched = ", ".join(f"{d}/upsd and {d}/dummy-ups" for d in dirs)
    raise RuntimeError(
        f"NUT is not installed: none of {searched} is executable. "
        "Install it with: apt-get install nut-server"
    )


def _check_value(value: str, field: str) -> None:
    # dummy-ups 2.8.0 drops non-ASCII bytes from its state file, cuts a quoted value at an
    # escaped quote and drops escaped backslashes; refuse what it cannot carry.
    if len(value) > _MAX_VALUE_CHARS or not _REPRESENTABLE.fullmatch(value):
        raise ConfigError(
            f"{field}: {value!r} must be at most {_MAX_VALUE_CHARS} printable ASCII characters "
            "without '\"' or '\\' (what dummy-ups can read from its state file)"
        )


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`; only this Popen's own child."""
    if proc.poll() is not None:
        return
    proc.terminate()
    # A frozen driver would keep SIGTERM pending forever.
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGCONT)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)
