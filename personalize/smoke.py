"""``personalize smoke``: produce Avro events, copy them with the Flink smoke job, count.

The count comes from an independent read_committed consumer on the sink topic,
and every event id read back is checked against what was produced.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from personalize import kafkaio, logs, topics
from personalize.settings import Settings

log = logs.get(__name__)

EVENT_TYPES = ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout", "purchase", "search")
BASE_MS = 1_569_888_000_000  # 2019-10-01T00:00:00Z, the start of the REES46 sample


def sample_events(n: int, users: int = 100, start_ms: int = BASE_MS) -> list[dict]:
    """``n`` valid UserEvent records, spread over ``users`` users, one second apart."""
    events = []
    for i in range(n):
        etype = EVENT_TYPES[i % len(EVENT_TYPES)]
        events.append({
            "event_id": f"smoke-{i}",
            "event_type": etype,
            "user_id": f"u{i % users}",
            "session_id": None,
            "event_time": start_ms + i * 1000,
            "product_id": f"p{i % 37}" if etype != "page_view" else None,
            "category": "electronics.smartphone",
            "price": 19.99 if etype in ("add_to_cart", "purchase") else None,
            "quantity": 1,
            "consent_analytics": True,
            "consent_personalization": True,
            "consent_marketing": True,
            "context": None,
        })
    return events


def produce_events(settings: Settings, topic: str, events: list[dict]) -> int:
    import schemas

    codec = schemas.codec("user_event")
    return kafkaio.produce(
        settings,
        topic,
        ((e["user_id"].encode(), codec.encode(e), e["event_time"]) for e in events),
    )


def _millis(value) -> int:
    """fastavro reads timestamp-millis as an aware datetime."""
    return value if isinstance(value, int) else round(value.timestamp() * 1000)


@dataclass
class SmokeReport:
    source_topic: str
    sink_topic: str
    produced: int
    source_records: int
    committed_read: int
    distinct_event_ids: int
    missing: int
    unexpected: int
    wrong_key_or_timestamp: int
    job_seconds: float

    @property
    def ok(self) -> bool:
        return (
            self.committed_read == self.source_records
            and self.distinct_event_ids == self.source_records
            and self.missing == 0
            and self.unexpected == 0
            and self.wrong_key_or_timestamp == 0
        )

    def describe(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (
            f"smoke {verdict}: produced {self.produced} Avro events to {self.source_topic!r} "
            f"({self.source_records} in the topic); the Flink job copied them to {self.sink_topic!r} "
            f"in {self.job_seconds:.1f}s; a read_committed consumer counted {self.committed_read} "
            f"({self.distinct_event_ids} distinct event ids, {self.missing} missing, {self.unexpected} unexpected, "
            f"{self.wrong_key_or_timestamp} with a key other than the user or a timestamp other than the event time)"
        )


def run_smoke(
    settings: Settings,
    messages: int = 1000,
    source_topic: str | None = None,
    sink_topic: str | None = None,
) -> SmokeReport:
    import schemas
    from jobs import smoke as smoke_job

    run_id = uuid.uuid4().hex[:12]
    source_topic = source_topic or f"smoke-in-{run_id}"
    sink_topic = sink_topic or f"smoke-out-{run_id}"
    topics.ensure(settings, [source_topic, sink_topic], local_stack=True)

    produced = 0
    if messages:
        produced = produce_events(settings, source_topic, sample_events(messages))
        log.info("produced", topic=source_topic, events=produced)
    codec = schemas.codec("user_event")
    expected = {codec.decode(r.value)["event_id"] for r in kafkaio.read_to_end(settings, source_topic)}

    log.info("flink smoke job starting", source=source_topic, sink=sink_topic)
    started = time.monotonic()
    smoke_job.run(settings, source_topic, sink_topic)
    job_seconds = time.monotonic() - started

    ids, misplaced = [], 0
    for rec in kafkaio.read_to_end(settings, sink_topic, read_committed=True):
        event = codec.decode(rec.value)
        ids.append(event["event_id"])
        # keyed by user, record timestamp = event time (DESIGN.md, Wire format)
        if rec.key != event["user_id"].encode() or rec.timestamp_ms != _millis(event["event_time"]):
            misplaced += 1
    seen = set(ids)
    return SmokeReport(
        source_topic=source_topic,
        sink_topic=sink_topic,
        produced=produced,
        source_records=len(expected),
        committed_read=len(ids),
        distinct_event_ids=len(seen),
        missing=len(expected - seen),
        unexpected=len(seen - expected),
        wrong_key_or_timestamp=misplaced,
        job_seconds=job_seconds,
    )
