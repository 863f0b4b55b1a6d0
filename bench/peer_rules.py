"""The rules both peers of `make bench-peers` apply, as ../shared/DESIGN.md states them.

Plain Python over plain dicts, so that the Quix Streams peer (bench/quix_peer.py) and
the Bytewax peer (bench/bytewax_peer.py) differ only in how their framework meets
the events: decoding, per-user counts, a session's net cart, the cart-abandonment
trigger, and the Redis writes. It imports nothing of the product, and nothing of the
product imports it.

- per user, counts of the events with personalization consent (``n_events`` and
  ``n_<event type>``), written to Redis as the hash ``profile:{user}``; a user whose
  latest event (by event time) withdrew personalization consent has no profile;
- a closed session with a net cart (added minus removed, per product, above 0), no
  purchase and marketing consent on its latest event gives a cart-abandonment
  trigger, id UUIDv5 of (user, session start) in the product's namespace, as JSON to
  the triggers topic and an entry of the Redis stream ``triggers:cart_abandonment``.
"""

from __future__ import annotations

import io
import json
import uuid
from decimal import Decimal
from pathlib import Path

import fastavro

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "user_event.avsc"
# the product's trigger id namespace (DESIGN.md: UUIDv5 of kind|user|session start)
NAMESPACE = uuid.UUID("6f1d3c2a-5b7e-4e8f-9a0b-1c2d3e4f5a6b")
STREAM = "triggers:cart_abandonment"
CENT = Decimal("0.01")
MAX_CART_LINES = 100  # DESIGN.md: a trigger lists at most this many lines, the most valuable


def _plain(schema):
    """The schema without logical types: event_time read as epoch ms, not a datetime."""
    if isinstance(schema, list):
        return [_plain(s) for s in schema]
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if k != "logicalType"}
    return schema


class AvroDecoder:
    """Avro single-object encoding (C3 01, the schema's CRC-64-AVRO fingerprint, the body) to a dict."""

    def __init__(self):
        raw = json.loads(SCHEMA.read_text())
        self.schema = fastavro.parse_schema(_plain(raw))
        canonical = fastavro.schema.to_parsing_canonical_form(raw)
        self.header = b"\xc3\x01" + bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))

    def __call__(self, value: bytes) -> dict:
        if value[:10] != self.header:
            raise ValueError("not a current UserEvent record")
        return fastavro.schemaless_reader(io.BytesIO(value[10:]), self.schema)


def update_profile(profile: dict | None, event: dict) -> dict:
    """The user's counts after this event, and whether the user's latest event consents."""
    if profile is None:
        profile = {"n_events": 0, "latest": [-1, True]}
    at = event["event_time"]
    if event["consent_personalization"]:
        profile["n_events"] += 1
        key = "n_" + event["event_type"]
        profile[key] = profile.get(key, 0) + 1
    # the latest event's flag; at the same time, consent wins (the product's MAX(time*2+flag))
    if [at, event["consent_personalization"]] > profile["latest"]:
        profile["latest"] = [at, event["consent_personalization"]]
    return profile


def new_cart() -> dict:
    return {"net": {}, "price": {}, "purchases": 0, "marketing": [-1, False]}


def add_to_cart(cart: dict, event: dict, timestamp: int) -> dict:
    """A session's net cart, purchases and latest marketing consent after this event."""
    kind = event["event_type"]
    if kind == "add_to_cart" or kind == "remove_from_cart":
        product = event["product_id"]
        sign = 1 if kind == "add_to_cart" else -1
        cart["net"][product] = cart["net"].get(product, 0) + sign * event["quantity"]
        if sign > 0:
            # rounded half-even to cents, as the product's decode does
            price = event["price"]
            cents = int(Decimal(repr(price)).quantize(CENT) * 100) if price is not None else 0
            cart["price"][product] = max(cart["price"].get(product, [-1, -1]), [timestamp, cents])
    elif kind == "purchase":
        cart["purchases"] += 1
    cart["marketing"] = max(cart["marketing"], [timestamp, event["consent_marketing"]])
    return cart


def merge_carts(a: dict, b: dict) -> dict:
    """Two sessions' carts as one (an out-of-order event joined them)."""
    for product, q in b["net"].items():
        a["net"][product] = a["net"].get(product, 0) + q
    for product, p in b["price"].items():
        a["price"][product] = max(a["price"].get(product, [-1, -1]), p)
    a["purchases"] += b["purchases"]
    a["marketing"] = max(a["marketing"], b["marketing"])
    return a


def trigger_of(cart: dict, user: str, start: int, end: int, gap_ms: int) -> dict | None:
    """The cart-abandonment trigger of a closed session [start, end] (its first and last
    event's times), or None when it has none."""
    lines = sorted((p, q, cart["price"][p][1]) for p, q in cart["net"].items() if q > 0)
    if cart["purchases"] or not cart["marketing"][1] or not lines:
        return None
    if len(lines) > MAX_CART_LINES:
        lines = sorted(sorted(lines, key=lambda line: (-line[1] * line[2], line[0]))[:MAX_CART_LINES])
    cents = sum(q * c for _, q, c in lines)
    return {"trigger_id": str(uuid.uuid5(NAMESPACE, f"cart_abandonment|{user}|{start}")), "user_id": user,
            "session_start_ms": start, "session_end_ms": end, "cart_value": f"{cents // 100}.{cents % 100:02d}",
            "cart": [{"product_id": p, "quantity": q, "price": f"{c // 100}.{c % 100:02d}"} for p, q, c in lines],
            "emitted_ms": end + gap_ms}


def write_profiles(client, newest: dict[str, dict]) -> None:
    """profile:{user} hashes from each user's newest profile; DEL without consent."""
    with client.pipeline(transaction=True) as pipe:
        for user, profile in newest.items():
            key = f"profile:{user}"
            if profile["latest"][1] and profile["n_events"]:
                pipe.hset(key, mapping={k: v for k, v in profile.items() if k != "latest"})
            else:
                pipe.delete(key)
        pipe.execute()


def write_triggers(client, triggers) -> None:
    """One entry of the trigger stream per trigger."""
    with client.pipeline(transaction=True) as pipe:
        for t in triggers:
            pipe.xadd(STREAM, {"trigger_id": t["trigger_id"], "user_id": t["user_id"],
                               "session_start_ms": t["session_start_ms"], "cart_value": t["cart_value"],
                               "cart": json.dumps(t["cart"])})
        pipe.execute()
