"""Window SQL: exact intervals; the packed closed-session rows read back typed."""

from __future__ import annotations

import base64
import struct

import pytest

from operators import sessions, windows


def test_intervals_are_exact_to_the_millisecond():
    assert windows.interval(5_000) == "INTERVAL '0 00:00:05.000' DAY TO SECOND(3)"
    assert windows.interval(30 * 60_000 - 1) == "INTERVAL '0 00:29:59.999' DAY TO SECOND(3)"
    assert windows.interval(26 * 3_600_000 + 1) == "INTERVAL '1 02:00:00.001' DAY TO SECOND(3)"


def test_a_packed_session_unpacks_to_its_typed_columns_with_empty_as_null():
    # written as the live function writes it: every column as text, '' for NULL, booleans '1'/'0',
    # doubles as base64 of little-endian IEEE bytes
    features = [1.0, 0.6931471805599453, 1e-05]
    values = ["u1", "10", "20", "3", "0", "2", "0", "1", "0", "0", "0", "0", "", "m", "a", "", "1", "0", "7",
              base64.b64encode(struct.pack("<3d", *features)).decode(), "", "AAEC"]
    session = sessions.unpack(sessions.COLUMN_SEP.join(values))
    assert list(session) == [name for name, _ in sessions.SESSION_COLUMNS]
    assert session["start_ms"] == 10 and session["outcome_ms"] is None and session["viewed"] is None
    assert session["cart_moves"] == "m" and session["consent_personalization"] is True
    assert session["consent_marketing"] is False and session["epoch"] == 7
    assert session["propensity_x"] == features and session["segment_x"] is None
    assert session["trigger_prefix"] == "AAEC"
    assert sessions.unpack(sessions.COLUMN_SEP.join(values[:-1] + [""]))["trigger_prefix"] is None
    # rows of earlier releases (in their savepoints' batches): the features as text and no
    # trigger, or neither; without the trigger_prefix key (the models step builds the trigger)
    as_text = values[:-3] + [sessions.FIELD_SEP.join(["1.0", "0.6931471805599453", "1.0E-5"]), ""]
    earlier = sessions.unpack(sessions.COLUMN_SEP.join(as_text))
    assert earlier["propensity_x"] == features and "trigger_prefix" not in earlier
    earliest = sessions.unpack(sessions.COLUMN_SEP.join(values[:-3]))
    assert earliest["epoch"] == 7 and earliest["propensity_x"] is None and earliest["segment_x"] is None
    assert "trigger_prefix" not in earliest
    with pytest.raises(ValueError):  # a row of another column list is refused, not read askew
        sessions.unpack(sessions.COLUMN_SEP.join(values[:-4]))
