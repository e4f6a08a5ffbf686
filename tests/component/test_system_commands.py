"""System commands run for real: recorder scripts in tmp_path stand in for `systemctl reboot`.

What the agent relies on: the configured program runs with exactly its configured argv (no
shell), its output comes back cut to a bound, a failure is reported with its exit status, and
a command that hangs is killed at its timeout together with what it started. Also the
in-memory log that "upload logs" sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from edge_agent.logbook import RecentLog
from edge_agent.system_commands import (
    SystemCommandError,
    SystemCommands,
    SystemCommandSettings,
)

RECORDER = """#!/bin/sh
# Records that it was asked to run: a timestamp and its argv, one per line.
printf '%s' "$(date +%s.%N)" >> "{record}"
for arg in "$@"; do printf ' [%s]' "$arg" >> "{record}"; done
echo >> "{record}"
echo "recorded: $*"
{tail}
"""


def script(tmp_path: Path, name: str, tail: str = "") -> Path:
    path = tmp_path / name
    path.write_text(RECORDER.format(record=tmp_path / "record.log", tail=tail), encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def recorded(tmp_path: Path) -> list[str]:
    record = tmp_path / "record.log"
    if not record.exists():
        return []
    lines = record.read_text(encoding="utf-8").splitlines()
    return [line.partition(" ")[2] for line in lines]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting for its parent is not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


async def wait_gone(*pids: int) -> bool:
    for _ in range(100):
        if not any(alive(p) for p in pids):
            return True
        await asyncio.sleep(0.05)
    return False


def commands(
    tmp_path: Path, reboot: list[str], timeout_s: float = 10.0, **kwargs: int
) -> SystemCommands:
    settings = msgspec.convert(
        {
            "reboot": reboot,
            "restart_app": [str(script(tmp_path, "restart"))],
            "timeout_s": timeout_s,
        },
        SystemCommandSettings,
    )
    return SystemCommands(settings, **kwargs)


@pytest.mark.asyncio
async def test_the_configured_program_runs_with_exactly_its_argv_and_no_shell(
    tmp_path: Path,
) -> None:
    recorder = script(tmp_path, "reboot")
    # Shell syntax in an argument stays one literal argument: nothing interprets it.
    system = commands(tmp_path, [str(recorder), "--when", "now; touch pwned", "$(id)"])
    outcome = await system.run("reboot")

    assert outcome.ok
    assert outcome.returncode == 0
    assert outcome.output == "recorded: --when now; touch pwned $(id)\n"
    assert recorded(tmp_path) == ["[--when] [now; touch pwned] [$(id)]"]
    assert not (tmp_path / "pwned").exists()
    assert outcome.words.en == f"done: {recorder} --when now; touch pwned $(id)"

    await system.run("restart_app")
    assert recorded(tmp_path)[-1] == ""  # the restart command, configured without arguments


@pytest.mark.asyncio
async def test_a_bare_program_name_is_found_on_path(tmp_path: Path) -> None:
    system = commands(tmp_path, ["echo", "重启", "reboot"])
    outcome = await system.run("reboot")
    assert outcome.ok
    assert outcome.output == "重启 reboot\n"


@pytest.mark.asyncio
async def test_a_non_zero_exit_is_reported_with_its_status_and_output(tmp_path: Path) -> None:
    failing = script(tmp_path, "reboot", tail='echo "Failed to reboot: access denied" >&2\nexit 3')
    outcome = await commands(tmp_path, [str(failing)]).run("reboot")

    assert not outcome.ok
    assert outcome.returncode == 3
    assert "Failed to reboot: access denied" in outcome.output  # stderr is captured too
    assert outcome.words.zh.startswith("命令执行失败（退出码 3）")
    assert recorded(tmp_path) == [""]


@pytest.mark.asyncio
async def test_the_summary_for_the_agents_operations_says_why_it_failed(tmp_path: Path) -> None:
    failing = script(tmp_path, "reboot", tail='echo "Failed to reboot: access denied" >&2\nexit 1')
    assert await commands(tmp_path, [str(failing)]).run_reboot() == (
        False,
        "退出码 1 (exit status 1): recorded: \nFailed to reboot: access denied",
    )
    ok, output = await commands(tmp_path, [str(failing)]).run_restart_app()
    assert (ok, output) == (True, "recorded: \n")
    missing = commands(tmp_path, [str(tmp_path / "no-such-reboot")])
    ok, output = await missing.run_reboot()
    assert not ok
    assert "no-such-reboot" in output
    hanging = commands(tmp_path, ["sleep", "60"], timeout_s=0.2)
    assert await hanging.run_reboot() == (False, "超时 0.2 秒 (timed out after 0.2 s)")


@pytest.mark.asyncio
async def test_a_missing_program_is_an_agent_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-reboot"
    with pytest.raises(SystemCommandError, match="no-such-reboot"):
        await commands(tmp_path, [str(missing)]).run("reboot")


@pytest.mark.asyncio
async def test_long_output_is_cut_to_the_bound_on_a_character_boundary(tmp_path: Path) -> None:
    # 3-byte characters and a 1000-byte bound: the cut falls inside a character.
    chatty = script(
        tmp_path, "reboot", tail="i=0; while [ $i -lt 2000 ]; do printf '重'; i=$((i+1)); done"
    )
    outcome = await commands(tmp_path, [str(chatty)], max_capture=1000).run("reboot")

    assert outcome.ok
    assert outcome.output.startswith("recorded: \n重重")
    assert "\ufffd" not in outcome.output
    assert len(outcome.output.encode()) <= 1000
    assert outcome.dropped_bytes == len(b"recorded: \n") + 2000 * 3 - 1000


@pytest.mark.asyncio
async def test_a_hanging_command_is_killed_at_its_timeout_with_what_it_started(
    tmp_path: Path,
) -> None:
    # The script starts a child and waits for it: both must be gone after the timeout.
    pids = tmp_path / "pids"
    hanging = script(
        tmp_path, "reboot", tail=f'echo $$ > "{pids}"\nsleep 60 &\necho $! >> "{pids}"\nwait'
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await commands(tmp_path, [str(hanging)], timeout_s=0.5).run("reboot")

    assert loop.time() - started < 5
    assert outcome.timed_out
    assert not outcome.ok
    assert outcome.returncode is not None
    assert outcome.returncode < 0  # ended by a signal
    assert outcome.output.startswith("recorded:")
    assert "did not finish within 0.5 s and was stopped" in outcome.words.en
    shell, sleeper = (int(p) for p in pids.read_text().split())
    assert await wait_gone(shell, sleeper)


@pytest.mark.asyncio
async def test_cancelling_a_run_kills_the_process(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hanging = script(tmp_path, "reboot", tail=f'echo $$ > "{pids}"\nexec sleep 60')
    run = asyncio.create_task(commands(tmp_path, [str(hanging)]).run("reboot"))
    for _ in range(100):
        if pids.exists() and pids.read_text().strip():
            break
        await asyncio.sleep(0.05)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert await wait_gone(int(pids.read_text()))


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ({"reboot": []}, "length >= 1"),
        ({"reboot": ["sbin/reboot"]}, "reboot: 'sbin/reboot' must be an absolute path"),
        ({"restart_app": ["./restart.sh"]}, "restart_app: './restart.sh' must be an absolute"),
        ({"reboot": ["systemctl reboot"]}, "must be an absolute path"),
        ({"reboot": ["/sbin/reboot", "a\0b"]}, "NUL"),
        ({"reboot": "systemctl reboot"}, "Expected `array`"),
        ({"timeout_s": 0}, "> 0"),
        ({"shell": True}, "unknown field `shell`"),
    ],
)
def test_settings_refuse_a_command_that_is_not_a_program_and_its_arguments(
    raw: dict[str, object], complaint: str
) -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.convert(raw, SystemCommandSettings)
    assert complaint in str(caught.value)


def test_settings_default_to_systemd() -> None:
    settings = msgspec.convert({}, SystemCommandSettings)
    assert settings.argv("reboot") == ("systemctl", "reboot")
    assert settings.argv("restart_app") == ("systemctl", "restart", "kiosk-app.service")
    assert settings.timeout_s == 30
    custom = msgspec.convert({"reboot": ["/usr/sbin/shutdown", "-r", "now"]}, SystemCommandSettings)
    assert custom.argv("reboot") == ("/usr/sbin/shutdown", "-r", "now")


# --- RecentLog -----------------------------------------------------------------------------


@contextlib.contextmanager
def logging_to(handler: logging.Handler, name: str) -> Iterator[logging.Logger]:
    logger = logging.getLogger(f"test-recent-log.{name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)


def test_recent_log_keeps_the_last_lines_oldest_first() -> None:
    recent = RecentLog(max_lines=100)
    with logging_to(recent, "last") as log:
        for i in range(1000):
            log.info("sample %d queued", i)

    assert len(recent) == 100  # bounded: the oldest were dropped
    lines = recent.tail(3).splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines] == [
        "sample 997 queued",
        "sample 998 queued",
        "sample 999 queued",
    ]
    assert " INFO test-recent-log.last: " in lines[0]
    assert len(recent.tail(5000).splitlines()) == 100
    assert recent.tail(0) == ""


def test_recent_log_cuts_long_lines_and_splits_tracebacks() -> None:
    recent = RecentLog(max_lines=50, max_chars=80)
    with logging_to(recent, "long") as log:
        log.warning("打印机" * 100)
        try:
            raise OSError("串口 /dev/ttyUSB0 不可用")
        except OSError:
            log.exception("printer failed")

    lines = recent.tail(50).splitlines()
    assert len(lines[0]) == 80
    assert lines[0].endswith("…")
    assert all(len(line) <= 80 for line in lines)
    assert any("printer failed" in line for line in lines)
    assert lines[-1] == "OSError: 串口 /dev/ttyUSB0 不可用"


def test_recent_log_keeps_a_records_lines_together_across_threads() -> None:
    recent = RecentLog(max_lines=3000)
    recent.setFormatter(logging.Formatter("%(message)s"))

    def write(name: str) -> None:
        log = logging.getLogger(f"test-recent-log.threads.{name}")
        for i in range(200):
            log.info("%s-%d a\n%s-%d b\n%s-%d c", name, i, name, i, name, i)

    with logging_to(recent, "threads"):
        workers = [threading.Thread(target=write, args=(f"t{n}",)) for n in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    lines = recent.tail(3000).splitlines()
    assert len(lines) == 4 * 200 * 3
    for first, second, third in zip(lines[::3], lines[1::3], lines[2::3], strict=True):
        tag = first.removesuffix(" a")
        assert (second, third) == (f"{tag} b", f"{tag} c")
