"""Window SQL: exact intervals, session gaps that follow DESIGN.md's boundary, typed parts."""

from __future__ import annotations

import pytest

from operators import sessions, windows
from personalize.settings import Settings


def test_intervals_are_exact_to_the_millisecond():
    assert windows.interval(5_000) == "INTERVAL '0 00:00:05.000' DAY TO SECOND(3)"
    assert windows.interval(30 * 60_000 - 1) == "INTERVAL '0 00:29:59.999' DAY TO SECOND(3)"
    assert windows.interval(26 * 3_600_000 + 1) == "INTERVAL '1 02:00:00.001' DAY TO SECOND(3)"


def test_session_window_gap_is_one_millisecond_short_so_an_event_exactly_one_gap_later_starts_anew():
    sql = sessions.session_closes("v", Settings.from_env({"PERSONALIZE_SESSION_GAP_MS": "1800000"}))
    assert "INTERVAL '0 00:29:59.999' DAY TO SECOND(3)" in sql


def test_every_profile_part_is_typed_and_carries_consent():
    settings = Settings.from_env({})
    for sql, columns in ((windows.totals("v"), windows.TOTALS_COLUMNS),
                         (windows.recent("v", settings), windows.RECENT_COLUMNS)):
        assert "MAP[" not in sql
        assert ("consent", "BOOLEAN") in columns
        assert [name for name, _ in columns if name not in sql] == []


def test_the_sliding_window_follows_its_size_and_slide_settings():
    sql = windows.recent("v", Settings.from_env({"PERSONALIZE_RECENT_WINDOW_MS": "1800000",
                                                 "PERSONALIZE_RECENT_SLIDE_MS": "600000"}))
    assert "HOP(TABLE v, DESCRIPTOR(rowtime), INTERVAL '0 00:10:00.000' DAY TO SECOND(3), " \
           "INTERVAL '0 00:30:00.000' DAY TO SECOND(3))" in " ".join(sql.split())


def test_a_packed_session_unpacks_to_its_typed_columns_with_empty_as_null():
    # written as session_closes writes it: every column as text, '' for NULL, booleans '1'/'0'
    values = ["u1", "10", "20", "3", "0", "2", "0", "1", "0", "0", "0", "0", "", "m", "a", "", "1", "0", "7"]
    session = sessions.unpack(sessions.COLUMN_SEP.join(values))
    assert list(session) == [name for name, _ in sessions.SESSION_COLUMNS]
    assert session["start_ms"] == 10 and session["outcome_ms"] is None and session["viewed"] is None
    assert session["cart_moves"] == "m" and session["consent_personalization"] is True
    assert session["consent_marketing"] is False and session["epoch"] == 7
    with pytest.raises(ValueError):  # a row of another column list is refused, not read askew
        sessions.unpack(sessions.COLUMN_SEP.join(values[:-1]))
