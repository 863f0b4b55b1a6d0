"""Decode and validate: the one place Python touches every event.

Bytes from ``events`` become flat event rows for the JVM windows, or dead letters
(Avro ``DeadLetter``: original bytes, topic, partition, offset, reason). An event
whose time is at or behind the current watermark when it arrives is late
(DESIGN.md): it goes to the dead letters with reason ``late`` and changes no
window. Nothing here keeps state, so the operator runs unkeyed at full speed.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

LATE = "late"
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
# the dead-letter row: key, Avro DeadLetter bytes, record timestamp
DEAD_LETTER_COLUMNS = (("user_id", "STRING"), ("value", "BYTES"), ("ts_ms", "BIGINT"))

_CENT = Decimal("0.01")
# Bounds that keep every downstream step total (issue "Faults and bad input"): an id
# longer than this, or holding a control character (the session rows list cart moves
# with U+001E/U+001F between them), is refused; a price above MAX_PRICE_CENTS or a
# quantity above MAX_QUANTITY too, so a cart line (and any sum of them a session can
# hold) fits the Trigger's Avro decimals and revenue stays far from BIGINT overflow.
MAX_ID_CHARS = 256
MAX_PRICE_CENTS = 100_000_000  # 1,000,000.00
MAX_QUANTITY = 1_000
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
    if record_ts_ms is not None and event_ms != record_ts_ms:
        return None, f"record timestamp {record_ts_ms} differs from event_time {event_ms}"
    product = event.get("product_id")
    if etype in NEEDS_PRODUCT and not product:
        return None, f"{etype} without product_id"
    price = event.get("price")
    cents = None
    if price is not None:
        try:
            cents = to_cents(price)
        except (InvalidOperation, ValueError, OverflowError):
            return None, f"price {price!r} is not a number"
        if cents < 0:
            return None, f"price {price!r} is negative"
        if cents > MAX_PRICE_CENTS:
            return None, f"price {price!r} is above {MAX_PRICE_CENTS // 100}"
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


def decode_function(dead_letter_tag):
    """The Flink ProcessFunction (built here so importing this module starts no JVM)."""
    from pyflink.common import Row
    from pyflink.datastream import ProcessFunction

    class DecodeValidate(ProcessFunction):
        def open(self, runtime_context):
            import schemas

            self.events = schemas.codec("user_event")
            self.letters = schemas.codec("dead_letter")

        def process_element(self, row, ctx):
            value, topic, partition, offset = row[0], row[1], row[2], row[3]
            ts_ms = ctx.timestamp()
            user = None
            try:
                event = self.events.decode(value)
            except Exception as exc:  # DecodeError, or anything fastavro raised
                reason = getattr(exc, "reason", f"{type(exc).__name__}: {exc}")
            else:
                user = event["user_id"] or None
                fields, reason = validate(event, ts_ms)
                if fields is not None:
                    watermark = ctx.timer_service().current_watermark()
                    if ts_ms <= watermark:
                        letter = dead_letter(self.letters, value, topic, partition, offset, ts_ms, LATE, watermark)
                        yield dead_letter_tag, Row(user, letter, ts_ms)
                        return
                    yield Row(*fields)
                    return
            letter = dead_letter(self.letters, value, topic, partition, offset, ts_ms, reason)
            yield dead_letter_tag, Row(user, letter, ts_ms)

    return DecodeValidate()
