"""Adapter: the only module that starts operating-system processes for the agent.

Two things the agent does to its machine are done by other programs: rebooting it and
restarting the kiosk application. What runs is fixed by the kiosk's config, never by a
command from the fleet server, as argv lists passed to ``exec`` (no shell, so nothing in them
is ever interpreted)::

    [system_commands]
    reboot = ["systemctl", "reboot"]
    restart_app = ["systemctl", "restart", "kiosk-app.service"]
    timeout_s = 30

Tests and the demo point both at a recorder script (a small executable that appends its argv
and a timestamp to a file), so a reboot can be proven to have been asked for without one.

Each process runs in a session of its own; when it outlives ``timeout_s``, that process group
(the process we started, and whatever it started and left behind) is killed, and the outcome
says so.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import re
import signal
from dataclasses import dataclass
from typing import Annotated, Final, Literal

import msgspec

from edge_agent.errors import AgentError
from edge_agent.status_model import Words

SystemAction = Literal["reboot", "restart_app"]

#: Output kept from one run; more is read (so the process never blocks on a full pipe) and
#: counted, not kept.
MAX_CAPTURE: Final = 16 * 1024
#: Characters of a failed command's output kept in its summary (the end: where it says why).
SUMMARY_OUTPUT: Final = 300
#: After a kill, how long to wait for the process to be reaped and its output pipe to close.
KILL_GRACE_S: Final = 5.0

_BARE_PROGRAM: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")

Argv = Annotated[tuple[str, ...], msgspec.Meta(min_length=1, max_length=64)]


class SystemCommandError(AgentError):
    """A configured system command could not be started (missing, not executable)."""


def check_argv(argv: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``argv`` is a program (absolute path or bare name) + args."""
    if not argv:
        raise ValueError("the command is empty: give the program and its arguments")
    if any("\0" in part for part in argv):
        raise ValueError("the command contains a NUL character")
    program = argv[0]
    if not (os.path.isabs(program) or _BARE_PROGRAM.fullmatch(program)):
        raise ValueError(
            f"{program!r} must be an absolute path (/usr/bin/systemctl) or a bare program "
            "name found on PATH (systemctl)"
        )


class SystemCommandSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which programs reboot the kiosk and restart its application. Unknown keys are errors."""

    reboot: Argv = ("systemctl", "reboot")
    restart_app: Argv = ("systemctl", "restart", "kiosk-app.service")
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 30.0

    def __post_init__(self) -> None:
        for name in ("reboot", "restart_app"):
            try:
                check_argv(getattr(self, name))
            except ValueError as exc:
                # msgspec reports a __post_init__ error without a path: name the field here.
                raise ValueError(f"{name}: {exc}") from None

    def argv(self, which: SystemAction) -> tuple[str, ...]:
        return self.reboot if which == "reboot" else self.restart_app


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """How one run of a system command ended."""

    argv: tuple[str, ...]
    #: The exit status (negative: killed by that signal); None if it could not be learnt.
    returncode: int | None
    #: stdout and stderr together, decoded as UTF-8 (undecodable bytes replaced), cut short.
    output: str
    timed_out: bool = False
    timeout_s: float = 0.0
    #: Bytes of output read but not kept.
    dropped_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def words(self) -> Words:
        """What happened, for the status page and the command's answer."""
        shown = " ".join(self.argv)
        if self.timed_out:
            return Words(
                f"命令 {self.timeout_s:g} 秒内未结束，已被终止：{shown}",
                f"did not finish within {self.timeout_s:g} s and was stopped: {shown}",
            )
        if self.returncode == 0:
            return Words(f"命令已执行：{shown}", f"done: {shown}")
        return Words(
            f"命令执行失败（退出码 {self.returncode}）：{shown}",
            f"failed (exit status {self.returncode}): {shown}",
        )


class _Capture:
    """Output of a process, kept up to a limit; the rest is read and counted."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.kept = bytearray()
        self.dropped = 0

    async def pump(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            room = self._limit - len(self.kept)
            self.kept += chunk[:room]
            self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        # An incremental decoder holds back a multi-byte character cut by the limit instead
        # of turning it into a replacement character.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return decoder.decode(bytes(self.kept), final=self.dropped == 0)


class SystemCommands:
    """Runs the configured system commands, one process per call."""

    def __init__(self, settings: SystemCommandSettings, *, max_capture: int = MAX_CAPTURE) -> None:
        self._settings = settings
        self._max_capture = max_capture

    async def run(self, which: SystemAction) -> CommandOutcome:
        """Run the command configured for ``which`` to its end or its timeout.

        Raises :class:`SystemCommandError` if it cannot be started. Cancelling the call kills
        the process group.
        """
        argv = self._settings.argv(which)
        timeout_s = self._settings.timeout_s
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise SystemCommandError(
                f"cannot run {which} command {argv[0]!r}: {exc.strerror or exc}"
            ) from exc
        assert process.stdout is not None  # asked for a pipe
        capture = _Capture(self._max_capture)
        reading = asyncio.create_task(
            capture.pump(process.stdout), name=f"system-command-output:{process.pid}"
        )
        timed_out = False
        try:
            async with asyncio.timeout(timeout_s):
                # Shielded: a timeout must stop the waiting, not the reading of what is left.
                await asyncio.shield(reading)
                await process.wait()
        except TimeoutError:
            timed_out = True
            await self._kill(process, reading)
        except BaseException:
            await self._kill(process, reading)
            raise
        return CommandOutcome(
            argv=argv,
            returncode=process.returncode,
            output=capture.text(),
            timed_out=timed_out,
            timeout_s=timeout_s,
            dropped_bytes=capture.dropped,
        )

    async def run_reboot(self) -> tuple[bool, str]:
        """:meth:`run` for ``edge_agent.operations.MachineCommands``: (ok, what to report)."""
        return await self._summary("reboot")

    async def run_restart_app(self) -> tuple[bool, str]:
        """:meth:`run` for ``edge_agent.operations.MachineCommands``: (ok, what to report)."""
        return await self._summary("restart_app")

    async def _summary(self, which: SystemAction) -> tuple[bool, str]:
        try:
            outcome = await self.run(which)
        except SystemCommandError as exc:
            return False, str(exc)
        if outcome.ok:
            return True, outcome.output
        if outcome.timed_out:
            status = f"超时 {outcome.timeout_s:g} 秒 (timed out after {outcome.timeout_s:g} s)"
        else:
            status = f"退出码 {outcome.returncode} (exit status {outcome.returncode})"
        # A program says why it failed last; the caller shows the start of this text.
        said = outcome.output.strip()[-SUMMARY_OUTPUT:]
        return False, f"{status}: {said}" if said else status

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process, reading: asyncio.Task[None]) -> None:
        # The process was started as the leader of a new session, so its process group id is
        # its pid: this kills it and what it started, and nothing else.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        # Not asyncio.timeout: this also runs while our own task is being cancelled.
        waiting = asyncio.create_task(process.wait(), name=f"system-command-reap:{process.pid}")
        await asyncio.wait({waiting, reading}, timeout=KILL_GRACE_S)
        # Still pending: something that left our process group holds the output pipe; give
        # up on the rest of the output rather than wait for it.
        for task in (waiting, reading):
            task.cancel()
