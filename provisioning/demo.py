"""``fleetctl demo``: the whole system on one machine, looking like a Jinshan district fleet.

Starts the local stack, a fleet server, a few real ``kiosk-agent`` processes at town centres
and ``fleet-sim`` for the village service points; prints what runs and how to look at it;
stops everything it started on Ctrl-C (or after ``--for`` seconds).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

import msgspec

from fleet_protocol.site_import import parse_sites
from provisioning import ops_client, stack
from provisioning.authority import FleetAuthority, save_settings
from provisioning.errors import DemoError


@dataclass(frozen=True, slots=True)
class DemoSite:
    id: str
    name: str
    town: str
    kind: str
    #: The ``[sites.hours]`` lines of its sites-file entry; empty for a 24-hour site.
    hours: str
    #: Its owner's name and mailbox (at jinshan.example.gov.cn).
    owner: tuple[str, str]


DISTRICT: Final = "金山区"
_CENTRE_HOURS: Final = (
    "".join(
        f'{day} = ["08:30-12:00", "13:30-17:30"]\n' for day in ("mon", "tue", "wed", "thu", "fri")
    )
    + 'sat = ["09:00-12:00"]\n'
)
_VILLAGE_HOURS: Final = "".join(
    f'{day} = ["08:30-11:30", "13:30-17:00"]\n' for day in ("mon", "tue", "wed", "thu", "fri")
)
SITES: Final = (
    DemoSite("zhujing-dqzx", "朱泾镇党群服务中心", "朱泾镇", "党群服务中心",
             _CENTRE_HOURS, ("王磊", "wang.lei")),
    DemoSite("fengjing-dqzx", "枫泾镇党群服务中心", "枫泾镇", "党群服务中心",
             _CENTRE_HOURS, ("李娜", "li.na")),
    DemoSite("tinglin-dqzx", "亭林镇党群服务中心", "亭林镇", "党群服务中心",
             _CENTRE_HOURS, ("张伟", "zhang.wei")),
    DemoSite("shihua-sqsw", "石化街道社区事务受理服务中心（24小时自助服务区）", "石化街道",
             "社区事务受理服务中心", "", ("刘洋", "liu.yang")),
    DemoSite("zhujing-daijing-cun", "朱泾镇待泾村村民服务点", "朱泾镇", "村居服务点",
             _VILLAGE_HOURS, ("陈静", "chen.jing")),
    DemoSite("fengjing-zhonghong-cun", "枫泾镇中洪村村民服务点", "枫泾镇", "村居服务点",
             _VILLAGE_HOURS, ("杨帆", "yang.fan")),
    DemoSite("tinglin-yuntao-cun", "亭林镇运河村村民服务点", "亭林镇", "村居服务点",
             _VILLAGE_HOURS, ("赵敏", "zhao.min")),
)  # fmt: skip
#: The demo's sites get a short grace, so an alert shows within a minute of a fault.
DEMO_GRACE_S: Final = 60
DEMO_OPS: Final = "ops@jinshan.example.gov.cn"
#: Real agent processes, one per town centre kiosk.
AGENTS: Final = (
    ("zhujing-dqzx-01", "zhujing-dqzx"),
    ("zhujing-dqzx-02", "zhujing-dqzx"),
    ("fengjing-dqzx-01", "fengjing-dqzx"),
    ("tinglin-dqzx-01", "tinglin-dqzx"),
    ("shihua-sqsw-24h-01", "shihua-sqsw"),
)
DEFAULT_API_PORT: Final = 8700
DEFAULT_ENROL_PORT: Final = 8701
#: The kiosk whose peripherals are simulated (`kiosk-bridge simulate`) for its status page.
KIOSK_WITH_DEVICES: Final = "zhujing-dqzx-01"
#: Status pages of the agents: this port and the next ones, in the order of AGENTS.
STATUS_PAGE_PORT: Final = 8780
#: The demo's staff account on every status page (a demo only: real ones come from config).
DEMO_STAFF: Final = ("演示员", "kiosk-demo-2026")
SIM_PREFIX: Final = "jinshan-cun"
SIM_SITES: Final = ("zhujing-daijing-cun", "fengjing-zhonghong-cun", "tinglin-yuntao-cun")


def _port(preferred: int, *, avoid: frozenset[int] = frozenset()) -> int:
    """``preferred`` when it is free (so the defaults of `fleetctl` work without options),
    else any free port not in ``avoid``."""
    for candidate in (preferred, 0, 0, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port: int = s.getsockname()[1]
            if port not in avoid:
                return port
    raise DemoError("no free port on 127.0.0.1 for the fleet server")


def server_config(info: stack.StackInfo, workdir: Path, api_port: int, enrol_port: int) -> str:
    sites = "".join(
        f"\n[[sites]]\nid = {stack.toml_value(s.id)}\nname = {stack.toml_value(s.name)}\n"
        f"town = {stack.toml_value(s.town)}\ndistrict = {stack.toml_value(DISTRICT)}\n"
        for s in SITES
    )
    return "# written by `fleetctl demo`\n" + stack.server_config(
        info,
        client_id="fleet-server-demo",
        database=info.influx_database,
        registry=workdir / "server" / "registry.sqlite3",
        api_port=api_port,
        extra=f"""
