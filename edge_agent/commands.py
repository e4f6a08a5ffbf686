"""Commands from the fleet server: allow-listed, run at most once, never after expiry, answered.

A command arrives on ``kiosk/v1/{terminal}/cmd/{name}``; :class:`CommandRunner` decides what
happens to it and says so on ``cmd-result`` (through ``publish_result``) and in the event log:

=========================================  ===========  ==========================
the command                                answer       the operation
=========================================  ===========  ==========================
payload not a Command (id readable)        rejected     never runs
payload not a Command (no id)              none         never runs; counted
name differs from the topic's name         rejected     never runs
name not in :class:`CommandName`          rejected     never runs
arguments not in its spec                  rejected     never runs
``now >= expires_at`` when its turn comes  expired      never runs
id claimed before (this run or earlier)    duplicate    not run again
otherwise                                  ok / failed  runs once, with a timeout
=========================================  ===========  ==========================

Arguments are typed values checked against a fixed spec per command and handed to Python
operations (:class:`KioskOperations`); nothing from the wire ever becomes part of a shell
command or an argv. The one module that starts processes is :mod:`edge_agent.system_commands`,
and what it runs comes from the kiosk's own config.

At most once: the id is claimed in the :class:`CommandLedger` (on disk in the agent) before
the operation starts, so an agent killed mid-run never runs it again; :meth:`CommandRunner.recover`
answers such interrupted commands at the next start. Operations run one at a time, in arrival
order.

Wire names use '-', as every command name on the topic tree must (see fleet_protocol.ids):
``reboot``, ``restart-app``, ``power-cycle``, ``print-test-ticket``, ``diagnostics``,
``upload-logs``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Final, Literal, Protocol

import msgspec

from edge_agent.errors import AgentError
from edge_agent.status_model import ActionOutcome, Words
from firmware_bridge.errors import BridgeError
from fleet_protocol import ids
from fleet_protocol.codec import decode, encode
from fleet_protocol.errors import DecodeError, InvalidId, PayloadTooLarge
from fleet_protocol.ids import CommandIdField
from fleet_protocol.messages import (
    Command,
    CommandResult,
    CommandStatus,
    Message,
    Scalar,
    Severity,
)

#: Who the event log names for anything the fleet server asked for.
FLEET_ACTOR: Final = "fleet-server"
#: ``CommandResult.output`` holds at most this many characters (its schema's limit).
MAX_OUTPUT: Final = 65536
#: ``CommandResult.message`` and ``Event.message`` hold at most this many characters.
MAX_MESSAGE: Final = 4000


class CommandName(enum.StrEnum):
    """The allow-list: the only commands the agent runs."""

    REBOOT = "reboot"
    RESTART_APP = "restart-app"
    POWER_CYCLE = "power-cycle"
    PRINT_TEST_TICKET = "print-test-ticket"
    DIAGNOSTICS = "diagnostics"
    UPLOAD_LOGS = "upload-logs"


#: How long each operation may take before it is answered "failed". A reboot's own delay is
#: added to its timeout: the operation may wait that long before it runs the reboot.
TIMEOUTS_S: Final[Mapping[CommandName, float]] = {
    CommandName.REBOOT: 60.0,
    CommandName.RESTART_APP: 60.0,
    CommandName.POWER_CYCLE: 120.0,
    CommandName.PRINT_TEST_TICKET: 60.0,
    CommandName.DIAGNOSTICS: 30.0,
    CommandName.UPLOAD_LOGS: 30.0,
}


class CommandRejected(AgentError):
    """A command the agent will not run as sent: not allowed, or arguments outside its spec."""


# --- argument specs ------------------------------------------------------------------------
# One frozen Struct per command, converted strictly from Command.args: unknown keys, wrong
# types (a bool is not a number, "5" is not a number), out-of-range values and missing
# requirements are all rejected by msgspec before anything runs.

#: A peripheral id as device profiles allow it (firmware_bridge.profiles).
PeripheralIdArg = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?\Z")]
#: A controller board channel name as board configs allow it (firmware_bridge.modbus.board).
ChannelArg = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,47}\Z")]


class CommandArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of the typed arguments of a command; a command without arguments takes this."""


