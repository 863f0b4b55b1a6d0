"""Cart abandonment (DESIGN.md, Semantics): a closed session with a non-empty net
cart and no purchase yields one trigger, with an id derived from (user, session start).

Net cart: per product, added minus removed quantity over the whole session,
floored at 0. The sum does not depend on the order events arrive in (removing
what was never added changes nothing as long as it is never added later in the
session; a remove before its add cancels it, which is what a log replayed out of
order must give). The line's price is the latest add's price.
"""

from __future__ import annotations

import uuid
from base64 import b64decode
from decimal import Decimal

import schemas
from operators.sessions import FIELD_SEP, ITEM_SEP

KIND = "cart_abandonment"
# a trigger lists at most this many lines, the most valuable (a session that never closes,
# a bot's, can cart thousands: their sum would overflow the Trigger's decimal(14,2) and
# the record Kafka's request size; 100 lines at the price and quantity bounds fit both)
MAX_CART_LINES = 100
# a fixed namespace: the same (user, session start) gives the same id in every run
_NAMESPACE = uuid.UUID("6f1d3c2a-5b7e-4e8f-9a0b-1c2d3e4f5a6b")


def trigger_id(user_id: str, session_start_ms: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{KIND}|{user_id}|{session_start_ms}"))


def net_cart(cart_moves: str | None) -> list[tuple[str, int, int]]:
    """Cart lines (product_id, quantity, price in cents) with quantity above 0, by product id."""
    return net_lines(move.split(FIELD_SEP) for move in (cart_moves or "").split(ITEM_SEP) if move)


def net_lines(moves) -> list[tuple[str, int, int]]:
    """``net_cart`` of cart moves already split into (sign, product, quantity, cents, at)."""
    added: dict[str, int] = {}
    removed: dict[str, int] = {}
    price: dict[str, tuple[int, int]] = {}  # product -> (time of latest add, cents)
    for sign, product, quantity, cents, at in moves:
        if sign == "+":
            added[product] = added.get(product, 0) + int(quantity)
            seen = (int(at), int(cents) if cents else 0)
            if seen > price.get(product, (-1, -1)):
                price[product] = seen  # the latest add; at the same time, the higher price
        else:
            removed[product] = removed.get(product, 0) + int(quantity)
    lines = []
    for product in sorted(added):
        quantity = added[product] - removed.get(product, 0)
        if quantity > 0:
            lines.append((product, quantity, price[product][1]))
    return lines


def cents_decimal(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def format_cents(cents: int) -> str:
    """Integer cents as a decimal with exactly two places (``-0.05``, ``12.30``)."""
    sign = "-" if cents < 0 else ""
    whole, rest = divmod(abs(cents), 100)
    return f"{sign}{whole}.{rest:02d}"


def abandonment(session: dict, gap_ms: int, propensity: float | None, segment: str | None, *,
                lines: list | None = None) -> dict | None:
    """The Trigger record (Avro fields) for a closed session, or None when none is due.

    ``session`` has the SESSION_COLUMNS of operators.sessions. No trigger without
    marketing consent (the session's latest event decides). At most MAX_CART_LINES
    lines, the most valuable (ties: by product id); ``cart_value`` is their sum.
    """
    if session["n_purchases"] > 0 or not session["consent_marketing"]:
        return None
    lines = net_cart(session["cart_moves"]) if lines is None else lines
    if not lines:
        return None
    if len(lines) > MAX_CART_LINES:
        kept = sorted(lines, key=lambda line: (-line[1] * line[2], line[0]))[:MAX_CART_LINES]
        lines = sorted(kept)
    return {
        "trigger_id": trigger_id(session["user_id"], session["start_ms"]),
        "kind": KIND,
        "user_id": session["user_id"],
        "session_start_ms": session["start_ms"],
        "session_end_ms": session["end_ms"],
        "cart": [{"product_id": p, "quantity": q, "price": cents_decimal(c)} for p, q, c in lines],
        "cart_value": cents_decimal(sum(q * c for _, q, c in lines)),
        "propensity": propensity,
        "segment": segment,
        "emitted_ms": session["end_ms"] + gap_ms,
    }


def complete(header: bytes, prefix: str, propensity: float | None, segment: str | None, emitted_ms: int) -> bytes:
    """The Trigger record's bytes from the JVM's part of it (``trigger_prefix`` of a closed
    session: the Avro body of the fields up to cart_value, base64, Abandonment.java) and what
    the models step adds: propensity, segment, the close's time; ``header`` is the schema's
    single-object header. The same bytes as encoding ``abandonment``'s record (held by
    tests/unit/operators/test_features_jvm.py)."""
    return b"".join((header, b64decode(prefix), schemas.optional_double_bytes(propensity),
                     schemas.optional_string_bytes(segment), schemas.long_bytes(emitted_ms)))


def _money(value) -> str:
    """A decimal (Avro decimal, read as Decimal) with exactly two places."""
    return f"{Decimal(value):.2f}"


def as_json(trigger: dict) -> dict:
    """The trigger as JSON-ready fields, the same for the Redis stream and ``personalize triggers``."""
    return {
        "trigger_id": trigger["trigger_id"],
        "kind": trigger["kind"],
        "user_id": trigger["user_id"],
        "session_start_ms": trigger["session_start_ms"],
        "session_end_ms": trigger["session_end_ms"],
        "cart": [{"product_id": line["product_id"], "quantity": line["quantity"], "price": _money(line["price"])}
                 for line in trigger["cart"]],
        "cart_value": _money(trigger["cart_value"]),
        "propensity": trigger["propensity"],
        "segment": trigger["segment"],
        "emitted_ms": trigger["emitted_ms"],
    }
