"""State that expires (PERSONALIZE_STATE_TTL_MS): a user inactive longer than the TTL is
forgotten by every store at once. Live, with a TTL of seconds: the user's profile leaves
Redis by itself, and the user's next event starts from zero in the job, in the totals
aggregate (SQL state) and in the models step's history (n_sessions 1, not 2)."""

from __future__ import annotations

import time

import pytest

import schemas
from personalize import credentials, kafkaio, smoke, topics
from tests.integration.test_profile_job import QUICK_LIVE, _interrupt, _start, job_stack, wait_until

pytestmark = pytest.mark.slow

TTL_MS = 6_000


def test_an_inactive_user_leaves_redis_and_the_job_s_state_and_comes_back_as_new(stack, tmp_path):
    own = job_stack(stack, redis_db=5, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_STATE_TTL_MS=str(TTL_MS), **QUICK_LIVE)
    s = own.settings
    topics.ensure(s, [s.topic_events], partitions=1, local_stack=True)
    codec = schemas.codec("user_event")
    base = smoke.sample_events(1, users=1)[0]
    now = lambda: int(time.time() * 1000)  # noqa: E731

    def send(*events: tuple[str, int]) -> None:
        records = [dict(base, event_id=f"{user}-{t}", user_id=user, event_time=t, event_type="page_view",
                        product_id=None, category=None, price=None, quantity=1, consent_personalization=True,
                        consent_marketing=True) for user, t in events]
        assert kafkaio.produce(s, s.topic_events, [(e["user_id"].encode(), codec.encode(e), e["event_time"])
                                                   for e in records]) == len(records)

    r = credentials.redis_client(s, decode_responses=True)
    t0 = now()
    # u's first session (two events), closed by a later event of another user ("clock")
    send(("u", t0), ("u", t0 + 100), ("clock", t0 + 2_000))
    proc = _start(own)
    try:
        first = wait_until("u's first session in Redis", lambda: (
            (p := r.hgetall("profile:u")).get("n_sessions") == "1" and p.get("n_events") == "2" and p), proc, 180)
        assert int(first["first_seen_ms"]) == t0
        assert 0 < r.pttl("profile:u") <= TTL_MS
        wait_until("profile:u expired in Redis", lambda: not r.exists("profile:u"), proc, 30)
        time.sleep(2)  # past the TTL of the job's last write for u too (it came before the loader's)
        t1 = now()
        send(("u", t1))
        time.sleep(2.5)  # the watermark never passes the wall clock: the closing event comes later
        send(("clock", now()))
        again = wait_until("u back after its state expired", lambda: (
            (p := r.hgetall("profile:u")).get("n_sessions") and p.get("n_events") and p), proc, 60)
    finally:
        _interrupt(proc)
    # without expiry: n_events 3, n_sessions 2, first_seen t0
    assert (again["n_events"], again["n_sessions"], int(again["first_seen_ms"])) == ("1", "1", t1), again
