"""Single records that once stopped the job: each goes to the dead-letter topic with its
reason and its own source record, and the valid users around it count exactly.

Found by producing each alone among 60 valid users' sessions to a fresh topic
(issue "Faults and bad input"): a product id holding the cart-list separator
U+001E, a quantity of 2**31-1 at 500.00, a price of 1e12 (the Trigger encode
failed), and a ~1 MiB value that is not Avro (its dead letter exceeded the sink's
request size)."""

from __future__ import annotations

import io
import random
from collections import Counter

import pytest

import schemas
from operators import decode
from personalize import kafkaio, produce, topics
from tests.integration.test_profile_job import check_counts, job_stack, run_bounded
from tests.integration.test_triggers_job import check_triggers, expected_triggers, kafka_triggers

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


def _header_of(codec) -> bytes:
    return b"\xc3\x01" + codec.fingerprint


def fuzzed(valid: list[dict], seed: int = 20261125) -> list[tuple[str, bytes | None, int, bytes | None]]:
    """(kind, value, record timestamp, key) of more than 10,000 records that no reading of
    the contract can accept, each malformed by construction (so the expectation needs no
    decoder): not Avro, truncated, bit-flipped headers, unknown fingerprints, enum symbols
    and ints out of range, refused values in every schema version, record timestamps that
    differ from event_time, and oversized payloads. Their timestamps lie among the valid
    events', so none of them moves a watermark."""
    import copy
    import json
    from pathlib import Path

    import fastavro

    from tests.unit.schemas.test_codec import writer

    rng = random.Random(seed)
    current = schemas.codec("user_event")
    v1 = writer(Path(schemas.HERE, "versions", "user_event.v1.avsc"))
    known = set(current.writers)
    times = [e["event_time"] for e in valid]
    out: list[tuple[str, bytes | None, int, bytes | None]] = []

    def some_event() -> dict:
        return dict(rng.choice(valid))

    def add(kind: str, value: bytes | None, ts: int | None = None, key: bytes | None = None) -> None:
        out.append((kind, value, rng.choice(times) if ts is None else ts,
                    key if key is not None else rng.choice((None, b"", f"fuzz-{rng.randrange(50)}".encode()))))

    for _ in range(1_500):  # random bytes: never the single-object marker
        value = bytearray(rng.randbytes(rng.randint(1, 300)))
        if value[0] == 0xC3:
            value[0] = 0
        add("random bytes", bytes(value))
    for _ in range(10):
        add("null value", None, key=b"fuzz-null")  # (a record needs a key or a value)
        add("empty value", b"")
    for _ in range(1_500):  # every Avro field takes at least one byte: any cut loses one
        data = current.encode(some_event())
        add("truncated", data[:rng.randrange(len(data))])
    for _ in range(1_500):  # one bit of the marker or fingerprint flipped
        data = bytearray(current.encode(some_event()))
        bit = rng.randrange(80)
        data[bit // 8] ^= 1 << (bit % 8)
        assert bytes(data[:2]) != b"\xc3\x01" or bytes(data[2:10]) not in known
        add("bit-flipped header", bytes(data))
    for _ in range(1_000):
        fingerprint = rng.randbytes(8)
        assert fingerprint not in known
        add("unknown fingerprint", b"\xc3\x01" + fingerprint + current.encode(some_event())[10:])
    # the current schema with more event types and a long quantity: bodies that use them
    raw = json.loads(Path(schemas.HERE, "user_event.avsc").read_text())
    wider = copy.deepcopy(raw)
    for f in wider["fields"]:
        if f["name"] == "event_type":
            f["type"]["symbols"] += [f"unknown_{n}" for n in range(20)]
        if f["name"] == "quantity":
            f["type"] = "long"
    wide = fastavro.parse_schema(wider)

    def wide_body(event: dict) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, wide, event)
        return buf.getvalue()

    for _ in range(800):
        add("enum symbol out of range", _header_of(current) + wide_body(
            dict(some_event(), event_type=f"unknown_{rng.randrange(20)}")))
    for _ in range(500):
        add("int out of range", _header_of(current) + wide_body(
            dict(some_event(), quantity=rng.choice((2**31, 2**40, -(2**31) - 1, -(2**50))))))
    refusals = [
        ("user_id", ""), ("user_id", "   "), ("user_id", "a\x00b"), ("user_id", "x" * 257), ("user_id", "\n"),
        ("event_id", "e\x1f"), ("session_id", "s\x7f"), ("product_id", "p\x1e1"), ("category", "c\u2028"),
        ("category", "y" * 300), ("price", -1.0), ("price", -1e300), ("price", 1e300), ("price", 1_000_000.01),
        ("price", float("nan")), ("price", float("inf")), ("quantity", 0), ("quantity", -5), ("quantity", 1_001),
        ("quantity", 2**31 - 1), ("quantity", -(2**31)),
    ]
    for name, codec, count in (("current", current, 1_500), ("v1", v1, 1_000)):
        for _ in range(count):
            field, value = rng.choice(refusals)
            event = {**some_event(), "event_type": "add_to_cart", "product_id": "p1", "price": 9.5, field: value}
            if name == "v1":
                event = {k: v for k, v in event.items() if k not in ("consent_analytics", "context")}
            add(f"refused value ({name} schema)", codec.encode(event))
    for _ in range(1_000):  # absurd and far-future event times, the record stamped among the valid events
        event_time = rng.choice((0, 1, 253_402_300_799_999, 2**62, rng.randrange(2**41)))
        ts = rng.choice(times)
        assert event_time != ts
        add("event_time differs from the record timestamp", current.encode(dict(some_event(), event_time=event_time)),
            ts=ts)
    for n in range(3):  # oversized: about a mebibyte each
        add("oversized, not Avro", bytes(900_000 + n))
        add("oversized id", current.encode(dict(some_event(), user_id="z" * (300_000 + n))))
    return out


