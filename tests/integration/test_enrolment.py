"""Enrolment over HTTPS against a real fleet server: one certificate per token, all audited."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_protocol import enrolment as contract
from provisioning import pki
from provisioning.authority import FleetAuthority, write_private
from provisioning.stack import StackInfo
from tests.integration.fleet import BIN, RunningServer, start_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(reloaded_stack: StackInfo) -> StackInfo:
    """This module's revocations reload the broker: its own stack (see ``reloaded_stack``)."""
    return reloaded_stack


@pytest.fixture(scope="module")
def server(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(stack, tmp_path_factory.mktemp("enrolment"), enrolment=True)
    yield running
    running.stop()


def fleetctl(*args: str) -> str:
    done = subprocess.run(
        [str(BIN / "fleetctl"), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def new_token(stack: StackInfo, terminal: str, ttl: str = "1h") -> dict[str, str]:
    out = fleetctl(
        "token",
        "create",
        "--pki",
        str(stack.pki_dir),
        "--terminal",
        terminal,
        "--site",
        "jinshan-test",
        "--ttl",
        ttl,
        "--json",
    )
    token: dict[str, str] = json.loads(out)
    return token


def context(stack: StackInfo, identity: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=stack.pki_dir / "ca.pem")
    if identity is not None:
        ctx.load_cert_chain(identity)
    return ctx


def post(url: str, body: bytes, ctx: ssl.SSLContext) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=ctx) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def enrol(
    stack: StackInfo, server: RunningServer, token: str, cn: str
) -> tuple[int, dict[str, object], pki.PrivateKey]:
    key = pki.new_key()
    body = contract.encode(
        contract.EnrolmentRequest(token=token, csr_pem=pki.new_csr(cn, key).decode())
    )
    status, answer = post(server.enrol_url + contract.ENROL_PATH, body, context(stack))
    return status, answer, key


def terminal_name() -> str:
    return f"enrol-{uuid.uuid4().hex[:8]}"


def test_the_ca_is_served_for_fingerprint_pinning(stack: StackInfo, server: RunningServer) -> None:
    with urllib.request.urlopen(
        server.enrol_url + contract.CA_PATH, timeout=10, context=context(stack)
    ) as response:
        served = response.read()
    assert served == (stack.pki_dir / "ca.pem").read_bytes()
    token = new_token(stack, terminal_name())
    assert token["ca_fingerprint"] == pki.fingerprint(pki.cert_from_pem(served, what="ca"))


def test_a_token_enrols_once_and_a_replay_is_refused(
    stack: StackInfo, server: RunningServer
) -> None:
    name = terminal_name()
    token = new_token(stack, name)
    status, answer, key = enrol(stack, server, token["token"], name)
    assert status == 200, answer
    issued = contract.decode(contract.Enrolment, json.dumps(answer).encode())
    assert issued.terminal == name
    assert issued.broker.port == stack.mqtt_port
    assert issued.renew_url == server.enrol_url + contract.RENEW_PATH
    leaf = pki.certs_from_pem(issued.certificate_pem.encode(), what="chain")[0]
    assert pki.common_name(leaf.subject) == name
    assert leaf.public_key() == key.public_key()
    # The answer carries no private key: the key never left "the kiosk".
    assert "PRIVATE KEY" not in json.dumps(answer)

    status, answer, _ = enrol(stack, server, token["token"], name)
    assert (status, answer["reason"]) == (403, "token-used")
    assert len(FleetAuthority.open(stack.pki_dir).certificates(name)) == 1


def test_two_concurrent_requests_with_one_token_get_one_certificate(
    stack: StackInfo, server: RunningServer
) -> None:
    name = terminal_name()
    token = new_token(stack, name)
    results: list[int] = []
    start = threading.Barrier(4)

    def attempt() -> None:
        start.wait()
        results.append(enrol(stack, server, token["token"], name)[0])

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 403, 403, 403]
    assert len(FleetAuthority.open(stack.pki_dir).certificates(name)) == 1


def test_an_expired_token_is_refused(stack: StackInfo, server: RunningServer) -> None:
    name = terminal_name()
    token = new_token(stack, name, ttl="1s")
    time.sleep(2.1)
    status, answer, _ = enrol(stack, server, token["token"], name)
    assert (status, answer["reason"]) == (403, "token-expired")
    assert FleetAuthority.open(stack.pki_dir).certificates(name) == []


def test_a_csr_for_another_terminal_is_refused(stack: StackInfo, server: RunningServer) -> None:
    name, other = terminal_name(), terminal_name()
    token = new_token(stack, name)
    status, answer, _ = enrol(stack, server, token["token"], other)
    assert (status, answer["reason"]) == (403, "identity-mismatch")
    authority = FleetAuthority.open(stack.pki_dir)
    assert authority.certificates(name) == []
    assert authority.certificates(other) == []


def test_every_attempt_is_in_the_audit_log(stack: StackInfo, server: RunningServer) -> None:
    name = terminal_name()
    token = new_token(stack, name)
    assert enrol(stack, server, token["token"], name)[0] == 200
    assert enrol(stack, server, token["token"], name)[0] == 403
    entries = json.loads(
        fleetctl("audit", "--pki", str(stack.pki_dir), "--terminal", name, "--json")
    )
    assert [(e["action"], e["outcome"], e["reason"]) for e in entries] == [
        ("token-create", "created", ""),
        ("enroll", "issued", ""),
        ("enroll", "refused", "token-used"),
    ]
    assert all(e["actor"].startswith("enrolment:127.0.0.1") for e in entries[1:])


def test_a_garbage_request_is_refused_without_spending_the_token(
    stack: StackInfo, server: RunningServer
) -> None:
    name = terminal_name()
    token = new_token(stack, name)
    status, answer = post(server.enrol_url + contract.ENROL_PATH, b"{not json", context(stack))
    assert (status, answer["reason"]) == (400, "bad-request")
    status, answer = post(server.enrol_url + contract.ENROL_PATH, b"x" * 100_000, context(stack))
    assert status in (400, 413)
    assert enrol(stack, server, token["token"], name)[0] == 200


def test_renewal_needs_the_current_certificate_over_mutual_tls(
    stack: StackInfo, server: RunningServer, tmp_path: Path
) -> None:
    name = terminal_name()
    token = new_token(stack, name)
    status, answer, key = enrol(stack, server, token["token"], name)
    assert status == 200
    identity = tmp_path / "identity.pem"
    write_private(identity, pki.key_to_pem(key) + str(answer["certificate_pem"]).encode())
    new_key = pki.new_key()
    body = contract.encode(contract.RenewalRequest(csr_pem=pki.new_csr(name, new_key).decode()))
    url = server.enrol_url + contract.RENEW_PATH
    status, refused = post(url, body, context(stack))  # no client certificate
    assert (status, refused["reason"]) == (403, "no-certificate")

    status, renewed = post(url, body, context(stack, identity))
    assert status == 200, renewed
    leaf = pki.certs_from_pem(str(renewed["certificate_pem"]).encode(), what="chain")[0]
    assert leaf.public_key() == new_key.public_key()
    records = {r.status for r in FleetAuthority.open(stack.pki_dir).certificates(name)}
    assert records == {"valid", "superseded"}
    # The renewed-away certificate cannot renew a second time.
    status, again = post(url, body, context(stack, identity))
    assert (status, again["reason"]) == (403, "certificate-superseded")
