"""Typed schemas of every message in the topic tree.

Rules that hold for all of them:
- ``ts`` is milliseconds since the Unix epoch, taken by the sender when the thing happened.
- ``seq`` numbers what a terminal produces per stream so a redelivery is recognisable.
- Unknown fields are ignored (a newer agent may send more); a missing or ill-typed field is a
  decode error. Cross-field rules live in ``__post_init__`` so the decoder enforces them too.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from fleet_protocol.ids import (
    CommandIdField,
    CommandNameField,
    SiteIdField,
)

Millis = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
ShortText = Annotated[str, msgspec.Meta(max_length=200)]
Text = Annotated[str, msgspec.Meta(max_length=4000)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Kind = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.-]{0,63}\Z")]
Scalar = str | int | float | bool
Attributes = Annotated[dict[Label, Scalar], msgspec.Meta(max_length=64)]
#: A physical reading (volts, degrees): bounded so that it is always finite.
Measure = Annotated[float, msgspec.Meta(ge=-1e15, le=1e15)]
#: A duration in ms or s: never negative, always finite.
Duration = Annotated[float, msgspec.Meta(ge=0.0, le=1e15)]
#: A clock difference in ms: negative when the kiosk is behind; bounded so always finite.
OffsetMillis = Annotated[float, msgspec.Meta(ge=-1e15, le=1e15)]

MAX_SAMPLES_PER_BATCH: Final = 1000
MAX_INTERFACES: Final = 32


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of every message; frozen so a decoded message cannot be changed in flight."""


# --- state ---------------------------------------------------------------------------------

OfflineReason = Literal["lost", "shutdown", "planned"]


class State(Message, frozen=True, kw_only=True):
    """Retained presence of a terminal: the birth, the last will, or a planned shutdown.

    ``session`` counts the agent's connections across restarts (Sparkplug's bdSeq): a death
    whose session is older than the terminal's current one is stale and must be ignored.
    """

    online: bool
    session: Seq
    ts: Millis
    reason: OfflineReason | None = None
    expected_back: Millis | None = None
    site: SiteIdField | None = None
    agent_version: ShortText | None = None

    def __post_init__(self) -> None:
        if self.online and self.reason is not None:
            raise ValueError("an online state has no offline reason")
        if not self.online and self.reason is None:
            raise ValueError("an offline state says why: lost, shutdown or planned")
        if (self.reason == "planned") != (self.expected_back is not None):
            raise ValueError("expected_back goes with reason 'planned' and only with it")


# --- telemetry -----------------------------------------------------------------------------


class SystemSample(Message, frozen=True, kw_only=True, tag="system", tag_field="kind"):
    """One reading of the kiosk PC itself. Fields added after the first release are optional,
    so a sample from an older agent still decodes."""

    seq: Seq
    ts: Millis
    cpu_percent: Percent
    memory_percent: Percent
    memory_available: Count
    disk_percent: Percent
    disk_free: Count
    uptime_s: Annotated[float, msgspec.Meta(ge=0.0)]
    net_bytes_sent: Count
    net_bytes_recv: Count
    load_1m: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    temperatures: Annotated[dict[Label, float], msgspec.Meta(max_length=64)] = {}
    on_ac: bool | None = None
    battery_percent: Percent | None = None
    boot_ms: Millis | None = None
    #: Reboots the agent has seen on this machine since it first ran there.
    reboot_count: Count | None = None
    #: Kiosk clock minus fleet server clock; positive when the kiosk is ahead. None until
    #: measured.
    clock_offset_ms: OffsetMillis | None = None


InterfaceKind = Literal["ethernet", "wifi", "cellular", "other"]


class InterfaceSample(Message, frozen=True, kw_only=True):
    """One network interface: its kind as far as the agent can tell, link state, counters."""

    name: Label
    kind: InterfaceKind
    up: bool
    bytes_sent: Count
    bytes_recv: Count
    #: Receive plus transmit errors since boot.
    errors: Count | None = None


