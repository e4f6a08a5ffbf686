"""The status page's pure parts: staff settings and passcodes, the login lock, sessions, and what
the page tells village staff about their terminal."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgspec
import pytest

from edge_agent.status_model import (
    ActionKind,
    ClockView,
    LinkView,
    OutboxView,
    PeripheralView,
    PowerView,
    StatusSnapshot,
    Words,
)
from edge_agent.status_page.staff import (
    LoginThrottle,
    StaffAccount,
    StaffSessions,
    StatusPageSettings,
    hash_passcode,
    verify_passcode,
    verify_staff,
)
from edge_agent.status_page.texts import (
    TEXT,
    action_description,
    concerns,
    duration,
    lockout,
    verdict,
)

PASSCODE = "qiaotou-2024-ok"
HASH = hash_passcode(PASSCODE)
NOW_MS = 1_750_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- passcodes ------------------------------------------------------------------------------


def test_a_hashed_passcode_verifies_and_a_wrong_one_does_not() -> None:
    assert HASH.startswith("scrypt$16384$8$1$")
    assert PASSCODE not in HASH
    assert verify_passcode(PASSCODE, HASH)
    assert not verify_passcode(PASSCODE + "x", HASH)
    assert not verify_passcode("", HASH)
    # A new salt every time: two kiosks with the same passcode do not share a hash.
    assert hash_passcode(PASSCODE) != HASH


def test_passcodes_shorter_than_eight_characters_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 8 characters"):
        hash_passcode("1234567")
    assert verify_passcode("12345678", hash_passcode("12345678"))
    with pytest.raises(ValueError, match="at least 8"):
        hash_passcode("村委会密码口令")  # seven characters, however many bytes


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        PASSCODE,
        "scrypt$16384$8$1$!!$!!",
        "scrypt$3$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==",
        "bcrypt$x",
    ],
)
def test_a_damaged_hash_never_verifies(encoded: str) -> None:
    assert not verify_passcode(PASSCODE, encoded)


def test_an_account_with_the_passcode_itself_instead_of_a_hash_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="kiosk-agent hash-passcode"):
        msgspec.convert({"name": "王芳", "passcode_hash": PASSCODE}, StaffAccount)
    with pytest.raises(msgspec.ValidationError, match="32"):
        msgspec.convert({"name": "王" * 33, "passcode_hash": HASH}, StaffAccount)
    account = msgspec.convert({"name": "王芳", "passcode_hash": HASH}, StaffAccount)
    assert verify_staff(PASSCODE, account)
    assert not verify_staff(PASSCODE, None)


# --- settings -------------------------------------------------------------------------------


def settings(**raw: Any) -> StatusPageSettings:
    """As the agent reads ``[status_page]`` from TOML."""
    return msgspec.convert(raw, StatusPageSettings, strict=True)


def test_defaults_listen_on_loopback_only_and_are_read_only_without_staff() -> None:
    s = settings()
    assert s.listen == ("127.0.0.1",)
    assert (s.port, s.session_idle_s, s.session_max_s) == (8080, 600.0, 3600.0)
    assert (s.lockout_after, s.lockout_s) == (5, 300.0)
    assert s.read_only
    staffed = settings(staff=[{"name": "王芳", "passcode_hash": HASH}])
    assert not staffed.read_only
    assert staffed.account("王芳") is not None
    assert staffed.account("李强") is None


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "0:0::0"])
def test_listening_on_every_network_is_refused(address: str) -> None:
    with pytest.raises(msgspec.ValidationError, match="every network"):
        settings(listen=["127.0.0.1", address])


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("8.8.8.8", "not a site LAN address"),
        ("2001:4860::1", "not a site LAN address"),
        ("fe80::1", "not a site LAN address"),
        ("127.0.0.2", "use 127.0.0.1"),
        ("kiosk.local", "not an IP address"),
    ],
)
def test_only_loopback_and_lan_addresses_may_be_listened_on(address: str, problem: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=problem):
        settings(listen=[address])


def test_lan_addresses_are_accepted() -> None:
    s = settings(listen=["127.0.0.1", "::1", "192.168.1.23", "10.8.0.5", "fd00::2"])
    assert len(s.listen) == 5


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"server_names": ["Kiosk 01"]}, "host name"),
        ({"session_idle_s": 4000}, "session_idle_s"),
        ({"listen": []}, "at least one"),
        ({"listen": ["127.0.0.1", "127.0.0.1"]}, "twice"),
        ({"lockout_after": 0}, ">= 1"),
        ({"passcode": "x"}, "unknown field"),
        (
            {"staff": [{"name": "王芳", "passcode_hash": HASH}] * 2},
            "same name",
        ),
    ],
)
def test_bad_settings_say_what_is_wrong(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=problem):
        settings(**raw)


# --- the login lock -------------------------------------------------------------------------


def throttle(clock: FakeClock) -> LoginThrottle:
    return LoginThrottle(limit=5, lock_s=300.0, clock=clock)


def test_five_wrong_passcodes_lock_the_name_for_five_minutes() -> None:
    clock = FakeClock()
    t = throttle(clock)
    for left in (4, 3, 2, 1):
        assert t.failed("王芳", "192.168.1.50") == 0.0
        assert t.attempts_left("王芳", "192.168.1.50") == left
    assert t.failed("王芳", "192.168.1.50") == 300.0
    # The 6th attempt is refused before its passcode is looked at, from any address.
    assert t.locked_for("王芳", "192.168.1.50") == 300.0
    assert t.locked_for("王芳", "192.168.1.77") == 300.0
    clock.advance(299)
    assert t.locked_for("王芳", "192.168.1.77") == pytest.approx(1.0)
    clock.advance(1)
    assert t.locked_for("王芳", "192.168.1.50") == 0.0
    # After the lock, a fresh five.
    for _ in range(4):
        assert t.failed("王芳", "192.168.1.50") == 0.0
    assert t.failed("王芳", "192.168.1.50") == 300.0


def test_a_success_clears_the_count() -> None:
    t = throttle(FakeClock())
    for _ in range(4):
        t.failed("王芳", "192.168.1.50")
    t.succeeded("王芳", "192.168.1.50")
    for _ in range(4):
        assert t.failed("王芳", "192.168.1.50") == 0.0
    assert t.locked_for("王芳", "192.168.1.50") == 0.0


def test_one_address_cannot_walk_through_the_names() -> None:
    t = throttle(FakeClock())
    for name in ("王芳", "李强", "张伟", "赵敏"):
        assert t.failed(name, "192.168.1.66") == 0.0
    assert t.failed(None, "192.168.1.66") == 300.0  # a name nobody has counts too
    assert t.locked_for("刘洋", "192.168.1.66") == 300.0
    # The names themselves are not locked for staff at other addresses.
    assert t.locked_for("王芳", "127.0.0.1") == 0.0


def test_a_wrong_passcode_now_and_then_never_adds_up_to_a_lock() -> None:
    clock = FakeClock()
    t = throttle(clock)
    for _ in range(10):
        assert t.failed("王芳", "127.0.0.1") == 0.0
        clock.advance(300)


def test_the_lock_message_counts_whole_minutes_up() -> None:
    assert lockout(300).zh == "密码错误次数过多，请 5 分钟后再试。"
    assert lockout(130).zh == "密码错误次数过多，请 3 分钟后再试。"
    assert lockout(1).en == "Too many wrong passcodes. Please try again in 1 minute."


# --- sessions -------------------------------------------------------------------------------


def sessions(clock: FakeClock) -> StaffSessions:
    return StaffSessions(idle_s=600.0, max_s=3600.0, clock=clock)


def test_a_session_has_random_tokens_and_ends_when_idle() -> None:
    clock = FakeClock()
    store = sessions(clock)
    a, b = store.open("王芳"), store.open("王芳")
    assert len({a.token, a.csrf, b.token, b.csrf}) == 4
    assert len(a.token) >= 43  # 32 random bytes
    assert store.get(a.token) == a
    assert store.get("not-a-token") is None
    assert store.get(None) is None
    clock.advance(599)
    assert store.get(a.token) == a  # looking does not keep it alive ...
    clock.advance(1)
    assert store.get(a.token) is None


def test_staff_activity_keeps_a_session_until_its_time_limit() -> None:
    clock = FakeClock()
    store = sessions(clock)
    s = store.open("王芳")
    for _ in range(6):
        clock.advance(590)
        assert store.get(s.token, activity=True) == s
    clock.advance(59)
    assert store.get(s.token) == s  # 3599 s
    clock.advance(1)
    assert store.get(s.token, activity=True) is None


def test_logout_ends_the_session_and_old_sessions_make_room() -> None:
    clock = FakeClock()
    store = sessions(clock)
    s = store.open("王芳")
    store.close(s.token)
    assert store.get(s.token) is None
    first = store.open("李强")
    for _ in range(StaffSessions.MAX_SESSIONS):
        clock.advance(1)
        store.open("李强")
    assert len(store) == StaffSessions.MAX_SESSIONS
    assert store.get(first.token) is None


# --- what the page says ---------------------------------------------------------------------

PRINTER = PeripheralView(
    id="receipt-printer",
    role="receipt_printer",
    title=Words("凭条打印机", "Receipt printer"),
    state="ok",
    since_ms=NOW_MS - 60_000,
    power_channel="relay-1",
    printable=True,
)


def healthy() -> StatusSnapshot:
    return StatusSnapshot(
        terminal="zhujing-dqzx-01",
        site="zhujing-dqzx",
        agent_version="0.1.0",
        now_ms=NOW_MS,
        boot_ms=NOW_MS - 86400_000,
        link=LinkView(broker="fleet:8883", connected=True, since_ms=NOW_MS - 3600_000),
        clock=ClockView(offset_ms=200.0, max_offset_ms=5000.0),
        power=PowerView(on_ac=True, cabinet_door_open=False),
        peripherals=(PRINTER,),
        outbox=OutboxView(pending=3, pending_bytes=900, oldest_ms=NOW_MS - 2000),
    )


def paper_out() -> PeripheralView:
    return replace(
        PRINTER,
        state="faulty",
        problem=Words("打印机缺纸", "The printer is out of paper"),
        action=Words("请更换纸卷", "Load a new paper roll"),
    )


def test_a_healthy_terminal_is_working_with_nothing_to_do() -> None:
    assert verdict(healthy()) == ("ok", TEXT.verdict_ok)
    assert concerns(healthy()) == ()


def test_an_essential_peripheral_out_of_order_makes_the_terminal_unusable() -> None:
    level, words = verdict(replace(healthy(), peripherals=(paper_out(),)))
    assert level == "broken"
    assert words.zh == "凭条打印机：打印机缺纸。请更换纸卷。"
    assert words.en == "Receipt printer: The printer is out of paper. Load a new paper roll."


def test_an_unplugged_peripheral_without_words_of_its_own_gets_a_plain_instruction() -> None:
    gone = replace(PRINTER, state="absent")
    level, words = verdict(replace(healthy(), peripherals=(gone,)))
    assert level == "broken"
    assert "未连接" in words.zh
    assert "请检查连接线是否插好" in words.zh


@pytest.mark.parametrize(
    "peripheral",
    [
        replace(PRINTER, state="absent", essential=False),
        replace(PRINTER, state="degraded", problem=Words("打印头温度偏高", "Print head hot")),
    ],
)
def test_a_non_essential_or_degraded_peripheral_needs_attention_only(
    peripheral: PeripheralView,
) -> None:
    assert verdict(replace(healthy(), peripherals=(peripheral,)))[0] == "attention"


def test_a_lost_link_says_for_how_long_and_what_to_check() -> None:
    down = LinkView(broker="fleet:8883", connected=False, since_ms=NOW_MS - 192_000, dns_ok=False)
    level, words = verdict(replace(healthy(), link=down))
    assert level == "attention"
    assert "已断开 3 分 12 秒" in words.zh
    assert "无法解析服务器地址" in words.zh
    assert "请检查网线和路由器" in words.zh
    assert "Disconnected for 3 min 12 s" in words.en
    never = LinkView(broker="fleet:8883", connected=False, since_ms=None)
    assert verdict(replace(healthy(), link=never))[1].zh.startswith("还没有连上管理平台")


def test_a_wrong_clock_needs_attention() -> None:
    skewed = ClockView(offset_ms=-310_000.0, max_offset_ms=5000.0)
    level, words = verdict(replace(healthy(), clock=skewed))
    assert level == "attention"
    assert "终端时间不准（慢了 5 分 10 秒）" in words.zh
    unmeasured = ClockView(offset_ms=None, max_offset_ms=5000.0)
    assert verdict(replace(healthy(), clock=unmeasured))[0] == "ok"


def test_a_backlog_that_does_not_drain_while_connected_needs_attention() -> None:
    stuck = OutboxView(pending=1234, pending_bytes=9_000_000, oldest_ms=NOW_MS - 1800_000)
    level, words = verdict(replace(healthy(), outbox=stuck))
    assert level == "attention"
    assert "1234 条数据积压" in words.zh
    # While disconnected a backlog is expected: the link message says it is sent later.
    down = LinkView(broker="fleet:8883", connected=False, since_ms=NOW_MS - 1800_000)
    found = concerns(replace(healthy(), outbox=stuck, link=down))
    assert len(found) == 1
    assert "补发" in found[0].words.zh


def test_a_planned_reboot_says_to_wait() -> None:
    planned = Words("终端正在重启，预计 3 分钟后恢复", "Restarting, back in about 3 minutes")
    level, words = verdict(replace(healthy(), planned=planned))
    assert level == "attention"
    assert words.zh == "终端正在重启，预计 3 分钟后恢复。无需操作，请稍候，终端会自动恢复。"


def test_power_cut_and_open_door_need_attention_and_the_worst_comes_first() -> None:
    snapshot = replace(
        healthy(),
        power=PowerView(on_ac=False, ups_charge_percent=64.0, cabinet_door_open=True),
        peripherals=(paper_out(),),
    )
    found = concerns(snapshot)
    assert [c.level for c in found] == ["broken", "attention", "attention"]
    assert "停电了，终端正在用电池供电（剩余 64%）" in found[1].words.zh
    assert "机柜门开着" in found[2].words.zh


@pytest.mark.parametrize(
    ("seconds", "zh", "en"),
    [
        (0, "0 秒", "0 s"),
        (45.7, "45 秒", "45 s"),
        (192, "3 分 12 秒", "3 min 12 s"),
        (7200, "2 小时", "2 h"),
        (7260, "2 小时 1 分", "2 h 1 min"),
        (3 * 86400 + 4 * 3600 + 59, "3 天 4 小时", "3 d 4 h"),
    ],
)
def test_durations_read_in_plain_words(seconds: float, zh: str, en: str) -> None:
    assert duration(seconds) == Words(zh, en)


def test_the_confirmation_says_exactly_what_will_happen() -> None:
    assert action_description(ActionKind.POWER_CYCLE, PRINTER).zh.startswith(
        "将关闭并重新打开 凭条打印机 的电源"
    )
    assert "整台终端" in action_description(ActionKind.REBOOT_TERMINAL, None).zh
    assert "测试页" in action_description(ActionKind.PRINT_TEST, PRINTER).zh


def test_outbox_drop_counters_are_named_in_plain_words() -> None:
    from edge_agent.status_page.texts import drop_reason  # noqa: PLC0415

    assert drop_reason("full/telemetry").zh == "存储已满（运行数据）"
    assert drop_reason("too_old/action").en == "waited too long (actions)"
    assert drop_reason("full").zh == "存储已满"
