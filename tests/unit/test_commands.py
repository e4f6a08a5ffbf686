"""Commands from the fleet server: what runs, what is refused, and how every one is answered.

The runner is driven with an in-memory ledger, fake kiosk operations and an injected clock;
what the tests look at is what the fleet server and ops would see: the answers published on
cmd-result, the events recorded, and which operations were called on the kiosk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from edge_agent.commands import (
    MAX_OUTPUT,
    CommandName,
    CommandRunner,
    EventDraft,
    MemoryLedger,
)
from edge_agent.errors import AgentError
from edge_agent.status_model import ActionOutcome, Words
from firmware_bridge.errors import DeviceUnavailable
from fleet_protocol.codec import MAX_PAYLOAD, decode, encode
from fleet_protocol.ids import CommandId
from fleet_protocol.ids import CommandName as WireName
from fleet_protocol.messages import Command, CommandResult, Scalar

pytestmark = pytest.mark.asyncio

T0 = 1_700_000_000_000
CORRELATION = b"\x01corr"
DONE = ActionOutcome(True, Words("已完成", "done"))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Kiosk:
    """Fake KioskOperations: records each call; can fail, hang or answer slowly."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.outcome = DONE
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.most_at_once = 0
        self.report = "cpu 3%\n磁盘 40%"
        self.logs = "line 1\nline 2"

    async def _act(self, *call: object) -> None:
        self.calls.append(call)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error
        finally:
            self.running -= 1

    async def reboot(self, actor: str, delay_s: float, expected_back_s: float) -> ActionOutcome:
        await self._act("reboot", actor, delay_s, expected_back_s)
        return self.outcome

    async def restart_app(self, actor: str) -> ActionOutcome:
        await self._act("restart_app", actor)
        return self.outcome

    async def power_cycle(self, target: str, actor: str) -> ActionOutcome:
        await self._act("power_cycle", target, actor)
        return self.outcome

    async def print_test_ticket(self, peripheral: str | None, actor: str) -> ActionOutcome:
        await self._act("print_test_ticket", peripheral, actor)
        return self.outcome

    async def diagnostics(self) -> str:
        await self._act("diagnostics")
        return self.report

    async def recent_logs(self, lines: int) -> str:
        await self._act("recent_logs", lines)
        return self.logs


class Fleet:
    """What the fleet server and the event log receive."""

    def __init__(self) -> None:
        self.results: list[tuple[CommandResult, bytes | None]] = []
        self.events: list[EventDraft] = []

    async def publish(self, result: CommandResult, correlation: bytes | None) -> None:
        # Every answer must be a valid message on the wire.
        assert decode(CommandResult, encode(result)) == result
        self.results.append((result, correlation))

    async def record(self, event: EventDraft) -> None:
        self.events.append(event)

    @property
    def statuses(self) -> list[tuple[str, str]]:
        return [(r.id, r.status) for r, _ in self.results]


class Rig:
    def __init__(
        self,
        *,
        max_output: int = MAX_OUTPUT,
        timeouts_s: Mapping[CommandName, float] | None = None,
        ledger: MemoryLedger | None = None,
    ) -> None:
        self.clock = Clock()
        self.kiosk = Kiosk()
        self.fleet = Fleet()
        self.ledger = ledger or MemoryLedger()
        self.runner = CommandRunner(
            "zhujing-dqzx-01",
            self.ledger,
            self.kiosk,
            now_ms=self.clock,
            record_event=self.fleet.record,
            publish_result=self.fleet.publish,
            max_output=max_output,
            timeouts_s=timeouts_s or {},
        )

    async def send(
        self,
        name: str,
        args: Mapping[str, Scalar] | None = None,
        *,
        command_id: str = "cmd-00000001",
        topic_name: str | None = None,
        expires_in_ms: int = 60_000,
    ) -> None:
        command = Command(
            id=CommandId(command_id),
            name=WireName(name),
            issued_at=self.clock.now - 60_000,
            expires_at=self.clock.now + expires_in_ms,
            args=dict(args or {}),
        )
        await self.runner.handle(topic_name or name, encode(command), CORRELATION)

    @property
    def last(self) -> CommandResult:
        return self.fleet.results[-1][0]


