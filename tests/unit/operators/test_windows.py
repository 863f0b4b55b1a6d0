"""Window SQL: exact intervals, and session gaps that follow DESIGN.md's boundary."""

from __future__ import annotations

from operators import windows
from personalize.settings import Settings


def test_intervals_are_exact_to_the_millisecond():
    assert windows.interval(5_000) == "INTERVAL '0 00:00:05.000' DAY TO SECOND(3)"
    assert windows.interval(30 * 60_000 - 1) == "INTERVAL '0 00:29:59.999' DAY TO SECOND(3)"
    assert windows.interval(26 * 3_600_000 + 1) == "INTERVAL '1 02:00:00.001' DAY TO SECOND(3)"


def test_session_window_gap_is_one_millisecond_short_so_an_event_exactly_one_gap_later_starts_anew():
    sql = windows.sessions("v", Settings.from_env({"PERSONALIZE_SESSION_GAP_MS": "1800000"}))
    assert "INTERVAL '0 00:29:59.999' DAY TO SECOND(3)" in sql


def test_every_profile_part_carries_consent():
    for sql in windows.profile_parts("v", Settings.from_env({})):
        assert "'consent'" in sql
