"""The agent's exception tree.

AgentError
├── AgentConfigError   the config file is unusable (names file and field)
├── StateDirError      the state directory cannot be read or written
├── IdentityError      the terminal's key, certificate or fleet CA cannot be used (names the
│                      file and the fix; never carries key material)
├── EnrolmentError     enrolment or renewal failed (the server's refusal, or the way there)
│    .reason           the server's stable refusal code (``token-used``, ...) or None
└── UplinkError        the broker connection failed (the peer's or the network's fault)
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error raised by edge_agent."""


class AgentConfigError(AgentError):
    """The agent's configuration cannot be used."""


class StateDirError(AgentError):
    """The agent's state directory is not usable."""


class IdentityError(AgentError):
    """The terminal's identity file or the fleet CA file cannot be used as it is."""


class EnrolmentError(AgentError):
    """Enrolment or certificate renewal did not succeed.

    ``reason`` is the server's refusal code when the server refused (it is also in the server's
    audit log), and None when the server was not reached or its answer was unusable.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class UplinkError(AgentError):
    """The connection to the broker failed."""
