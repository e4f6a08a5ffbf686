"""The fleet server's operational numbers: one snapshot, served as JSON and as Prometheus text.

`IngestStats` is what ``GET /api/v1/ingest`` returns; `fleet_families` turns it (plus the
terminals by presence state, the mailer's counters when there is a mailer and the alerting
loop's when it runs) into metric
families, and `render` writes them in the Prometheus text exposition format 0.0.4 for
``GET /metrics``. Pure: no I/O, no clock.

Why by hand: the format is small and stable, and the server has no other use for
``prometheus_client``. What matters, and is done here:

- label values escape ``\\``, ``"`` and line feed; HELP text escapes ``\\`` and line feed;
- names are checked (a bad one is our bug, so it raises);
- the output is deterministic: families in a fixed order, samples sorted by their labels;
- cardinality stays sane: counters are by channel or reason, never by terminal; only the
  terminals that are *flagged* (clock fault, flooding) appear as a label, so a healthy fleet
  of thousands of kiosks adds no series.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from fleet_protocol.topics import Channel

__all__ = [
    "CONTENT_TYPE",
    "ClockFaultView",
    "Family",
    "IngestStats",
    "SpoolView",
    "fleet_families",
    "render",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Reasons a message is dropped (fleet_server.ingest), shown even before the first happens.
REJECT_REASONS: Final = ("bad_topic", "too_large", "malformed", "schema", "unstorable")
QUARANTINE_REASONS: Final = ("future", "too_old")

_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LABEL_ESCAPES: Final = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
_HELP_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\n": "\\n"})


# --- the snapshot ---------------------------------------------------------------------------


class ClockFaultView(msgspec.Struct, frozen=True, kw_only=True):
    """A terminal's clock fault (see `fleet_server.ingest.ClockFault`)."""

    first_ms: int
    last_ms: int
    offset_ms: int
    count: int


class SpoolView(msgspec.Struct, frozen=True, kw_only=True):
    """The write spool now (depth, cap, whether deliveries are held) and since start."""

    batches: int = 0
    points: int = 0
    bytes: int = 0
    max_bytes: int = 0
    holding: bool = False
    batches_spooled: int = 0
    points_spooled: int = 0
    batches_replayed: int = 0
    points_replayed: int = 0
    errors: int = 0


class IngestStats(msgspec.Struct, frozen=True, kw_only=True):
    received: dict[str, int]
    rejected: dict[str, dict[str, int]]  # terminal -> reason -> messages
    points_written: int
    batches_written: int
    write_retries: int
    points_rejected: int
    broker_connected: bool
    slow_writes: int = 0
    spool: SpoolView = SpoolView()
    quarantined: dict[str, dict[str, int]] = {}  # terminal -> reason -> samples
    clock_faults: dict[str, ClockFaultView] = {}
    flooding: list[str] = []


class AlertingView(msgspec.Struct, frozen=True, kw_only=True):
    """The alerting loop's counters (see `fleet_server.alerting.AlertingCounters`)."""

    #: True in the one process that holds the alerting lease and decides.
    leading: bool = False
    decisions: int = 0
    mails_queued: int = 0
    inputs_dropped: int = 0
    registry_errors: int = 0


# --- exposition -----------------------------------------------------------------------------

Value = int | float | bool
Labels = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: its name, type, help text and samples (labels, value)."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    samples: tuple[tuple[Labels, Value], ...]

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"not a metric name: {self.name!r}")
        seen: set[tuple[tuple[str, str], ...]] = set()
        for labels, _ in self.samples:
            for name in labels:
                if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                    raise ValueError(f"{self.name}: not a label name: {name!r}")
            key = tuple(sorted(labels.items()))
            if key in seen:
                raise ValueError(f"{self.name}: two samples with labels {dict(key)}")
            seen.add(key)

    @classmethod
    def single(
        cls, name: str, kind: Literal["counter", "gauge"], help: str, value: Value
    ) -> Family:
        return cls(name, kind, help, (({}, value),))

    @classmethod
    def by(
        cls,
        name: str,
        kind: Literal["counter", "gauge"],
        help: str,
        label: str,
        values: Mapping[str, Value],
    ) -> Family:
        return cls(name, kind, help, tuple(({label: k}, v) for k, v in values.items()))


