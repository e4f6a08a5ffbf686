"""Samples of every kind (system, network, power), their numbering and batching, the reboot
count, and reconnect delays of the agent (pure logic, injected clock; boots in tmp_path)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import pytest

from edge_agent.backoff import backoff_delays
from edge_agent.boots import FILE, Boot, record_boot
from edge_agent.errors import StateDirError
from edge_agent.telemetry import (
    BatchBuilder,
    InterfaceReading,
    MonotonicStamp,
    NetworkReading,
    PowerReading,
    SystemReading,
    encode_batches,
    power_reading,
    to_network_sample,
    to_power_sample,
    to_sample,
)
from firmware_bridge.modbus.board import (
    BoardStatus,
    ChannelState,
    InputMeaning,
    InputState,
    Reading,
)
from firmware_bridge.nut.protocol import status_from_variables
from fleet_protocol.codec import MAX_PAYLOAD, decode, encode
from fleet_protocol.messages import (
    MAX_INTERFACES,
    MAX_SAMPLES_PER_BATCH,
    NetworkSample,
    PowerSample,
    SystemSample,
    Telemetry,
)

READING = SystemReading(
    cpu_percent=12.5,
    memory_percent=40.0,
    memory_available=4_000_000_000,
    disk_percent=50.0,
    disk_free=60_000_000_000,
    uptime_s=3600.0,
    net_bytes_sent=1,
    net_bytes_recv=2,
)


def test_timestamps_never_go_backwards_nor_repeat_when_the_wall_clock_does() -> None:
    # A repeated timestamp would overwrite the previous sample in InfluxDB.
    clock = iter([1000, 2000, 1500, 1500, 2500])
    stamp = MonotonicStamp(lambda: next(clock))
    stamps = [stamp.next() for _ in range(5)]
    assert stamps == [(1, 1000), (2, 2000), (3, 2001), (4, 2002), (5, 2500)]


def test_a_batch_is_published_when_full() -> None:
    builder = BatchBuilder(size=3, max_age_ms=60_000)
    assert builder.add(to_sample(READING, 1, 1000), now_ms=1000) is None
    assert builder.add(to_sample(READING, 2, 2000), now_ms=2000) is None
    batch = builder.add(to_sample(READING, 3, 3000), now_ms=3000)
    assert batch is not None
    assert [s.seq for s in batch.samples] == [1, 2, 3]
    assert builder.take() is None


def test_a_batch_is_published_when_its_first_sample_is_old_enough() -> None:
    builder = BatchBuilder(size=100, max_age_ms=10_000)
    assert builder.add(to_sample(READING, 1, 0), now_ms=0) is None
    assert builder.due(now_ms=9_999) is None
    batch = builder.due(now_ms=10_000)
    assert batch is not None
    assert len(batch.samples) == 1


def test_out_of_range_cpu_readings_are_clamped_not_sent_invalid() -> None:
    sample = to_sample(
        SystemReading(
            cpu_percent=100.3,
            memory_percent=1,
            memory_available=1,
            disk_percent=1,
            disk_free=1,
            uptime_s=-0.5,
            net_bytes_sent=0,
            net_bytes_recv=0,
        ),
        1,
        1,
    )
    assert sample.cpu_percent == 100.0
    assert sample.uptime_s == 0.0


def test_backoff_grows_to_its_cap_and_is_jittered() -> None:
    delays = list(itertools.islice(backoff_delays(1.0, 30.0, random.Random(7)), 12))
    assert all(0.5 <= d <= 30.0 for d in delays)
    assert max(delays[6:]) > 8.0  # the cap has grown well past the minimum
    other = list(itertools.islice(backoff_delays(1.0, 30.0, random.Random(8)), 12))
    assert delays != other  # two terminals do not retry in lock step


def test_a_batch_too_large_for_one_message_is_split_and_loses_no_sample() -> None:
    hot = dataclasses.replace(READING, temperatures={f"sensor-{i:02d}": 40.5 for i in range(40)})
    batch = Telemetry(samples=[to_sample(hot, i, i) for i in range(MAX_SAMPLES_PER_BATCH)])
    payloads = encode_batches(batch)
    assert len(payloads) > 1
    assert all(len(p) <= MAX_PAYLOAD for p in payloads)
    seqs = [s.seq for p in payloads for s in decode(Telemetry, p).samples]
    assert seqs == list(range(MAX_SAMPLES_PER_BATCH))


# --- system: boot, reboots and clock ---------------------------------------------------------


def test_boot_time_reboots_and_clock_offset_travel_in_the_system_sample() -> None:
    reading = dataclasses.replace(
        READING, boot_ms=1_732_100_000_000, reboot_count=4, clock_offset_ms=-1_500.5
    )
    sample = decode(Telemetry, encode(Telemetry(samples=[to_sample(reading, 1, 2)]))).samples[0]
    assert isinstance(sample, SystemSample)
    assert (sample.boot_ms, sample.reboot_count, sample.clock_offset_ms) == (
        1_732_100_000_000,
        4,
        -1_500.5,
    )


def test_a_clock_offset_that_is_not_a_number_is_left_out_not_sent_broken() -> None:
    for bad in (math.nan, math.inf, -math.inf, 1e300):
        reading = dataclasses.replace(READING, clock_offset_ms=bad, boot_ms=-5)
        sample = to_sample(reading, 1, 2)
        assert sample.clock_offset_ms is None
        assert sample.boot_ms is None
        decode(Telemetry, encode(Telemetry(samples=[sample])))  # the server would accept it


# --- network -----------------------------------------------------------------------------------

ETH = InterfaceReading("eth0", "ethernet", up=True, bytes_sent=10, bytes_recv=20, errors=1)
WWAN = InterfaceReading("wwan0", "cellular", up=False, bytes_sent=3, bytes_recv=4)


def test_a_network_reading_becomes_a_sample_the_server_accepts() -> None:
    reading = NetworkReading(interfaces=(WWAN, ETH), broker_rtt_ms=42.5, dns_ok=True, dns_ms=3.0)
    sample = to_network_sample(reading, 7, 1_000)
    assert decode(Telemetry, encode(Telemetry(samples=[sample]))).samples == [sample]
    assert [(i.name, i.kind, i.up) for i in sample.interfaces] == [
        ("eth0", "ethernet", True),
        ("wwan0", "cellular", False),
    ]
    assert (sample.interfaces[0].bytes_sent, sample.interfaces[0].errors) == (10, 1)
    assert (sample.broker_rtt_ms, sample.dns_ok, sample.dns_ms) == (42.5, True, 3.0)


def test_many_interfaces_keep_the_real_links_and_each_name_once() -> None:
    tunnels = tuple(InterfaceReading(f"tun{i}", "other", up=True) for i in range(40))
    long_name = "x" * 70
    reading = NetworkReading(
        interfaces=(
            *tunnels,
            WWAN,
            ETH,
            dataclasses.replace(ETH, bytes_sent=99),  # the same interface twice
            InterfaceReading("", "ethernet", up=True),
            InterfaceReading(long_name, "wifi", up=True),
        )
    )
    sample = to_network_sample(reading, 1, 1)
    names = [i.name for i in sample.interfaces]
    assert len(names) == MAX_INTERFACES
    assert names[:3] == ["eth0", "x" * 64, "wwan0"]
    assert sample.interfaces[0].bytes_sent == 10
    assert len(set(names)) == len(names)
    decode(Telemetry, encode(Telemetry(samples=[sample])))


def test_impossible_link_numbers_are_clamped_or_left_out() -> None:
    reading = NetworkReading(
        interfaces=(InterfaceReading("eth0", "ethernet", up=True, bytes_sent=-1, errors=-3),),
        broker_rtt_ms=-0.25,  # a wall clock stepped back during the measurement
        dns_ms=math.nan,
    )
    sample = to_network_sample(reading, 1, 1)
    assert (sample.interfaces[0].bytes_sent, sample.interfaces[0].errors) == (0, 0)
    assert sample.broker_rtt_ms == 0.0
    assert sample.dns_ms is None
    decode(Telemetry, encode(Telemetry(samples=[sample])))


# --- power -------------------------------------------------------------------------------------

BOARD = BoardStatus(
    channels=(ChannelState("printer", on=True),),
    inputs=(
        InputState("cabinet_door_open", active=True, meaning=InputMeaning.CABINET_DOOR_OPEN),
        InputState("tilt", active=False, meaning=InputMeaning.TILTED),
    ),
    readings=(Reading("supply_voltage", 219.8, "V"), Reading("cabinet_temperature", 31.5, "°C")),
)


def test_ups_on_battery_and_an_open_cabinet_door_are_reported_as_power() -> None:
    ups = status_from_variables(
        "kiosk", {"ups.status": "OB DISCHRG LB", "battery.charge": "18", "battery.runtime": "240"}
    )
    reading = power_reading(ups, BOARD, on_ac=None, battery_percent=None)
    assert reading == PowerReading(
        ups_status="OB DISCHRG LB",
        ups_on_battery=True,
        ups_charge_percent=18.0,
        ups_runtime_s=240.0,
        supply_voltage=219.8,
        cabinet_door_open=True,
        cabinet_temperature=31.5,
    )
    sample = to_power_sample(reading, 3, 5)
    assert decode(Telemetry, encode(Telemetry(samples=[sample]))).samples == [sample]


def test_a_ups_that_does_not_say_where_its_power_comes_from_is_not_called_on_mains() -> None:
    ups = status_from_variables("kiosk", {"battery.charge": "100"})
    reading = power_reading(ups, None)
    assert reading.ups_status is None
    assert reading.ups_on_battery is None
    assert reading.ups_charge_percent == 100.0


def test_a_kiosk_without_ups_or_board_reports_only_its_own_battery() -> None:
    assert power_reading(None, None, on_ac=True, battery_percent=80.0) == PowerReading(
        on_ac=True, battery_percent=80.0
    )
    bare = BoardStatus(channels=(), inputs=(), readings=())
    assert power_reading(None, bare).cabinet_door_open is None  # no door switch, not "closed"


def test_power_values_the_wire_would_refuse_are_clamped_or_left_out() -> None:
    sample = to_power_sample(
        PowerReading(
            battery_percent=100.4,
            ups_charge_percent=-2.0,
            ups_runtime_s=math.inf,
            supply_voltage=math.nan,
            ups_status="  " + "OL " * 100,
            cabinet_temperature=-12.5,
        ),
        1,
        1,
    )
    assert (sample.battery_percent, sample.ups_charge_percent) == (100.0, 0.0)
    assert sample.ups_runtime_s is None
    assert sample.supply_voltage is None
    assert sample.ups_status is not None
    assert len(sample.ups_status) == 200
    assert sample.ups_status.startswith("OL OL")
    assert sample.cabinet_temperature == -12.5
    decode(Telemetry, encode(Telemetry(samples=[sample])))
    assert to_power_sample(PowerReading(ups_status="   "), 1, 1).ups_status is None


def test_one_batch_holds_every_kind_of_sample_in_the_order_taken() -> None:
    builder = BatchBuilder(size=3, max_age_ms=60_000)
    assert builder.add(to_sample(READING, 1, 1000), now_ms=1000) is None
    assert builder.add(to_network_sample(NetworkReading((ETH,)), 2, 1000), now_ms=1000) is None
    batch = builder.add(to_power_sample(PowerReading(on_ac=True), 3, 1000), now_ms=1000)
    assert batch is not None
    decoded = decode(Telemetry, encode(batch))
    assert [type(s) for s in decoded.samples] == [SystemSample, NetworkSample, PowerSample]
    assert [s.seq for s in decoded.samples] == [1, 2, 3]


# --- reboot count --------------------------------------------------------------------------------

BOOT_MS = 1_732_100_000_000


def test_the_first_start_on_a_machine_counts_no_reboot(tmp_path: Path) -> None:
    record = record_boot(tmp_path, Boot(BOOT_MS, "id-1"))
    assert (record.reboot_count, record.first_start_of_boot, record.history_lost) == (
        0,
        True,
        False,
    )


def test_an_agent_restart_is_not_a_reboot_but_a_new_boot_is(tmp_path: Path) -> None:
    record_boot(tmp_path, Boot(BOOT_MS, "id-1"))
    again = record_boot(tmp_path, Boot(BOOT_MS, "id-1"))
    assert (again.reboot_count, again.first_start_of_boot) == (0, False)
    rebooted = record_boot(tmp_path, Boot(BOOT_MS + 3_600_000, "id-2"))
    assert (rebooted.reboot_count, rebooted.first_start_of_boot) == (1, True)
    assert record_boot(tmp_path, Boot(BOOT_MS + 3_600_000, "id-2")).reboot_count == 1
    assert record_boot(tmp_path, Boot(BOOT_MS + 7_200_000, "id-3")).reboot_count == 2


def test_boot_time_jitter_is_not_a_reboot_and_does_not_accumulate(tmp_path: Path) -> None:
    record_boot(tmp_path, Boot(BOOT_MS))
    for jitter in (1_000, -2_000, 2_000, 1_500, -1_999):
        record = record_boot(tmp_path, Boot(BOOT_MS + jitter))
        assert record.reboot_count == 0
        assert record.boot.boot_ms == BOOT_MS  # the first reading of this boot is kept
    assert record_boot(tmp_path, Boot(BOOT_MS + 2_001)).reboot_count == 1


def test_a_clock_step_moves_the_boot_time_but_the_boot_id_knows_better(tmp_path: Path) -> None:
    record_boot(tmp_path, Boot(BOOT_MS, "id-1"))
    # NTP stepped the clock ten minutes after a long power cut: same boot, other boot time.
    assert record_boot(tmp_path, Boot(BOOT_MS + 600_000, "id-1")).reboot_count == 0


def test_a_machine_without_boot_id_reboots_by_boot_time(tmp_path: Path) -> None:
    record_boot(tmp_path, Boot(BOOT_MS, None))
    assert record_boot(tmp_path, Boot(BOOT_MS + 60_000, None)).reboot_count == 1


def test_a_damaged_record_restarts_counting_and_says_so(tmp_path: Path) -> None:
    record_boot(tmp_path, Boot(BOOT_MS, "id-1"))
    record_boot(tmp_path, Boot(BOOT_MS + 60_000, "id-2"))
    (tmp_path / FILE).write_text('{"boot_ms": "yesterday"', encoding="utf-8")
    record = record_boot(tmp_path, Boot(BOOT_MS + 120_000, "id-3"))
    assert (record.reboot_count, record.history_lost) == (0, True)
    stored = json.loads((tmp_path / FILE).read_text(encoding="utf-8"))
    assert stored == {"boot_ms": BOOT_MS + 120_000, "boot_id": "id-3", "reboot_count": 0}
    assert not (tmp_path / FILE).with_suffix(".tmp").exists()


def test_an_unwritable_state_directory_is_a_state_dir_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("", encoding="utf-8")
    with pytest.raises(StateDirError):
        record_boot(not_a_dir, Boot(BOOT_MS))