async def test_a_command_runs_once_and_its_answer_echoes_the_correlation_data() -> None:
    rig = Rig()
    await rig.send("power-cycle", {"peripheral": "receipt-printer"})

    assert rig.kiosk.calls == [("power_cycle", "receipt-printer", "fleet-server")]
    (result, correlation), *_ = rig.fleet.results
    assert correlation == CORRELATION
    assert (result.id, result.name, result.status) == ("cmd-00000001", "power-cycle", "ok")
    assert result.message == "已完成 (done)"
    assert result.ts == T0
    assert await rig.ledger.result_of("cmd-00000001") == result
    assert await rig.ledger.interrupted() == []


async def test_the_same_id_twice_runs_once_and_the_second_is_answered_duplicate() -> None:
    rig = Rig()
    await rig.send("restart-app")
    await rig.send("restart-app")

    assert rig.kiosk.calls == [("restart_app", "fleet-server")]
    assert rig.fleet.statuses == [("cmd-00000001", "ok"), ("cmd-00000001", "duplicate")]
    assert "first result: ok" in rig.last.message
    assert rig.fleet.results[1][1] == CORRELATION


async def test_a_new_id_for_the_same_command_runs_again() -> None:
    rig = Rig()
    await rig.send("restart-app", command_id="cmd-00000001")
    await rig.send("restart-app", command_id="cmd-00000002")
    assert len(rig.kiosk.calls) == 2
    assert rig.fleet.statuses == [("cmd-00000001", "ok"), ("cmd-00000002", "ok")]


async def test_an_expired_command_never_runs_and_is_answered_expired() -> None:
    rig = Rig()
    await rig.send("reboot", expires_in_ms=0)
    await rig.send("reboot", command_id="cmd-00000002", expires_in_ms=1)
    rig.clock.now += 1
    await rig.send("reboot", command_id="cmd-00000003", expires_in_ms=-5000)

    assert rig.kiosk.calls == [("reboot", "fleet-server", 5.0, 300.0)]
    assert rig.fleet.statuses == [
        ("cmd-00000001", "expired"),
        ("cmd-00000002", "ok"),
        ("cmd-00000003", "expired"),
    ]
    assert "5000 ms" in rig.last.message


async def test_a_command_that_expires_while_waiting_its_turn_never_runs() -> None:
    rig = Rig()
    rig.kiosk.gate = asyncio.Event()
    first = asyncio.create_task(rig.send("power-cycle", {"channel": "printer"}))
    await asyncio.sleep(0)
    second = asyncio.create_task(
        rig.send("restart-app", command_id="cmd-00000002", expires_in_ms=10_000)
    )
    await asyncio.sleep(0.01)
    rig.clock.now += 10_000
    rig.kiosk.gate.set()
    await asyncio.gather(first, second)

    assert rig.kiosk.calls == [("power_cycle", "printer", "fleet-server")]
    assert rig.fleet.statuses == [("cmd-00000001", "ok"), ("cmd-00000002", "expired")]


async def test_operations_run_one_at_a_time_in_arrival_order() -> None:
    rig = Rig()
    rig.kiosk.gate = asyncio.Event()
    sends = []
    for i, name in enumerate(["restart-app", "diagnostics", "print-test-ticket", "upload-logs"]):
        sends.append(asyncio.create_task(rig.send(name, command_id=f"cmd-0000000{i}")))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert len(rig.kiosk.calls) == 1  # the rest wait for the first
    rig.kiosk.gate.set()
    await asyncio.gather(*sends)

    assert [c[0] for c in rig.kiosk.calls] == [
        "restart_app",
        "diagnostics",
        "print_test_ticket",
        "recent_logs",
    ]
    assert rig.kiosk.most_at_once == 1
    assert [s for _, s in rig.fleet.statuses] == ["ok"] * 4