[enrolment]
pki_dir = {stack.toml_value(str(info.pki_dir))}
host = "127.0.0.1"
port = {enrol_port}
public_url = "https://127.0.0.1:{enrol_port}"

# Alerts go to the stack's SMTP sink, which keeps each e-mail as a file.
[mail]
smtp_host = {stack.toml_value(info.smtp_host)}
smtp_port = {info.smtp_port}
security = "none"
from_address = "fleet@jinshan.example.gov.cn"
from_name = "金山区政务服务自助终端运维"

[alerts.district_ops]
{stack.toml_value(DISTRICT)} = [{stack.toml_value(DEMO_OPS)}]
{sites}""",
    )


def sites_file() -> str:
    """The demo's sites as ops would import them (`fleetctl sites import`): owners, opening
    hours (a 24-hour zone has none), and the site kinds."""
    out = []
    for s in SITES:
        name, mailbox = s.owner
        out.append(
            f"[[sites]]\nid = {stack.toml_value(s.id)}\nname = {stack.toml_value(s.name)}\n"
            f"district = {stack.toml_value(DISTRICT)}\ntown = {stack.toml_value(s.town)}\n"
            f"kind = {stack.toml_value(s.kind)}\naddress = {stack.toml_value(DISTRICT + s.name)}\n"
            f"owners = [{{ name = {stack.toml_value(name)}, "
            f"email = {stack.toml_value(mailbox + '@jinshan.example.gov.cn')} }}]\n"
            f"grace_s = {DEMO_GRACE_S}\n"
            + (f"[sites.hours]\n{s.hours}" if s.hours else "open_24h = true\n")
        )
    return "\n".join(out)


def _import_sites(api: str, children: _Children, path: Path) -> str:
    """Once the fleet server answers, write the demo's sites file and import it as ops
    would; says what was done."""
    _wait_for_api(api, children)
    path.write_text(sites_file(), "utf-8")
    imported = ops_client.import_sites(api, parse_sites(path.read_bytes(), path.name))
    return f"imported {imported.added + imported.updated} sites from {path}"


def _enrol_agent(
    bin_dir: Path,
    authority: FleetAuthority,
    *,
    workdir: Path,
    terminal: str,
    site: str,
    enrol_url: str,
) -> Path:
    """Enrol one kiosk the way a site does: a token from ops, `kiosk-agent enroll` on the kiosk."""
    config = workdir / "agents" / f"{terminal}.toml"
    if config.exists():
        return config  # enrolled by an earlier run; its certificate renews itself
    token = authority.create_token(terminal, site, actor="fleetctl:demo")
    done = subprocess.run(
        [
            str(bin_dir / "kiosk-agent"), "enroll",
            "--server", enrol_url,
            "--terminal", terminal,
            f"--token={token.secret}",
            "--ca-fingerprint", token.ca_fingerprint,
            "--config", str(config),
            "--state-dir", str(workdir / "agents" / terminal),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise DemoError(f"enrolling {terminal} failed: {done.stderr.strip()}")
    return config


_RECORDER = """#!/bin/sh
# The demo's stand-in for `systemctl reboot` and restarting the kiosk application: the demo
# must never reboot the machine it runs on. Each request is one line in the log.
echo "$(date '+%Y-%m-%d %H:%M:%S') $*" >> "$(dirname "$0")/machine-commands.log"
"""


def _section_free(text: str, name: str) -> str:
    """``text`` (a config `kiosk-agent enroll` wrote) without section ``name`` and its tables."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        if line.startswith("["):
            header = line.strip("[] ")
            skipping = header == name or header.startswith(f"{name}.")
        if not skipping:
            kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def _local_settings(
    config: Path,
    *,
    page_port: int,
    staff_hash: str,
    recorder: Path,
    overrides: Path | None,
) -> None:
    """The demo's settings of one enrolled kiosk: its status page with the demo staff member,
    the recorder instead of a real reboot, and for one kiosk its simulated peripherals."""
    text = config.read_text("utf-8")
    for name in ("status_page", "system_commands", "peripherals"):
        text = _section_free(text, name)
    rec = stack.toml_value(str(recorder))
    text += f"""
[status_page]
listen = ["127.0.0.1"]
port = {page_port}

[[status_page.staff]]
name = {stack.toml_value(DEMO_STAFF[0])}
passcode_hash = {stack.toml_value(staff_hash)}

[system_commands]
reboot = [{rec}, "reboot"]
restart_app = [{rec}, "restart-app"]
"""
    if overrides is not None:
        text += f"""
[peripherals]
profile = "comprehensive"
overrides = {stack.toml_value(str(overrides))}
usb = "simulated"
debounce_s = 2
"""
    config.write_text(text, "utf-8")


def _staff_hash(bin_dir: Path) -> str:
    done = subprocess.run(
        [str(bin_dir / "kiosk-agent"), "hash-passcode", "--stdin"],
        input=DEMO_STAFF[1] + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise DemoError(f"hashing the demo passcode failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _wait_for_file(path: Path, children: _Children, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        children.check()
        if time.monotonic() > deadline:
            raise DemoError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.2)


def _provision_sim(authority: FleetAuthority, tls_dir: Path, count: int) -> None:
    """Certificates for the simulated kiosks, made ops-side (factory provisioning)."""
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (tls_dir / "ca.pem").write_bytes(authority.ca_pem)
    for i in range(1, count + 1):
        terminal = f"{SIM_PREFIX}-{i:04d}"
        path = tls_dir / f"{terminal}.pem"
        if not path.exists():
            site = SIM_SITES[(i - 1) % len(SIM_SITES)]
            authority.provision_identity(terminal, site, path, actor="fleetctl:demo")


class _Children:
    """The processes the demo started; stopped by PID, in reverse order."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self._logs / f"{name}.log"
        with log.open("ab") as out:
            try:
                # Own session: Ctrl-C reaches only the demo, which stops everything in order
                # (agents first, so they can still say goodbye to the broker).
                proc = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as exc:
                raise DemoError(f"cannot start {name} ({argv[0]}): {exc.strerror}") from exc
        self.procs.append((name, proc, log))
        return proc

    def check(self) -> None:
        for name, proc, log in self.procs:
            code = proc.poll()
            if code is not None:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                raise DemoError(
                    f"{name} exited with {code}; its log {log} ends:\n" + "\n".join(tail)
                )

    def stop(self, out: TextIO) -> None:
        for _name, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        stopped = []
        for name, proc, _ in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            stopped.append(f"  stopped {name} (pid {proc.pid})")
        # Said only once all are stopped: an output that is gone (`| head`) must not leave
        # processes running.
        with contextlib.suppress(OSError):
            print("\n".join(stopped), file=out, flush=True)


#: Our own loopback server: never through a proxy named in the environment.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_for_api(url: str, children: _Children, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children.check()
        try:
            with _direct.open(f"{url}/healthz", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise DemoError(f"the fleet server did not answer at {url} within {timeout:.0f} s")


@dataclass(frozen=True)
class _Kiosks:
    bin_dir: Path
    authority: FleetAuthority
    workdir: Path
    enrol_url: str
    api_port: int


def _start_kiosks(
    k: _Kiosks, children: _Children, step: Callable[[str], None]
) -> list[tuple[str, int]]:
    """Simulated peripherals for one kiosk, then the town-centre kiosks, each enrolled and
    set up for the demo; their status pages as (terminal, port)."""
    devices_dir = k.workdir / "dev"  # short: upsd's socket path has a length limit
    (devices_dir / "overrides.toml").unlink(missing_ok=True)
    children.start(
        "kiosk-bridge",
        [
            str(k.bin_dir / "kiosk-bridge"), "simulate", "comprehensive",
            "--dir", str(devices_dir),
        ],
    )  # fmt: skip
    _wait_for_file(devices_dir / "overrides.toml", children)
    recorder = k.workdir / "agents" / "machine-command"
    recorder.write_text(_RECORDER, "utf-8")
    recorder.chmod(0o755)
    staff_hash = _staff_hash(k.bin_dir)
    step("enrolling the town-centre kiosks ...")
    pages: list[tuple[str, int]] = []
    for n, (terminal, site) in enumerate(AGENTS):
        config = _enrol_agent(
            k.bin_dir,
            k.authority,
            workdir=k.workdir,
            terminal=terminal,
            site=site,
            enrol_url=k.enrol_url,
        )
        page_port = _port(STATUS_PAGE_PORT + n, avoid=frozenset({k.api_port}))
        pages.append((terminal, page_port))
        _local_settings(
            config,
            page_port=page_port,
            staff_hash=staff_hash,
            recorder=recorder,
            overrides=devices_dir / "overrides.toml" if terminal == KIOSK_WITH_DEVICES else None,
        )
        step(f"  {terminal} enrolled; starting its kiosk-agent")
        children.start(
            f"agent-{terminal}",
            [str(k.bin_dir / "kiosk-agent"), "run", "--config", str(config)],
        )
    return pages


def run(workdir: Path, sim_terminals: int, duration: float | None, out: TextIO) -> int:
    workdir = workdir.resolve()
    logs = workdir / "logs"
    for d in (logs, workdir / "server", workdir / "agents"):
        d.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    children = _Children(logs)
    started = time.monotonic()

    def step(text: str) -> None:
        # Each step with the seconds since the start: a slow or stuck start-up says where.
        print(f"[{time.monotonic() - started:5.1f} s] {text}", file=out, flush=True)

    with stack.sigterm_as_interrupt():
        try:
            step(f"starting the local stack in {workdir / 'stack'} ...")
            stack_dir = workdir / "stack"
            info = stack.up(stack_dir, detach=True)
            try:
                api_port = _port(DEFAULT_API_PORT)
                api = f"http://127.0.0.1:{api_port}"
                enrol_port = _port(DEFAULT_ENROL_PORT, avoid=frozenset({api_port}))
                enrol_url = f"https://127.0.0.1:{enrol_port}"
                authority = FleetAuthority.open(info.pki_dir)
                save_settings(
                    info.pki_dir,
                    msgspec.structs.replace(authority.settings, enrol_url=enrol_url),
                )
                cfg = workdir / "server" / "server.toml"
                cfg.write_text(server_config(info, workdir, api_port, enrol_port), "utf-8")
                step("starting the fleet server ...")
                children.start(
                    "fleet-server", [str(bin_dir / "fleet-server"), "run", "--config", str(cfg)]
                )
                step(_import_sites(api, children, workdir / "server" / "sites.toml"))
                step(f"simulating the peripherals of {KIOSK_WITH_DEVICES} ...")
                pages = _start_kiosks(
                    _Kiosks(bin_dir, authority, workdir, enrol_url, api_port), children, step
                )
                if sim_terminals:
                    step(f"provisioning and starting {sim_terminals} simulated kiosks ...")
                    _provision_sim(authority, workdir / "agents" / "sim-tls", sim_terminals)
                    sim_argv = [
                        str(bin_dir / "fleet-sim"),
                        "--terminals", str(sim_terminals),
                        "--prefix", SIM_PREFIX,
                        "--broker-host", info.mqtt_host,
                        "--broker-port", str(info.mqtt_port),
                        "--tls-dir", str(workdir / "agents" / "sim-tls"),
                        "--interval", "5",
                        "--state-dir", str(workdir / "agents" / "sim"),
                        "--profile", "comprehensive",
                        "--control", str(workdir / "agents" / "fleet-sim.sock"),
                    ]  # fmt: skip
                    for site in SIM_SITES:
                        sim_argv += ["--site", site]
                    children.start("fleet-sim", sim_argv)
                _print_running(
                    out, info, api=api, workdir=workdir, sim_terminals=sim_terminals, pages=pages
                )
                deadline = None if duration is None else time.monotonic() + duration
                while deadline is None or time.monotonic() < deadline:
                    children.check()
                    time.sleep(0.5)
            finally:
                with contextlib.suppress(OSError):
                    print("\nstopping ...", file=out, flush=True)
                try:
                    children.stop(out)
                finally:
                    stack.down(stack_dir)
        except KeyboardInterrupt:
            pass
    print("  stopped the local stack; its data stays in", workdir / "stack", file=out)
    return 0


def _print_running(
    out: TextIO,
    info: stack.StackInfo,
    *,
    api: str,
    workdir: Path,
    sim_terminals: int,
    pages: list[tuple[str, int]],
) -> None:
    sock = workdir / "agents" / "fleet-sim.sock"
    page_lines = "\n".join(
        f"  status page   http://127.0.0.1:{port}/   {terminal}"
        + ("  (simulated peripherals)" if terminal == KIOSK_WITH_DEVICES else "")
        for terminal, port in pages
    )
    q = "SELECT mean(cpu_percent) FROM system WHERE time > now() - 5m GROUP BY town, terminal"
    print(
        f"""
金山区自助终端运维演示 / Jinshan district kiosk fleet demo is running:

  MQTT broker   mqtts://{info.mqtt_host}:{info.mqtt_port}   (Mosquitto, mutual TLS, loopback)
  InfluxDB      {info.influx_url}   database "{info.influx_database}"
  SMTP sink     smtp://{info.smtp_host}:{info.smtp_port}   mails saved under {info.maildir}
  fleet server  {api}   (ops API)
  kiosks        {len(AGENTS)} kiosk-agent processes at town centres
                {sim_terminals} simulated village kiosks (fleet-sim)
{page_lines}
                staff login: {DEMO_STAFF[0]} / {DEMO_STAFF[1]} (reboots are only recorded,
                in {workdir / "agents" / "machine-commands.log"})

How to look at it (in another shell, from this directory):
  .venv/bin/fleetctl terminals list --server {api}
  .venv/bin/fleetctl sites list --server {api}
  .venv/bin/fleetctl alerts list --server {api}
  ls {info.maildir}        (the e-mails owners and district ops were sent)
  curl -s {api}/api/v1/ingest
  curl -sG {info.influx_url}/query --data-urlencode db={info.influx_database} \\
       --data-urlencode "q={q}"
  tail -f {workdir / "logs" / "fleet-server.log"}
  .venv/bin/fleetctl audit --pki {info.pki_dir}
  .venv/bin/fleetctl token create --pki {info.pki_dir} --terminal jinshan-new-01 --site zhujing-dqzx

Try:
  kill -9 one kiosk-agent (see {workdir / "logs"}) and watch it go offline: in opening
  hours its site's owner is e-mailed {DEMO_GRACE_S} s later (24-hour zone: any time), and
  again when it is back;
  inject a fault into a simulated village kiosk (power-cut, reboot, unplug id-card-reader,
  flap, clock-skew 120 ...; `fleet-sim inject --help`):
    .venv/bin/fleet-sim inject --control {sock} {SIM_PREFIX}-0001 power-cut 30
Ctrl-C stops everything the demo started.
""",
        file=out,
        flush=True,
    )
