"""The agent's exception tree.

AgentError
├── AgentConfigError   the config file is unusable (names file and field)
├── StateDirError      the state directory cannot be read or written
└── UplinkError        the broker connection failed (the peer's or the network's fault)
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error raised by edge_agent."""


class AgentConfigError(AgentError):
    """The agent's configuration cannot be used."""


class StateDirError(AgentError):
    """The agent's state directory is not usable."""


class UplinkError(AgentError):
    """The connection to the broker failed."""
