"""Helpers for integration tests: real processes of the project's own commands, started and
stopped by PID, and small readers of what the real servers hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt

from fleet_server.config import BrokerSettings
from fleet_server.errors import MqttProtocolError
from fleet_server.mqtt_wire import ConnAck, Decoder, Packet, PingResp, encode_connect
from provisioning.authority import FleetAuthority, write_private
from provisioning.stack import Service, StackInfo, server_config, status

BIN = Path(sys.executable).parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def eventually(check: Callable[[], T | None], timeout: float, every: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"not true within {timeout} s; last value: {last!r}")


@dataclass
class Proc:
    """A command of ours running as a child process, with its output in a log file."""

    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass(frozen=True)
class Identity:
    """A certificate of ours for a test: ``identity_file`` holds the key, then the chain."""

    name: str
    identity_file: Path
    ca_file: Path

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.load_cert_chain(self.identity_file)
        return context


def issue_identity(
    stack: StackInfo,
    terminal: str,
    dest: Path,
    *,
    site: str = "test-site",
    validity_s: int | None = None,
) -> Identity:
    """A terminal certificate from the stack's fleet CA, written like `kiosk-agent enroll`."""
    identity_file = dest / f"{terminal}.pem"
    FleetAuthority.open(stack.pki_dir).provision_identity(
        terminal, site, identity_file, actor="tests", validity_s=validity_s
    )
    return Identity(terminal, identity_file, stack.pki_dir / "ca.pem")


def service_identity(stack: StackInfo) -> Identity:
    """The fleet server's own MQTT identity (service CA), for tests acting as the server."""
    combined = stack.pki_dir / "fleet-server.combined.pem"
    if not combined.exists():
        key = (stack.pki_dir / "fleet-server.key").read_bytes()
        write_private(combined, key + (stack.pki_dir / "fleet-server.pem").read_bytes())
    return Identity("fleet.server", combined, stack.pki_dir / "ca.pem")


def service_settings(
    stack: StackInfo, client_id: str, group: str, **overrides: Any
) -> BrokerSettings:
    """``[broker]`` settings of a fleet server on ``stack``'s service listener, with its own
    certificate, a persistent session of 5 minutes and any ``overrides``."""
    return BrokerSettings(
        port=stack.mqtt_service_port,
        ca_file=str(stack.pki_dir / "ca.pem"),
        cert_file=str(stack.pki_dir / "fleet-server.pem"),
        key_file=str(stack.pki_dir / "fleet-server.key"),
        client_id=client_id,
        share_group=group,
        session_expiry_s=overrides.pop("session_expiry_s", 300),
        **overrides,
    )


def mqtt_client(
    stack: StackInfo,
    identity: Identity | None,
    *,
    client_id: str = "",
    service: bool = False,
    v5: bool = True,
    **kwargs: Any,
) -> aiomqtt.Client:
    """An aiomqtt client over TLS to the stack's terminal (or service) listener."""
    if identity is None:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=stack.pki_dir / "ca.pem"
        )
    else:
        context = identity.tls_context()
    return aiomqtt.Client(
        stack.mqtt_host,
        stack.mqtt_service_port if service else stack.mqtt_port,
        identifier=client_id or (identity.name if identity else None),
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        tls_context=context,
        **kwargs,
    )


#: PINGREQ and DISCONNECT (MQTT 5 §3.12, §3.14): fixed headers with nothing after them.
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"


