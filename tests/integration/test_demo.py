"""`make demo` runs `fleetctl demo`: the whole system comes up looking like a Jinshan district
fleet, and Ctrl-C stops every process it started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from provisioning import stack
from tests.integration.fleet import BIN, eventually

pytestmark = pytest.mark.integration

TOWNS = {"朱泾镇", "枫泾镇", "亭林镇"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait() is missing.
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def _what_the_demo_said(log: Path, workdir: Path) -> str:
    """The demo's own output and the end of every log it keeps: what a failure is judged by."""
    parts = [f"--- {log.name}\n{log.read_text(errors='replace')}"]
    for child_log in sorted((workdir / "logs").glob("*.log")):
        tail = child_log.read_text(errors="replace").splitlines()[-20:]
        parts.append(f"--- {child_log.name} (last 20 lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def _page_listing_the_printer(url: str) -> str | None:
    try:
        with _direct.open(url, timeout=5) as response:
            html: str = response.read().decode("utf-8")
    except OSError:
        return None
    return html if "凭条打印机" in html else None


_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _announced_api(demo: subprocess.Popen[bytes], log: Path, workdir: Path) -> str | None:
    if demo.poll() is not None:
        pytest.fail(
            f"the demo exited with {demo.returncode} before it was up\n"
            + _what_the_demo_said(log, workdir)
        )
    m = re.search(r"fleet server\s+(http://\S+)", log.read_text())
    return m[1] if m else None


def test_demo_runs_a_jinshan_fleet_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.out"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [str(BIN / "fleetctl"), "demo", "--workdir", str(workdir), "--sim-terminals", "3"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            # Generous: a cold CI machine starts InfluxDB, Mosquitto and seven processes of ours.
            api = eventually(lambda: _announced_api(demo, log, workdir), timeout=150)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_what_the_demo_said(log, workdir)}") from None

        def listing() -> list[dict[str, object]] | None:
            out = subprocess.run(
                [str(BIN / "fleetctl"), "terminals", "list", "--server", api, "--json"],
                capture_output=True,
                check=False,
                timeout=20,
            )
            if out.returncode != 0:
                return None
            terminals: list[dict[str, object]] = json.loads(out.stdout)["terminals"]
            online = [t for t in terminals if t["status"] == "online"]
            return terminals if len(online) == 8 else None  # 5 agent processes + 3 simulated

        try:
            terminals = eventually(listing, timeout=60, every=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_what_the_demo_said(log, workdir)}") from None
        assert {t["town"] for t in terminals} >= TOWNS
        assert any(t["site_name"] == "朱泾镇党群服务中心" for t in terminals)
        assert all(t["district"] == "金山区" for t in terminals)
        human = subprocess.run(
            [str(BIN / "fleetctl"), "terminals", "list", "--server", api],
            capture_output=True,
            check=True,
            text=True,
            timeout=20,
        ).stdout
        assert "8/8 online" in human
        assert "在线 online" in human

        # Its sites were imported as ops would: owners to e-mail, opening hours, a 24-hour zone.
        sites = json.loads(
            subprocess.run(
                [str(BIN / "fleetctl"), "sites", "list", "--server", api, "--json"],
                capture_output=True,
                check=True,
                timeout=20,
            ).stdout
        )
        assert len(sites) == 7
        assert all(site["owners"] for site in sites)
        by_id = {site["id"]: site for site in sites}
        assert by_id["shihua-sqsw"]["schedule"].get("open_24h") is True
        assert by_id["zhujing-dqzx"]["schedule"]["hours"]["sat"] == [{"start": 540, "end": 720}]

        # The kiosk with simulated peripherals shows them on its status page.
        page = eventually(
            lambda: (
                (m := re.search(r"status page\s+(http://\S+)\s+zhujing-dqzx-01", log.read_text()))
                and m[1]
            ),
            timeout=10,
        )
        html = eventually(lambda: _page_listing_the_printer(page), timeout=60, every=1.0)
        assert "演示员" not in html  # nobody is logged in

        info = stack.StackInfo.from_json((workdir / "stack" / "stack.json").read_text())
        service_pids = [info.mqtt_pid, info.influx_pid, info.smtp_pid]
        assert all(_alive(pid) for pid in service_pids)

        demo.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert demo.wait(60) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    text = log.read_text()
    assert "stopped fleet-server" in text
    child_pids = [int(p) for p in re.findall(r"stopped \S+ \(pid (\d+)\)", text)]
    assert len(child_pids) == 8  # server, kiosk-bridge, 5 agents, fleet-sim
    assert not [pid for pid in service_pids + child_pids if _alive(pid)]
    # The agents said goodbye before the broker went away: their last state is "shutdown".
    agent_log = (workdir / "logs" / "agent-zhujing-dqzx-01.log").read_text()
    assert "published shutdown state" in agent_log
