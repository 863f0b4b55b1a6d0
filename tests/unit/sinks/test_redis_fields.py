"""What the Redis loader writes for each profile part (pure functions, no Redis)."""

from __future__ import annotations

from operators.triggers import format_cents
from sinks import redis as sink


def test_cents_are_written_with_exactly_two_decimals():
    assert [format_cents(c) for c in (0, 5, 1230, 123456, -5)] == ["0.00", "0.05", "12.30", "1234.56", "-0.05"]


def test_active_hours_are_the_busiest_three_ties_to_the_earlier_hour():
    counts = [0] * 24
    counts[20], counts[8], counts[9], counts[3] = 5, 2, 2, 1
    assert sink.active_hours(",".join(map(str, counts))) == "20,8,9"


def test_totals_add_revenue_updated_ms_and_active_hours_and_drop_consent():
    hours = ",".join(["0"] * 20 + ["4", "0", "0", "1"])
    fields = sink.profile_fields("totals", {"n_events": 5, "revenue_cents": 1999, "last_seen_ms": 77,
                                            "events_by_hour": hours, "consent": True})
    assert fields == {"n_events": "5", "revenue_cents": "1999", "last_seen_ms": "77", "revenue": "19.99",
                      "updated_ms": "77", "events_by_hour": hours, "active_hours": "20,23"}


def test_a_part_missing_a_field_writes_the_rest_and_does_not_raise():
    """A purchase without a price once made SQL drop a revenue field (KeyError in the loader)."""
    assert sink.profile_fields("totals", {"n_events": 2, "revenue_cents": None}) == {"n_events": "2"}
    assert sink.profile_fields("recent", {}) == {}


def test_only_an_explicit_false_withdraws_consent():
    assert sink.consents({"consent": True}) and sink.consents({}) and sink.consents({"consent": "true"})
    assert not sink.consents({"consent": False}) and not sink.consents({"consent": "false"})
