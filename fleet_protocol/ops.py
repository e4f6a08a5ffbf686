"""What the fleet server's ops API returns, shared by the server and ``fleetctl``."""

from __future__ import annotations

from typing import Literal

import msgspec

from fleet_protocol.ids import SiteIdField, TerminalIdField
from fleet_protocol.messages import Millis, OfflineReason, ShortText

TerminalStatus = Literal["online", "offline", "unknown"]
#: The server's presence table: finer than online/offline (see fleet_server.presence_table).
PresenceStatus = Literal["unknown", "online", "stale", "offline", "planned", "flapping"]


class TerminalView(msgspec.Struct, frozen=True, kw_only=True):
    id: TerminalIdField
    status: TerminalStatus
    site: SiteIdField | None = None
    site_name: ShortText | None = None
    town: ShortText | None = None
    district: ShortText | None = None
    reason: OfflineReason | None = None
    session: int | None = None
    since_ms: Millis | None = None
    last_seen_ms: Millis | None = None
    agent_version: ShortText | None = None
    presence: PresenceStatus | None = None
    #: While its samples are quarantined for a wrong clock: the kiosk's clock minus the
    #: server's (positive: ahead).
    clock_offset_ms: int | None = None
    #: Sending more messages than any healthy agent would.
    flooding: bool = False


class TerminalList(msgspec.Struct, frozen=True, kw_only=True):
    terminals: list[TerminalView]


class AlertEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One alert decision: sent, suppressed (and why), reminded, escalated, acknowledged,
    resolved."""

    key: str
    alert_id: str
    action: str
    at_ms: Millis
    kind: str
    subject: str
    site: str | None = None
    district: str
    reason: str | None = None
    recipients: list[str] = []


class AlertLog(msgspec.Struct, frozen=True, kw_only=True):
    entries: list[AlertEntry]


class SitesImported(msgspec.Struct, frozen=True, kw_only=True):
    added: int
    updated: int


class AckRequest(msgspec.Struct, frozen=True, kw_only=True):
    who: ShortText
