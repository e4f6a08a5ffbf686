"""The agent: wires the collectors, the outbox, the uplink and the commands. No global state, so
many can share a process (``fleet-sim``).

Tasks (all named, all owned by one TaskGroup, all ended through ``stopping``):
- ``telemetry``: every interval one system, one network and one power sample, batched into the
  outbox;
- ``peripherals``: the peripheral monitor (bridge drivers + USB hotplug, debounced); each
  committed change is an event and a new retained snapshot, both through the outbox;
- ``uplink``: the broker connection, publishing the outbox in order and handing on commands;
- ``commands``: runs the commands the uplink received, one at a time, answers through the
  outbox;
- ``housekeeping``: the outbox's age bound and the clock check against the fleet server;
- ``renewal`` (only with ``enrolment.renew_url``): renews the certificate when two thirds of
  its lifetime have passed, then has the uplink reconnect with it.

What differs between a real kiosk and a simulated one comes in as :class:`KioskParts`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Final, Protocol

from edge_agent.boots import Boot, BootRecord, record_boot
from edge_agent.clock import ClockCheck, ClockReference, ClockUnavailable, OffsetEstimate
from edge_agent.commands import CommandRunner, EventDraft
from edge_agent.config import AgentConfig
from edge_agent.dns import DnsProbe
from edge_agent.enrolment_client import renew
from edge_agent.errors import AgentError
from edge_agent.identity import Identity, load_identity, new_key, read_ca, store_identity
from edge_agent.journal import Journal
from edge_agent.mqtt_uplink import IncomingCommand, MqttUplink
from edge_agent.operations import MachineCommands, Operations
from edge_agent.outbox import Outgoing, Priority
from edge_agent.peripheral_monitor import PeripheralMonitor
from edge_agent.peripherals import PeripheralBook, PeripheralChange
from edge_agent.session import next_session
from edge_agent.status_model import (
    InterfaceView,
    LinkView,
    OutboxView,
    PowerView,
    StatusSnapshot,
    Words,
)
from edge_agent.stopping import sleep_unless_stopped
from edge_agent.store import AgentStore
from edge_agent.telemetry import (
    BatchBuilder,
    MonotonicStamp,
    NetworkReading,
    PowerReading,
    SystemReading,
    encode_batches,
    power_reading,
    to_network_sample,
    to_power_sample,
    to_sample,
)
from edge_agent.usb import UsbSource
from firmware_bridge.kiosk import KioskDevices
from firmware_bridge.modbus.board import BoardStatus
from firmware_bridge.nut.protocol import UpsStatus
from firmware_bridge.profiles import DeviceProtocol, Profile
from fleet_protocol.codec import encode
from fleet_protocol.messages import CommandResult, Peripherals, Sample, Telemetry
from fleet_protocol.topics import Channel, topic

#: Longest single sleep before renewal: a kiosk's clock is often wrong after a power cut and
#: set right later by NTP, so the time left is measured again at least this often.
RENEWAL_RECHECK_S: Final = 3600.0
#: How often what is too old leaves the outbox.
EXPIRE_EVERY_S: Final = 300.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def agent_version() -> str:
    try:
        return version("kiosk-fleet")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


class Machine(Protocol):
    """The kiosk PC as the agent reads it (psutil on a kiosk, a model in ``fleet-sim``)."""

    async def read(self) -> SystemReading: ...

    async def read_network(self) -> NetworkReading: ...

    async def boot(self) -> Boot: ...


@dataclass(frozen=True)
class KioskParts:
    """Everything of one kiosk that is not configuration."""

    machine: Machine
    store: AgentStore
    machine_commands: MachineCommands
    #: The kiosk's device profile with its overrides applied (None: no peripherals watched).
    profile: Profile | None = None
    #: The running drivers of the profile's devices (the caller owns their lifetime).
    devices: KioskDevices | None = None
    usb: UsbSource | None = None
    clock_reference: ClockReference | None = None
    #: Resolves the broker's name for the network check (None: not checked).
    dns: DnsProbe | None = None
    #: The newest lines of the agent's log (diagnostics, upload-logs).
    recent_log: Callable[[int], str] = lambda _lines: ""


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        parts: KioskParts,
        *,
        now_ms: Callable[[], int] = wall_ms,
        logger: logging.Logger | None = None,
    ) -> None:
        """Blocking (opens this terminal's part of the database): build it before the loop
        runs, or through ``asyncio.to_thread``."""
        self.config = config
        self.parts = parts
        self._now_ms = now_ms
        tid = config.terminal.id
        self._log = logger or logging.getLogger(f"kiosk-agent.{tid}")
        ocfg = config.outbox
        self.outbox = parts.store.outbox(tid, ocfg.limits)
        # One numbering per kind of sample, so each measurement's series has no gaps unless a
        # sample was really lost.
        self._seq_system = parts.store.sequence(tid, "samples.system")
        self._seq_network = parts.store.sequence(tid, "samples.network")
        self._seq_power = parts.store.sequence(tid, "samples.power")
        self.journal = Journal(
            tid,
            self.outbox,
            parts.store.sequence(tid, "events"),
            now_ms=now_ms,
            logger=self._log,
        )
        self._stamp = MonotonicStamp(now_ms)
        tcfg = config.telemetry
        self._batches = BatchBuilder(tcfg.batch_size, int(tcfg.max_batch_age_s * 1000))
        self._telemetry_topic = topic(tid, Channel.TELEMETRY)
        self._peripherals_topic = topic(tid, Channel.PERIPHERALS)
        self._result_topic = topic(tid, Channel.CMD_RESULT)
        self._incoming: asyncio.Queue[IncomingCommand] = asyncio.Queue(maxsize=256)
        self.uplink = MqttUplink(
            tid,
            config.terminal.site,
            config.broker,
            config.tls,
            server_name=config.broker_server_name,
            outbox=self.outbox,
            next_session=self._next_session,
            now_ms=now_ms,
            agent_version=agent_version(),
            logger=self._log,
            on_command=self._command_arrived,
            replay_rate=ocfg.replay_rate,
        )
        self.book: PeripheralBook | None = None
        self._monitor: PeripheralMonitor | None = None
        if parts.profile is not None:
            self.book = PeripheralBook(
                parts.profile,
                debounce_ms=int(config.peripherals.debounce_s * 1000),
                now_ms=now_ms,
            )
            self._monitor = PeripheralMonitor(
                parts.profile,
                self.book,
                devices=parts.devices,
                usb=parts.usb,
                on_changes=self._peripherals_changed,
                name=f"peripherals:{tid}",
                logger=self._log,
            )
        self._spawned: asyncio.TaskGroup | None = None
        self._spawned_tasks: set[asyncio.Task[None]] = set()
        self.operations = Operations(
            tid,
            devices=parts.devices,
            machine=parts.machine_commands,
            announcer=self.uplink,
            journal=self.journal,
            now_ms=now_ms,
            diagnostics=self.diagnostics,
            recent_log=parts.recent_log,
            logger=self._log,
            spawn=self._spawn,
        )
        self.commands = CommandRunner(
            tid,
            parts.store.ledger(tid),
            self.operations,
            now_ms=self.server_now_ms,
            record_event=self._record_draft,
            publish_result=self._publish_result,
            logger=self._log,
        )
        self._clock = ClockCheck(config.clock.max_offset_s * 1000)
        self._offset = OffsetEstimate()
        self.clock_offset_ms: float | None = None
        self.boot: BootRecord | None = None
        self._network: NetworkReading | None = None
        self._power = PowerReading()
        self._dns_ok: bool | None = None
        self.started_ms = now_ms()

    # --- what others read -----------------------------------------------------------------------

    def server_now_ms(self) -> int:
        """The fleet server's time as best known: the kiosk clock corrected by its measured
        offset. Command expiry is judged by it, so a kiosk clock that is wrong neither runs an
        expired command nor refuses a valid one."""
        offset = self.clock_offset_ms or 0.0
        return self._now_ms() - round(offset)

    def snapshot(self) -> StatusSnapshot:
        """The status page's view of this kiosk (no I/O)."""
        cfg = self.config
        network = self._network
        interfaces = tuple(
            InterfaceView(i.name, i.kind, i.up, i.addresses, i.bytes_sent, i.bytes_recv)
            for i in (network.interfaces if network else ())
        )
        p = self._power
        return StatusSnapshot(
            terminal=cfg.terminal.id,
            site=cfg.terminal.site,
            agent_version=agent_version(),
            now_ms=self._now_ms(),
            boot_ms=self.boot.boot.boot_ms if self.boot else None,
            link=LinkView(
                broker=f"{cfg.broker.host}:{cfg.broker.port}",
                connected=self.uplink.connected.is_set(),
                since_ms=self.uplink.since_ms,
                session=self.uplink.session,
                rtt_ms=self.uplink.rtt_ms,
                dns_ok=self._dns_ok,
            ),
            clock=self._clock.view(self.clock_offset_ms),
            power=PowerView(
                on_ac=p.on_ac,
                battery_percent=p.battery_percent,
                ups=_ups_words(p),
                ups_charge_percent=p.ups_charge_percent,
                ups_runtime_s=p.ups_runtime_s,
                supply_voltage=p.supply_voltage,
                cabinet_door_open=p.cabinet_door_open,
                cabinet_temperature=p.cabinet_temperature,
            ),
            peripherals=self.book.views() if self.book else (),
            outbox=OutboxView(
                pending=len(self.outbox),
                pending_bytes=self.outbox.pending_bytes,
                oldest_ms=self.outbox.oldest_ms,
                dropped=self.outbox.dropped,
            ),
            network=interfaces,
            events=self.journal.recent,
            planned=self.operations.planned,
        )

    def diagnostics(self) -> str:
        """A plain-text report for ops (the ``diagnostics`` command)."""
        s = self.snapshot()
        lines = [
            f"terminal {s.terminal} at {s.site}, agent {s.agent_version}",
            f"now {_iso(s.now_ms)}; booted {_iso(s.boot_ms) if s.boot_ms else 'unknown'}; "
            f"reboots {self.boot.reboot_count if self.boot else 'unknown'}",
            f"broker {s.link.broker}: {'connected' if s.link.connected else 'disconnected'} "
            f"since {_iso(s.link.since_ms) if s.link.since_ms else '-'}, session "
            f"{s.link.session}, rtt {s.link.rtt_ms} ms, dns ok {s.link.dns_ok}",
            f"clock offset {s.clock.offset_ms} ms (bound {s.clock.max_offset_ms:.0f} ms)",
            f"outbox {s.outbox.pending} messages, {s.outbox.pending_bytes} bytes, oldest "
            f"{_iso(s.outbox.oldest_ms) if s.outbox.oldest_ms else '-'}, dropped "
            f"{dict(s.outbox.dropped) or 'none'}",
            f"commands: {self.commands.malformed} malformed",
            f"power: {dataclasses.asdict(self._power)}",
        ]
        lines += [
            f"interface {i.name} ({i.kind}) {'up' if i.up else 'DOWN'} {' '.join(i.addresses)}"
            for i in s.network
        ]
        lines += [
            f"peripheral {v.id} ({v.role}): {v.state}" + (f" — {v.problem.zh}" if v.problem else "")
            for v in s.peripherals
        ]
        lines += [f"event {_iso(e.ts_ms)} {e.kind}: {e.message}" for e in s.events[:20]]
        return "\n".join(lines)

    # --- running ------------------------------------------------------------------------------

    async def _next_session(self) -> int:
        return await asyncio.to_thread(next_session, self.config.state_dir)

    async def run(self, stopping: asyncio.Event) -> None:
        """Run until ``stopping`` is set, then shut down gracefully."""
        tid = self.config.terminal.id
        boot = await self.parts.machine.boot()
        self.boot = await asyncio.to_thread(record_boot, self.config.state_dir, boot)
        # Commands that were running when the agent last stopped are answered first, once.
        await self.commands.recover(booted_ms=boot.boot_ms)
        # The uplink stops only after the collectors have put their last partial batch in the
        # outbox, so the final flush includes it.
        uplink_stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            self._spawned = tg
            workers = [
                tg.create_task(self._telemetry(stopping), name=f"telemetry:{tid}"),
                tg.create_task(self._run_commands(), name=f"commands:{tid}"),
                tg.create_task(self._housekeeping(stopping), name=f"housekeeping:{tid}"),
            ]
            if self._monitor is not None:
                workers.append(tg.create_task(self._monitor.run(stopping), name=f"periph:{tid}"))
            tg.create_task(self.uplink.run(uplink_stopping), name=f"uplink:{tid}")
            renewal = None
            if self.config.enrolment.renew_url:
                renewal = tg.create_task(self._renewal(stopping), name=f"renewal:{tid}")
            await stopping.wait()
            if renewal is not None:
                # A request in flight would hold the shutdown for its whole timeout; the
                # identity file is replaced atomically, so stopping mid-way leaves the old one.
                renewal.cancel()
            for worker in workers:
                if worker.get_name().startswith(("commands:", "housekeeping:")):
                    worker.cancel()
            for task in list(self._spawned_tasks):  # e.g. a reboot still waiting to happen
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            uplink_stopping.set()
            self.outbox.wake()
        self._spawned = None

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        tg = self._spawned
        if tg is None:  # not running: nothing may outlive the agent
            if isinstance(work, Coroutine):
                work.close()
            return
        task = tg.create_task(_as_coroutine(work), name=f"{name}:{self.config.terminal.id}")
        self._spawned_tasks.add(task)
        task.add_done_callback(self._spawned_tasks.discard)

    # --- telemetry ----------------------------------------------------------------------------

    async def _telemetry(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.telemetry.interval_s
        next_tick = loop.time()
        while not stopping.is_set():
            await self._sample_once()
            next_tick = max(next_tick + interval, loop.time())
            await sleep_unless_stopped(stopping, next_tick - loop.time())
        rest = self._batches.take()
        if rest is not None:
            await self._queue(rest)

    async def _sample_once(self) -> None:
        machine = self.parts.machine
        system = await machine.read()
        system = dataclasses.replace(
            system,
            boot_ms=system.boot_ms or (self.boot.boot.boot_ms if self.boot else None),
            reboot_count=self.boot.reboot_count if self.boot else None,
            clock_offset_ms=self.clock_offset_ms,
        )
        network = dataclasses.replace(
            await machine.read_network(), broker_rtt_ms=self.uplink.rtt_ms
        )
        if self.parts.dns is not None:
            resolution = await self.parts.dns.resolve()
            if resolution is not None:
                self._dns_ok = resolution.ok
                network = dataclasses.replace(network, dns_ok=resolution.ok, dns_ms=resolution.ms)
        self._network = network
        self._power = power_reading(
            *self._power_devices(), on_ac=system.on_ac, battery_percent=system.battery_percent
        )
        _, ts = self._stamp.next()
        now = self._now_ms()
        samples: list[Sample] = [
            to_sample(system, await self._seq_system.next(), ts),
            to_network_sample(network, await self._seq_network.next(), ts),
            to_power_sample(self._power, await self._seq_power.next(), ts),
        ]
        for sample in samples:
            batch = self._batches.add(sample, now)
            if batch is not None:
                await self._queue(batch)

    def _power_devices(self) -> tuple[UpsStatus | None, BoardStatus | None]:
        devices = self.parts.devices
        if devices is None:
            return None, None
        ups: UpsStatus | None = None
        board: BoardStatus | None = None
        for p in devices.watched:
            latest = devices.watch(p.id).latest
            status = latest.status if latest is not None else None
            if p.protocol is DeviceProtocol.NUT and isinstance(status, UpsStatus):
                ups = status
            elif p.protocol is DeviceProtocol.MODBUS_RTU and isinstance(status, BoardStatus):
                board = status
        return ups, board

    async def _queue(self, batch: Telemetry) -> None:
        for payload in encode_batches(batch):
            await self.outbox.put(
                Outgoing(self._telemetry_topic, payload, Priority.TELEMETRY), self._now_ms()
            )
        if self._log.isEnabledFor(logging.DEBUG):
            # What is on disk now is never lost; tests check delivery against this line.
            self._log.debug(
                "outbox: telemetry %s",
                " ".join(f"{s.__struct_config__.tag}:{s.seq}" for s in batch.samples),
            )

    # --- peripherals, events, commands ----------------------------------------------------

    async def _peripherals_changed(
        self, changes: list[PeripheralChange], snapshot: Peripherals
    ) -> None:
        book = self.book
        assert book is not None  # the monitor exists only with a book
        for change in changes:
            if change.initial and change.new == "ok":
                continue  # a device found working at start is not news; a fault at start is
            event = book.event(change, 0, change.at_ms)  # the journal numbers it
            await self.journal.record(
                event.kind,
                event.message,
                severity=event.severity,
                attributes=event.attributes,
            )
        await self.outbox.put(
            Outgoing(
                self._peripherals_topic,
                encode(snapshot),
                Priority.SNAPSHOT,
                retain=True,
                replace_key="peripherals",
            ),
            self._now_ms(),
        )

    def _command_arrived(self, command: IncomingCommand) -> None:
        try:
            self._incoming.put_nowait(command)
        except asyncio.QueueFull:
            # The broker redelivers nothing we acknowledged; a flood of commands beyond this
            # is not ops asking for something, and the runner answers only what it sees.
            self._log.error("command %s dropped: %d commands already waiting", command.name, 256)

    async def _run_commands(self) -> None:
        while True:
            command = await self._incoming.get()
            await self.commands.handle(command.name, command.payload, command.correlation)

    async def _record_draft(self, draft: EventDraft) -> None:
        await self.journal.record(
            draft.kind,
            draft.message,
            severity=draft.severity,
            actor=draft.actor,
            attributes=draft.attributes,
            action=True,
        )

    async def _publish_result(self, result: CommandResult, correlation: bytes | None) -> None:
        await self.outbox.put(
            Outgoing(self._result_topic, encode(result), Priority.ACTION, correlation=correlation),
            self._now_ms(),
        )

    # --- housekeeping: outbox age, clock --------------------------------------------------

    async def _housekeeping(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_expire = loop.time()
        next_clock = loop.time() + 1.0  # after the first connection attempt has begun
        while not stopping.is_set():
            now = loop.time()
            if now >= next_expire:
                dropped = await self.outbox.expire(self._now_ms())
                if dropped:
                    self._log.warning("dropped %d outbox messages older than the bound", dropped)
                next_expire = now + EXPIRE_EVERY_S
            if now >= next_clock and self.parts.clock_reference is not None:
                await self.check_clock(self.parts.clock_reference)
                next_clock = now + self.config.clock.check_interval_s
            await sleep_unless_stopped(stopping, max(0.5, min(next_expire, next_clock) - now))

    async def check_clock(self, reference: ClockReference) -> None:
        """Measure the clock against ``reference`` now; report when it turns wrong or right."""
        try:
            self.clock_offset_ms = await self._offset.measure(reference, self._now_ms)
        except ClockUnavailable as exc:
            self._log.info("clock not checked: %s", exc)
            return
        change = self._clock.update(self.clock_offset_ms)
        if change is None or self.clock_offset_ms is None:
            return
        words = self._clock.describe(self.clock_offset_ms)
        wrong = self._clock.verdict(self.clock_offset_ms).value == "wrong"
        await self.journal.record(
            "clock.wrong" if wrong else "clock.ok",
            words.zh,
            severity="error" if wrong else "info",
            attributes={"offset_ms": round(self.clock_offset_ms)},
        )

    # --- certificate renewal ------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._now_ms() / 1000, dt.UTC)

    async def _renewal(self, stopping: asyncio.Event) -> None:
        retry_s = self.config.enrolment.retry_s
        path = self.config.tls.identity_path
        while not stopping.is_set():
            try:
                current = await asyncio.to_thread(load_identity, path)
            except AgentError as exc:
                self._log.error("certificate renewal: %s; looking again in %.0f s", exc, retry_s)
                await sleep_unless_stopped(stopping, retry_s)
                continue
            wait_s = (current.renew_at - self._now()).total_seconds()
            if wait_s > 0:
                await sleep_unless_stopped(stopping, min(wait_s, RENEWAL_RECHECK_S))
                continue
            try:
                renewed = await self._renew_once()
            except AgentError as exc:
                self._log.warning(
                    "certificate renewal failed (certificate %s valid until %s): %s; "
                    "next attempt in %.0f s",
                    current.serial_hex,
                    current.not_after.isoformat(timespec="seconds"),
                    exc,
                    retry_s,
                )
                await sleep_unless_stopped(stopping, retry_s)
                continue
            self._log.info(
                "certificate renewed: serial %s, valid until %s",
                renewed.serial_hex,
                renewed.not_after.isoformat(timespec="seconds"),
            )
            if self.config.enrolment.reconnect_after_renew:
                self.uplink.request_reconnect()
            if renewed.renew_due(self._now()):
                # A certificate already due (very short-lived, or our clock is ahead) must not
                # turn into a loop of renewals.
                await sleep_unless_stopped(stopping, retry_s)

    async def _renew_once(self) -> Identity:
        tls = self.config.tls
        key = await asyncio.to_thread(new_key)
        enrolment = await renew(
            self.config.enrolment.renew_url, tls.ca_path, tls.identity_path, key
        )
        ca_pem = await asyncio.to_thread(read_ca, tls.ca_path)
        return await asyncio.to_thread(
            store_identity,
            tls.identity_path,
            key,
            enrolment.certificate_pem,
            ca_pem=ca_pem,
            cn=self.config.terminal.id,
        )


async def _as_coroutine(work: Awaitable[None]) -> None:
    await work


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).astimezone().isoformat(timespec="seconds")


def _ups_words(p: PowerReading) -> Words | None:
    if p.ups_status is None and p.ups_on_battery is None:
        return None
    if p.ups_on_battery:
        return Words("市电中断，UPS 电池供电中", "Mains lost: running on the UPS battery")
    if p.ups_on_battery is False:
        return Words("市电供电正常", "On mains power")
    return Words(f"UPS 状态：{p.ups_status}", f"UPS status: {p.ups_status}")
