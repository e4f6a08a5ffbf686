"""Helpers for integration tests: real processes of the project's own commands, started and
stopped by PID, and small readers of what the real servers hold."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

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


def write_agent_config(
    path: Path,
    *,
    terminal: str,
    site: str,
    mqtt_port: int,
    state_dir: Path,
    keepalive_s: int = 2,
    interval_s: float = 0.5,
    batch_size: int = 2,
) -> Path:
    path.write_text(
        f"""
[terminal]
id = "{terminal}"
site = "{site}"

[broker]
host = "127.0.0.1"
port = {mqtt_port}
keepalive_s = {keepalive_s}
reconnect_min_s = 0.2
reconnect_max_s = 2.0

[telemetry]
interval_s = {interval_s}
batch_size = {batch_size}
max_batch_age_s = 2.0

[storage]
state_dir = "{state_dir}"
""",
        encoding="utf-8",
    )
    return path


def write_server_config(
    path: Path,
    *,
    mqtt_port: int,
    influx_url: str,
    database: str,
    registry: Path,
    api_port: int,
    client_id: str = "fleet-server-1",
    share_group: str = "fleet",
    extra: str = "",
) -> Path:
    path.write_text(
        f"""
[broker]
host = "127.0.0.1"
port = {mqtt_port}
client_id = "{client_id}"
share_group = "{share_group}"
keepalive_s = 5
session_expiry_s = 60

[influx]
url = "{influx_url}"
database = "{database}"
batch_points = 500
flush_interval_s = 0.2

[registry]
path = "{registry}"

[api]
host = "127.0.0.1"
port = {api_port}
{extra}""",
        encoding="utf-8",
    )
    return path


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
