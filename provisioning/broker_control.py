"""Adapter: tell the broker about a revocation (the only provisioning module importing paho).

Mosquitto checks a client certificate against the CRL during the TLS handshake only. After a
revocation it must therefore do three things, in this order:

1. reread the CRL and the ACL (:func:`reload_broker`, SIGHUP through the configured command):
   from now on no new session with the revoked certificate, and the ACL's ``topic deny #`` for
   the terminal applies to its open session at once (no publish is accepted, nothing is
   delivered to it);
2. end the open session (:func:`cut_off`): the fleet's ops identity connects on the service
   listener with the terminal's client id. Mosquitto closes the existing connection with that
   id ("session taken over"); connecting with clean start and no session expiry also discards
   the terminal's stored session, so queued commands are not kept for a revoked kiosk. The
   terminal's reconnects then fail the TLS handshake. The service listener only admits
   certificates of the service CA, so no terminal can do this to another.

Other terminals are not touched: SIGHUP neither drops connections nor resets sessions.
"""

from __future__ import annotations

import ssl
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from provisioning.errors import BrokerControlError

RELOAD_TIMEOUT_S: Final = 15.0
CONNECT_TIMEOUT_S: Final = 10.0


def reload_broker(command: Sequence[str]) -> None:
    """Run the broker's reload command (argv, no shell); raise with its output if it fails."""
    if not command:
        raise BrokerControlError(
            "no broker reload command is configured in the PKI settings (reload_command); "
            "reload the broker by hand (e.g. `systemctl reload mosquitto`)"
        )
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=RELOAD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerControlError(f"broker reload command {command[0]!r} failed: {exc}") from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise BrokerControlError(
            f"broker reload command exited with {done.returncode}: {output or '(no output)'}"
        )


def cut_off(
    client_id: str,
    *,
    host: str,
    port: int,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    timeout: float = CONNECT_TIMEOUT_S,
) -> None:
    """End the open session of ``client_id`` (and its stored session) on the broker."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise BrokerControlError(f"cannot load the ops identity {cert_file}: {exc}") from exc
    client.tls_set_context(context)
    connected = threading.Event()
    outcome: list[str] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        outcome.append(str(reason))
        connected.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    try:
        client.connect(host, port, keepalive=10, clean_start=True, properties=props)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerControlError(
            f"cannot reach the broker's service listener {host}:{port}: {exc}"
        ) from exc
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise BrokerControlError(f"no answer from the broker at {host}:{port}")
        if outcome != ["Success"]:
            raise BrokerControlError(f"the broker refused the ops identity: {outcome[0]}")
    finally:
        client.disconnect()
        client.loop_stop()


def enforce_revocation(
    client_id: str, *, reload_command: Sequence[str], host: str, port: int, pki_dir: Path
) -> None:
    """After a revocation was written: reload the broker, then end the terminal's session."""
    reload_broker(reload_command)
    cut_off(
        client_id,
        host=host,
        port=port,
        ca_file=pki_dir / "ca.pem",
        cert_file=pki_dir / "ops.pem",
        key_file=pki_dir / "ops.key",
    )
