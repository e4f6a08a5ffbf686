"""The real kiosk-agent with its certificate: enrolled by `kiosk-agent enroll`, refusing a key
anyone can read, renewing itself, and staying online while its old certificate is revoked."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from provisioning.authority import CertificateRecord, FleetAuthority, load_settings, save_settings
from provisioning.stack import StackInfo
from tests.integration.fleet import (
    BIN,
    Identity,
    Proc,
    RunningServer,
    eventually,
    influx_query,
    issue_identity,
    mqtt_session_works,
    start_server,
    write_agent_config,
)

pytestmark = pytest.mark.integration

GRACE_S = 3


@pytest.fixture(scope="module")
def stack(reloaded_stack: StackInfo) -> StackInfo:
    """This module's revocations reload the broker: its own stack (see ``reloaded_stack``)."""
    return reloaded_stack


@pytest.fixture(scope="module")
def server(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # A short renewal grace for this module's server: it reads the PKI settings at start.
    original = load_settings(stack.pki_dir)
    save_settings(stack.pki_dir, msgspec.structs.replace(original, renewal_grace_s=GRACE_S))
    try:
        running = start_server(
            stack, tmp_path_factory.mktemp("agent-identity"), enrolment=True, upkeep_s=0.5
        )
    finally:
        save_settings(stack.pki_dir, original)
    yield running
    running.stop()


def stored(stack: StackInfo, server: RunningServer, terminal: str, since_ms: int = 0) -> int:
    series = influx_query(
        stack.influx_url,
        server.database,
        f'SELECT count("cpu_percent") FROM "system" WHERE "terminal" = \'{terminal}\' '
        f"AND time > {since_ms}ms",
    )
    if not series:
        return 0
    values = series[0]["values"]
    assert isinstance(values, list)
    return int(values[0][1])


def test_an_enrolled_kiosk_runs_with_its_own_key(
    stack: StackInfo, server: RunningServer, tmp_path: Path
) -> None:
    terminal = f"enrolled-{uuid.uuid4().hex[:6]}"
    token = json.loads(
        subprocess.run(
            [str(BIN / "fleetctl"), "token", "create", "--pki", str(stack.pki_dir),
             "--terminal", terminal, "--site", "zhujing-dqzx", "--json"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout
    )  # fmt: skip
    config = tmp_path / "etc" / "agent.toml"
    state = tmp_path / "state"
    enrol = subprocess.run(
        [str(BIN / "kiosk-agent"), "enroll", "--server", server.enrol_url,
         "--terminal", terminal, "--token", token["token"],
         "--ca-fingerprint", token["ca_fingerprint"].replace(":", "").lower(),
         "--config", str(config), "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert enrol.returncode == 0, enrol.stderr
    identity = state / "tls" / "identity.pem"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert stat.S_IMODE(identity.parent.stat().st_mode) == 0o700
    assert "PRIVATE KEY" not in enrol.stdout + enrol.stderr

    # The same token cannot enrol a second kiosk.
    again = subprocess.run(
        [str(BIN / "kiosk-agent"), "enroll", "--server", server.enrol_url,
         "--terminal", terminal, "--token", token["token"],
         "--ca-fingerprint", token["ca_fingerprint"],
         "--config", str(tmp_path / "other.toml"), "--state-dir", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert again.returncode == 2
    assert "token-used" in again.stderr or "already used" in again.stderr
    assert "Traceback" not in again.stderr

    agent = Proc(
        [str(BIN / "kiosk-agent"), "run", "--config", str(config)], tmp_path / "agent.log"
    ).start()
    try:
        eventually(lambda: stored(stack, server, terminal), timeout=60)
    finally:
        assert agent.stop() == 0
    key_body = identity.read_text().split("-----BEGIN PRIVATE KEY-----")[1].split("-----")[0]
    log = agent.output()
    assert "PRIVATE KEY" not in log
    assert key_body.strip().splitlines()[0] not in log


def test_a_fingerprint_that_does_not_match_sends_no_token(
    stack: StackInfo, server: RunningServer, tmp_path: Path
) -> None:
    terminal = f"pinned-{uuid.uuid4().hex[:6]}"
    token = FleetAuthority.open(stack.pki_dir).create_token(terminal, "zhujing-dqzx", actor="t")
    result = subprocess.run(
        [str(BIN / "kiosk-agent"), "enroll", "--server", server.enrol_url,
         "--terminal", terminal, "--token", token.secret, "--ca-fingerprint", "AB" * 32,
         "--config", str(tmp_path / "a.toml"), "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "fingerprint" in result.stderr
    # The token was never shown to the server: it still works.
    actions = [e.action for e in FleetAuthority.open(stack.pki_dir).audit(terminal=terminal)]
    assert actions == ["token-create"]


def test_the_agent_refuses_a_key_others_can_read(stack: StackInfo, tmp_path: Path) -> None:
    config = write_agent_config(
        tmp_path / "agent.toml", terminal="loose-key-01", site="zhujing-dqzx", stack=stack,
        state_dir=tmp_path / "state",
    )  # fmt: skip
    identity = tmp_path / "state" / "tls" / "loose-key-01.pem"
    identity.chmod(0o644)
    for command in ("run", "check-config"):
        result = subprocess.run(
            [str(BIN / "kiosk-agent"), command, "--config", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 2
        assert str(identity) in result.stderr
        assert "644" in result.stderr
        assert "chmod 600" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.asyncio
async def test_a_kiosk_renews_and_its_old_certificate_is_revoked_after_the_grace(
    stack: StackInfo, server: RunningServer, tmp_path: Path
) -> None:
    terminal = f"renewing-{uuid.uuid4().hex[:6]}"
    # A certificate already past two thirds of its life: the agent renews it at start.
    old = issue_identity(stack, terminal, tmp_path / "old", validity_s=20)
    state = tmp_path / "state"
    (state / "tls").mkdir(parents=True, mode=0o700)
    current = state / "tls" / "identity.pem"
    current.write_bytes(old.identity_file.read_bytes())
    current.chmod(0o600)
    config = write_agent_config(
        tmp_path / "agent.toml", terminal=terminal, site="test-site", stack=stack,
        state_dir=state, identity=Identity(terminal, current, old.ca_file),
    )  # fmt: skip
    with config.open("a", encoding="utf-8") as f:
        f.write(f'\n[enrolment]\nrenew_url = "{server.enrol_url}/enroll/v1/renew"\nretry_s = 1\n')
    authority = FleetAuthority.open(stack.pki_dir)
    (first,) = authority.certificates(terminal)
    agent = Proc(
        [str(BIN / "kiosk-agent"), "run", "--config", str(config)], tmp_path / "agent.log"
    ).start()
    try:

        def renewed() -> list[CertificateRecord] | None:
            records = authority.certificates(terminal)
            return records if len(records) == 2 else None

        records = eventually(renewed, timeout=30)
        assert {r.serial: r.status for r in records}[first.serial] in ("superseded", "revoked")
        # The new pair is stored: the agent writes it once the answer reached it, a moment
        # after the authority recorded the new certificate.
        eventually(lambda: current.read_bytes() != old.identity_file.read_bytes(), timeout=10)
        # After the grace the old certificate is revoked (CRL, broker reloaded) ...
        eventually(
            lambda: (
                {r.serial: r.status for r in authority.certificates(terminal)}[first.serial]
                == "revoked"
            ),
            timeout=GRACE_S + 10,
        )
        revoked_at = int(time.time() * 1000)
        assert not await _connects(stack, old)
        # ... while the kiosk, on its new certificate, keeps reporting.
        eventually(lambda: stored(stack, server, terminal, since_ms=revoked_at), timeout=30)
    finally:
        assert agent.stop() == 0, agent.output()[-3000:]
    assert "PRIVATE KEY" not in agent.output()


async def _connects(stack: StackInfo, identity: Identity) -> bool:
    # The upkeep reloads the broker just after it recorded the revocation; give it that moment
    # (a successful probe would take the kiosk's session over, its client id being its CN).
    await asyncio.sleep(2)
    return await mqtt_session_works(stack, identity, client_id=identity.name)
