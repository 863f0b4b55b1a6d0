"""The Redis loader never stops on a record: what it cannot read, and what Redis refuses,
goes to its dead-letter stream (personalize:loader:dead_letters) with where it came
from and why, and everything else in the same batches is applied. Its own keys live
under personalize:, so a category or user id cannot collide with them (a trending
category named ``window_end_ms`` once made the loader fail with WRONGTYPE)."""

from __future__ import annotations

import dataclasses
import time
from decimal import Decimal

import orjson
import pytest
import redis

import schemas
from personalize import credentials, kafkaio, topics
from sinks.redis import (FENCED_TRIES, DEAD_LETTERS_KEY, NO_CONSENT_KEY, OFFSETS_KEY, OWNER_PREFIX, OWNER_TOKENS, TRIGGERS_BY_USER,
                         LoaderFenced, Materializer)
from tests.integration.test_loader_redis_restart import following, until
from tests.integration.test_profile_job import job_stack


def _key(user: str, part: str = "sessions") -> bytes:
    """The key of a profile part on the models step's changelog: the user id (the JSON key
    {user_id, part} of earlier releases is still read, see the consent test)."""
    return user.encode() if part == "sessions" else orjson.dumps({"user_id": user, "part": part})


def _legacy_key(user: str) -> bytes:
    return orjson.dumps({"user_id": user, "part": "sessions"})


def _live(user: str, version: int, **fields) -> tuple:
    """A record of the live changelog (operators/live.py): keyed by the user id."""
    return (user.encode(), orjson.dumps({"version": version, **fields}), 1_000)


def _ensure(s, partitions: int) -> None:
    topics.ensure(s, [s.topic_profile_updates, s.topic_profile_live, s.topic_trending, s.topic_triggers,
                      s.topic_model_snapshots], local_stack=True, partitions=partitions)