def test_ten_thousand_fuzzed_records_among_valid_events_stop_nothing_and_lose_nothing(stack):
    """More than 10,000 malformed records mixed into valid users' sessions, through the
    real job: the run ends normally (a bounded run has no restart strategy: any failure
    would fail it, so it restarted 0 times), every bad record is in the dead-letter topic
    once with a reason and its own source bytes, and every valid event is counted: every
    profile field and every trigger equal an independent computation over the valid
    events only."""
    from tests.integration.test_triggers_job import expected_profile_fields
    from tests.integration.test_profile_job import profiles

    own = job_stack(stack, redis_db=8)
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    codec = schemas.codec("user_event")
    events = produce.generate(produce.TrafficSpec(users=200, sessions_per_user=2, jitter_ms=0, seed=17))
    bad = fuzzed(events)
    assert len(bad) >= 10_000
    records = [(e["user_id"].encode(), codec.encode(e), e["event_time"]) for e in events]
    records += [(key, value, ts) for _, value, ts, key in bad]
    records.sort(key=lambda r: r[2])  # bad records among the valid ones, in time order
    assert kafkaio.produce(s, s.topic_events, records) == len(records)

    summary = run_bounded(own)  # exit 0: the job never failed

    kinds = {}
    for kind, value, _, _ in bad:
        kinds.setdefault(value, kind)
    source = {(r.partition, r.offset): r.value for r in kafkaio.read_to_end(s, s.topic_events)}
    bad_at = {where for where, value in source.items() if value in kinds or value is None}
    assert len(bad_at) == len(bad)
    letters = [schemas.codec("dead_letter").decode(r.value) for r in kafkaio.read_to_end(s, s.topic_dlq)]
    where = [(letter["partition"], letter["offset"]) for letter in letters]
    missed = Counter(kinds[source[at]] for at in bad_at - set(where))
    assert not missed, (missed, [source[at][:80] for at in sorted(bad_at - set(where))][:5])
    assert len(where) == len(set(where)) and set(where) == bad_at  # each bad record once, no valid one
    assert summary["events read"] == len(records)
    assert summary["dead letters"] == len(bad)
    assert summary["late events"] == 0
    missing_reason = Counter()
    for letter, at in zip(letters, where):
        original = source[at]
        assert letter["topic"] == s.topic_events
        assert letter["original"] == (None if original is None else original[:decode.MAX_ORIGINAL_BYTES])
        if not letter["reason"]:
            missing_reason[kinds.get(original, "null value")] += 1
    assert not missing_reason
    print("fuzzed records per kind:", dict(Counter(kind for kind, _, _, _ in bad)))

    want = expected_profile_fields(events, s.recent_window_ms, s.recent_slide_ms)
    got = profiles(own)
    assert set(got) == set(want)  # no profile for any user a bad record named
    wrong = [(u, f, got[u].get(f), v) for u, fields in want.items() for f, v in fields.items() if got[u].get(f) != v]
    assert not wrong, wrong[:10]
    check_triggers(own, expected_triggers(events))


