"""`personalize forget USER_ID`: a user's "forget me" reaches every store, live.

A live job holds two users' profiles and cart-abandonment triggers; one of them is
forgotten. Afterwards: no Redis key, stream entry or trigger id of that user (the other
user untouched); the compacted profile changelog ends with a tombstone for each of the
user's parts, and the triggers and segment changes with one for the user; a new event of
the user starts from zero in the job's state (totals and the models step's history); a
later bounded replay of the same events topic does not bring the old events back; and
no output of the CLI or the job names the user in clear."""

from __future__ import annotations

import time

import orjson
import pytest

import schemas
from personalize import credentials, kafkaio, smoke, topics
from sinks import redis as loader
from tests.integration.test_profile_job import QUICK_LIVE, _interrupt, _start, job_stack, run_bounded, wait_until

pytestmark = pytest.mark.slow

GONE = "shopper-who-asks-to-be-forgotten-7f3a"
KEPT = "shopper-who-stays-51c2"


def _last_by_key(settings, topic: str) -> dict[bytes, bytes | None]:
    """The newest value per key of ``topic`` (read_committed): what compaction keeps."""
    return {rec.key: rec.value for rec in kafkaio.read_to_end(settings, topic)}


def test_forget_leaves_nothing_of_the_user_and_a_replay_does_not_bring_it_back(stack, tmp_path):
    own = job_stack(stack, redis_db=10, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_PROFILE_FLUSH_MS="200", **QUICK_LIVE)
    s = own.settings
    topics.ensure(s, [s.topic_events], partitions=1, local_stack=True)
    codec = schemas.codec("user_event")
    base = smoke.sample_events(1, users=1)[0]
    now = lambda: int(time.time() * 1000)  # noqa: E731

    def send(*events: tuple[str, str, int]) -> None:
        records = [dict(base, event_id=f"{user}-{kind}-{t}", user_id=user, event_time=t, event_type=kind,
                        product_id="p-1" if kind != "page_view" else None, category="shoes",
                        price=25.5 if kind == "add_to_cart" else None, quantity=1,
                        consent_personalization=True, consent_marketing=True) for user, kind, t in events]
        assert kafkaio.produce(s, s.topic_events, [(e["user_id"].encode(), codec.encode(e), e["event_time"])
                                                   for e in records]) == len(records)

    r = credentials.redis_client(s, decode_responses=True)
    t0 = now()
    # each user: a session with a product view and a cart add, no purchase (a trigger);
    # a later event of another user closes the sessions (times rise: the watermark follows each)
    for i, user in enumerate((GONE, KEPT)):
        send((user, "product_view", t0 + 200 * i), (user, "add_to_cart", t0 + 200 * i + 100))
    send(("clock", "page_view", t0 + 2_000))
    outputs = []
    proc = _start(own)
    try:
        for user in (GONE, KEPT):
            wait_until(f"{user}'s profile and trigger in Redis", lambda u=user: (
                r.hget(f"profile:{u}", "n_sessions") == "1"
                and r.exists(loader.TRIGGERS_BY_USER + u)), proc, 180)
        kept_before = r.hgetall(f"profile:{KEPT}")
        gone_trigger_ids = set(r.hvals(loader.TRIGGERS_BY_USER + GONE))
        assert len(gone_trigger_ids) == 1 and gone_trigger_ids <= r.smembers(loader.TRIGGER_IDS)

        forgot = own.cli("forget", GONE, "--wait", "60")
        outputs += [forgot.stdout, forgot.stderr]
        assert forgot.returncode == 0, forgot.stderr[-3000:]
        said = orjson.loads(forgot.stdout.strip().splitlines()[-1])
        assert said["redis"] == "nothing of the user left" and said["erasure"].startswith("user#")

        # Redis: no key naming the user, no stream entry or trigger id of it; the other user as before
        keys = r.keys("*")
        assert [k for k in keys if GONE in k] == [], keys
        assert [e for _, e in r.xrange(loader.TRIGGER_STREAM) if e.get("user_id") == GONE] == []
        assert not gone_trigger_ids & r.smembers(loader.TRIGGER_IDS)
        assert not r.hexists(loader.NO_CONSENT_KEY, GONE)
        assert r.hgetall(f"profile:{KEPT}") == kept_before
        assert [e["user_id"] for _, e in r.xrange(loader.TRIGGER_STREAM)] == [KEPT]

        # Kafka: the compacted outputs end with a tombstone for each of the user's keys (all
        # keyed by the user id: the sessions part's changelog, the live one, the triggers)
        def tombstoned() -> bool:
            return (_last_by_key(s, s.topic_profile_updates).get(GONE.encode(), b"") is None
                    and _last_by_key(s, s.topic_profile_live).get(GONE.encode(), b"") is None
                    and _last_by_key(s, s.topic_triggers).get(GONE.encode(), b"") is None)
        wait_until("tombstones for every key of the user", tombstoned, proc, 60)
        segment_changes = _last_by_key(s, s.topic_segment_changes)
        assert segment_changes.get(GONE.encode(), b"") is None, "no tombstone on the segment changes"
        assert _last_by_key(s, s.topic_profile_live)[KEPT.encode()] is not None

        # the job's state: the user's next event starts from nothing (totals and history)
        t1 = now()
        send((GONE, "page_view", t1))
        time.sleep(2.5)  # the watermark never passes the wall clock: the closing event comes later
        send(("clock", "page_view", now()))
        again = wait_until("the forgotten user back as a new one", lambda: (
            (p := r.hgetall(f"profile:{GONE}")).get("n_sessions") and p.get("n_events") and p), proc, 60)
    finally:
        outputs.append(_interrupt(proc))
    # were it not forgotten: n_events 3, n_sessions 2, first_seen t0, 1 cart add
    assert (again["n_events"], again["n_sessions"], int(again["first_seen_ms"]), again["n_add_to_cart"]) == \
        ("1", "1", t1, "0"), again

    # a bounded replay of the same events topic, from fresh state: the old events stay forgotten
    r.flushdb()
    summary = run_bounded(own)
    assert summary["events read"] == 7, summary  # 2 users x 2, the probe, 2 clock events
    replayed = r.hgetall(f"profile:{GONE}")
    assert (replayed["n_events"], replayed["n_sessions"], int(replayed["first_seen_ms"])) == ("1", "1", t1)
    assert r.hgetall(f"profile:{KEPT}")["n_events"] == kept_before["n_events"]
    assert [e["user_id"] for _, e in r.xrange(loader.TRIGGER_STREAM)] == [KEPT]
    # the dropped events are the user's data: not dead letters either
    assert GONE.encode() not in _last_by_key(s, s.topic_dlq)
    assert summary["dead letters"] == 0, summary

    # nothing printed or logged names the user in clear
    for text in outputs:
        assert GONE not in text
