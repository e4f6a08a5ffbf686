"""CPU cost of the fleet server's MQTT client per delivery, in-process, without a broker.

N pre-encoded QoS 1 PUBLISH packets (1.4 kB payload, a telemetry topic) are handed over in
64 KiB chunks, as the TLS transport hands them to the client, and every delivery is
acknowledged. Printed: CPU µs per message for

- ingest: ``fleet_server.mqtt_ingest``'s connection (decoder, delivery queue, ack, PUBACKs
  coalesced per event-loop turn, written to a transport that only counts bytes);
- paho:   paho-mqtt 2.x as the previous client ran it (its packet reader on a socket that
  serves the same bytes, manual ack, each PUBACK written as it is made), the baseline.

Neither figure includes TLS or the kernel: it is the client's own share of the cost.

    .venv/bin/python bench/bench_mqtt_client.py [--messages 20000] [--size 1400]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, _ConnectionState

from fleet_server import mqtt_wire
from fleet_server.mqtt_ingest import LinkStats, _Link

TOPIC = "kiosk/v1/bench-0001/telemetry"
CHUNK = 64 * 1024


def encoded_publishes(count: int, size: int) -> bytes:
    payload = b"x" * size
    topic = TOPIC.encode()
    packets = []
    for i in range(count):
        body = len(topic).to_bytes(2, "big") + topic + (i % 65535 + 1).to_bytes(2, "big")
        body += b"\x00" + payload  # no properties
        length = bytearray()
        n = len(body)
        while True:
            n, digit = divmod(n, 128)
            length.append(digit | (0x80 if n else 0))
            if not n:
                break
        packets.append(b"\x32" + bytes(length) + body)
    return b"".join(packets)


class _CountingTransport:
    """Just enough of an ``asyncio.Transport`` for the link: counts what is written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass


async def bench_ingest(stream: bytes, count: int) -> float:
    link = _Link(receive_maximum=65535, stats=LinkStats())
    transport = _CountingTransport()
    link.connection_made(transport)  # type: ignore[arg-type]
    link.connack.set_result(mqtt_wire.ConnAck(session_present=True, reason_code=0))
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    handled = 0
    started = time.process_time()
    for chunk in chunks:
        link.data_received(chunk)
        while link.deliveries:
            delivery = link.take()
            handled += 1
            delivery.ack()
        await asyncio.sleep(0)  # the event-loop turn in which the PUBACKs go out together
    elapsed = time.process_time() - started
    assert handled == count, handled
    assert transport.written == 4 * count, transport.written
    return elapsed / count * 1e6


class _ServingSocket:
    """Serves ``data`` to paho's reader like a socket would, swallowing what it writes."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.written = 0

    def recv(self, size: int) -> bytes:
        chunk = self._data[self._pos : self._pos + size].tobytes()
        self._pos += len(chunk)
        if not chunk:
            raise BlockingIOError
        return chunk

    def send(self, data: bytes) -> int:
        self.written += len(data)
        return len(data)

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        pass


def bench_paho(stream: bytes, count: int) -> float:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.manual_ack_set(True)
    handled = 0

    def on_message(c: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        nonlocal handled
        handled += 1
        c.ack(message.mid, message.qos)

    client.on_message = on_message
    sock = _ServingSocket(stream)
    client._sock = sock  # type: ignore[assignment]  # noqa: SLF001 - feeding paho's reader
    client._state = _ConnectionState.MQTT_CS_CONNECTED  # noqa: SLF001
    started = time.process_time()
    for _ in range(count):
        client.loop_read()
        client.loop_write()
    elapsed = time.process_time() - started
    assert handled == count, handled
    assert sock.written == 4 * count, sock.written
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1400)
    args = parser.parse_args()
    stream = encoded_publishes(args.messages, args.size)
    ours = asyncio.run(bench_ingest(stream, args.messages))
    theirs = bench_paho(stream, args.messages)
    print(f"{args.messages} QoS 1 PUBLISH of {args.size} B, received and acknowledged:")
    print(f"  ingest (fleet_server.mqtt_ingest): {ours:6.1f} µs CPU per message")
    print(f"  paho 2.x reader + manual ack:      {theirs:6.1f} µs CPU per message")
    print(f"  ratio: {theirs / ours:.1f}x less CPU")


if __name__ == "__main__":
    main()