class NetworkSample(Message, frozen=True, kw_only=True, tag="network", tag_field="kind"):
    """The kiosk's network interfaces and its link to the fleet: broker round trip, DNS."""

    seq: Seq
    ts: Millis
    interfaces: Annotated[list[InterfaceSample], msgspec.Meta(max_length=MAX_INTERFACES)] = []
    #: Publish-to-acknowledgement time of a message to the broker.
    broker_rtt_ms: Duration | None = None
    #: Whether the broker's host name resolved; None when the broker is given as an address.
    dns_ok: bool | None = None
    dns_ms: Duration | None = None

    def __post_init__(self) -> None:
        names = [i.name for i in self.interfaces]
        if len(set(names)) != len(names):
            raise ValueError("each interface appears once in a sample")


class PowerSample(Message, frozen=True, kw_only=True, tag="power", tag_field="kind"):
    """Where the kiosk's power comes from: mains or battery, the UPS, the controller board."""

    seq: Seq
    ts: Millis
    on_ac: bool | None = None
    battery_percent: Percent | None = None
    #: The UPS's status words as NUT reports them, e.g. "OL CHRG" or "OB DISCHRG LB".
    ups_status: ShortText | None = None
    ups_on_battery: bool | None = None
    ups_charge_percent: Percent | None = None
    ups_runtime_s: Duration | None = None
    supply_voltage: Measure | None = None
    cabinet_door_open: bool | None = None
    cabinet_temperature: Measure | None = None


Sample = SystemSample | NetworkSample | PowerSample


class Telemetry(Message, frozen=True, kw_only=True):
    """A batch of samples. ``historical`` marks a backlog replayed after an outage."""

    samples: Annotated[list[Sample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES_PER_BATCH)]
    historical: bool = False


# --- peripherals ---------------------------------------------------------------------------

PeripheralState = Literal["ok", "degraded", "faulty", "absent"]


class PeripheralStatus(Message, frozen=True, kw_only=True):
    id: Kind
    role: Kind
    state: PeripheralState
    since: Millis
    reason: Text = ""


class Peripherals(Message, frozen=True, kw_only=True):
    """Retained snapshot of every peripheral; ``changed`` names those that changed last."""

    ts: Millis
    peripherals: Annotated[list[PeripheralStatus], msgspec.Meta(max_length=256)]
    changed: Annotated[list[Kind], msgspec.Meta(max_length=256)] = []


# --- events --------------------------------------------------------------------------------

Severity = Literal["info", "warning", "error", "critical"]


class Event(Message, frozen=True, kw_only=True):
    """Something that happened: hotplug, fault, staff action, apply result."""

    seq: Seq
    ts: Millis
    kind: Kind
    severity: Severity = "info"
    message: Text = ""
    actor: ShortText | None = None
    attributes: Attributes = {}
    #: Replayed from the terminal's outbox after an outage: something that happened, not the
    #: terminal's state now.
    historical: bool = False


# --- versions: reported and desired --------------------------------------------------------

Version = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")]
HardwareId = Kind


class BundleRef(Message, frozen=True, kw_only=True):
    version: Version
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")] | None = None


class Reported(Message, frozen=True, kw_only=True):
    """Retained: what the terminal has applied."""

    ts: Millis
    config: BundleRef | None = None
    service_items: BundleRef | None = None
    firmware: Annotated[dict[HardwareId, BundleRef], msgspec.Meta(max_length=64)] = {}
    agent_version: ShortText | None = None


class Desired(Message, frozen=True, kw_only=True):
    """Retained, server to terminal: what the terminal should apply."""

    ts: Millis
    config: BundleRef | None = None
    service_items: BundleRef | None = None
    firmware: Annotated[dict[HardwareId, BundleRef], msgspec.Meta(max_length=64)] = {}
    rollout: ShortText | None = None


# --- commands ------------------------------------------------------------------------------


class Command(Message, frozen=True, kw_only=True):
    """A command for one terminal. Runs at most once per ``id``, never after ``expires_at``."""

    id: CommandIdField
    name: CommandNameField
    issued_at: Millis
    expires_at: Millis
    args: Attributes = {}

    def __post_init__(self) -> None:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")

    def expired(self, now_ms: int) -> bool:
        return now_ms >= self.expires_at


CommandStatus = Literal["ok", "failed", "rejected", "expired", "duplicate"]


class CommandResult(Message, frozen=True, kw_only=True):
    id: CommandIdField
    name: CommandNameField
    status: CommandStatus
    ts: Millis
    message: Text = ""
    output: Annotated[str, msgspec.Meta(max_length=65536)] = ""
