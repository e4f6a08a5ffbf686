"""What the fleet server's ops API returns, shared by the server and ``fleetctl``."""

from __future__ import annotations

from typing import Literal

import msgspec

from fleet_protocol.ids import SiteIdField, TerminalIdField
from fleet_protocol.messages import Millis, OfflineReason, ShortText

TerminalStatus = Literal["online", "offline", "unknown"]


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


class TerminalList(msgspec.Struct, frozen=True, kw_only=True):
    terminals: list[TerminalView]
