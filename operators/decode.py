"""Decode and validate: the one place Python touches every event.

In the job this is a scalar Python UDF in SQL (``decode_udf``), called once per
record (the job puts a JVM-only barrier right after it, DESIGN.md): Kafka bytes
become one typed row of DECODED_COLUMNS, the event's fields with ``reason`` NULL,
or the reason the record cannot be used. The SQL around it checks the record
timestamp and splits late events off with ``CURRENT_WATERMARK`` (an event at or
behind the watermark when it arrives is late: reason ``late``, DESIGN.md); every
unusable record becomes an Avro ``DeadLetter`` (original bytes, topic, partition,
offset, reason) through a second UDF (``dead_letter_udf``) that runs for those
records only. Nothing here keeps state.
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
# what the decode UDF returns per record: the event, or the user (when known) and the reason.
# INT columns cross as BIGINT: PyFlink 2.2.1's thread mode fails on a NULL INT inside
# a ROW (NullPointerException in Long.intValue), and a bad record's fields are NULL;
# the SQL casts them back to EVENT_COLUMNS' types.
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


def decode_row(codec, value: bytes | None) -> tuple:
    """One record's bytes as a DECODED_COLUMNS tuple (no exception escapes: a bad
    record is a reason, never a failed job)."""
    try:
        event = codec.decode(value)
    except Exception as exc:  # DecodeError, or anything fastavro raised
        return (None, *_NOTHING, getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")
    try:
        fields, reason = validate(event)
    except Exception as exc:  # a value of a type no check foresaw
        fields, reason = None, f"invalid event: {type(exc).__name__}: {exc}"
    if fields is None:
        user = event.get("user_id")
        return (user if isinstance(user, str) and user and user.isprintable() and len(user) <= MAX_ID_CHARS
                else None, *_NOTHING, reason)
    return (*fields, None)


def _data_type(sql: str):
    from pyflink.table import DataTypes

    return {"STRING": DataTypes.STRING(), "BIGINT": DataTypes.BIGINT(), "INT": DataTypes.INT(),
            "BOOLEAN": DataTypes.BOOLEAN(), "BYTES": DataTypes.BYTES()}[sql]


def decode_udf():
    """``decode_event(value BYTES) -> ROW<DECODED_COLUMNS>`` (built here so importing this module starts no JVM)."""
    from pyflink.common import Row
    from pyflink.table import DataTypes
    from pyflink.table.udf import ScalarFunction, udf

    class DecodeEvent(ScalarFunction):
        def open(self, function_context):
            import schemas

            self.codec = schemas.codec("user_event")

        def eval(self, value):
            return Row(*decode_row(self.codec, value))

    row_type = DataTypes.ROW([DataTypes.FIELD(name, _data_type(sql)) for name, sql in DECODED_COLUMNS])
    return udf(DecodeEvent(), input_types=[DataTypes.BYTES()], result_type=row_type)


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
