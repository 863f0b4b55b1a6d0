"""Consent withdrawn and given again in a live run, and segments per user, through the
real stack, each checked against a computation straight from the events produced."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

import schemas
from personalize import credentials, kafkaio, produce, topics
from tests.integration.test_profile_job import _interrupt, _start, job_stack, profiles, run_bounded, wait_until
from tests.integration.test_triggers_job import (
    GAP_MS, _clock, expected_profile_fields, send_events, sessions_of, stream_entries,
)

pytestmark = pytest.mark.slow

T0 = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000  # an hour boundary


def event(user: str, n: int, t: int, kind: str, *, consent: bool = True, product: str | None = None,
          price: float | None = None, quantity: int = 1) -> dict:
    return {"event_id": f"{user}-{n}", "event_type": kind, "user_id": user, "session_id": None, "event_time": t,
            "product_id": product, "category": f"cat-{product[-1]}" if product else None, "price": price,
            "quantity": quantity, "consent_analytics": True, "consent_personalization": consent,
            "consent_marketing": True, "context": None}


def session(user: str, start: int, first_n: int, *, consent: bool, buy: bool) -> list[dict]:
    """Views, two cart adds (one of quantity 2), and a purchase of both or none (an abandoned cart)."""
    steps = [("page_view", None, None, 1), ("product_view", "p1", 12.5, 1), ("add_to_cart", "p1", 12.5, 2),
             ("product_view", "p2", 3.25, 1), ("add_to_cart", "p2", 3.25, 1)]
    if buy:
        steps += [("checkout", None, None, 1), ("purchase", "p1", 12.5, 2), ("purchase", "p2", 3.25, 1)]
    return [event(user, first_n + i, start + i * 60_000, kind, consent=consent, product=p, price=price, quantity=q)
            for i, (kind, p, price, q) in enumerate(steps)]


def test_consent_withdrawn_removes_the_profile_and_given_again_brings_back_only_consented_events(stack, tmp_path):
    """Live: a profile from consented events; withdrawn, it disappears and nothing of the
    withdrawn session is written; given again, it comes back from the consented events only."""
    own = job_stack(stack, redis_db=13, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_CHECKPOINT_INTERVAL_MS="1000", PERSONALIZE_MODEL_FLUSH_MS="200")
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    r = credentials.redis_client(s, decode_responses=True)
    phase1 = session("back", T0, 0, consent=True, buy=True) + session("gone", T0, 0, consent=True, buy=False)
    phase2 = (session("back", T0 + 2 * 3_600_000, 10, consent=False, buy=True)
              + session("gone", T0 + 2 * 3_600_000, 10, consent=False, buy=False))
    phase3 = session("back", T0 + 4 * 3_600_000, 20, consent=True, buy=False)
    trigger_of = lambda user, start: lambda: [e for e in stream_entries(own)  # noqa: E731
                                              if e["user_id"] == user and int(e["session_start_ms"]) == start]

    send_events(own, phase1 + _clock(T0 + 3_600_000))
    proc = _start(own)
    try:
        want = expected_profile_fields(phase1, s.recent_window_ms, s.recent_slide_ms)
        wait_until("both profiles of the consented first sessions", lambda: all(
            r.hgetall(f"profile:{u}").get("n_sessions") == "1" for u in ("back", "gone")), proc)
        for user in ("back", "gone"):
            got = r.hgetall(f"profile:{user}")
            assert {f: got.get(f) for f in want[user]} == want[user]

        send_events(own, phase2 + _clock(T0 + 3 * 3_600_000))
        wait_until("the profiles deleted", lambda: not r.exists("profile:back", "profile:gone"), proc)
        wait_until("the withdrawn session of 'gone' closed (its trigger)", trigger_of("gone", T0 + 2 * 3_600_000), proc)
        time.sleep(3)  # a few more checkpoints: still nothing written for either
        assert not r.exists("profile:back", "profile:gone")

        # the session closes in the same checkpoint as the totals that give consent again: the
        # loaders may apply its part first (another partition); it is newer than the withdrawal
        send_events(own, phase3 + _clock(T0 + 5 * 3_600_000))
        wait_until("the session after consent came back closed (its trigger)", trigger_of("back", T0 + 4 * 3_600_000),
              proc)
        want = expected_profile_fields(phase1[:8] + phase3, s.recent_window_ms, s.recent_slide_ms)["back"]
        closed = str(phase3[-1]["event_time"] + GAP_MS)
        wait_until("the profile back, with the newest session", lambda: r.hget("profile:back", "propensity_ms") == closed,
              proc)
        got = r.hgetall("profile:back")
        assert {f: got.get(f) for f in want} == want  # nothing of the withdrawn session: its purchase, its hour
        assert got["revenue"] == "28.25" and got["n_purchase"] == "2" and got["n_sessions"] == "2"
        assert not r.exists("profile:gone")
    finally:
        _interrupt(proc)


def test_segments_per_user_first_assignment_at_once_later_changes_debounced_and_on_kafka(stack):
    """Per user: the segment-change events form a chain (first from no segment, each from the
    previous), each at one of the user's session closes; the first comes at the user's first
    close once the clusterer has centroids; a later one only after ``segment_debounce``
    closes; the profile holds the newest."""
    debounce = 2
    own = job_stack(stack, redis_db=9, PERSONALIZE_SEGMENT_DEBOUNCE=str(debounce))
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    events = produce.generate(produce.TrafficSpec(users=150, sessions_per_user=7, no_personalization_rate=0.0,
                                                  jitter_ms=0, seed=5))
    assert send_events(own, events) == len(events)
    assert run_bounded(own)["dead letters"] == 0

    codec = schemas.codec("segment_change")
    changes: dict[str, list[dict]] = defaultdict(list)
    for rec in kafkaio.read_to_end(s, s.topic_segment_changes):
        change = codec.decode(rec.value)
        assert rec.key.decode() == change["user_id"] and rec.timestamp_ms == change["changed_ms"]
        changes[change["user_id"]].append(change)  # one user's changes are in order on its partition
    closes: dict[str, list[int]] = defaultdict(list)
    for x in sorted(sessions_of(events), key=lambda x: x[-1]["event_time"]):
        closes[x[0]["user_id"]].append(x[-1]["event_time"] + GAP_MS)
    got = profiles(own)
    first_ever = min(c[0]["changed_ms"] for c in changes.values())
    settled = first_ever + 3_600_000  # by then every session reaching the models is scored by centroids
    moved = 0
    for user, times in closes.items():
        mine = changes.get(user, [])
        if not mine:
            assert times[-1] < settled and "segment" not in got[user], user
            continue
        assert mine[0]["old_segment"] is None
        assert all(b["old_segment"] == a["new_segment"] != b["new_segment"] for a, b in zip(mine, mine[1:])), mine
        assert all(c["changed_ms"] in times and c["new_segment_name"] for c in mine), (mine, times)
        # the first segment is taken at the first close scored with centroids
        assert all(t < settled for t in times if t < mine[0]["changed_ms"]), (user, mine[0], times)
        for a, b in zip(mine, mine[1:]):
            assert sum(a["changed_ms"] < t <= b["changed_ms"] for t in times) >= debounce, (user, a, b, times)
            moved += 1
        assert got[user]["segment"] == mine[-1]["new_segment"]
        if mine[-1]["changed_ms"] == times[-1]:
            assert got[user]["segment_name"] == mine[-1]["new_segment_name"]
    assert moved > 0  # at least one debounced change was seen
    assert sum(len(c) for c in changes.values()) - len(changes) == moved
