"""The kiosk's local status page for village staff (aiohttp, server-rendered, Chinese first).

Pure parts: :mod:`.staff` (settings, passcode hashes, login throttle, sessions) and :mod:`.texts`
(the words, and the verdict "is this terminal working"). :mod:`.web` is the adapter: the only
module here that imports aiohttp and jinja2. The page renders a
:class:`~edge_agent.status_model.StatusSnapshot` and calls
:class:`~edge_agent.status_model.StaffActions`; it knows nothing else of the agent.
"""

from edge_agent.status_page.staff import (
    LoginThrottle,
    StaffAccount,
    StaffSession,
    StaffSessions,
    StatusPageSettings,
    hash_passcode,
    verify_passcode,
)
from edge_agent.status_page.texts import Concern, Level, concerns, verdict
from edge_agent.status_page.web import Listening, StatusPageError, make_app, running

__all__ = [
    "Concern",
    "Level",
    "Listening",
    "LoginThrottle",
    "StaffAccount",
    "StaffSession",
    "StaffSessions",
    "StatusPageError",
    "StatusPageSettings",
    "concerns",
    "hash_passcode",
    "make_app",
    "running",
    "verdict",
    "verify_passcode",
]