async def mqtt_session_works(
    stack: StackInfo, identity: Identity | None, *, client_id: str, service: bool = False
) -> bool:
    """Whether the broker gives ``identity`` (``None``: no client certificate) a working session
    as ``client_id`` on its terminal (or ``service``) listener: a CONNACK with reason 0, then
    a PINGRESP to a PINGREQ. A refusal is a TLS alert, the connection closed, or a CONNACK
    with a failure code.

    Spoken on the wire (fleet_server.mqtt_wire), not through aiomqtt: aiomqtt does not notice
    a connection closed before its CONNACK and waits out its whole connect timeout, 5 s per
    refused probe, where a closed socket here answers at once."""
    if identity is None:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=stack.pki_dir / "ca.pem"
        )
    else:
        context = identity.tls_context()
    port = stack.mqtt_service_port if service else stack.mqtt_port
    decoder = Decoder()

    async def packet(reader: asyncio.StreamReader) -> Packet | None:
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                return None  # closed by the broker
            found = decoder.feed(chunk)
            if found:
                return found[0]

    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(stack.mqtt_host, port, ssl=context)
            writer.write(
                encode_connect(
                    client_id,
                    clean_start=True,
                    keepalive_s=30,
                    session_expiry_s=0,
                    receive_maximum=10,
                )
            )
            await writer.drain()
            connack = await packet(reader)
            if not isinstance(connack, ConnAck) or connack.reason_code != 0:
                return False
            writer.write(_PINGREQ)
            await writer.drain()
            if not isinstance(await packet(reader), PingResp):
                return False
            writer.write(_DISCONNECT)
            await writer.drain()
    except (TimeoutError, ssl.SSLError, OSError, MqttProtocolError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(ssl.SSLError, OSError):
                await writer.wait_closed()
    return True


def write_agent_config(
    path: Path,
    *,
    terminal: str,
    site: str,
    stack: StackInfo,
    state_dir: Path,
    keepalive_s: int = 2,
    interval_s: float = 0.5,
    batch_size: int = 2,
    identity: Identity | None = None,
    extra: str = "",
) -> Path:
    """An agent config for ``terminal`` on ``stack``, with a certificate issued for it.

    ``extra`` is more TOML (sections the test needs). The status page listens on a free port
    unless ``extra`` sets one."""
    if identity is None:
        identity = issue_identity(stack, terminal, state_dir / "tls", site=site)
    path.write_text(
        f"""
[terminal]
id = "{terminal}"
site = "{site}"

[broker]
host = "127.0.0.1"
port = {stack.mqtt_port}
keepalive_s = {keepalive_s}
reconnect_min_s = 0.2
reconnect_max_s = 2.0

[telemetry]
interval_s = {interval_s}
batch_size = {batch_size}
max_batch_age_s = 2.0

[tls]
ca_file = "{identity.ca_file}"
identity_file = "{identity.identity_file}"

[storage]
state_dir = "{state_dir}"
{extra}
{"" if "[status_page]" in extra else "[status_page]" + chr(10) + "port = 0"}
""",
        encoding="utf-8",
    )
    return path


def write_server_config(
    path: Path,
    *,
    stack: StackInfo,
    influx_url: str,
    database: str,
    registry: Path,
    api_port: int,
    client_id: str = "fleet-server-1",
    share_group: str = "fleet",
    keepalive_s: int = 5,
    extra: str = "",
) -> Path:
    path.write_text(
        server_config(
            stack,
            client_id=client_id,
            database=database,
            registry=registry,
            api_port=api_port,
            influx_url=influx_url,
            broker={"share_group": share_group, "keepalive_s": keepalive_s, "session_expiry_s": 60},
            influx={"batch_points": 500, "flush_interval_s": 0.2},
            extra=extra,
        ),
        encoding="utf-8",
    )
    return path


def stop_broker(stack: StackInfo, how: signal.Signals) -> None:
    """Stop the stack's Mosquitto by its PID (``how``: SIGTERM, SIGKILL); wait until it is
    gone. ``provisioning.stack.up`` starts it again on the same port."""
    os.kill(stack.pid(Service.MQTT), how)

    def stopped() -> bool:
        found = status(stack.workdir)
        return not any(s.running for s in found.services if s.service is Service.MQTT)

    eventually(stopped, timeout=30)


def server_healthy(api: str) -> bool:
    """True once the server's ops API answers and its broker subscription is up."""
    try:
        return bool(http_json(f"{api}/healthz"))
    except OSError:
        return False


def influx_query(url: str, database: str, query: str) -> list[dict[str, object]]:
    """Run InfluxQL with the plain v1 HTTP API; returns the first statement's series."""
    params = urllib.parse.urlencode({"db": database, "q": query, "epoch": "ms"})
    with urllib.request.urlopen(f"{url}/query?{params}", timeout=10) as response:
        body = json.load(response)
    result = body["results"][0]
    if "error" in result:
        raise AssertionError(f"InfluxQL error: {result['error']}")
    series: list[dict[str, object]] = result.get("series", [])
    return series


def http_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def server_metrics(api: str) -> tuple[str, dict[str, float]]:
    """The content type of a server's /metrics and its samples, by name and labels as written
    (``fleet_spool_points``, ``fleet_mail_total{outcome="sent"}``)."""
    with urllib.request.urlopen(f"{api}/metrics", timeout=10) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return content_type, values


@dataclass
class RunningServer:
    """A ``fleet-server`` process of a test, with its own database and share group."""

    proc: Proc
    api: str
    database: str
    enrol_url: str
    #: Its ``[broker] client_id``, which is also its name as an alerting lease holder.
    client_id: str = ""
    registry: Path | None = None

    def stop(self) -> None:
        code = self.proc.stop()
        assert code == 0, f"fleet-server exited {code}:\n{self.proc.output()[-3000:]}"


def start_server(
    stack: StackInfo,
    workdir: Path,
    *,
    enrolment: bool = False,
    upkeep_s: float = 60.0,
    extra: str = "",
    registry: Path | None = None,
    database: str | None = None,
    share_group: str | None = None,
    keepalive_s: int = 5,
) -> RunningServer:
    """Start a fleet server on ``stack``; wait until its subscription is up. ``extra`` is
    appended to its config file (``[mail]``, ``[alerts]`` ...).

    Each server has its own client id. By default it also has its own registry, InfluxDB
    database and share group; several processes of one fleet share them by passing the same
    ``registry``, ``database`` and ``share_group``. Its MQTT keep-alive is a short 5 s unless
    ``keepalive_s`` says otherwise."""
    tag = uuid.uuid4().hex[:8]
    registry = registry or workdir / f"registry-{tag}.sqlite3"
    database = database or f"t_{tag}"
    api_port = free_port()
    enrol_port = free_port()
    enrol_url = f"https://127.0.0.1:{enrol_port}"
    if enrolment:
        extra += f"""
[enrolment]
pki_dir = "{stack.pki_dir}"
host = "127.0.0.1"
port = {enrol_port}
public_url = "{enrol_url}"
upkeep_s = {upkeep_s}
"""
    config = write_server_config(
        workdir / f"server-{tag}.toml",
        stack=stack,
        influx_url=stack.influx_url,
        database=database,
        registry=registry,
        api_port=api_port,
        client_id=f"fleet-server-{tag}",
        share_group=share_group or f"g{tag}",
        keepalive_s=keepalive_s,
        extra=extra,
    )
    proc = Proc(
        [str(BIN / "fleet-server"), "run", "--config", str(config)],
        workdir / f"server-{tag}.log",
    ).start()
    api = f"http://127.0.0.1:{api_port}"
    try:
        eventually(lambda: server_healthy(api) or proc.popen.poll() is not None, timeout=20)  # type: ignore[union-attr]
    except AssertionError:
        proc.stop()
        raise
    assert proc.popen is not None
    assert proc.popen.poll() is None, f"fleet-server exited:\n{proc.output()[-3000:]}"
    return RunningServer(proc, api, database, enrol_url, f"fleet-server-{tag}", registry)


def provision_sim(
    stack: StackInfo,
    tls_dir: Path,
    prefix: str,
    count: int,
    site: str | Sequence[str],
    *,
    threads: int = 1,
) -> None:
    """Certificates for fleet-sim's kiosks ``{prefix}-0001`` on, made ops-side as the demo
    does. With several sites, kiosks are spread over them in turn, as fleet-sim does. Each
    certificate is a key, a signature and fsynced writes: ``threads`` overlap the disk waits."""
    sites = [site] if isinstance(site, str) else list(site)
    authority = FleetAuthority.open(stack.pki_dir)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (tls_dir / "ca.pem").write_bytes(authority.ca_pem)

    def one(i: int) -> None:
        terminal = f"{prefix}-{i:04d}"
        authority.provision_identity(
            terminal, sites[(i - 1) % len(sites)], tls_dir / f"{terminal}.pem", actor="tests"
        )

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(one, range(1, count + 1)):
            pass


def start_sim(
    stack: StackInfo,
    workdir: Path,
    prefix: str,
    count: int,
    *options: str,
    site: str | Sequence[str],
    provision: bool = True,
    log_level: str = "INFO",
) -> tuple[Proc, Path]:
    """A fleet-sim of ``count`` kiosks at ``site`` (or spread over several sites); returns it
    and its control socket. ``provision=False``: the certificates are in ``workdir/tls``
    already (see :func:`provision_sim`)."""
    tls_dir = workdir / "tls"
    sites = [site] if isinstance(site, str) else list(site)
    if provision:
        provision_sim(stack, tls_dir, prefix, count, sites)
    control = workdir / "control.sock"
    proc = Proc(
        [
            str(BIN / "fleet-sim"),
            *("--terminals", str(count), "--prefix", prefix),
            *(arg for s in sites for arg in ("--site", s)),
            *("--broker-port", str(stack.mqtt_port), "--tls-dir", str(tls_dir)),
            *("--state-dir", str(workdir / "state"), "--control", str(control)),
            *("--log-level", log_level),
            *options,
        ],
        workdir / "fleet-sim.log",
    ).start()
    return proc, control


def inject(control: Path, terminal: str, *fault: str) -> str:
    """``fleet-sim inject``: a fault into one kiosk of a running simulation; what it did."""
    result = subprocess.run(
        [str(BIN / "fleet-sim"), "inject", "--control", str(control), terminal, *fault],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def inject_now(control: Path, terminal: str, *fault: str) -> str:
    """What ``fleet-sim inject`` does, without starting a Python process for it (about a
    second each on a busy machine): the line ``TERMINAL FAULT [VALUE]`` on the simulation's
    control socket; what it did. Fails unless the simulation answered ``ok:``. The command
    itself is tested with :func:`inject`, in test_fleet_sim."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(control))
        conn.sendall(f"{terminal} {' '.join(fault)}\n".encode())
        with conn.makefile("rb") as answers:
            answer = answers.readline().decode("utf-8", "replace").strip()
    assert answer.startswith("ok: "), answer
    return answer.removeprefix("ok: ")


def sites_toml(
    path: Path,
    sites: Mapping[str, str],
    *,
    owners: Sequence[str],
    grace_s: int,
    district: str | Mapping[str, str] = "金山区",
    town: str = "朱泾镇",
) -> Path:
    """A sites file for ``fleetctl sites import``: 24-hour sites (id -> name), each with
    ``owners`` and ``grace_s``, in one ``district`` or in each site's (site id -> district)."""
    quoted = ", ".join(json.dumps(o, ensure_ascii=False) for o in owners)
    text = ""
    for site, name in sites.items():
        text += f"""
[[sites]]
id = "{site}"
name = "{name}"
district = "{district if isinstance(district, str) else district[site]}"
town = "{town}"
kind = "village-point"
address = "{town}测试路 1 号"
owners = [{quoted}]
open_24h = true
grace_s = {grace_s}
"""
    path.write_text(text, encoding="utf-8")
    return path


def read_mails(maildir: Path) -> list[EmailMessage]:
    """Every message the stack's SMTP sink received, oldest first."""
    found = []
    for path in sorted(maildir.glob("*.eml")):
        message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        assert isinstance(message, EmailMessage)
        found.append(message)
    return found


def mails_about(maildir: Path, words: str) -> list[EmailMessage]:
    """The messages in the SMTP sink whose subject or text contains ``words``."""
    return [
        m for m in read_mails(maildir) if words in str(m["Subject"]) or words in m.get_content()
    ]
