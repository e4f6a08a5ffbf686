"""The relay / IO board driver: polls it, switches and power-cycles its channels.

One :class:`RelayBoard` per board, over one :class:`~firmware_bridge.link.Connection`; every
request has the board's timeout and a failed one closes the link, so the next request (the
next poll) opens it again. Power-cycles of different channels may run at once (their requests
take turns on the link); a second one of the same channel is refused with ``ChannelBusy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from firmware_bridge.errors import BridgeError, ChannelBusy, ConfigError, ProtocolViolation
from firmware_bridge.health import Assessment
from firmware_bridge.link import Connection, Endpoint
from firmware_bridge.modbus import protocol
from firmware_bridge.modbus.board import (
    BoardConfig,
    BoardStatus,
    PlannedStep,
    PowerChannel,
    PowerCyclePlan,
    PowerCycleReport,
    StepKind,
    StepReport,
    assess,
    decode_status,
    plan_power_cycle,
    read_plan,
)

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RelayBoard:
    """A relay / IO board on a Modbus RTU link; satisfies ``watch.Device[BoardStatus]``."""

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        config: BoardConfig,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._name = name
        self.config = config
        self._connection = Connection(endpoint)
        self._plan = read_plan(config)
        self._clock = clock
        self._sleep = sleep
        self._switching: set[str] = set()

    @property
    def name(self) -> str:
        return self._name

    @property
    def switching(self) -> frozenset[str]:
        """Channels a power-cycle or switch command is working on now."""
        return frozenset(self._switching)

    async def poll(self) -> BoardStatus:
        """Read every channel's coil, every input and every register reading."""
        unit = self.config.unit
        coils: dict[int, bool] = {}
        inputs: dict[int, bool] = {}
        registers: dict[int, int] = {}
        for span in self._plan.coils:
            bits = await self._exchange(protocol.read_coils(unit, span.address, span.count))
            coils.update(zip(span.addresses, bits, strict=True))
        for span in self._plan.inputs:
            bits = await self._exchange(
                protocol.read_discrete_inputs(unit, span.address, span.count)
            )
            inputs.update(zip(span.addresses, bits, strict=True))
        for span in self._plan.registers:
            words = await self._exchange(
                protocol.read_input_registers(unit, span.address, span.count)
            )
            registers.update(zip(span.addresses, words, strict=True))
        return decode_status(self.config, coils, inputs, registers, self._switching)

    def assess(self, status: BoardStatus) -> Assessment:
        return assess(status, self.config)

    async def close(self) -> None:
        await self._connection.close()

    async def set_channel(self, channel: str, on: bool) -> None:
        """Switch a channel on or off and read it back.

        Switching off the channel that powers this computer is refused: nothing could switch
        it on again. Use :meth:`power_cycle`, which leaves that to the board.
        """
        spec = self.config.channel(channel)
        if not on and spec.self_powered:
            raise ConfigError(
                f"{self.name}: {channel} powers this computer; switching it off would leave it "
                "off for good (power_cycle lets the board switch it back on)",
                reason="self_powered",
            )
        with self._claim(channel):
            await self._switch(spec, on)

    async def power_cycle(self, channel: str, off_s: float | None = None) -> PowerCycleReport:
        """Switch a channel off, keep it off for ``off_s`` (default: the board's), switch it on.

        Returns the report of every step. A failing step ends the cycle as ``failed`` and the
        channel is switched back on if at all possible. Raises ``ConfigError`` for an unknown
        channel or off-time and ``ChannelBusy`` while that channel is already being switched.
        """
        plan = plan_power_cycle(self.config, channel, off_s)
        with self._claim(channel):
            return await self._run(plan)

    # -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _claim(self, channel: str) -> Iterator[None]:
        # Check and claim with no await in between, so two tasks cannot both get past it.
        if channel in self._switching:
            raise ChannelBusy(
                f"{self.name}: {channel} is already being switched or power-cycled",
                reason="busy",
            )
        self._switching.add(channel)
        try:
            yield
        finally:
            self._switching.discard(channel)

    async def _run(self, plan: PowerCyclePlan) -> PowerCycleReport:
        began = self._clock()
        steps: list[StepReport] = []
        for step in plan.steps:
            started = self._clock()
            try:
                detail = await self._carry_out(plan, step)
            except BridgeError as exc:
                steps.append(
                    StepReport(
                        step.kind,
                        False,
                        started - began,
                        self._clock() - started,
                        str(exc),
                        exc.reason,
                    )
                )
                steps.append(await self._restore(plan.channel, began))
                return PowerCycleReport(
                    plan.channel.name, plan.off_s, "failed", tuple(steps), step.kind, exc.reason
                )
            except asyncio.CancelledError:
                # Cancelled in the middle (the agent is stopping): do not leave it off.
                await self._restore(plan.channel, began)
                raise
            steps.append(
                StepReport(step.kind, True, started - began, self._clock() - started, detail)
            )
        return PowerCycleReport(plan.channel.name, plan.off_s, "done", tuple(steps))

    async def _carry_out(self, plan: PowerCyclePlan, step: PlannedStep) -> str:
        channel = plan.channel
        unit = self.config.unit
        match step.kind:
            case StepKind.SWITCH_OFF | StepKind.SWITCH_ON:
                on = step.kind is StepKind.SWITCH_ON
                level = channel.coil_level(on)
                await self._write(protocol.write_coil(unit, channel.coil, level))
                return f"coil {channel.coil} := {int(level)}"
            case StepKind.CONFIRM_OFF | StepKind.CONFIRM_ON:
                on = step.kind is StepKind.CONFIRM_ON
                await self._confirm(channel, on)
                return f"reads {'on' if on else 'off'}"
            case StepKind.WAIT_OFF:
                await self._sleep(step.seconds)
                return f"off for {step.seconds:g} s"
            case StepKind.WRITE_PULSE:
                # The plan has this step only for a channel with a pulse register.
                assert channel.pulse_register is not None
                assert plan.pulse_tenths is not None
                await self._write(
                    protocol.write_register(unit, channel.pulse_register, plan.pulse_tenths)
                )
                return f"register {channel.pulse_register} := {plan.pulse_tenths} (x 0.1 s)"
            case StepKind.AWAIT_OFF | StepKind.AWAIT_ON:
                on = step.kind is StepKind.AWAIT_ON
                reads = await self._await_power(channel, on, step.seconds, plan.poll_every_s)
                return f"read {'on' if on else 'off'} after {reads} read(s)"
        # RESTORE_ON is not planned; it follows a failure (_restore).
        raise AssertionError(f"not a planned step: {step.kind}")

    async def _restore(self, channel: PowerChannel, began: float) -> StepReport:
        started = self._clock()
        try:
            await self._switch(channel, True)
        except BridgeError as exc:
            return StepReport(
                StepKind.RESTORE_ON,
                False,
                started - began,
                self._clock() - started,
                str(exc),
                exc.reason,
            )
        return StepReport(
            StepKind.RESTORE_ON, True, started - began, self._clock() - started, "back on"
        )

    async def _switch(self, channel: PowerChannel, on: bool) -> None:
        await self._write(
            protocol.write_coil(self.config.unit, channel.coil, channel.coil_level(on))
        )
        await self._confirm(channel, on)

    async def _confirm(self, channel: PowerChannel, on: bool) -> None:
        if await self._power(channel) != on:
            state = "on" if on else "off"
            raise ProtocolViolation(
                f"{self.name}: {channel.name} does not read {state} after switching it {state}",
                reason=f"not_switched_{state}",
            )

    async def _await_power(
        self, channel: PowerChannel, on: bool, within_s: float, every_s: float
    ) -> int:
        """Read the coil until the power is ``on`` (or off); the number of reads it took."""
        deadline = self._clock() + within_s
        reads = 0
        while True:
            reads += 1
            if await self._power(channel) == on:
                return reads
            if self._clock() >= deadline:
                state = "on" if on else "off"
                raise ProtocolViolation(
                    f"{self.name}: {channel.name} not seen {state} within {within_s:g} s "
                    f"of the pulse ({reads} reads)",
                    reason=f"not_switched_{state}",
                )
            await self._sleep(every_s)

    async def _power(self, channel: PowerChannel) -> bool:
        (level,) = await self._exchange(protocol.read_coils(self.config.unit, channel.coil, 1))
        return channel.power_on(level)

    async def _write(self, request: protocol.WriteCoil | protocol.WriteRegister) -> None:
        # The reply checks the echo; a write that comes back different raises there.
        await self._exchange(request)

    async def _exchange(self, request: protocol.ModbusRequest[T]) -> T:
        return await self._connection.exchange(
            request.encode(), request.receiver(), self.config.timeout_s
        )
