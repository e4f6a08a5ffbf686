"""Offline e-mails through the whole system: fleet-sim kiosks over mutual TLS, the broker's
will, the fleet server's presence table and alert policy, its mail outbox, and the stack's
real SMTP sink. Sites are imported with ``fleetctl sites import``, as ops would.

Short timings keep it quick: a 6 s grace, a 24-hour site (opening hours have their own tests
on an injected clock, where waiting for a morning is possible).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from provisioning.stack import StackInfo, import_sites, running_stack
from tests.integration.fleet import (
    BIN,
    Proc,
    RunningServer,
    eventually,
    http_json,
    inject_now,
    mails_about,
    sites_toml,
    start_server,
    start_sim,
)

pytestmark = pytest.mark.integration

GRACE_S = 6
#: How long the silent drop lasts: past the grace with room to mail on a busy machine (the
#: offline e-mail goes about GRACE_S after the drop), and no longer than that needs.
CUT_S = 2 * GRACE_S
OWNERS = ("王磊 <wang.lei@zhujing.example.gov.cn>", "李娜 <li.na@zhujing.example.gov.cn>")


@dataclass
class Fleet:
    stack: StackInfo
    server: RunningServer
    sims: dict[str, tuple[Proc, Path]]
    prefix: dict[str, str]

    def inject(self, site: str, n: int, *fault: str) -> None:
        self.inject_together(site, [n], *fault)

    def inject_together(self, site: str, numbers: list[int], *fault: str) -> None:
        """The same fault into several kiosks of ``site`` at once: straight to the control
        socket, milliseconds apart (a `fleet-sim inject` process each would spread them over
        seconds on a busy machine)."""
        _, control = self.sims[site]
        for n in numbers:
            inject_now(control, f"{self.prefix[site]}-{n:04d}", *fault)

    def terminal(self, site: str, n: int) -> str:
        return f"{self.prefix[site]}-{n:04d}"

    def presence(self, terminal: str) -> str | None:
        listing = http_json(f"{self.server.api}/api/v1/terminals")
        assert isinstance(listing, dict)
        for view in listing["terminals"]:
            if view["id"] == terminal:
                return str(view.get("presence"))
        return None

    def mails_about(self, words: str) -> list[EmailMessage]:
        return mails_about(self.stack.layout.maildir, words)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("alerts")
    with running_stack(workdir / "stack") as stack:
        server = start_server(
            stack,
            workdir,
            extra=f"""
[mail]
smtp_host = "127.0.0.1"
smtp_port = {stack.smtp_port}
security = "none"
from_address = "fleet@jinshan.example.gov.cn"

[alerts]
tick_s = 0.2
""",
        )
        tag = uuid.uuid4().hex[:4]
        sites = {f"cun-{tag}-a": "测试村A服务点", f"cun-{tag}-c": "测试村C服务点"}
        sites_file = sites_toml(workdir / "sites.toml", sites, owners=OWNERS, grace_s=GRACE_S)
        assert "导入 2 个点位" in import_sites(server.api, sites_file)
        sims: dict[str, tuple[Proc, Path]] = {}
        prefixes: dict[str, str] = {}
        try:
            for site, count in zip(sites, (1, 3), strict=True):
                prefixes[site] = f"k{uuid.uuid4().hex[:6]}"
                simdir = workdir / site
                simdir.mkdir()
                sims[site] = start_sim(
                    stack, simdir, prefixes[site], count, "--interval", "1", site=site
                )
            f = Fleet(stack, server, sims, prefixes)
            for site, count in zip(sites, (1, 3), strict=True):
                for n in range(1, count + 1):
                    terminal = f.terminal(site, n)
                    eventually(lambda t=terminal: f.presence(t) == "online", 60)  # type: ignore[misc]
            yield f
        finally:
            for proc, _ in sims.values():
                proc.stop(timeout=30)
            server.stop()


def _site(fleet: Fleet, letter: str) -> str:
    return next(s for s in fleet.sims if s.endswith(f"-{letter}"))


def test_a_silent_drop_mails_the_owners_once_after_the_grace_and_once_when_back(
    fleet: Fleet,
) -> None:
    site = _site(fleet, "a")
    terminal = fleet.terminal(site, 1)
    cut = time.monotonic()
    fleet.inject(site, 1, "power-cut", str(CUT_S))
    eventually(lambda: fleet.presence(terminal) == "offline", 15)

    [offline] = eventually(lambda: fleet.mails_about(terminal), 30)
    waited = time.monotonic() - cut
    assert waited >= GRACE_S, f"mailed {waited:.1f} s after the drop, before the grace"
    assert "离线" in str(offline["Subject"])
    assert "Terminal offline" in str(offline["Subject"])
    to = sorted(a.addr_spec for a in offline["To"].addresses)
    assert to == ["li.na@zhujing.example.gov.cn", "wang.lei@zhujing.example.gov.cn"]
    assert "王磊" in str(offline["To"])

    # Back after its CUT_S without power: one recovery e-mail with the outage's length.
    eventually(lambda: fleet.presence(terminal) == "online", 90)
    eventually(lambda: len(fleet.mails_about(terminal)) >= 2, 30)
    time.sleep(3)  # nothing more comes
    mails = fleet.mails_about(terminal)
    assert len(mails) == 2, [str(m["Subject"]) for m in mails]
    back = mails[1]
    assert "恢复" in str(back["Subject"]) or "back" in str(back["Subject"]).lower()
    assert "秒" in back.get_content() or "分钟" in back.get_content()

    # A planned reboot that is back in time sends nothing.
    fleet.inject(site, 1, "reboot", "3")
    eventually(lambda: fleet.presence(terminal) == "planned", 15)
    eventually(lambda: fleet.presence(terminal) == "online", 60)
    time.sleep(GRACE_S)
    assert len(fleet.mails_about(terminal)) == 2

    listed = subprocess.run(
        [str(BIN / "fleetctl"), "alerts", "list", "--json", "--server", fleet.server.api],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert f"terminal-offline:{terminal}" in listed.stdout


def test_a_whole_site_down_is_one_e_mail_not_three(fleet: Fleet) -> None:
    site = _site(fleet, "c")
    terminals = [fleet.terminal(site, n) for n in (1, 2, 3)]
    fleet.inject_together(site, [1, 2, 3], "power-cut", "25")
    for t in terminals:
        eventually(lambda t=t: fleet.presence(t) == "offline", 15)  # type: ignore[misc]
    site_name = "测试村C服务点"
    [alert] = eventually(lambda: fleet.mails_about(site_name), 30)
    time.sleep(GRACE_S)
    about_site = fleet.mails_about(site_name)
    assert len(about_site) == 1, [str(m["Subject"]) for m in about_site]
    for t in terminals:
        assert t in alert.get_content()
