"""How often this kiosk has rebooted, counted across agent restarts (blocking file I/O).

The agent records the machine's current boot in ``boots.json`` in its state directory each
time it starts. A different boot than the one recorded is one more reboot; the same boot (the
agent itself was restarted) is not. The count starts at 0 the first time the agent runs on a
machine, so it means "reboots seen since the agent was installed" (or since the state
directory was last wiped).

A boot is known by the kernel's boot id (``/proc/sys/kernel/random/boot_id``, new on every
boot) when there is one on both sides; otherwise by the boot time, where a difference of up
to 2 s is jitter (the kernel derives the boot time from the wall clock and the uptime, and
rounds it to whole seconds), not a reboot. The boot id is preferred because stepping the wall
clock (NTP after a long power cut) moves the boot time without a reboot.

The file is replaced atomically and fsynced like the session counter, so a power cut leaves
either the old record or the new one. A file that cannot be read as a record (half written
by something else, edited by hand) is not worth stopping the agent for: counting starts
again at 0 and :attr:`BootRecord.history_lost` says so, for the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from edge_agent.errors import StateDirError
from edge_agent.identity import write_file_atomically

FILE: Final = "boots.json"
#: How far two readings of the same boot's time may differ.
JITTER_MS: Final = 2_000
_BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True, slots=True)
class Boot:
    """The machine's current boot: when (wall clock, ms) and, on Linux, the kernel's id of it."""

    boot_ms: int
    boot_id: str | None = None


@dataclass(frozen=True, slots=True)
class BootRecord:
    boot: Boot
    #: Reboots seen since the agent first ran on this machine.
    reboot_count: int
    #: This start is the first since the machine booted (False: only the agent restarted).
    first_start_of_boot: bool
    #: The stored record could not be read; counting started again at 0.
    history_lost: bool = False


class _Stored(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    boot_ms: int
    boot_id: str | None = None
    reboot_count: int = 0


def read_boot_id(path: Path = _BOOT_ID) -> str | None:
    """The kernel's id of the current boot, or None where there is none (not Linux)."""
    try:
        return path.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def same_boot(stored: Boot, current: Boot) -> bool:
    if stored.boot_id is not None and current.boot_id is not None:
        return stored.boot_id == current.boot_id
    return abs(stored.boot_ms - current.boot_ms) <= JITTER_MS


def record_boot(state_dir: Path, current: Boot) -> BootRecord:
    """Count ``current`` against the boot recorded in ``state_dir`` and record it (blocking).

    Raises :class:`StateDirError` when the state directory cannot be written.
    """
    path = state_dir / FILE
    stored: _Stored | None = None
    history_lost = False
    try:
        stored = msgspec.json.decode(path.read_bytes(), type=_Stored)
    except FileNotFoundError:
        pass
    except (msgspec.DecodeError, msgspec.ValidationError):
        history_lost = True
    except OSError as exc:
        raise StateDirError(f"{path}: cannot read it: {exc.strerror}") from exc

    if stored is None:
        record = BootRecord(current, 0, first_start_of_boot=True, history_lost=history_lost)
    elif same_boot(Boot(stored.boot_ms, stored.boot_id), current):
        # Keep the first reading of this boot's time, so jitter never accumulates into a
        # difference that looks like a reboot.
        kept = Boot(stored.boot_ms, stored.boot_id or current.boot_id)
        record = BootRecord(kept, max(0, stored.reboot_count), first_start_of_boot=False)
    else:
        record = BootRecord(current, max(0, stored.reboot_count) + 1, first_start_of_boot=True)

    _write(
        state_dir,
        path,
        _Stored(
            boot_ms=record.boot.boot_ms,
            boot_id=record.boot.boot_id,
            reboot_count=record.reboot_count,
        ),
    )
    return record


def _write(state_dir: Path, path: Path, stored: _Stored) -> None:
    try:
        write_file_atomically(path, msgspec.json.encode(stored) + b"\n", mode=0o600, dir_mode=0o700)
    except OSError as exc:
        raise StateDirError(f"state directory {state_dir}: {exc.strerror}") from exc
