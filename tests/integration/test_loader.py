"""The Redis loader never stops on a record: what it cannot read, and what Redis refuses,
goes to its dead-letter stream (personalize:loader:dead_letters) with where it came
from and why, and everything else in the same batches is applied. Its own keys live
under personalize:, so a category or user id cannot collide with them (a trending
category named ``window_end_ms`` once made the loader fail with WRONGTYPE)."""

from __future__ import annotations

from decimal import Decimal

import orjson
import redis

import schemas
from personalize import kafkaio, topics
from sinks.redis import DEAD_LETTERS_KEY, Materializer
from tests.integration.test_profile_job import job_stack


def _key(user: str, part: str) -> bytes:
    return orjson.dumps({"user_id": user, "part": part})


def test_unreadable_records_and_refused_writes_are_dead_letters_and_the_rest_is_applied(stack):
    own = job_stack(stack, redis_db=11)
    s = own.settings
    topics.ensure(s, [s.topic_profile_updates, s.topic_trending, s.topic_triggers, s.topic_model_snapshots],
                  local_stack=True, partitions=1)
    client = redis.Redis.from_url(s.redis_url, decode_responses=True)
    client.set("profile:clash", "not a hash")  # another writer's key of the wrong type

    profiles = [
        (_key("u1", "totals"), orjson.dumps({"n_events": 3, "consent": True}), 1_000),
        (b"not json", orjson.dumps({"n_events": 1}), 1_000),                     # unreadable key
        (_key("u2", "totals"), b"{broken", 1_000),                             # unreadable value
        (_key("u3", "totals"), orjson.dumps([1, 2]), 1_000),                   # not an object
        (_key("clash", "totals"), orjson.dumps({"n_events": 1, "consent": True}), 1_000),  # Redis refuses
        (_key("u4", "totals"), orjson.dumps({"n_events": 7, "consent": True}), 1_000),
    ]
    trending = [
        (None, orjson.dumps({"category": "window_end_ms", "product_id": "p1", "views": 5,
                             "window_end_ms": 300_000}), 1_000),
        (None, orjson.dumps({"category": "shoes"}), 1_000),                    # fields missing
    ]
    trigger = {"trigger_id": "t-1", "kind": "cart_abandonment", "user_id": "u1", "session_start_ms": 1,
               "session_end_ms": 2, "cart": [], "cart_value": Decimal("0.00"), "propensity": None, "segment": None,
               "emitted_ms": 3}
    triggers = [(b"u1", b"\xc3\x01 not a trigger", 1_000), (b"u1", schemas.codec("trigger").encode(trigger), 1_000)]
    assert kafkaio.produce(s, s.topic_profile_updates, profiles) == 6
    assert kafkaio.produce(s, s.topic_trending, trending) == 2
    assert kafkaio.produce(s, s.topic_triggers, triggers) == 2

    stats = Materializer(s).drain(timeout_s=60)

    assert client.hgetall("profile:u1") == {"n_events": "3"}
    assert client.hgetall("profile:u4") == {"n_events": "7"}
    assert not client.exists("profile:u2") and not client.exists("profile:u3")
    assert client.get("profile:clash") == "not a hash"
    assert client.zrange("trending:window_end_ms", 0, -1, withscores=True) == [("p1", 5.0)]
    letters = client.xrange(DEAD_LETTERS_KEY)
    where = sorted((f["topic"], int(f["offset"])) for _, f in letters if "topic" in f)
    assert where == sorted([(s.topic_profile_updates, 1), (s.topic_profile_updates, 2),
                            (s.topic_profile_updates, 3), (s.topic_trending, 1), (s.topic_triggers, 0)])
    refused = [f["reason"] for _, f in letters if "topic" not in f]
    assert len(refused) == 1 and "WRONGTYPE" in refused[0]
    assert stats.dead_letters == 6
    assert [f["trigger_id"] for _, f in client.xrange("triggers:cart_abandonment")] == ["t-1"]
