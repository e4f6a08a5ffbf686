"""The one exception tree of the provisioning package.

    ProvisioningError
    ├── InvalidSettings      a setting that cannot work (the caller's fault), also a ValueError
    ├── PkiError             a key, certificate, CSR or PKI directory that cannot be used
    │    └── PkiExists       `ca init` would overwrite an existing CA (use --force)
    ├── EnrolmentRefused     a token or CSR was refused; .reason is a stable code (audited)
    ├── BrokerControlError   the broker could not be reloaded, or a session not cut off
    └── StackError           the local dev/demo/test stack could not be brought up or read
         ├── BinaryMissing   a server binary is not installed     .binary .package
         ├── PortInUse       a requested port is taken            .service .host .port .option
         └── ServiceFailed   a server exited or never got ready   .service .reason .log_file
                                                                   .log_tail

Every message is written for the person at the terminal: it says what is wrong and what to do
about it, so ``fleetctl`` prints ``str(exc)`` and exits 2 without a traceback. Errors of the
standard library (``OSError`` from sockets, files and processes) are translated into this tree
where they happen, with ``raise ... from exc``.
"""

from __future__ import annotations

from pathlib import Path


class ProvisioningError(Exception):
    """Base of every error raised on purpose by the provisioning package."""


class InvalidSettings(ProvisioningError, ValueError):
    """A configuration value that cannot work: a port out of range, a non-loopback host, ..."""


class PkiError(ProvisioningError):
    """A key, certificate, CSR or PKI directory that cannot be used as it is."""


class PkiExists(PkiError):
    """``fleetctl ca init`` found a CA in the directory and was not told to replace it."""


class EnrolmentRefused(ProvisioningError):
    """An enrolment, renewal or issue request was refused.

    ``reason`` is a short stable code (``token-unknown``, ``token-used``, ``token-expired``,
    ``identity-mismatch``, ``bad-csr``, ``bad-terminal-id``, ``revoked``, ...) that the audit log
    and the HTTP answer carry; the message explains it to a person.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BrokerControlError(ProvisioningError):
    """The broker could not be reloaded, or an open session could not be cut off."""


class StackError(ProvisioningError):
    """The local stack (Mosquitto, InfluxDB, SMTP sink) failed, or its state file is unusable."""


class BinaryMissing(StackError):
    """A server binary the stack needs was not found on the search path."""

    def __init__(self, binary: str, package: str, searched: str) -> None:
        super().__init__(
            f"{binary} not found (searched {searched}); install it with: "
            f"apt-get install -y {package}"
        )
        self.binary = binary
        self.package = package
        self.searched = searched


class PortInUse(StackError):
    """A port asked for explicitly is already bound by another process."""

    def __init__(self, service: str, host: str, port: int, option: str) -> None:
        super().__init__(
            f"{host}:{port} for {service} is already in use; pass another {option}, "
            f"or omit {option} to get a free port"
        )
        self.service = service
        self.host = host
        self.port = port
        self.option = option


class ServiceFailed(StackError):
    """A server exited, or did not become ready within its timeout."""

    def __init__(self, service: str, reason: str, log_file: Path, log_tail: str) -> None:
        tail = log_tail.rstrip("\n") or "(the log is empty)"
        super().__init__(f"{service} {reason}; last lines of {log_file}:\n{tail}")
        self.service = service
        self.reason = reason
        self.log_file = log_file
        self.log_tail = log_tail


class OpsApiError(ProvisioningError):
    """The fleet server's ops API could not be reached or answered unexpectedly."""


class DemoError(ProvisioningError):
    """The demo could not start one of its parts."""