async def test_an_unknown_command_is_rejected_and_nothing_runs() -> None:
    rig = Rig()
    await rig.send("format-disk", {"device": "/dev/sda"})

    assert rig.kiosk.calls == []
    assert rig.fleet.statuses == [("cmd-00000001", "rejected")]
    assert "'format-disk' is not a command this agent runs" in rig.last.message
    # Rejected is not claimed: the ledger knows only commands that ran.
    assert await rig.ledger.interrupted() == []
    assert await rig.ledger.result_of("cmd-00000001") is None


async def test_a_command_whose_name_differs_from_its_topic_is_rejected() -> None:
    rig = Rig()
    await rig.send("reboot", topic_name="diagnostics")

    assert rig.kiosk.calls == []
    assert rig.fleet.statuses == [("cmd-00000001", "rejected")]
    assert "'reboot'" in rig.last.message
    assert "'diagnostics'" in rig.last.message


@pytest.mark.parametrize(
    ("name", "args", "complaint"),
    [
        ("reboot", {"delay_s": 301}, "<= 300"),
        ("reboot", {"delay_s": -1}, ">= 0"),
        ("reboot", {"delay_s": True}, "got `bool`"),
        ("reboot", {"delay_s": "5"}, "got `str`"),
        ("reboot", {"expected_back_s": 29}, ">= 30"),
        ("reboot", {"expected_back_s": 3601}, "<= 3600"),
        ("reboot", {"command": "rm -rf /"}, "unknown field `command`"),
        ("upload-logs", {"lines": 0}, ">= 1"),
        ("upload-logs", {"lines": 2001}, "<= 2000"),
        ("upload-logs", {"lines": 1.5}, "got `float`"),
        ("power-cycle", {}, "exactly one of `peripheral` or `channel`"),
        ("power-cycle", {"peripheral": "printer", "channel": "printer"}, "exactly one"),
        ("power-cycle", {"peripheral": "printer; reboot"}, "$.peripheral"),
        ("power-cycle", {"peripheral": "../../etc/passwd"}, "$.peripheral"),
        ("power-cycle", {"channel": "Printer"}, "$.channel"),
        ("power-cycle", {"channel": 3}, "got `int`"),
        ("print-test-ticket", {"peripheral": "$(reboot)"}, "$.peripheral"),
        ("diagnostics", {"verbose": True}, "unknown field `verbose`"),
        ("restart-app", {"service": "sshd"}, "unknown field `service`"),
    ],
)
async def test_arguments_outside_the_spec_are_rejected_before_anything_runs(
    name: str, args: dict[str, Scalar], complaint: str
) -> None:
    rig = Rig()
    await rig.send(name, args)

    assert rig.kiosk.calls == []
    assert rig.fleet.statuses == [("cmd-00000001", "rejected")]
    assert rig.last.message.startswith(f"命令 {name} 的参数不符合要求 (arguments of {name}: ")
    assert complaint in rig.last.message


@pytest.mark.parametrize(
    ("name", "args", "call"),
    [
        ("reboot", {}, ("reboot", "fleet-server", 5.0, 300.0)),
        (
            "reboot",
            {"delay_s": 0, "expected_back_s": 600.5},
            ("reboot", "fleet-server", 0.0, 600.5),
        ),
        ("restart-app", {}, ("restart_app", "fleet-server")),
        ("power-cycle", {"channel": "scanner_5v"}, ("power_cycle", "scanner_5v", "fleet-server")),
        ("print-test-ticket", {}, ("print_test_ticket", None, "fleet-server")),
        (
            "print-test-ticket",
            {"peripheral": "printer-2"},
            ("print_test_ticket", "printer-2", "fleet-server"),
        ),
        ("diagnostics", {}, ("diagnostics",)),
        ("upload-logs", {}, ("recent_logs", 200)),
        ("upload-logs", {"lines": 2000}, ("recent_logs", 2000)),
    ],
)
async def test_arguments_reach_the_operation_as_typed_values_with_defaults(
    name: str, args: dict[str, Scalar], call: tuple[object, ...]
) -> None:
    rig = Rig()
    await rig.send(name, args)
    assert rig.kiosk.calls == [call]
    assert rig.last.status == "ok"