class RebootArgs(CommandArgs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: Wait before rebooting, so the answer can leave first.
    delay_s: Annotated[float, msgspec.Meta(ge=0, le=300)] = 5.0
    #: When the server should expect the terminal back (the "planned" state says so).
    expected_back_s: Annotated[float, msgspec.Meta(ge=30, le=3600)] = 300.0


class PowerCycleArgs(CommandArgs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Exactly one of a peripheral (its board channel is cycled) or a channel by name."""

    peripheral: PeripheralIdArg | None = None
    channel: ChannelArg | None = None

    def __post_init__(self) -> None:
        if (self.peripheral is None) == (self.channel is None):
            raise ValueError("give exactly one of `peripheral` or `channel`")

    @property
    def target(self) -> str:
        target = self.peripheral if self.peripheral is not None else self.channel
        assert target is not None  # __post_init__ guarantees one of them
        return target


class PrintTestTicketArgs(CommandArgs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: None: the kiosk's receipt printer.
    peripheral: PeripheralIdArg | None = None


class UploadLogsArgs(CommandArgs, frozen=True, kw_only=True, forbid_unknown_fields=True):
    lines: Annotated[int, msgspec.Meta(ge=1, le=2000)] = 200


ARGUMENTS: Final[Mapping[CommandName, type[CommandArgs]]] = {
    CommandName.REBOOT: RebootArgs,
    CommandName.RESTART_APP: CommandArgs,
    CommandName.POWER_CYCLE: PowerCycleArgs,
    CommandName.PRINT_TEST_TICKET: PrintTestTicketArgs,
    CommandName.DIAGNOSTICS: CommandArgs,
    CommandName.UPLOAD_LOGS: UploadLogsArgs,
}


def both(words: Words) -> str:
    """A text for ops in both languages, Chinese first."""
    return f"{words.zh} ({words.en})"


@dataclass(frozen=True, slots=True)
class ValidCommand:
    """A command that passed the allow-list and its argument spec."""

    command: Command
    name: CommandName
    args: CommandArgs


def validate(command: Command, topic_name: str) -> ValidCommand:
    """Check ``command`` against its topic, the allow-list and its argument spec.

    Raises :class:`CommandRejected` saying what was wrong.
    """
    if command.name != topic_name:
        said = Words(
            "命令名称与主题不符",
            f"the command is named {command.name!r} but came on the topic of {topic_name!r}",
        )
        raise CommandRejected(both(said))
    try:
        name = CommandName(command.name)
    except ValueError:
        allowed = ", ".join(n.value for n in CommandName)
        said = Words(
            f"本终端不执行命令 {command.name}",
            f"{command.name!r} is not a command this agent runs (allowed: {allowed})",
        )
        raise CommandRejected(both(said)) from None
    try:
        args = msgspec.convert(dict(command.args), ARGUMENTS[name], strict=True)
    except msgspec.ValidationError as exc:
        said = Words(f"命令 {name.value} 的参数不符合要求", f"arguments of {name.value}: {exc}")
        raise CommandRejected(both(said)) from exc
    return ValidCommand(command, name, args)


# --- the edges: ledger, operations, event log ----------------------------------------------


class CommandLedger(Protocol):
    """Which command ids the agent has taken on, and their answers; survives restarts.

    At most once rests on :meth:`claim` being durable (committed to disk) before it returns:
    the operation starts right after it.
    """

    async def claim(self, command_id: str, name: str, received_ms: int) -> bool:
        """Record ``command_id`` as taken on, atomically; False if it was recorded before."""
        ...

    async def finish(self, command_id: str, result: CommandResult) -> None:
        """Store the answer of a claimed command; it is no longer interrupted."""
        ...

    async def result_of(self, command_id: str) -> CommandResult | None:
        """The stored answer, or None (never claimed, or claimed and not finished)."""
        ...

    async def interrupted(self) -> list[tuple[str, str, int]]:
        """(id, name, received_ms) of every command claimed and never finished, oldest first."""
        ...


class MemoryLedger:
    """A :class:`CommandLedger` in memory, for tests and simulated kiosks."""

    def __init__(self) -> None:
        self.claims: dict[str, tuple[str, int]] = {}
        self.results: dict[str, CommandResult] = {}

    async def claim(self, command_id: str, name: str, received_ms: int) -> bool:
        if command_id in self.claims:
            return False
        self.claims[command_id] = (name, received_ms)
        return True

    async def finish(self, command_id: str, result: CommandResult) -> None:
        self.results[command_id] = result

    async def result_of(self, command_id: str) -> CommandResult | None:
        return self.results.get(command_id)

    async def interrupted(self) -> list[tuple[str, str, int]]:
        return [
            (command_id, name, received_ms)
            for command_id, (name, received_ms) in self.claims.items()
            if command_id not in self.results
        ]


class KioskOperations(Protocol):
    """What the agent can do to its kiosk; staff actions on the status page use the same.

    ``actor`` is who asked ("fleet-server", or the staff member's name) for the agent's log and
    events. A failure the agent understands comes back as ``ActionOutcome(ok=False, ...)`` or
    as an :class:`~edge_agent.errors.AgentError` / ``firmware_bridge`` error; the runner
    answers either as "failed" with its message.
    """

    async def reboot(self, actor: str, delay_s: float, expected_back_s: float) -> ActionOutcome:
        """Publish state reason "planned" (back in ``expected_back_s``), then reboot.

        May return once the reboot is scheduled ``delay_s`` from now, so the answer leaves
        before the machine goes down.
        """
        ...

    async def restart_app(self, actor: str) -> ActionOutcome: ...

    async def power_cycle(self, target: str, actor: str) -> ActionOutcome:
        """Power-cycle a board channel: ``target`` is a peripheral id or a channel name."""
        ...

    async def print_test_ticket(self, peripheral: str | None, actor: str) -> ActionOutcome:
        """Print a test ticket; ``peripheral`` None means the kiosk's receipt printer."""
        ...

    async def diagnostics(self) -> str:
        """A text report of the kiosk's state, for ops."""
        ...

    async def recent_logs(self, lines: int) -> str:
        """The agent's last ``lines`` log lines."""
        ...


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event before the agent's event log gives it its sequence number."""

    ts: int
    kind: str
    severity: Severity
    message: str
    actor: str | None = None
    attributes: Mapping[str, Scalar] = field(default_factory=dict)


RecordEvent = Callable[[EventDraft], Awaitable[None]]
#: Publish a result on cmd-result, echoing the request's MQTT 5 correlation data (None: none).
PublishResult = Callable[[CommandResult, bytes | None], Awaitable[None]]


# --- texts ---------------------------------------------------------------------------------


_SEVERITY: Final[Mapping[CommandStatus, Severity]] = {
    "ok": "info",
    "failed": "error",
    "rejected": "warning",
    "expired": "warning",
    "duplicate": "info",
}
_HEADLINE: Final[Mapping[CommandStatus, Words]] = {
    "ok": Words("远程命令已执行", "remote command done"),
    "failed": Words("远程命令执行失败", "remote command failed"),
    "rejected": Words("远程命令被拒绝，未执行", "remote command refused, not run"),
    "expired": Words("远程命令已过期，未执行", "remote command expired, not run"),
    "duplicate": Words("重复的远程命令，未再次执行", "repeated remote command, not run again"),
}
INTERRUPTED: Final = Words(
    "命令执行中断：运行期间代理程序重新启动", "interrupted: the agent restarted while it ran"
)
REBOOTED: Final = Words("终端已重新启动", "the terminal rebooted")
NOT_REBOOTED: Final = Words(
    "重启未完成：代理程序重新启动，但终端没有重启",
    "interrupted: the agent restarted but the terminal did not reboot",
)


def _clip(text: str, limit: int, keep: Literal["head", "tail"] = "head") -> str:
    """``text`` cut to ``limit`` characters (never inside one), saying how much was cut."""
    if len(text) <= limit:
        return text

    def note(cut: int) -> str:
        return f"\n…[已截断 {cut} 个字符 / {cut} characters cut]\n"

    # The note for the longest possible cut is at least as long as the real one.
    room = max(0, limit - len(note(len(text))))
    cut = note(len(text) - room)
    if room == 0:
        return cut[:limit]
    return text[:room] + cut if keep == "head" else cut + text[len(text) - room :]


# --- the runner ----------------------------------------------------------------------------


class _CommandIdentity(Message, frozen=True, kw_only=True):
    """Just enough of a payload that is not a valid Command to answer it."""

    id: CommandIdField
    name: str = ""


@dataclass(frozen=True, slots=True)
class _Answer:
    status: CommandStatus
    message: str
    output: str = ""
    #: Which end of a too-long output to keep.
    keep: Literal["head", "tail"] = "head"


class CommandRunner:
    """Takes commands from the uplink, runs the allowed ones once each, answers every one.

    :meth:`handle` raises only what the ledger, ``publish_result`` or ``record_event`` raise
    (the agent's own storage and outbox); nothing a command or its payload contains, and no
    failure of an operation, gets past it.
    """

    def __init__(
        self,
        terminal: str,
        ledger: CommandLedger,
        operations: KioskOperations,
        *,
        now_ms: Callable[[], int],
        record_event: RecordEvent,
        publish_result: PublishResult,
        max_output: int = MAX_OUTPUT,
        timeouts_s: Mapping[CommandName, float] = TIMEOUTS_S,
        logger: logging.Logger | None = None,
    ) -> None:
        if not 0 < max_output <= MAX_OUTPUT:
            raise ValueError(f"max_output must be 1..{MAX_OUTPUT} characters")
        self._ledger = ledger
        self._operations = operations
        self._now_ms = now_ms
        self._record_event = record_event
        self._publish_result = publish_result
        self._max_output = max_output
        self._timeouts_s = {**TIMEOUTS_S, **timeouts_s}
        self._log = logger or logging.getLogger(f"kiosk-agent.{terminal}.commands")
        # asyncio.Lock wakes its waiters first come, first served: commands run in order.
        self._turn = asyncio.Lock()
        #: Payloads on cmd/ that were not a valid Command (answered if their id was readable).
        self.malformed = 0

    async def handle(self, topic_name: str, payload: bytes, correlation: bytes | None) -> None:
        """Decide on, maybe run, and answer one command received on ``cmd/{topic_name}``."""
        try:
            command = decode(Command, payload)
        except DecodeError as exc:
            await self._malformed(topic_name, payload, correlation, exc)
            return
        try:
            valid = validate(command, topic_name)
        except CommandRejected as exc:
            self._log.warning("command %s (%s) rejected: %s", command.id, command.name, exc)
            await self._answer(command.id, command.name, _Answer("rejected", str(exc)), correlation)
            return
        async with self._turn:
            answer, claimed = await self._settle(valid)
            await self._answer(command.id, command.name, answer, correlation, finish=claimed)

    async def recover(self, *, booted_ms: int | None = None) -> None:
        """Answer, once, every command the agent took on and never finished (call at start).

        A reboot that was under way is answered "ok": the machine rebooting is what it was
        for. Given the machine's boot time, a reboot claimed after the last boot is "failed"
        instead: the agent restarted, the machine did not.
        """
        async with self._turn:
            for command_id, name, received_ms in await self._ledger.interrupted():
                if name != CommandName.REBOOT:
                    answer = _Answer("failed", both(INTERRUPTED))
                elif booted_ms is not None and booted_ms < received_ms:
                    answer = _Answer("failed", both(NOT_REBOOTED))
                else:
                    answer = _Answer("ok", both(REBOOTED))
                self._log.warning("command %s (%s): %s", command_id, name, answer.message)
                # The correlation data of the request was not kept; the server matches by id.
                await self._answer(command_id, name, answer, None, finish=True)

    async def _malformed(
        self, topic_name: str, payload: bytes, correlation: bytes | None, exc: DecodeError
    ) -> None:
        self.malformed += 1
        try:
            identity = decode(_CommandIdentity, payload)
        except DecodeError:
            self._log.warning("dropped a payload on cmd/%s that is no command: %s", topic_name, exc)
            return
        for candidate in (identity.name, topic_name):
            try:
                name = ids.command_name(candidate)
                break
            except InvalidId:
                continue
        else:
            self._log.warning("dropped command %s: no usable name, and %s", identity.id, exc)
            return
        self._log.warning("command %s on cmd/%s rejected: %s", identity.id, topic_name, exc)
        answer = _Answer("rejected", both(Words("不是有效的命令", f"not a valid command: {exc}")))
        await self._answer(identity.id, name, answer, correlation)

    async def _settle(self, valid: ValidCommand) -> tuple[_Answer, bool]:
        """The answer to a valid command, and whether it was claimed (then it was run)."""
        command = valid.command
        now = self._now_ms()
        if command.expired(now):
            late = now - command.expires_at
            self._log.warning("command %s (%s) expired %d ms ago", command.id, command.name, late)
            said = Words(f"已过期 {late} 毫秒，未执行", f"expired {late} ms before its turn")
            return _Answer("expired", both(said)), False
        if not await self._ledger.claim(command.id, command.name, now):
            first = await self._ledger.result_of(command.id)
            if first is None:
                said = Words("首次执行未完成", "the first run did not finish")
            else:
                said = Words(f"首次结果：{first.status}", f"first result: {first.status}")
            self._log.info("command %s (%s) seen before; not run again", command.id, command.name)
            return _Answer("duplicate", both(said)), False
        self._log.info("running command %s (%s)", command.id, command.name)
        return await self._run(valid), True

    async def _run(self, valid: ValidCommand) -> _Answer:
        timeout_s = self._timeouts_s[valid.name]
        if isinstance(valid.args, RebootArgs):
            timeout_s += valid.args.delay_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._operate(valid)
        except TimeoutError:
            self._log.error("command %s did not finish within %g s", valid.command.id, timeout_s)
            said = Words(f"操作在 {timeout_s:g} 秒内未完成", f"not done within {timeout_s:g} s")
            return _Answer("failed", both(said))
        except (AgentError, BridgeError) as exc:
            self._log.error("command %s failed: %s", valid.command.id, exc)
            return _Answer("failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - the runner's one broad except, see below
            # The one broad except: an operation's bug or a driver's error must be answered,
            # and must not end the runner (which would leave every later command unanswered).
            self._log.exception("command %s failed unexpectedly", valid.command.id)
            return _Answer("failed", f"{type(exc).__name__}: {exc}")

    async def _operate(self, valid: ValidCommand) -> _Answer:
        ops, args = self._operations, valid.args
        match valid.name:
            case CommandName.REBOOT:
                assert isinstance(args, RebootArgs)
                outcome = await ops.reboot(FLEET_ACTOR, args.delay_s, args.expected_back_s)
            case CommandName.RESTART_APP:
                outcome = await ops.restart_app(FLEET_ACTOR)
            case CommandName.POWER_CYCLE:
                assert isinstance(args, PowerCycleArgs)
                outcome = await ops.power_cycle(args.target, FLEET_ACTOR)
            case CommandName.PRINT_TEST_TICKET:
                assert isinstance(args, PrintTestTicketArgs)
                outcome = await ops.print_test_ticket(args.peripheral, FLEET_ACTOR)
            case CommandName.DIAGNOSTICS:
                report = await ops.diagnostics()
                said = Words("诊断报告见输出", "diagnostics report in the output")
                return _Answer("ok", both(said), report)
            case CommandName.UPLOAD_LOGS:
                assert isinstance(args, UploadLogsArgs)
                logs = await ops.recent_logs(args.lines)
                said = Words(f"最近 {args.lines} 行日志见输出", f"last {args.lines} log lines")
                # The newest lines are the ones wanted: a cut keeps the end.
                return _Answer("ok", both(said), logs, keep="tail")
        return _Answer("ok" if outcome.ok else "failed", both(outcome.message))

    async def _answer(
        self,
        command_id: str,
        name: str,
        answer: _Answer,
        correlation: bytes | None,
        *,
        finish: bool = False,
    ) -> None:
        result = self._result(command_id, name, answer)
        if finish:
            await self._ledger.finish(command_id, result)
        await self._publish_result(result, correlation)
        headline = _HEADLINE[answer.status]
        text = f"{headline.zh}：{name} ({headline.en}: {name}) — {result.message}"
        await self._record_event(
            EventDraft(
                ts=result.ts,
                kind=f"command.{answer.status}",
                severity=_SEVERITY[answer.status],
                message=_clip(text, MAX_MESSAGE),
                actor=FLEET_ACTOR,
                attributes={"id": command_id, "name": name, "status": answer.status},
            )
        )

    def _result(self, command_id: str, name: str, answer: _Answer) -> CommandResult:
        limit = self._max_output
        while True:
            result = CommandResult(
                id=ids.CommandId(command_id),
                name=ids.CommandName(name),
                status=answer.status,
                ts=self._now_ms(),
                message=_clip(answer.message, MAX_MESSAGE),
                output=_clip(answer.output, limit, answer.keep),
            )
            try:
                encode(result)
            except PayloadTooLarge:
                # Characters JSON escapes (control bytes take six bytes each) can make output
                # of allowed length too big for the wire; halve it until the answer fits.
                limit //= 2
                continue
            return result