def render(families: Iterable[Family]) -> str:
    """The families in the text exposition format, in the order given."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help.translate(_HELP_ESCAPES)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in sorted(family.samples, key=lambda s: sorted(s[0].items())):
            lines.append(f"{family.name}{_labels(labels)} {_value(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    pairs = ",".join(
        f'{name}="{value.translate(_LABEL_ESCAPES)}"' for name, value in sorted(labels.items())
    )
    return "{" + pairs + "}"


def _value(value: Value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# --- the fleet server's families ------------------------------------------------------------


def fleet_families(
    stats: IngestStats,
    terminal_states: Mapping[str, int],
    mail: Mapping[str, int] | None = None,
    alerting: AlertingView | None = None,
) -> list[Family]:
    """What ``/metrics`` shows; ``mail`` are the mailer's counters by outcome, if it runs,
    ``alerting`` the alerting loop's, if it runs."""
    received = {str(c): 0 for c in Channel} | stats.received
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    for reasons in stats.rejected.values():
        for reason, n in reasons.items():
            rejected[reason] = rejected.get(reason, 0) + n
    quarantined = dict.fromkeys(QUARANTINE_REASONS, 0)
    for reasons in stats.quarantined.values():
        for reason, n in reasons.items():
            quarantined[reason] = quarantined.get(reason, 0) + n
    faults = stats.clock_faults
    spool = stats.spool
    families = [
        Family.single(
            "fleet_broker_connected",
            "gauge",
            "1 while the broker subscription is up.",
            stats.broker_connected,
        ),
        Family.by(
            "fleet_ingest_messages_total",
            "counter",
            "Messages received, by channel.",
            "channel",
            received,
        ),
        Family.by(
            "fleet_ingest_rejected_total",
            "counter",
            "Messages dropped as undecodable or unstorable, by reason.",
            "reason",
            rejected,
        ),
        Family.by(
            "fleet_ingest_quarantined_samples_total",
            "counter",
            "Samples not written because their timestamp is outside the window, by reason.",
            "reason",
            quarantined,
        ),
        Family.single(
            "fleet_clock_fault_terminals",
            "gauge",
            "Terminals whose samples are stamped outside the window now.",
            len(faults),
        ),
        Family.by(
            "fleet_terminal_clock_fault",
            "gauge",
            "1 for each terminal with a clock fault (only those are listed).",
            "terminal",
            dict.fromkeys(faults, 1),
        ),
        Family.by(
            "fleet_terminal_clock_offset_seconds",
            "gauge",
            "Timestamp minus server time of the latest quarantined sample, for terminals "
            "with a clock fault.",
            "terminal",
            {t: f.offset_ms / 1000 for t, f in faults.items()},
        ),
        Family.single(
            "fleet_flooding_terminals",
            "gauge",
            "Terminals sending more messages a minute than allowed now.",
            len(stats.flooding),
        ),
        Family.by(
            "fleet_terminal_flooding",
            "gauge",
            "1 for each terminal flagged as flooding (only those are listed).",
            "terminal",
            dict.fromkeys(stats.flooding, 1),
        ),
        Family.by(
            "fleet_terminals",
            "gauge",
            "Terminals by presence state.",
            "state",
            terminal_states,
        ),
        Family.single(
            "fleet_influx_points_written_total",
            "counter",
            "Points InfluxDB accepted (directly or replayed from the spool).",
            stats.points_written,
        ),
        Family.single(
            "fleet_influx_batches_written_total",
            "counter",
            "Writes InfluxDB accepted.",
            stats.batches_written,
        ),
        Family.single(
            "fleet_influx_write_retries_total",
            "counter",
            "Writes that failed as unavailable or slow, to be tried again.",
            stats.write_retries,
        ),
        Family.single(
            "fleet_influx_slow_writes_total",
            "counter",
            "Writes abandoned for taking longer than the bound (and spooled).",
            stats.slow_writes,
        ),
        Family.single(
            "fleet_influx_points_rejected_total",
            "counter",
            "Points in writes InfluxDB refused as invalid.",
            stats.points_rejected,
        ),
        Family.single(
            "fleet_spool_batches", "gauge", "Batches waiting in the spool.", spool.batches
        ),
        Family.single("fleet_spool_points", "gauge", "Points waiting in the spool.", spool.points),
        Family.single(
            "fleet_spool_bytes",
            "gauge",
            "Line protocol bytes waiting in the spool.",
            spool.bytes,
        ),
        Family.single("fleet_spool_capacity_bytes", "gauge", "The spool's cap.", spool.max_bytes),
        Family.single(
            "fleet_spool_holding",
            "gauge",
            "1 while a batch can go nowhere (spool full or failing): deliveries are held in "
            "the broker.",
            spool.holding,
        ),
        Family.single(
            "fleet_spool_spooled_points_total",
            "counter",
            "Points appended to the spool.",
            spool.points_spooled,
        ),
        Family.single(
            "fleet_spool_spooled_batches_total",
            "counter",
            "Batches appended to the spool.",
            spool.batches_spooled,
        ),
        Family.single(
            "fleet_spool_replayed_points_total",
            "counter",
            "Points replayed from the spool into InfluxDB.",
            spool.points_replayed,
        ),
        Family.single(
            "fleet_spool_replayed_batches_total",
            "counter",
            "Batches replayed from the spool into InfluxDB.",
            spool.batches_replayed,
        ),
        Family.single(
            "fleet_spool_errors_total",
            "counter",
            "Spool reads or writes that failed.",
            spool.errors,
        ),
    ]
    if mail is not None:
        families.append(
            Family.by("fleet_mail_total", "counter", "E-mails by outcome.", "outcome", mail)
        )
    if alerting is not None:
        families += _alerting_families(alerting)
    return families


def _alerting_families(view: AlertingView) -> list[Family]:
    return [
        Family.single(
            "fleet_alerting_leader",
            "gauge",
            "1 in the one server process that holds the alerting lease and decides alerts.",
            view.leading,
        ),
        Family.single(
            "fleet_alert_decisions_total",
            "counter",
            "Alert decisions stored by this process (sent, suppressed, resolved, ...).",
            view.decisions,
        ),
        Family.single(
            "fleet_alert_mails_queued_total",
            "counter",
            "Alert e-mails this process put in the outbox.",
            view.mails_queued,
        ),
        Family.single(
            "fleet_alerting_inputs_dropped_total",
            "counter",
            "Presence and peripheral messages dropped because the alerting queue was full.",
            view.inputs_dropped,
        ),
        Family.single(
            "fleet_alerting_registry_errors_total",
            "counter",
            "Alerting ticks that failed because the registry did (each is tried again).",
            view.registry_errors,
        ),
    ]
