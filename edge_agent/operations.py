"""What can be done to this kiosk, by staff on the status page or by the fleet server's commands.

One implementation for both, so a power-cycle from the page and one from ops behave the same and
are recorded the same way: every operation is an event with the person (or ``fleet-server``)
who asked for it.

A reboot is announced first: the retained state "planned" with the time the kiosk expects to be
back, so the server raises no offline alert for it; then, after a short delay (so the answer to
whoever asked still goes out), the configured reboot command runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from edge_agent.journal import Journal
from edge_agent.peripheral_words import explain
from edge_agent.status_model import ActionOutcome, Words
from firmware_bridge.errors import BridgeError, ChannelBusy
from firmware_bridge.kiosk import KioskDevices
from firmware_bridge.profiles import Peripheral
from firmware_bridge.roles import ROLE_TITLES, Role

#: How long a peripheral stays off in a power-cycle when the board config does not say.
DEFAULT_OFF_S = 5.0


class Announcer(Protocol):
    async def announce_planned(self, expected_back_ms: int) -> bool: ...

    def cancel_planned(self) -> None: ...


class MachineCommands(Protocol):
    """The configured commands that touch the machine (``edge_agent.system_commands``)."""

    async def run_reboot(self) -> tuple[bool, str]: ...

    async def run_restart_app(self) -> tuple[bool, str]: ...


class Operations:
    def __init__(
        self,
        terminal: str,
        *,
        devices: KioskDevices | None,
        machine: MachineCommands,
        announcer: Announcer,
        journal: Journal,
        now_ms: Callable[[], int],
        diagnostics: Callable[[], str],
        recent_log: Callable[[int], str],
        logger: logging.Logger,
        spawn: Callable[[Awaitable[None], str], None],
    ) -> None:
        self._terminal = terminal
        self._devices = devices
        self._machine = machine
        self._announcer = announcer
        self._journal = journal
        self._now_ms = now_ms
        self._diagnostics = diagnostics
        self._recent_log = recent_log
        self._log = logger
        self._spawn = spawn
        #: Set while a reboot or restart someone asked for is under way.
        self.planned: Words | None = None

    # --- the fleet server's commands (edge_agent.commands.KioskOperations) --------------------

    async def reboot(self, actor: str, delay_s: float, expected_back_s: float) -> ActionOutcome:
        back_ms = self._now_ms() + int((delay_s + expected_back_s) * 1000)
        back = _clock_text(back_ms)
        announced = await self._announcer.announce_planned(back_ms)
        self.planned = Words(
            f"终端正在按计划重启，预计 {back} 前恢复", f"Planned reboot; expected back by {back}"
        )
        await self._journal.record(
            "terminal.reboot",
            f"{actor} 重启终端（预计 {back} 前恢复）",
            severity="warning",
            actor=actor,
            attributes={"expected_back_ms": back_ms, "announced": announced},
            action=True,
        )
        self._spawn(self._reboot_after(delay_s, expected_back_s, actor), "reboot")
        return ActionOutcome(
            True,
            Words(
                f"终端将在 {delay_s:.0f} 秒后重启，预计 {back} 前恢复",
                f"The terminal reboots in {delay_s:.0f} s; expected back by {back}",
            ),
        )

    async def _reboot_after(self, delay_s: float, expected_back_s: float, actor: str) -> None:
        await asyncio.sleep(delay_s)
        ok, output = await self._machine.run_reboot()
        if ok:
            # A reboot takes the agent down long before this; still running after the whole
            # expected time means the command did not reboot the machine.
            await asyncio.sleep(expected_back_s)
            output = "the machine did not reboot within the expected time"
        self.planned = None
        self._announcer.cancel_planned()  # online again: the server must not wait for us
        await self._journal.record(
            "terminal.reboot_failed",
            f"重启没有发生：{output[:500]}",
            severity="error",
            actor=actor,
            action=True,
        )

    async def restart_app(self, actor: str) -> ActionOutcome:
        await self._journal.record(
            "app.restart", f"{actor} 重启自助服务程序", actor=actor, action=True
        )
        ok, output = await self._machine.run_restart_app()
        if ok:
            return ActionOutcome(
                True, Words("自助服务程序已重新启动", "The kiosk application was restarted")
            )
        await self._journal.record(
            "app.restart_failed",
            f"重启自助服务程序失败：{output[:500]}",
            severity="error",
            actor=actor,
            action=True,
        )
        return ActionOutcome(
            False,
            Words(
                f"自助服务程序重启失败：{output[:200]}",
                f"Restarting the kiosk application failed: {output[:200]}",
            ),
        )

    async def power_cycle(self, target: str, actor: str) -> ActionOutcome:
        devices = self._devices
        if devices is None or devices.board is None:
            return ActionOutcome(
                False, Words("本终端没有可控制电源的控制板", "This kiosk has no power controller")
            )
        title = self._title(target)
        await self._journal.record(
            "peripheral.power_cycle",
            f"{actor} 对 {title.zh} 重新上电",
            actor=actor,
            attributes={"target": target},
            action=True,
        )
        try:
            report = await devices.power_cycle(target)
        except ChannelBusy:
            return ActionOutcome(
                False,
                Words(f"{title.zh} 正在重新上电，请稍候", f"{title.en} is being power-cycled"),
            )
        except BridgeError as exc:
            return await self._failed_power_cycle(target, title, actor, exc.reason, str(exc))
        if report.outcome == "done":
            return ActionOutcome(
                True,
                Words(
                    f"已为 {title.zh} 重新上电（断电 {report.off_s:.0f} 秒）",
                    f"{title.en} was power-cycled (off for {report.off_s:.0f} s)",
                ),
            )
        code = report.reason or "error"
        detail = next((s.detail for s in report.steps if not s.ok), code)
        return await self._failed_power_cycle(target, title, actor, code, detail)

    async def _failed_power_cycle(
        self, target: str, title: Words, actor: str, code: str, detail: str
    ) -> ActionOutcome:
        # What went wrong is the controller board's doing (it switches the power), so the words
        # are about the board; the driver's own text stays in the event for ops.
        why = self._plainly(code, self._board())
        await self._journal.record(
            "peripheral.power_cycle_failed",
            f"{title.zh} 重新上电失败：{why.zh}",
            severity="error",
            actor=actor,
            attributes={"target": target, "reason": code, "detail": detail[:500]},
            action=True,
        )
        return ActionOutcome(
            False,
            Words(
                f"{title.zh} 重新上电失败：{why.zh}",
                f"Power-cycling {title.en} failed: {why.en}",
            ),
        )

    async def print_test_ticket(self, peripheral: str | None, actor: str) -> ActionOutcome:
        devices = self._devices
        if devices is None:
            return ActionOutcome(False, Words("本终端没有打印机", "This kiosk has no printer"))
        title = self._title(peripheral) if peripheral else Words("打印机", "printer")
        await self._journal.record(
            "peripheral.print_test",
            f"{actor} 打印测试页（{title.zh}）",
            actor=actor,
            attributes={"target": peripheral or ""},
            action=True,
        )
        try:
            result = await devices.print_test_ticket(
                self._terminal, _clock_text(self._now_ms(), seconds=True), peripheral
            )
        except BridgeError as exc:
            # Staff read this on the page: "打印机缺纸。请更换纸卷。", not the driver's text.
            self._log.info("test ticket on %s not printed: %s", peripheral or "printer", exc)
            why = self._plainly(exc.reason, self._peripheral(peripheral), title)
            return ActionOutcome(
                False,
                Words(f"测试页未能打印：{why.zh}", f"The test ticket was not printed: {why.en}"),
            )
        if result.confirmed:
            return ActionOutcome(
                True, Words("测试页已打印，请查看出纸口", "Test ticket printed; check the slot")
            )
        return ActionOutcome(
            False,
            Words(
                "测试页已发送，但打印机随后报告故障，请查看打印机",
                "The ticket was sent but the printer then reported a fault",
            ),
        )

    async def diagnostics(self) -> str:
        return self._diagnostics()

    async def recent_logs(self, lines: int) -> str:
        return self._recent_log(lines)

    # --- the status page's staff actions (edge_agent.status_model.StaffActions) ---------------

    async def reboot_terminal(self, actor: str) -> ActionOutcome:
        return await self.reboot(actor, delay_s=3.0, expected_back_s=300.0)

    # restart_app, power_cycle and print_test_ticket are shared with the commands above; the
    # page names its peripheral always.

    def _peripheral(self, peripheral_id: str | None) -> Peripheral | None:
        devices = self._devices
        if devices is None or peripheral_id is None:
            return None
        try:
            return devices.profile.peripheral(peripheral_id)
        except KeyError:
            return None

    def _board(self) -> Peripheral | None:
        devices = self._devices
        if devices is None:
            return None
        return next(
            (p for p in devices.profile.peripherals if p.role is Role.CONTROLLER_BOARD), None
        )

    @staticmethod
    def _plainly(code: str, about: Peripheral | None, title: Words | None = None) -> Words:
        """A driver's reason code as the sentences staff read, with what to do."""
        if about is not None:
            explained = explain(
                code, role=about.role.value, title=Words(about.title, about.title_en)
            )
        else:
            explained = explain(code, title=title)
        parts = [explained.problem]
        if explained.action is not None:
            parts.append(explained.action)
        return Words(
            "".join(_sentence_zh(p.zh) for p in parts),
            " ".join(_sentence_en(p.en) for p in parts),
        )

    def _title(self, target: str) -> Words:
        devices = self._devices
        if devices is not None:
            try:
                p = devices.profile.peripheral(target)
            except KeyError:
                return Words(target, target)
            return Words(p.title, p.title_en)
        try:
            role = Role(target)
        except ValueError:
            return Words(target, target)
        zh, en = ROLE_TITLES[role]
        return Words(zh, en)


def _clock_text(ms: int, *, seconds: bool = False) -> str:
    """Local wall-clock time as staff read it."""
    moment = dt.datetime.fromtimestamp(ms / 1000).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%H:%M")


def _sentence_zh(text: str) -> str:
    return text if not text or text[-1] in "。！？；.!?" else f"{text}。"


def _sentence_en(text: str) -> str:
    return text if not text or text[-1] in ".!?" else f"{text}."
