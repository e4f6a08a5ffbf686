"""What the agent knows about its kiosk, as the status page shows it, and what staff may do.

Pure records: the agent assembles a :class:`StatusSnapshot` from its collectors, uplink and
outbox; the status page renders it and calls :class:`StaffActions`. Neither side knows how the
other is built, so the page is tested with a hand-made snapshot and the agent without a browser.

Every text a person on site reads comes as :class:`Words`: Chinese first, English second.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

PeripheralState = Literal["ok", "degraded", "faulty", "absent"]
InterfaceKind = Literal["ethernet", "wifi", "cellular", "other"]


@dataclass(frozen=True, slots=True)
class Words:
    """One text in both languages of the page."""

    zh: str
    en: str

    def in_language(self, lang: str) -> str:
        return self.en if lang == "en" else self.zh


@dataclass(frozen=True, slots=True)
class PeripheralView:
    id: str
    role: str
    title: Words
    state: PeripheralState
    #: When the current state began (wall clock, ms).
    since_ms: int
    #: What is wrong in plain words (None when ok), e.g. 打印机缺纸 / The printer is out of paper.
    problem: Words | None = None
    #: What the person on site should do (None when nothing), e.g. 请更换纸卷 / Load a new roll.
    action: Words | None = None
    essential: bool = True
    #: The controller board can switch this peripheral's power (a power-cycle button is shown).
    power_channel: str | None = None
    #: A receipt printer that can print a test ticket.
    printable: bool = False


@dataclass(frozen=True, slots=True)
class LinkView:
    """The connection to the fleet server's broker."""

    broker: str
    connected: bool
    #: Since when connected (if connected) or disconnected (if not); None: never connected.
    since_ms: int | None
    session: int | None = None
    #: Publish-to-acknowledgement time of the last message, ms.
    rtt_ms: float | None = None
    #: Whether the broker's host name resolved the last time it was looked up (None: an IP).
    dns_ok: bool | None = None


@dataclass(frozen=True, slots=True)
class InterfaceView:
    name: str
    kind: InterfaceKind
    up: bool
    addresses: tuple[str, ...] = ()
    bytes_sent: int = 0
    bytes_recv: int = 0


@dataclass(frozen=True, slots=True)
class PowerView:
    on_ac: bool | None = None
    battery_percent: float | None = None
    #: The UPS in plain words (e.g. 市电供电 / On mains), None without a UPS.
    ups: Words | None = None
    ups_charge_percent: float | None = None
    ups_runtime_s: float | None = None
    supply_voltage: float | None = None
    cabinet_door_open: bool | None = None
    cabinet_temperature: float | None = None


@dataclass(frozen=True, slots=True)
class OutboxView:
    """What waits on this kiosk's disk to be sent."""

    pending: int
    pending_bytes: int
    oldest_ms: int | None
    #: Messages dropped because the outbox was full or too old, by reason.
    dropped: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EventView:
    ts_ms: int
    kind: str
    severity: Literal["info", "warning", "error", "critical"]
    message: str
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class ClockView:
    #: Kiosk clock minus fleet server clock, ms; None until measured.
    offset_ms: float | None
    max_offset_ms: float

    @property
    def wrong(self) -> bool:
        return self.offset_ms is not None and abs(self.offset_ms) > self.max_offset_ms


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    terminal: str
    site: str
    agent_version: str
    now_ms: int
    boot_ms: int | None
    link: LinkView
    clock: ClockView
    power: PowerView
    peripherals: tuple[PeripheralView, ...]
    outbox: OutboxView
    network: tuple[InterfaceView, ...] = ()
    #: Applied versions by kind (config, service-items, firmware ...).
    versions: Mapping[str, str] = field(default_factory=dict)
    #: Newest first.
    events: tuple[EventView, ...] = ()
    #: A planned reboot or restart is under way (the page says so instead of offering buttons).
    planned: Words | None = None


class StatusSource(Protocol):
    def snapshot(self) -> StatusSnapshot: ...


class ActionKind(enum.StrEnum):
    REBOOT_TERMINAL = "reboot_terminal"
    RESTART_APP = "restart_app"
    POWER_CYCLE = "power_cycle"
    PRINT_TEST = "print_test"


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    ok: bool
    message: Words


class StaffActions(Protocol):
    """What staff may do from the status page; ``actor`` is the logged-in staff member's name.

    Each call is logged and reported as an event by the agent; the page only asks.
    """

    async def reboot_terminal(self, actor: str) -> ActionOutcome: ...

    async def restart_app(self, actor: str) -> ActionOutcome: ...

    async def power_cycle(self, peripheral_id: str, actor: str) -> ActionOutcome: ...

    async def print_test_ticket(self, peripheral_id: str, actor: str) -> ActionOutcome: ...
