"""Validation turns events into rows for the windows, or gives the reason they cannot be used."""

from __future__ import annotations

import pytest

import schemas
from operators import decode


def event(**overrides):
    base = {"event_id": "e", "event_type": "purchase", "user_id": "u1", "event_time": 1_000, "product_id": "p1",
            "category": "c", "price": 19.99, "quantity": 2, "consent_analytics": True,
            "consent_personalization": True, "consent_marketing": False}
    base.update(overrides)
    return base


@pytest.mark.parametrize("price, cents", [(19.99, 1999), (0.125, 12), (0.135, 14), (2.675, 268), ("10", 1000),
                                          (1e-3, 0), (-0.004, 0), (-0.006, -1)])
def test_prices_become_cents_rounded_half_even_from_their_decimal_form(price, cents):
    assert decode.to_cents(price) == cents


def test_a_valid_event_becomes_a_row_in_column_order():
    row, reason = decode.validate(event(), 1_000)
    assert reason is None
    assert dict(zip([c for c, _ in decode.EVENT_COLUMNS], row)) == {
        "user_id": "u1", "event_type": "purchase", "product_id": "p1", "category": "c", "price_cents": 1999,
        "quantity": 2, "consent_analytics": True, "consent_personalization": True, "consent_marketing": False,
        "event_time_ms": 1_000,
    }


@pytest.mark.parametrize(
    "overrides, ts, reason",
    [
        ({"user_id": " "}, 1_000, "user_id is empty"),
        ({}, 1_001, "record timestamp 1001 differs from event_time 1000"),
        ({"product_id": None}, 1_000, "purchase without product_id"),
        ({"price": -1.0}, 1_000, "price is negative"),
        ({"quantity": 0}, 1_000, "quantity 0 is below 1"),
        ({"price": float("nan")}, 1_000, "price is not a finite number"),
        ({"price": float("inf")}, 1_000, "price is not a finite number"),
        # each of these once stopped the job (issue "Faults and bad input")
        ({"product_id": "p\x1e1"}, 1_000, "product_id contains a control character"),
        ({"user_id": "u\x00"}, 1_000, "user_id contains a control character"),
        ({"category": "c\x1f"}, 1_000, "category contains a control character"),
        ({"quantity": 2147483647, "price": 500.0}, 1_000, "quantity 2147483647 is above 1000"),
        ({"price": 1e12}, 1_000, "price is above 1000000"),
        ({"price": 1e300}, 1_000, "price is above 1000000"),
        ({"user_id": "u" * 257}, 1_000, "user_id is longer than 256 characters (257)"),
        ({"product_id": "p" * 300}, 1_000, "product_id is longer than 256 characters (300)"),
        # beyond a SQL timestamp: the job's time checks came out NULL and let it pass (the fuzz test)
        ({"event_time": 2**62}, None, "event_time 4611686018427387904 is outside 1970-01-01..9999-12-31"),
        ({"event_time": -1}, None, "event_time -1 is outside 1970-01-01..9999-12-31"),
    ],
)
def test_unusable_events_get_a_reason(overrides, ts, reason):
    row, why = decode.validate(event(**overrides), ts)
    assert row is None and why == reason


def test_an_event_without_price_is_valid_and_earns_no_revenue():
    row, reason = decode.validate(event(price=None), 1_000)
    assert reason is None and row[4] is None


def test_dead_letters_are_avro_with_their_origin():
    codec = schemas.codec("dead_letter")
    data = decode.dead_letter(codec, b"\x00bad", "events", 1, 42, 5_000, "late", 6_000)
    letter = codec.decode(data)
    assert (letter["original"], letter["topic"], letter["partition"], letter["offset"], letter["reason"],
            letter["watermark"]) == (b"\x00bad", "events", 1, 42, "late", 6_000)


def test_the_largest_valid_line_fits_the_trigger_decimals():
    """price x quantity at the bounds fits Trigger.price (12,2) and a 999-line cart_value (14,2)."""
    row, reason = decode.validate(event(price=decode.MAX_PRICE_CENTS / 100, quantity=decode.MAX_QUANTITY), 1_000)
    assert reason is None
    line = row[4] * row[5]
    assert row[4] < 10**12 and line * 999 < 10**14


def test_a_huge_original_is_cut_in_its_dead_letter_and_the_reason_says_so():
    codec = schemas.codec("dead_letter")
    huge = b"\x07" * (1024 * 1024)
    letter = codec.decode(decode.dead_letter(codec, huge, "events", 0, 9, 5_000, "not single-object encoded"))
    assert letter["original"] == huge[:decode.MAX_ORIGINAL_BYTES]
    assert letter["reason"] == ("not single-object encoded (original truncated to 65536 of 1048576 bytes)")
