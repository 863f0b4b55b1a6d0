"""The smoke path through the real stack: kafka-python -> Flink Kafka source -> Python map
(thread mode) -> Flink exactly-once Kafka sink -> read_committed consumer."""

from __future__ import annotations

import uuid

import pytest

import schemas
from personalize import kafkaio, smoke, topics


@pytest.mark.slow
def test_1000_avro_events_come_out_exactly_once_keyed_by_user_with_event_time(stack):
    source, sink = f"it-in-{uuid.uuid4().hex}", f"it-out-{uuid.uuid4().hex}"
    topics.ensure(stack.settings, [source, sink], local_stack=True)
    events = smoke.sample_events(1000, users=50)
    assert smoke.produce_events(stack.settings, source, events) == 1000

    done = stack.cli("smoke", "--messages", "0", "--source-topic", source, "--sink-topic", sink, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "smoke OK" in done.stdout

    codec = schemas.codec("user_event")
    out = list(kafkaio.read_to_end(stack.settings, sink, read_committed=True))
    assert len(out) == 1000
    decoded = [codec.decode(r.value) for r in out]
    assert sorted(e["event_id"] for e in decoded) == sorted(e["event_id"] for e in events)
    assert all(r.key == e["user_id"].encode() for r, e in zip(out, decoded))
    by_id = {e["event_id"]: e["event_time"] for e in events}
    assert all(r.timestamp_ms == by_id[e["event_id"]] for r, e in zip(out, decoded))
