"""Decode and validate: Kafka bytes -> one typed row of DECODED_COLUMNS, the event's
fields with ``reason`` NULL, or the reason the record cannot be used.

In the job this step runs in the JVM: ``operators/jvm`` (``personalize.decode.DecodeEvent``,
a Java scalar function in SQL, called once per record behind a JVM-only barrier),
because measured, this Python decode held the job under its throughput target
(README). ``decode_row`` here is its twin, rule for rule and reason for reason, held
to it by one shared corpus (tests/unit/operators/test_decode_jvm.py); the CLI and
the tests read events with it. The SQL around the decode checks the record
timestamp and splits late events off with ``CURRENT_WATERMARK`` (an event at or
behind the watermark when it arrives is late: reason ``late``, DESIGN.md); every
unusable record becomes an Avro ``DeadLetter`` (original bytes, topic, partition,
offset, reason) through a Python UDF (``dead_letter_udf``) that runs for those
records only. Nothing here keeps state.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from decimal import ROUND_HALF_EVEN, Decimal

LATE = "late"
# an event of a user forgotten after it (`personalize forget`): dropped by the job, not a
# dead letter (DecodeEvent.ERASED)
ERASED = "erased"
CART_TYPES = ("add_to_cart", "remove_from_cart")
NEEDS_PRODUCT = ("product_view", "add_to_cart", "remove_from_cart", "purchase")

# the event row handed to the SQL windows: (name, SQL type)
EVENT_COLUMNS = (
    ("user_id", "STRING"),
    ("event_type", "STRING"),
    ("product_id", "STRING"),
    ("category", "STRING"),
    ("price_cents", "BIGINT"),
    ("quantity", "INT"),
    ("consent_analytics", "BOOLEAN"),
    ("consent_personalization", "BOOLEAN"),
    ("consent_marketing", "BOOLEAN"),
    ("event_time_ms", "BIGINT"),
)
# what the decode returns per record: the event, or the user (when known) and the reason
# (the JVM function's result type, DecodeEvent.RESULT, spells the same columns). INT
# columns come as BIGINT (as they did from the Python UDF this replaced: PyFlink 2.2.1's
# thread mode failed on a NULL INT inside a ROW); the SQL casts them back to
# EVENT_COLUMNS' types.
DECODED_COLUMNS = (*((name, "BIGINT" if sql == "INT" else sql) for name, sql in EVENT_COLUMNS), ("reason", "STRING"))
_NOTHING = (None,) * (len(EVENT_COLUMNS) - 1)

_CENT = Decimal("0.01")
# Bounds that keep every downstream step total (issue "Faults and bad input"): an id
# longer than this, or holding a control character (the session rows list cart moves
# with U+001E/U+001F between them), is refused; a price above MAX_PRICE_CENTS or a
# quantity above MAX_QUANTITY too, so a cart line (and any sum of them a session can
# hold) fits the Trigger's Avro decimals and revenue stays far from BIGINT overflow.
MAX_ID_CHARS = 256
MAX_PRICE_CENTS = 100_000_000  # 1,000,000.00
MAX_QUANTITY = 1_000
# prices at or beyond this size are refused before any rounding (far above MAX_PRICE_CENTS)
PRICE_LIMIT = 1e13
INT_RANGE = (-(2**31), 2**31 - 1)
MAX_EVENT_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last SQL TIMESTAMP(3)
# a dead letter keeps at most this much of the original value (the rest stays at its
# topic/partition/offset): a ~1 MiB value would not fit the sink's request size
MAX_ORIGINAL_BYTES = 64 * 1024
ID_FIELDS = ("user_id", "product_id", "category", "session_id", "event_id")


def to_cents(price: float | str | Decimal) -> int:
    """A price as integer cents, rounded half-even from its shortest decimal form."""
    return int((Decimal(str(price)).quantize(_CENT, rounding=ROUND_HALF_EVEN) * 100).to_integral_value())


def epoch_ms(value) -> int:
    """fastavro reads timestamp-millis as an aware datetime."""
    if isinstance(value, int):
        return value
    return round(value.timestamp() * 1000)


def _bad_id(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > MAX_ID_CHARS:
        return f"{name} is longer than {MAX_ID_CHARS} characters ({len(value)})"
    if not value.isprintable():
        return f"{name} contains a control character"
    return None


def validate(event: dict, record_ts_ms: int | None = None) -> tuple[tuple | None, str | None]:
    """The event as a row of EVENT_COLUMNS, or None and the reason it cannot be used.
    ``record_ts_ms`` None leaves the record-timestamp check to the caller (the SQL job)."""
    user = event["user_id"]
    if not user or not user.strip():
        return None, "user_id is empty"
    for name in ID_FIELDS:
        why = _bad_id(name, event.get(name))
        if why:
            return None, why
    etype = event["event_type"]
    event_ms = epoch_ms(event["event_time"])
    if not 0 <= event_ms <= MAX_EVENT_MS:  # beyond what a SQL timestamp holds: it would pass every time check
        return None, f"event_time {event_ms} is outside 1970-01-01..9999-12-31"
    if record_ts_ms is not None and event_ms != record_ts_ms:
        return None, f"record timestamp {record_ts_ms} differs from event_time {event_ms}"
    product = event.get("product_id")
    if etype in NEEDS_PRODUCT and not product:
        return None, f"{etype} without product_id"
    price = event.get("price")
    cents = None
    if price is not None:
        if not math.isfinite(price):
            return None, "price is not a finite number"
        if price <= -PRICE_LIMIT:
            return None, "price is negative"
        if price >= PRICE_LIMIT:
            return None, f"price is above {MAX_PRICE_CENTS // 100}"
        cents = to_cents(price)
        if cents < 0:
            return None, "price is negative"
        if cents > MAX_PRICE_CENTS:
            return None, f"price is above {MAX_PRICE_CENTS // 100}"
    quantity = event.get("quantity", 1)
    if quantity < 1:
        return None, f"quantity {quantity} is below 1"
    if quantity > MAX_QUANTITY:
        return None, f"quantity {quantity} is above {MAX_QUANTITY}"
    return (
        user,
        etype,
        product,
        event.get("category"),
        cents,
        quantity,
        event["consent_analytics"],
        event["consent_personalization"],
        event["consent_marketing"],
        event_ms,
    ), None


def dead_letter(codec, original: bytes | None, topic: str, partition: int, offset: int, ts_ms: int,
                reason: str, watermark: int | None = None) -> bytes:
    """An Avro DeadLetter (single-object encoded)."""
    if original is not None and len(original) > MAX_ORIGINAL_BYTES:
        reason = f"{reason} (original truncated to {MAX_ORIGINAL_BYTES} of {len(original)} bytes)"
        original = bytes(original[:MAX_ORIGINAL_BYTES])
    return codec.encode({
        "original": original,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "record_timestamp": ts_ms,
        "reason": reason,
        "watermark": watermark,
    })


PSEUDONYM_BYTES = 16  # 128 bits of the HMAC, 32 hex characters (DecodeEvent.PSEUDONYM_BYTES)


def pseudonym(user_id: str, key: str) -> str:
    """The user id as the job keeps it: with a pseudonym key (PERSONALIZE_PSEUDONYM_KEY),
    the first 16 bytes of its HMAC-SHA256 under the key, in hex; else the id itself.
    The JVM decode applies the same (DecodeEvent.pseudonym)."""
    if not key:
        return user_id
    digest = hmac.new(key.encode("utf-8"), user_id.encode("utf-8"), hashlib.sha256).digest()
    return digest[:PSEUDONYM_BYTES].hex()


def decode_row(codec, value: bytes | None, pseudonym_key: str = "") -> tuple:
    """One record's bytes as a DECODED_COLUMNS tuple (no exception escapes: a bad
    record is a reason, never a failed job); user ids as ``pseudonym`` makes them."""
    row = _decode_row(codec, value)
    if pseudonym_key and row[0] is not None:
        row = (pseudonym(row[0], pseudonym_key), *row[1:])
    return row


def _decode_row(codec, value: bytes | None) -> tuple:
    try:
        event = codec.decode(value)
    except Exception as exc:  # DecodeError, or anything fastavro raised
        return (None, *_NOTHING, getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")
    quantity = event.get("quantity")
    if isinstance(quantity, int) and not INT_RANGE[0] <= quantity <= INT_RANGE[1]:
        # fastavro reads an Avro int as a varint of any length; Avro's Java library does
        # not (the JVM decode refuses it the same way)
        return (None, *_NOTHING, f"invalid Avro datum for user_event: int out of range: {quantity}")
    try:
        fields, reason = validate(event)
    except Exception as exc:  # a value of a type no check foresaw
        fields, reason = None, f"invalid event: {type(exc).__name__}: {exc}"
    if fields is None:
        user = event.get("user_id")
        return (user if isinstance(user, str) and user and user.isprintable() and len(user) <= MAX_ID_CHARS
                else None, *_NOTHING, reason)
    return (*fields, None)


def dead_letter_udf():
    """``dead_letter(value, topic, partition, offset, ts_ms, reason, watermark_ms) -> BYTES``: the Avro DeadLetter."""
    from pyflink.table import DataTypes
    from pyflink.table.udf import ScalarFunction, udf

    class DeadLetter(ScalarFunction):
        def open(self, function_context):
            import schemas

            self.codec = schemas.codec("dead_letter")

        def eval(self, value, topic, partition, offset, ts_ms, reason, watermark_ms):
            return dead_letter(self.codec, value, topic, partition, offset, ts_ms, reason, watermark_ms)

    inputs = [DataTypes.BYTES(), DataTypes.STRING(), DataTypes.INT(), DataTypes.BIGINT(), DataTypes.BIGINT(),
              DataTypes.STRING(), DataTypes.BIGINT()]
    return udf(DeadLetter(), input_types=inputs, result_type=DataTypes.BYTES())
