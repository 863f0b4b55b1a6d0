"""What the Redis loader writes for each profile part (pure functions, no Redis)."""

from __future__ import annotations

from sinks import redis as sink


def test_cents_are_written_with_exactly_two_decimals():
    assert [sink.format_cents(c) for c in (0, 5, 1230, 123456, -5)] == ["0.00", "0.05", "12.30", "1234.56", "-0.05"]


def test_active_hours_are_the_busiest_three_ties_to_the_earlier_hour():
    counts = [0] * 24
    counts[20], counts[8], counts[9], counts[3] = 5, 2, 2, 1
    assert sink.active_hours(",".join(map(str, counts))) == "20,8,9"


def test_totals_add_revenue_and_updated_ms_and_drop_consent():
    fields = sink.profile_fields("totals", {"n_events": "3", "revenue_cents": "1999", "last_seen_ms": "77",
                                            "consent": "true"})
    assert fields == {"n_events": "3", "revenue_cents": "1999", "last_seen_ms": "77", "revenue": "19.99",
                      "updated_ms": "77"}


def test_a_part_missing_a_field_writes_the_rest_and_does_not_raise():
    """A purchase without a price once made SQL drop last_session_revenue_cents (KeyError in the loader)."""
    fields = sink.profile_fields("sessions", {"n_sessions": "1", "avg_session_ms": "1500",
                                              "last_session_revenue_cents": None, "consent": "true"})
    assert fields == {"n_sessions": "1", "avg_session_ms": "1500", "avg_session_s": "1.500"}
    assert sink.profile_fields("totals", {"n_events": "2"}) == {"n_events": "2"}
    assert sink.profile_fields("hours", {}) == {}
