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

MAX_SAMPLES_PER_BATCH: Final = 1000


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
    """One reading of the kiosk PC itself."""

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


Sample = SystemSample


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
