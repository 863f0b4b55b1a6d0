"""Single records that once stopped the job: each goes to the dead-letter topic with its
reason and its own source record, and the valid users around it count exactly.

Found by producing each alone among 60 valid users' sessions to a fresh topic
(issue "Faults and bad input"): a product id holding the cart-list separator
U+001E, a quantity of 2**31-1 at 500.00, a price of 1e12 (the Trigger encode
failed), and a ~1 MiB value that is not Avro (its dead letter exceeded the sink's
request size)."""

from __future__ import annotations

import pytest

import schemas
from operators import decode
from personalize import kafkaio, produce, topics
from tests.integration.test_profile_job import check_counts, job_stack, run_bounded
from tests.integration.test_triggers_job import check_triggers, expected_triggers

pytestmark = pytest.mark.slow


def _bad(events: list[dict]) -> list[tuple[str, dict | bytes, str]]:
    """(user, event or raw bytes, expected reason) for each record that once stopped the job."""
    t = events[len(events) // 2]["event_time"]
    base = dict(events[0], event_type="add_to_cart", event_time=t, session_id=None, context=None, product_id="p1")
    return [
        ("bad-sep", dict(base, user_id="bad-sep", product_id="p\x1e1", price=5.0),
         "product_id contains a control character"),
        ("bad-qty", dict(base, user_id="bad-qty", quantity=2**31 - 1, price=500.0),
         "quantity 2147483647 is above 1000"),
        ("bad-price", dict(base, user_id="bad-price", price=1e12), "price is above 1000000"),
        ("bad-huge", b"\x00not avro!" * 100_000, "not single-object encoded: marker 006e is not c301"),
    ]


def test_records_that_once_stopped_the_job_are_dead_lettered_and_valid_users_count_exactly(stack):
    own = job_stack(stack, redis_db=8)
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    codec = schemas.codec("user_event")
    events = produce.generate(produce.TrafficSpec(users=60, sessions_per_user=1, jitter_ms=0, seed=5,
                                                  no_personalization_rate=0.0, no_marketing_rate=0.0))
    bad = _bad(events)
    t = events[len(events) // 2]["event_time"]
    records = [(e["user_id"].encode(), codec.encode(e), e["event_time"]) for e in events]
    for user, record, _ in bad:
        records.append((user.encode(), record if isinstance(record, bytes) else codec.encode(record), t))
    records.sort(key=lambda r: r[2])
    assert kafkaio.produce(s, s.topic_events, records) == len(events) + 4

    summary = run_bounded(own)  # asserts the run ended with exit 0
    assert summary["events read"] == len(events) + 4 and summary["dead letters"] == 4

    source = {(r.partition, r.offset): r.value for r in kafkaio.read_to_end(s, s.topic_events)}
    letters = [schemas.codec("dead_letter").decode(r.value) for r in kafkaio.read_to_end(s, s.topic_dlq)]
    by_reason = {}
    for letter in letters:
        original = source[(letter["partition"], letter["offset"])]
        assert letter["topic"] == s.topic_events
        assert letter["original"] == original[:decode.MAX_ORIGINAL_BYTES]  # its own source record
        by_reason[letter["reason"].split(" (original truncated")[0]] = len(original)
    assert set(by_reason) == {reason for _, _, reason in bad}
    huge = next(letter for letter in letters if letter["reason"].startswith("not single-object"))
    assert huge["reason"].endswith(f"(original truncated to {decode.MAX_ORIGINAL_BYTES} of 1000000 bytes)")

    check_counts(own, events)  # and no profile for any bad record's user
    check_triggers(own, expected_triggers(events))


def test_events_written_with_the_first_schema_version_count_like_current_ones(stack):
    """Schema evolution through the whole job: half the users' events come from an old producer
    writing v1 (no consent_analytics, no context); the job resolves them to the current schema."""
    from pathlib import Path

    from tests.unit.schemas.test_codec import writer

    own = job_stack(stack, redis_db=10)
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    current = schemas.codec("user_event")
    v1 = writer(Path(schemas.HERE, "versions", "user_event.v1.avsc"))
    assert v1.fingerprint != current.fingerprint
    events = produce.generate(produce.TrafficSpec(users=40, sessions_per_user=1, jitter_ms=0, seed=9,
                                                  no_personalization_rate=0.0))
    old_users = {f"user-{u}" for u in range(0, 40, 2)}
    records = []
    for e in events:
        if e["user_id"] in old_users:
            old = {k: v for k, v in e.items() if k not in ("consent_analytics", "context")}
            records.append((e["user_id"].encode(), v1.encode(old), e["event_time"]))
        else:
            records.append((e["user_id"].encode(), current.encode(e), e["event_time"]))
    assert sum(r[1][2:10] == v1.fingerprint for r in records) > 0
    assert kafkaio.produce(s, s.topic_events, records) == len(events)

    summary = run_bounded(own)
    assert summary["events read"] == len(events) and summary["dead letters"] == 0
    check_counts(own, events)
    check_triggers(own, expected_triggers(events))