async def test_a_payload_that_is_not_json_is_counted_and_dropped_unanswered() -> None:
    rig = Rig()
    await rig.runner.handle("reboot", b'{"id": "cmd-00000001", "name": ', CORRELATION)
    await rig.runner.handle("reboot", b"\xff\xfe", CORRELATION)
    await rig.runner.handle("reboot", b"[]", CORRELATION)

    assert rig.runner.malformed == 3
    assert rig.kiosk.calls == []
    assert rig.fleet.results == []
    assert rig.fleet.events == []


async def test_an_invalid_command_whose_id_is_readable_is_rejected() -> None:
    rig = Rig()
    # expires_at missing: not a valid Command, but the server can still be told.
    payload = b'{"id": "cmd-00000009", "name": "reboot", "issued_at": 1}'
    await rig.runner.handle("reboot", payload, CORRELATION)
    # An underscore is not allowed in a command name; the topic's name is used instead.
    payload = b'{"id": "cmd-00000010", "name": "restart_app", "issued_at": 1, "expires_at": 2}'
    await rig.runner.handle("restart-app", payload, None)

    assert rig.runner.malformed == 2
    assert rig.kiosk.calls == []
    assert rig.fleet.statuses == [("cmd-00000009", "rejected"), ("cmd-00000010", "rejected")]
    first, second = (r for r, _ in rig.fleet.results)
    assert first.name == "reboot"
    assert "expires_at" in first.message
    assert second.name == "restart-app"
    assert rig.fleet.results[0][1] == CORRELATION


async def test_long_output_is_cut_to_the_limit_and_says_so() -> None:
    rig = Rig(max_output=1000)
    rig.kiosk.report = "诊断" * 3000
    await rig.send("diagnostics")
    output = rig.last.output
    assert len(output) <= 1000
    assert output.startswith("诊断诊断")
    assert "characters cut" in output

    rig.kiosk.logs = "\n".join(f"line {i}" for i in range(5000))
    await rig.send("upload-logs", {"lines": 2000}, command_id="cmd-00000002")
    output = rig.last.output
    assert len(output) <= 1000
    assert output.endswith("line 4999")  # the newest lines are the ones kept
    assert "characters cut" in output


async def test_output_that_fits_the_limit_but_not_the_wire_is_cut_until_it_fits() -> None:
    rig = Rig()
    # Control characters are escaped as \\u00XX by JSON: six bytes for each character.
    rig.kiosk.report = "\x01" * MAX_OUTPUT
    await rig.send("diagnostics")
    assert rig.last.status == "ok"
    assert len(encode(rig.last)) <= MAX_PAYLOAD
    assert rig.last.output.startswith("\x01")


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (RuntimeError("driver bug"), "RuntimeError: driver bug"),
        (AgentError("配置错误 (bad config)"), "配置错误 (bad config)"),
        (DeviceUnavailable("board not answering"), "board not answering"),
    ],
)
async def test_an_operation_that_raises_is_answered_failed_and_the_runner_goes_on(
    error: Exception, said: str
) -> None:
    rig = Rig()
    rig.kiosk.error = error
    await rig.send("power-cycle", {"channel": "printer"})
    rig.kiosk.error = None
    await rig.send("print-test-ticket", command_id="cmd-00000002")

    assert rig.fleet.statuses == [("cmd-00000001", "failed"), ("cmd-00000002", "ok")]
    assert rig.fleet.results[0][0].message == said
    assert (await rig.ledger.result_of("cmd-00000001")) == rig.fleet.results[0][0]


async def test_an_operation_that_says_it_failed_is_answered_failed_with_its_words() -> None:
    rig = Rig()
    rig.kiosk.outcome = ActionOutcome(False, Words("打印机缺纸", "the printer is out of paper"))
    await rig.send("print-test-ticket")
    assert rig.last.status == "failed"
    assert rig.last.message == "打印机缺纸 (the printer is out of paper)"


