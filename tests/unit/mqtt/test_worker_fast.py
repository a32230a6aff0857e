"""The ingest worker's bulk PUBLISH reader against a plain MQTT encoder and paho itself, and
the batching of what it hands over."""

from __future__ import annotations

import os
import queue
import random
import struct
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from sensorseal.core.ids import DeviceId
from sensorseal.mqtt import worker as w

DEV = DeviceId(bytes.fromhex("6650a1b2c3d4e5f601234567"))


# -- the PUBLISH reader ----------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(topic: bytes, payload: bytes, qos: int, mid: int, props: bytes | None,
             dup: bool = False) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if props is not None:
        body += _varint(len(props)) + props
    body += payload
    return bytes([0x30 | (0x08 if dup else 0) | (qos << 1)]) + _varint(len(body)) + body


class _FakeSock:
    """A non-blocking socket that returns the given chunks one recv() at a time."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def recv(self, n: int) -> bytes:
        if not self.chunks:
            raise BlockingIOError
        chunk = self.chunks.pop(0)
        if len(chunk) > n:
            self.chunks.insert(0, chunk[n:])
        return chunk[:n]

    def close(self) -> None:
        self.chunks = []


def _recv(reader: w._PublishReader, n: int) -> bytes:
    """reader.recv(n) as paho's loop calls it: again after BlockingIOError while data is left
    (the reader gives control back after each read that held only PUBLISH packets)."""
    while True:
        try:
            return reader.recv(n)
        except BlockingIOError:
            if not reader._sock.chunks:
                raise


@pytest.mark.parametrize("v5", [True, False])
def test_reader_splits_a_stream_cut_anywhere(v5: bool) -> None:
    rng = random.Random(3 + v5)
    expected: list[tuple[str, bytes, int, int]] = []
    other = bytearray()
    stream = bytearray()
    for k in range(3000):
        r = rng.random()
        if r < 0.8:
            qos = rng.randint(0, 1)
            topic = f"sensorseal/{os.urandom(12).hex()}/telemetry"
            payload = os.urandom(rng.choice([0, 1, 100, 200, 20_000]))
            mid = rng.randint(1, 65_535) if qos else 0
            props = None if not v5 else rng.choice([b"", b"\x01\x01", b"\x0b" + _varint(k + 1)])
            stream += _publish(topic.encode(), payload, qos, mid, props, rng.random() < 0.1)
            expected.append((topic, payload, mid, qos))
        else:  # packets paho must see untouched: SUBACK, PINGRESP, a QoS 2 PUBLISH
            pkt = rng.choice([b"\x90\x03\x00\x01\x01", b"\xd0\x00",
                              _publish(b"a/b", b"q2", 2, 9, b"" if v5 else None)])
            stream += pkt
            other += pkt
    cuts = sorted(rng.sample(range(1, len(stream)), 400))
    chunks = [bytes(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    items: list[w._Item] = []
    reader = w._PublishReader(_FakeSock(chunks), items.extend, v5=v5, connection=7)
    passed = bytearray()
    while True:
        try:
            passed += reader.recv(rng.choice([1, 1, 2, 100]))
        except BlockingIOError:
            if reader._sock.chunks:
                continue
            break
    assert bytes(passed) == bytes(other)
    assert [(i.topic, i.payload, i.mid, i.qos) for i in items] == expected
    assert all(i.connection == 7 for i in items)
    assert reader.pending() == 0


def test_reader_hands_malformed_framing_and_eof_to_paho() -> None:
    bad = b"\x30\xff\xff\xff\xff\x01rest"  # a remaining length of five bytes
    reader = w._PublishReader(_FakeSock([_publish(b"t", b"p", 0, 0, b""), bad, b"more", b""]),
                              lambda _items: None, v5=True, connection=0)
    assert _recv(reader, 100) == bad  # the good packet went to the sink, the rest to paho
    assert _recv(reader, 100) == b"more"  # passive from then on: paho closes the connection
    assert _recv(reader, 100) == b""  # end of stream


def test_reader_topic_not_utf8_and_truncated_fields() -> None:
    items: list[w._Item] = []
    truncated = bytes([0x32, 3]) + b"\x00\x01a"  # QoS 1 without its packet id: left to paho
    reader = w._PublishReader(
        _FakeSock([_publish(b"\xff\xfe", b"x", 1, 5, b""), truncated]), items.extend, v5=True,
        connection=0)
    assert _recv(reader, 100) == truncated
    assert [(i.topic, i.payload, i.mid) for i in items] == [("", b"x", 5)]


def test_reader_against_paho_decoder() -> None:
    """paho itself, fed the same PUBLISH packets through its own packet reader, sees the same
    topic, payload, mid and QoS as the bulk reader."""
    rng = random.Random(5)
    packets = []
    for _ in range(200):
        qos = rng.randint(0, 1)
        packets.append(_publish(f"sensorseal/{os.urandom(12).hex()}/state".encode(),
                                os.urandom(rng.randrange(300)), qos,
                                rng.randint(1, 65_535) if qos else 0,
                                rng.choice([b"", b"\x01\x01\x02\x00\x00\x00\x10"])))
    seen: list[tuple[str, bytes, int, int]] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)

    def on_message(_c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        seen.append((m.topic, bytes(m.payload), m.mid, m.qos))

    c.on_message = on_message
    stream = b"".join(packets)
    c._sock = _FakeSock([stream])  # type: ignore[assignment]
    while c._sock.chunks:  # type: ignore[union-attr]
        assert c._packet_read() in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN)
    consumed = w.split_packets(stream, bytearray(), True)
    assert consumed is not None
    assert [(i.topic, i.payload, i.mid, i.qos) for i in consumed[1]] == seen
    assert len(seen) == 200


def test_next_batch_respects_batch_max_and_keeps_the_rest() -> None:
    worker = w.IngestWorker.__new__(w.IngestWorker)
    worker._inbox = queue.SimpleQueue()
    worker._carry = []
    worker.batch_max = 4
    worker.batch_wait_s = 0
    worker._inbox.put([w._Item(str(i), b"", i, 1) for i in range(3)])
    worker._inbox.put([w._Item(str(i), b"", i, 1) for i in range(3, 10)])
    worker._inbox.put(None)
    sizes = []
    while (b := worker._next_batch()) is not None:
        sizes.append([int(i.topic) for i in b])
    assert sizes == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
