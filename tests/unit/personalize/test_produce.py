"""Synthetic traffic: deterministic, sessions a gap apart, abandonment near the configured rate."""

from __future__ import annotations

from collections import defaultdict

from personalize import produce


def test_same_seed_same_traffic():
    spec = produce.TrafficSpec(users=50)
    assert produce.generate(spec) == produce.generate(spec)


def test_sessions_are_separated_by_more_than_the_gap_and_abandonment_follows_the_rate():
    spec = produce.TrafficSpec(users=2000, sessions_per_user=1, abandonment_rate=0.6)
    by_session = defaultdict(list)
    for e in produce.generate(spec):
        by_session[e["session_id"]].append(e)
    with_cart = [s for s in by_session.values() if any(e["event_type"] == "add_to_cart" for e in s)]
    purchased = [s for s in with_cart if any(e["event_type"] == "purchase" for e in s)]
    assert 0.3 < len(purchased) / len(with_cart) < 0.5
    for events in by_session.values():
        times = [e["event_time"] for e in events]
        assert all(b - a < spec.gap_ms for a, b in zip(times, times[1:]))


def test_jitter_reorders_sends_within_the_bound():
    spec = produce.TrafficSpec(users=200, jitter_ms=2000)
    sent = produce.send_order(produce.generate(spec), spec.jitter_ms, spec.seed)
    high = 0
    for e in sent:
        assert e["event_time"] > high - 2000
        high = max(high, e["event_time"])
