"""The local stack: real Mosquitto, InfluxDB and SMTP sink, and `fleetctl stack` around them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import smtplib
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from provisioning.cli import main
from provisioning.errors import BinaryMissing, ServiceFailed
from provisioning.stack import Service, StackInfo, down, status, up
from tests.integration.fleet import mqtt_client, service_identity

pytestmark = pytest.mark.integration

SUBJECT = "终端离线 / Terminal offline"

# The stack is on loopback; a proxy from the environment must not be asked to reach it.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def influx(url: str, path: str, *, data: bytes | None = None, **params: str) -> bytes:
    query = urllib.parse.urlencode(params)
    with _http.open(f"{url}{path}?{query}", data=data, timeout=10) as response:
        body: bytes = response.read()
        return body


def influx_rows(url: str, database: str, q: str) -> list[list[object]]:
    answer = json.loads(influx(url, "/query", db=database, q=q))
    series = answer["results"][0].get("series", [])
    return [row for serie in series for row in serie["values"]]


def processes_with_argument(argument: str) -> list[int]:
    """Pids of live processes that have ``argument`` among their arguments."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(argument) in args:
            pids.append(int(entry.name))
    return pids


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def exchange(info: StackInfo, topic: str, payload: bytes) -> bytes:
    """Subscribe, publish ``payload`` at QoS 1 and return what the subscription delivers."""
    async with mqtt_client(
        info,
        service_identity(info),
        client_id=f"stack-test-{uuid.uuid4().hex[:8]}",
        service=True,
    ) as client:
        await client.subscribe(topic, qos=1)
        await client.publish(topic, payload, qos=1)
        async with asyncio.timeout(5):
            message = await anext(client.messages)
    assert isinstance(message.payload, bytes)
    return message.payload


async def publish_retained(info: StackInfo, topic: str, payload: bytes) -> None:
    async with mqtt_client(info, service_identity(info), service=True) as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def read_retained(info: StackInfo, topic: str) -> bytes:
    async with mqtt_client(info, service_identity(info), service=True) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            message = await anext(client.messages)
    assert message.retain
    assert isinstance(message.payload, bytes)
    return message.payload


# --- the session stack --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_broker_delivers_a_published_message(stack: StackInfo) -> None:
    payload = b'{"seq":1,"ts":1700000000.0}'
    assert await exchange(stack, "kiosk/v1/stack-test-01/telemetry", payload) == payload


@pytest.mark.asyncio
async def test_broker_passes_a_message_over_the_codec_limit_on_to_the_server(
    stack: StackInfo,
) -> None:
    # The server must see oversize messages to count them; the broker must not drop them.
    payload = b"x" * (300 * 1024)
    assert await exchange(stack, "kiosk/v1/stack-test-02/telemetry", payload) == payload


def test_influx_answers_a_query_and_has_the_database(stack: StackInfo) -> None:
    rows = influx_rows(stack.influx_url, stack.influx_database, "SHOW DATABASES")
    assert [stack.influx_database] in rows


def test_smtp_sink_stores_the_message_as_received(stack: StackInfo) -> None:
    recipient = f"owner-{uuid.uuid4().hex[:8]}@example.test"
    message = EmailMessage()
    message["From"] = "fleet@example.test"
    message["To"] = recipient
    message["Subject"] = SUBJECT
    message.set_content("终端 t-001 于 09:00 离线。\n.a line starting with a dot\n")
    with smtplib.SMTP(stack.smtp_host, stack.smtp_port, timeout=10) as smtp:
        smtp.send_message(message)

    deadline = time.monotonic() + 5
    stored: list[Path] = []
    while not stored and time.monotonic() < deadline:
        stored = [p for p in stack.maildir.glob("*.eml") if recipient.encode() in p.read_bytes()]
        time.sleep(0.05)
    assert len(stored) == 1
    raw = stored[0].read_bytes()
    assert b"=?utf-8?b?" in raw.lower()  # RFC 2047 encoded word, as smtplib sent it
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert parsed["Subject"] == SUBJECT
    assert parsed["X-Envelope-To"] == f"<{recipient}>"
    body = parsed.get_body()
    assert body is not None
    # Stored as on the wire: CRLF line ends, SMTP's dot-stuffing undone.
    text = body.get_content()
    assert text == "终端 t-001 于 09:00 离线。\r\n.a line starting with a dot\r\n"
    assert not list(stack.maildir.glob(".*")), "no temporary files are left behind"


# --- fleetctl stack, each in its own work dir ---------------------------------------------


def fleetctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fleetctl_up_status_down_up_keeps_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = str(tmp_path / "stack")
    code, out, _ = fleetctl(capsys, "stack", "up", "--workdir", workdir, "--json")
    assert code == 0
    first = StackInfo.from_json(out)
    pids = [first.mqtt_pid, first.influx_pid, first.smtp_pid]
    try:
        point = b"stack_test,terminal=t-001 value=42i 1700000000"
        influx(first.influx_url, "/write", data=point, db=first.influx_database, precision="s")
        asyncio.run(publish_retained(first, "kiosk/v1/t-001/desired", b'{"config":"v1"}'))

        code, out, _ = fleetctl(capsys, "stack", "up", "--workdir", workdir, "--json")
        assert code == 0
        assert StackInfo.from_json(out) == first, "up on a running stack changes nothing"

        code, out, _ = fleetctl(capsys, "stack", "status", "--workdir", workdir, "--json")
        assert code == 0
        reported = json.loads(out)
        assert reported["running"] is True
        assert [s["pid"] for s in reported["services"]] == pids

        code, out, _ = fleetctl(capsys, "stack", "status", "--workdir", workdir)
        assert code == 0
        for endpoint in (first.endpoint(s) for s in Service):
            assert endpoint in out
        assert str(first.maildir) in out

        code, out, _ = fleetctl(capsys, "stack", "down", "--workdir", workdir)
        assert code == 0
        assert all(f"pid {pid}" in out for pid in pids)
        assert not any(pid_exists(pid) for pid in pids)
        code, _, _ = fleetctl(capsys, "stack", "status", "--workdir", workdir)
        assert code == 1

        code, out, _ = fleetctl(capsys, "stack", "up", "--workdir", workdir, "--json")
        assert code == 0
        second = StackInfo.from_json(out)
        assert second.mqtt_pid not in pids
        assert (second.mqtt_port, second.influx_port, second.smtp_port) == (
            first.mqtt_port,
            first.influx_port,
            first.smtp_port,
        ), "the ports of the previous run are reused when free"
        rows = influx_rows(
            second.influx_url, second.influx_database, "SELECT value FROM stack_test"
        )
        assert rows == [["2023-11-14T22:13:20Z", 42]]
        retained = asyncio.run(read_retained(second, "kiosk/v1/t-001/desired"))
        assert retained == b'{"config":"v1"}'
    finally:
        down(Path(workdir))
    assert status(Path(workdir)).running is False


@pytest.mark.parametrize(
    ("option", "service"),
    [("--mqtt-port", "mosquitto"), ("--influx-port", "influxdb"), ("--smtp-port", "smtp")],
)
def test_a_taken_port_is_refused_and_nothing_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, service: str
) -> None:
    workdir = tmp_path / "stack"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        code, _, err = fleetctl(capsys, "stack", "up", "--workdir", str(workdir), option, str(port))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("fleetctl: error:")]
    assert len(errors) == 1
    assert f"127.0.0.1:{port}" in errors[0]
    assert service in errors[0]
    assert option in errors[0]
    assert "Traceback" not in err
    assert status(workdir).info is None
    assert not processes_with_argument(str(workdir / "mosquitto" / "mosquitto.conf"))


def test_a_missing_mosquitto_names_its_debian_package(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(BinaryMissing) as caught:
        up(tmp_path / "stack", search_path=str(empty))
    assert caught.value.binary == "mosquitto"
    assert "apt-get install -y mosquitto" in str(caught.value)


def test_a_missing_influxd_names_its_debian_package(tmp_path: Path) -> None:
    only_mosquitto = tmp_path / "bin"
    only_mosquitto.mkdir()
    mosquitto = shutil.which("mosquitto", path="/usr/sbin:/usr/bin")
    assert mosquitto is not None
    (only_mosquitto / "mosquitto").symlink_to(mosquitto)
    with pytest.raises(BinaryMissing) as caught:
        up(tmp_path / "stack", search_path=str(only_mosquitto))
    assert caught.value.package == "influxdb"
    assert "apt-get install -y influxdb" in str(caught.value)


def test_a_server_that_fails_is_reported_with_its_log_and_the_rest_is_stopped(
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mosquitto = shutil.which("mosquitto", path="/usr/sbin:/usr/bin")
    assert mosquitto is not None
    (bin_dir / "mosquitto").symlink_to(mosquitto)
    broken = bin_dir / "influxd"
    broken.write_text("#!/bin/sh\necho 'run: open server: boom' >&2\nexit 3\n")
    broken.chmod(0o755)
    workdir = tmp_path / "stack"

    with pytest.raises(ServiceFailed) as caught:
        up(workdir, search_path=str(bin_dir), detach=False)

    assert caught.value.service == "influxdb"
    assert "exited with status 3" in str(caught.value)
    assert "boom" in str(caught.value)
    assert str(workdir / "influxdb" / "influxd.log") in str(caught.value)
    assert not processes_with_argument(str(workdir / "mosquitto" / "mosquitto.conf"))
    assert not processes_with_argument(str(workdir / "smtp" / "maildir"))
    assert status(workdir).info is None


def test_down_never_signals_a_process_that_is_not_the_stacks(tmp_path: Path) -> None:
    # A stack.json whose pids now belong to someone else (pid reuse after a reboot, say).
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        workdir = tmp_path / "stack"
        workdir.mkdir()
        info = StackInfo(
            workdir=workdir,
            mqtt_host="127.0.0.1",
            mqtt_port=1,
            mqtt_service_port=4,
            influx_url="http://127.0.0.1:2",
            smtp_host="127.0.0.1",
            smtp_port=3,
            maildir=workdir / "smtp" / "maildir",
            mqtt_pid=stranger.pid,
            influx_pid=stranger.pid,
            smtp_pid=stranger.pid,
        )
        (workdir / "stack.json").write_text(info.to_json())
        assert down(workdir) == []
        assert stranger.poll() is None
        assert status(workdir).running is False
    finally:
        stranger.kill()
        stranger.wait()