def test_a_session_that_never_closes_keeps_only_its_first_items_and_counts_every_event(stack):
    """A bot's session, its events less than the gap apart, lists cart moves, categories and
    product views without end: each list keeps its first PERSONALIZE_SESSION_LIST_LIMIT items
    (here 50), so its state and the row that reaches Python are bounded, while the counts
    stay exact. Two sessions merged by a late event between them keep the first items of
    each in turn, cut at an item's edge."""
    from tests.integration.test_profile_job import profiles

    limit = 50
    # out-of-orderness of 3 h: the event that bridges two sessions 40 min apart is not late
    own = job_stack(stack, redis_db=8, PERSONALIZE_SESSION_LIST_LIMIT=str(limit),
                    PERSONALIZE_OUT_OF_ORDERNESS_MS=str(3 * 3_600_000))
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    codec = schemas.codec("user_event")
    events = produce.generate(produce.TrafficSpec(users=20, sessions_per_user=1, jitter_ms=0, seed=21,
                                                  no_personalization_rate=0.0, no_marketing_rate=0.0))
    t0 = min(e["event_time"] for e in events)
    base = dict(events[0], event_type="add_to_cart", session_id=None, context=None, quantity=1,
                consent_personalization=True, consent_marketing=True)

    def add(user: str, i: int, at: int, category: str) -> dict:
        # prices rise with i: unbounded, the trigger would keep the most valuable (the last) lines
        return dict(base, user_id=user, product_id=f"{user}-p{i:04d}", price=1.0 + i / 100, category=category,
                    event_time=at)

    # the bot: 300 cart adds 10 s apart (50 min, one session); categories change after the limit
    bot = [add("bot", i, t0 + i * 10_000, "early" if i < limit else "late") for i in range(300)]
    # two sessions of 40 adds, 40 min apart, then a late product view between them
    first = [add("merged", i, t0 + i * 10_000, "c") for i in range(40)]
    second_start = first[-1]["event_time"] + 40 * 60_000
    second = [add("merged", 100 + i, second_start + i * 10_000, "c") for i in range(40)]
    bridge = dict(base, user_id="merged", event_type="product_view", product_id="merged-viewed", price=None,
                  category="c", event_time=first[-1]["event_time"] + 20 * 60_000)
    mine = bot + first + second + [bridge]
    records = [(e["user_id"].encode(), codec.encode(e), e["event_time"]) for e in events]
    records += [(e["user_id"].encode(), codec.encode(e), e["event_time"]) for e in mine]  # bridge last
    assert kafkaio.produce(s, s.topic_events, records) == len(records)

    summary = run_bounded(own)
    assert summary["events read"] == len(records) and summary["dead letters"] == 0 and summary["late events"] == 0
    check_counts(own, events + mine)  # every cart add counted: 300 and 80

    def trigger_of(kept: list[dict], end_ms: int) -> dict:
        """The expected trigger of a session starting at kept[0], ending at end_ms, whose cart
        is the kept adds (each product once, quantity 1)."""
        at = kept[0]["event_time"]
        (tid, want), = expected_triggers([dict(e, event_time=at) for e in kept]).items()
        return {tid: want | {"session_end_ms": end_ms}}

    want = expected_triggers(events) | trigger_of(bot[:limit], bot[-1]["event_time"])
    merged = next(t for t in kafka_triggers(own) if t["user_id"] == "merged")
    carted = {line["product_id"] for line in merged["cart"]}
    # whichever session Flink merged into comes first: all of its 40 adds, then the other's first 10
    a_first, b_first = first + second[:limit - 40], second + first[:limit - 40]
    kept = a_first if carted == {e["product_id"] for e in a_first} else b_first
    want |= trigger_of(sorted(kept, key=lambda e: e["event_time"]), second[-1]["event_time"])
    check_triggers(own, want)  # the bot: its first 50 products, not the 100 most valuable of 300

    got = profiles(own)
    # the profile's top categories come from the session's bounded list: 50 "early", no "late"
    assert (got["bot"]["top_category_1"], got["bot"]["top_category_1_events"]) == ("early", str(limit))
    assert "late" not in {got["bot"].get(f"top_category_{r}") for r in (1, 2, 3)}
    assert int(got["merged"]["n_sessions"]) == 1  # the late view merged the two sessions