async def test_an_operation_that_hangs_is_answered_failed_at_its_timeout() -> None:
    rig = Rig(timeouts_s={CommandName.POWER_CYCLE: 0.05})
    rig.kiosk.gate = asyncio.Event()  # never set
    await rig.send("power-cycle", {"channel": "printer"})
    rig.kiosk.gate = None
    await rig.send("power-cycle", {"channel": "printer"}, command_id="cmd-00000002")

    assert rig.fleet.statuses == [("cmd-00000001", "failed"), ("cmd-00000002", "ok")]
    assert "not done within 0.05 s" in rig.fleet.results[0][0].message
    assert rig.kiosk.running == 0  # the hung operation was cancelled, not left behind


async def test_recover_answers_each_interrupted_command_once() -> None:
    ledger = MemoryLedger()
    await ledger.claim("cmd-00000001", "reboot", T0 - 5000)
    await ledger.claim("cmd-00000002", "power-cycle", T0 - 4000)
    await ledger.claim("cmd-00000003", "diagnostics", T0 - 3000)
    rig = Rig(ledger=ledger)
    await ledger.finish(
        "cmd-00000003",
        CommandResult(
            id=CommandId("cmd-00000003"), name=WireName("diagnostics"), status="ok", ts=T0 - 2000
        ),
    )

    await rig.runner.recover()
    await rig.runner.recover()  # a second start finds nothing left to answer

    assert rig.fleet.statuses == [("cmd-00000001", "ok"), ("cmd-00000002", "failed")]
    assert [c for _, c in rig.fleet.results] == [None, None]
    rebooted, interrupted = (r for r, _ in rig.fleet.results)
    assert rebooted.message == "终端已重新启动 (the terminal rebooted)"
    assert "interrupted: the agent restarted while it ran" in interrupted.message
    assert interrupted.message.startswith("命令执行中断")
    assert await ledger.interrupted() == []
    assert rig.kiosk.calls == []

    # The server sends the interrupted command again: it is not run a second time.
    await rig.send("power-cycle", {"channel": "printer"}, command_id="cmd-00000002")
    assert rig.kiosk.calls == []
    assert rig.last.status == "duplicate"
    assert "first result: failed" in rig.last.message


async def test_recover_answers_a_reboot_failed_when_the_machine_did_not_reboot() -> None:
    ledger = MemoryLedger()
    await ledger.claim("cmd-00000001", "reboot", T0 - 5000)
    await ledger.claim("cmd-00000002", "reboot", T0 - 1000)
    rig = Rig(ledger=ledger)
    await rig.runner.recover(booted_ms=T0 - 3000)
    assert rig.fleet.statuses == [("cmd-00000001", "ok"), ("cmd-00000002", "failed")]
    assert "the terminal did not reboot" in rig.last.message


async def test_every_outcome_is_recorded_as_an_event() -> None:
    ledger = MemoryLedger()
    await ledger.claim("cmd-00000000", "restart-app", T0 - 1000)
    rig = Rig(ledger=ledger)
    await rig.runner.recover()  # failed
    await rig.send("diagnostics", command_id="cmd-00000001")  # ok
    await rig.send("diagnostics", command_id="cmd-00000001")  # duplicate
    await rig.send("diagnostics", command_id="cmd-00000002", expires_in_ms=0)  # expired
    await rig.send("self-destruct", command_id="cmd-00000003")  # rejected

    events = rig.fleet.events
    assert [(e.kind, e.severity) for e in events] == [
        ("command.failed", "error"),
        ("command.ok", "info"),
        ("command.duplicate", "info"),
        ("command.expired", "warning"),
        ("command.rejected", "warning"),
    ]
    assert [e.attributes for e in events] == [
        {"id": r.id, "name": r.name, "status": r.status} for r, _ in rig.fleet.results
    ]
    assert all(e.actor == "fleet-server" for e in events)
    assert events[1].message.startswith("远程命令已执行：diagnostics")
    assert "(remote command done: diagnostics)" in events[1].message