def test_unreadable_records_and_refused_writes_are_dead_letters_and_the_rest_is_applied(stack):
    own = job_stack(stack, redis_db=11)
    s = own.settings
    _ensure(s, partitions=1)
    client = credentials.redis_client(s, decode_responses=True)
    client.set("profile:clash", "not a hash")  # another writer's key of the wrong type

    profiles = [
        _live("u1", 1, n_events=3, consent=True),
        (b"\xff\xfe", orjson.dumps({"version": 1, "n_events": 1}), 1_000),  # unreadable key (not UTF-8)
        (b"u2", b"{broken", 1_000),                                            # unreadable value
        (b"u3", orjson.dumps([1, 2]), 1_000),                                  # not an object
        _live("clash", 1, n_events=1, consent=True),                           # Redis refuses
        _live("u4", 5, n_events=7, consent=True),
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
    assert kafkaio.produce(s, s.topic_profile_live, profiles) == 6
    assert kafkaio.produce(s, s.topic_trending, trending) == 2
    assert kafkaio.produce(s, s.topic_triggers, triggers) == 2

    stats = Materializer(s).drain(timeout_s=60)

    assert client.hgetall("profile:u1") == {"n_events": "3", "version": "1"}
    assert client.hgetall("profile:u4") == {"n_events": "7", "version": "5"}
    assert not client.exists("profile:u2") and not client.exists("profile:u3")
    assert client.get("profile:clash") == "not a hash"
    assert client.zrange("trending:window_end_ms", 0, -1, withscores=True) == [("p1", 5.0)]
    letters = client.xrange(DEAD_LETTERS_KEY)
    where = sorted((f["topic"], int(f["offset"])) for _, f in letters if "topic" in f)
    assert where == sorted([(s.topic_profile_live, 1), (s.topic_profile_live, 2),
                            (s.topic_profile_live, 3), (s.topic_trending, 1), (s.topic_triggers, 0)])
    refused = [f["reason"] for _, f in letters if "topic" not in f]
    assert len(refused) == 1 and "WRONGTYPE" in refused[0]
    assert stats.dead_letters == 6
    assert [f["trigger_id"] for _, f in client.xrange("triggers:cart_abandonment")] == ["t-1"]


def _dump(client: redis.Redis) -> dict:
    """Every key of a Redis database with its value (stream entries without their ids, and
    so the per-user trigger index its trigger ids only), but the loaders' owner tokens
    (they name the loaders that ran)."""
    out = {}
    for key in client.scan_iter(count=1000):
        if key == OWNER_TOKENS or key.startswith(OWNER_PREFIX):
            continue
        kind = client.type(key)
        if key.startswith(TRIGGERS_BY_USER):
            out[key] = sorted(client.hvals(key))
        elif kind == "hash":
            out[key] = client.hgetall(key)
        elif kind == "zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            out[key] = client.smembers(key)
        elif kind == "stream":
            out[key] = sorted(tuple(sorted(f.items())) for _, f in client.xrange(key))
        else:
            out[key] = client.get(key)
    return out


def test_two_loaders_of_one_group_split_the_partitions_and_leave_redis_as_one_loader_does(stack):
    """Loaders are members of one Kafka consumer group: two following loaders each get a
    share of the partitions (the same partition number of every topic: a user's live changes
    and session parts reach the same one) and apply each record once; Redis ends as one
    loader alone leaves it. Users 0-299 give consent, 300-349 withdraw it (their live change
    false, their sessions part still written by the job), 350-399 withdraw and give it again
    later."""
    own = job_stack(stack, redis_db=14)
    s = own.settings
    _ensure(s, partitions=2)
    codec = schemas.codec("trigger")
    first, later, live_first, live_later = [], [], [], []
    for i in range(400):
        user = f"u{i}"
        withdrawn = i >= 300
        live_first.append(_live(user, 10, n_events=i, recent_events=i % 7, consent=not withdrawn, consent_ms=1_000))
        first.append((_key(user), orjson.dumps({"n_sessions": 1 + i % 3, "consent": True, "consent_ms": 800}), 1_000))
        if i >= 350:  # consent given again: a newer live change, then a newer sessions part
            live_later.append(_live(user, 20, n_events=i + 1, consent=True, consent_ms=2_000))
            later.append((_key(user), orjson.dumps({"n_sessions": 9, "consent": True, "consent_ms": 1_900}), 2_000))
    triggers = [(f"u{i}".encode(), codec.encode({
        "trigger_id": f"t-{i}", "kind": "cart_abandonment", "user_id": f"u{i}", "session_start_ms": i,
        "session_end_ms": i + 1, "cart": [], "cart_value": Decimal("0.00"), "propensity": None, "segment": None,
        "emitted_ms": i + 2}), 1_000) for i in range(0, 400, 4)]

    # the group first, both members assigned, then the records
    a, b = Materializer(s), Materializer(s)
    assert a.group == b.group
    runs = [following(a), following(b)]
    try:
        until(lambda: len(a.assigned) == len(b.assigned) == 5, "two members of 5 partitions each")
        assert {tp.partition for tp in a.assigned} != {tp.partition for tp in b.assigned}
        assert len({tp.partition for tp in a.assigned}) == 1  # one partition number, every topic
        assert kafkaio.produce(s, s.topic_profile_live, live_first) == len(live_first)
        assert kafkaio.produce(s, s.topic_profile_updates, first) == len(first)
        assert kafkaio.produce(s, s.topic_triggers, triggers) == len(triggers)
        assert kafkaio.produce(s, s.topic_profile_live, live_later) == len(live_later)
        assert kafkaio.produce(s, s.topic_profile_updates, later) == len(later)
        total = len(first) + len(later) + len(triggers) + 400 + len(live_later)
        until(lambda: a.stats.records + b.stats.records == total,
              lambda: f"every record applied: {a.stats.records} + {b.stats.records} of {total}, {runs[0][2]} {runs[1][2]}")
    finally:
        for stop, thread, _ in runs:
            stop.set()
        for _, thread, failures in runs:
            thread.join(timeout=30)
            assert not failures, failures
    assert a.stats.records > 0 and b.stats.records > 0

    one = dataclasses.replace(s, redis_url=s.redis_url.rsplit("/", 1)[0] + "/15")
    credentials.redis_client(one).flushdb()
    single = Materializer(one)
    assert single.group != a.group  # another Redis database: another group
    single.drain(timeout_s=60)

    client = credentials.redis_client(s, decode_responses=True)
    profiles = {k.removeprefix("profile:") for k in client.scan_iter("profile:*")}
    assert profiles == {f"u{i}" for i in range(400) if not 300 <= i < 350}
    assert client.hgetall("profile:u12") == {"n_events": "12", "recent_events": "5", "n_sessions": "1",
                                             "version": "10"}
    assert client.hget("profile:u360", "n_events") == "361"
    assert client.hgetall("profile:u360")["n_sessions"] == "9"
    assert _dump(client) == _dump(credentials.redis_client(one, decode_responses=True))
    assert len(a.stats.users | b.stats.users) == len(single.stats.users) == 350
    assert single.stats.records == total
    assert a.stats.stream_added + b.stats.stream_added == single.stats.stream_added == 100


def test_a_part_from_before_a_withdrawal_leaves_no_profile_and_a_later_one_stands(stack):
    """A user's sessions part and live changes sit on two topics, read in no fixed order
    against each other: here a live change was applied first (marked the user with the
    event time consent was withdrawn at, deleted the profile, or cleared the mark later)
    and the batch holds only the user's sessions parts (u4's under the JSON key of earlier
    releases, still read).

    u1: withdrawn at 5,000, its session ended at 4,000: no profile. u3: withdrawn at
    5,000, then consent given again and a session ending at 6,000 closed: its part is
    written although the live change that clears the mark is not applied yet (the race a
    bare mark lost: the session fields stayed missing until the next session). u4: a mark
    of an older loader (no time): nothing written. u2: never withdrawn."""
    own = job_stack(stack, redis_db=14)
    s = own.settings
    _ensure(s, partitions=1)
    client = credentials.redis_client(s, decode_responses=True)
    client.hset(NO_CONSENT_KEY, mapping={"u1": 5_000, "u3": 5_000, "u4": 1})
    session = lambda n, end: orjson.dumps({"n_sessions": n, "consent": True, "consent_ms": end})  # noqa: E731
    assert kafkaio.produce(s, s.topic_profile_updates, [
        (_key("u1", "sessions"), session(2, 4_000), 1_000),
        (_key("u2", "sessions"), session(3, 4_000), 1_000),
        (_key("u3", "sessions"), session(4, 6_000), 1_000),
        (_legacy_key("u4"), session(5, 6_000), 1_000)]) == 4

    stats = Materializer(s).drain(timeout_s=60)

    assert not client.exists("profile:u1") and not client.exists("profile:u4")
    assert client.hgetall("profile:u2") == {"n_sessions": "3"}
    assert client.hgetall("profile:u3") == {"n_sessions": "4"}
    assert stats.users == {"u2", "u3"} and stats.profile_writes == 2


def test_a_replayed_sessions_part_never_leaves_the_profile_older(stack):
    """The sessions part is at-least-once: after a failure the restored job emits again the
    parts since its checkpoint, after newer ones were applied. A part applies only when its
    session closed after the one the profile holds (``propensity_ms``): u1's replayed parts
    of sessions closed at 1,000 and 2,000, read after the one closed at 3,000 (in other
    batches, and in one batch with it), leave its fields; u2's newer part is written; u3's
    part of an earlier release (no propensity_ms) is written as before."""
    own = job_stack(stack, redis_db=13)
    s = own.settings
    _ensure(s, partitions=1)
    client = credentials.redis_client(s, decode_responses=True)
    part = lambda n, closed: orjson.dumps({"n_sessions": n, "propensity_ms": closed, "consent": True,  # noqa: E731
                                           "consent_ms": closed - 10})
    assert kafkaio.produce(s, s.topic_profile_updates, [
        (_key("u1"), part(1, 1_000), 1_000), (_key("u1"), part(2, 2_000), 1_000), (_key("u1"), part(3, 3_000), 1_000),
        (_key("u2"), part(1, 1_000), 1_000)]) == 4
    Materializer(s).drain(timeout_s=60)
    assert client.hgetall("profile:u1") == {"n_sessions": "3", "propensity_ms": "3000"}

    # the replay, read in a later batch: older parts of u1 (one batch with a newer one of u1),
    # a newer one of u2, one of an earlier release for u3
    assert kafkaio.produce(s, s.topic_profile_updates, [
        (_key("u1"), part(1, 1_000), 2_000), (_key("u1"), part(3, 3_000), 2_000), (_key("u1"), part(2, 2_000), 2_000),
        (_key("u2"), part(2, 2_000), 2_000),
        (_key("u3"), orjson.dumps({"n_sessions": 7, "consent": True}), 2_000)]) == 5
    stats = Materializer(s).drain(timeout_s=60)

    assert client.hgetall("profile:u1") == {"n_sessions": "3", "propensity_ms": "3000"}
    assert client.hgetall("profile:u2") == {"n_sessions": "2", "propensity_ms": "2000"}
    assert client.hgetall("profile:u3") == {"n_sessions": "7"}
    assert stats.users == {"u2", "u3"} and stats.profile_writes == 2


def _profile_record(user: str, n_events: int) -> tuple:
    return (_key(user), orjson.dumps({"n_events": n_events, "consent": True}), 1_000)


def test_a_loader_whose_partitions_another_took_writes_nothing_stale_and_then_stops_naming_it(stack):
    """A loader pauses (a long GC, a frozen VM) after fetching a batch; meanwhile another
    loader is assigned its partitions and applies newer records. When the first wakes, its
    transaction must not write the stale batch or move the offsets back: it finds another
    owner token on its partitions, writes nothing and goes back to the offsets Redis holds.
    (Within one group Kafka revokes the paused member's partitions; the other loader here is
    in a group of its own, so Kafka never gives them back, and after a few refused batches
    the first stops with a message naming the other.)"""
    own = job_stack(stack, redis_db=11)
    s = own.settings
    _ensure(s, partitions=1)
    client = credentials.redis_client(s, decode_responses=True)
    assert kafkaio.produce(s, s.topic_profile_updates, [_profile_record("u1", 1)]) == 1
    paused = Materializer(s)
    paused._open()
    try:
        batch: dict = {}
        deadline = time.monotonic() + 30
        while not batch and time.monotonic() < deadline:
            batch, positions = paused._gather(100) or ({}, {})
        assert sum(len(r) for r in batch.values()) == 1  # n_events 1, held in memory
        assert kafkaio.produce(s, s.topic_profile_updates, [_profile_record("u1", 2)]) == 1
        other = Materializer(s, group=paused.group + "-other")
        assert other.drain(timeout_s=30).users == {"u1"}  # owns the partitions now, writes n_events 2
        offsets = client.hgetall(OFFSETS_KEY)
        assert client.hget("profile:u1", "n_events") == "2"

        paused._apply_or_wait(batch, positions)  # wakes up with its stale batch

        assert client.hget("profile:u1", "n_events") == "2"
        assert client.hgetall(OFFSETS_KEY) == offsets
        # back at the offset Redis holds: past the newer record
        assert [tp.offset for tp in paused.assigned if tp.topic == s.topic_profile_updates] == [2]
        assert paused.stats.profile_writes == 0
        for _ in range(FENCED_TRIES - 2):
            paused._apply_or_wait(batch, positions)
        with pytest.raises(LoaderFenced, match=other.holder):
            paused._apply_or_wait(batch, positions)
        assert client.hget("profile:u1", "n_events") == "2" and client.hgetall(OFFSETS_KEY) == offsets
    finally:
        paused._close()


def test_a_live_change_applies_only_when_newer_so_a_replay_never_leaves_a_profile_older(stack):
    """The live changelog is at-least-once: after a failure the job replays changes Redis
    already holds, in any batch. A change writes only when its version is newer than the
    profile's; the session in progress's fields go when a change comes without them (the
    session closed); a withdrawal deletes the profile and marks its time, so a replayed
    older change that consents writes nothing, and only consent given at a later event
    time writes again."""
    own = job_stack(stack, redis_db=12)
    s = own.settings
    _ensure(s, partitions=1)
    client = credentials.redis_client(s, decode_responses=True)

    def drain(*records) -> None:
        assert kafkaio.produce(s, s.topic_profile_live, list(records)) == len(records)
        Materializer(s).drain(timeout_s=60)

    open_session = dict(session_start_ms=100, session_events=2, session_cart='[{"product_id":"p1"}]',
                        session_cart_value_cents=1999)
    drain(_live("u1", 30, n_events=2, consent=True, consent_ms=200, **open_session))
    assert client.hgetall("profile:u1") == {"version": "30", "n_events": "2", "session_start_ms": "100",
                                            "session_events": "2", "session_cart": '[{"product_id":"p1"}]',
                                            "session_cart_value": "19.99"}
    drain(_live("u1", 20, n_events=1, consent=True, consent_ms=100, **open_session))  # a replay: older
    assert client.hget("profile:u1", "n_events") == "2" and client.hget("profile:u1", "version") == "30"
    drain(_live("u1", 31, n_events=2, consent=True, consent_ms=200))  # the session closed
    assert client.hgetall("profile:u1") == {"version": "31", "n_events": "2"}
    # versions are compared as whole numbers however long (newest event time x 10,000 + changes)
    drain(_live("u1", 17_000_000_000_000_001, n_events=3, consent=True, consent_ms=1_700_000_000_000),
          _live("u1", 17_000_000_000_000_000, n_events=9, consent=True, consent_ms=1_700_000_000_000))
    assert client.hget("profile:u1", "n_events") == "3"

    drain(_live("u1", 17_000_000_000_000_002, n_events=3, consent=False, consent_ms=1_700_000_000_001))
    assert not client.exists("profile:u1")
    assert client.hget(NO_CONSENT_KEY, "u1") == "1700000000001"
    drain(_live("u1", 17_000_000_000_000_001, n_events=3, consent=True, consent_ms=1_700_000_000_000))  # replay
    assert not client.exists("profile:u1")
    drain(_live("u1", 17_000_000_000_100_000, n_events=4, consent=True, consent_ms=1_700_000_000_010))
    assert client.hgetall("profile:u1") == {"version": "17000000000100000", "n_events": "4"}
    assert client.hget(NO_CONSENT_KEY, "u1") is None
