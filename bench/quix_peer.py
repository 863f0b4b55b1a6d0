"""The peer of `make bench-peers`: the product's core workload as a Quix Streams application.

Written the way Quix Streams' documentation has a user write it (one
``Application``, a ``StreamingDataFrame``, stateful ``apply``, a session window
with a mergeable aggregator, ``to_topic`` and batching sinks), with the rules of
../shared/DESIGN.md the benchmark checks:

- per user, counts of the events with personalization consent (``n_events`` and
  ``n_<event type>``), written to Redis as the hash ``profile:{user}``; a user whose
  latest event (by event time) withdrew personalization consent has no profile;
- per-user sessions (a gap of PEER_GAP_MS or more ends one, as the product's
  ``SESSION`` of gap - 1 ms does); a closed session with a net cart (added minus
  removed, per product, above 0), no purchase and marketing consent on its latest
  event gives a cart-abandonment trigger, id UUIDv5 of (user, session start) in the
  product's namespace, as JSON to the triggers topic and an entry of the Redis stream
  ``triggers:cart_abandonment``.

It reads Avro single-object records with fastavro and the project's schema file
(schemas/user_event.avsc): it imports nothing of the product, and nothing of the
product imports it. No models run here (the product also scores and learns every
session): the table says so.

Settings from the environment: PEER_BROKERS, PEER_INPUT, PEER_GROUP, PEER_TRIGGERS,
PEER_REDIS (host:port/db), PEER_GAP_MS, PEER_STATE_DIR, PEER_GUARANTEE
(exactly-once, default, as the product's trigger topic; or at-least-once).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from decimal import Decimal
from pathlib import Path

import fastavro
import redis
from quixstreams import Application
from quixstreams.dataframe.windows.aggregations import BaseAggregator
from quixstreams.models.serializers import Deserializer
from quixstreams.sinks import BatchingSink, SinkBatch

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "user_event.avsc"
EVENT_TYPES = ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout", "purchase", "search")
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


class SingleObjectAvro(Deserializer):
    """Avro single-object encoding (C3 01, the schema's CRC-64-AVRO fingerprint, the body)."""

    def __init__(self):
        super().__init__()
        raw = json.loads(SCHEMA.read_text())
        self.schema = fastavro.parse_schema(_plain(raw))
        canonical = fastavro.schema.to_parsing_canonical_form(raw)
        self.header = b"\xc3\x01" + bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))

    def __call__(self, value: bytes, ctx):
        if value[:10] != self.header:
            raise ValueError("not a current UserEvent record")
        return fastavro.schemaless_reader(io.BytesIO(value[10:]), self.schema)


def update_profile(event: dict, state) -> dict:
    """The user's counts after this event, and whether the user's latest event consents."""
    profile = state.get("profile") or {"n_events": 0, "latest": [-1, True]}
    at = event["event_time"]
    if event["consent_personalization"]:
        profile["n_events"] += 1
        key = "n_" + event["event_type"]
        profile[key] = profile.get(key, 0) + 1
    # the latest event's flag; at the same time, consent wins (the product's MAX(time*2+flag))
    if [at, event["consent_personalization"]] > profile["latest"]:
        profile["latest"] = [at, event["consent_personalization"]]
    state.set("profile", profile)
    return profile


class Cart(BaseAggregator):
    """A session's net cart, purchases and latest marketing consent; mergeable (sessions merge)."""

    @property
    def state_suffix(self) -> str:
        return "cart-v1"

    def initialize(self):
        return {"net": {}, "price": {}, "purchases": 0, "marketing": [-1, False]}

    def agg(self, old, event, timestamp):
        kind = event["event_type"]
        if kind == "add_to_cart" or kind == "remove_from_cart":
            product = event["product_id"]
            sign = 1 if kind == "add_to_cart" else -1
            old["net"][product] = old["net"].get(product, 0) + sign * event["quantity"]
            if sign > 0:
                # rounded half-even to cents, as the product's decode does
                price = event["price"]
                cents = int(Decimal(repr(price)).quantize(CENT) * 100) if price is not None else 0
                old["price"][product] = max(old["price"].get(product, [-1, -1]), [timestamp, cents])
        elif kind == "purchase":
            old["purchases"] += 1
        old["marketing"] = max(old["marketing"], [timestamp, event["consent_marketing"]])
        return old

    def merge(self, a, b):
        for product, q in b["net"].items():
            a["net"][product] = a["net"].get(product, 0) + q
        for product, p in b["price"].items():
            a["price"][product] = max(a["price"].get(product, [-1, -1]), p)
        a["purchases"] += b["purchases"]
        a["marketing"] = max(a["marketing"], b["marketing"])
        return a

    def result(self, value):
        return value


def trigger_of(window: dict, key: str, gap_ms: int) -> dict | None:
    cart = window["cart"]
    lines = sorted((p, q, cart["price"][p][1]) for p, q in cart["net"].items() if q > 0)
    if cart["purchases"] or not cart["marketing"][1] or not lines:
        return None
    if len(lines) > MAX_CART_LINES:
        lines = sorted(sorted(lines, key=lambda line: (-line[1] * line[2], line[0]))[:MAX_CART_LINES])
    start, end = window["start"], window["end"] - 1  # Quix's end is exclusive
    cents = sum(q * c for _, q, c in lines)
    return {"trigger_id": str(uuid.uuid5(NAMESPACE, f"cart_abandonment|{key}|{start}")), "user_id": key,
            "session_start_ms": start, "session_end_ms": end, "cart_value": f"{cents // 100}.{cents % 100:02d}",
            "cart": [{"product_id": p, "quantity": q, "price": f"{c // 100}.{c % 100:02d}"} for p, q, c in lines],
            "emitted_ms": end + gap_ms}


class RedisProfiles(BatchingSink):
    """profile:{user} hashes, the newest per user of each checkpoint's batch; DEL without consent."""

    def __init__(self, client: redis.Redis):
        super().__init__()
        self.client = client

    def write(self, batch: SinkBatch) -> None:
        newest = {}
        for item in batch:
            newest[item.key] = item.value
        with self.client.pipeline(transaction=True) as pipe:
            for user, profile in newest.items():
                key = f"profile:{user}"
                if profile["latest"][1] and profile["n_events"]:
                    pipe.hset(key, mapping={k: v for k, v in profile.items() if k != "latest"})
                else:
                    pipe.delete(key)
            pipe.execute()


class RedisTriggers(BatchingSink):
    """One entry of the trigger stream per trigger."""

    def __init__(self, client: redis.Redis):
        super().__init__()
        self.client = client

    def write(self, batch: SinkBatch) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            for item in batch:
                t = item.value
                pipe.xadd(STREAM, {"trigger_id": t["trigger_id"], "user_id": t["user_id"],
                                   "session_start_ms": t["session_start_ms"], "cart_value": t["cart_value"],
                                   "cart": json.dumps(t["cart"])})
            pipe.execute()


def main() -> None:
    env = os.environ
    gap_ms = int(env.get("PEER_GAP_MS", "1800000"))
    host_port, db = env["PEER_REDIS"].rsplit("/", 1)
    host, port = host_port.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), db=int(db))
    app = Application(broker_address=env["PEER_BROKERS"], consumer_group=env["PEER_GROUP"],
                      auto_offset_reset="earliest", state_dir=env.get("PEER_STATE_DIR", "state"),
                      processing_guarantee=env.get("PEER_GUARANTEE", "exactly-once"))
    events = app.topic(env["PEER_INPUT"], key_deserializer="str", value_deserializer=SingleObjectAvro())
    triggers_topic = app.topic(env["PEER_TRIGGERS"], key_serializer="str", value_serializer="json")

    sdf = app.dataframe(events)
    profiles = sdf.apply(update_profile, stateful=True)
    profiles.sink(RedisProfiles(client))

    # the product's SESSION of gap - 1 ms: events gap_ms or more apart are two sessions
    sessions = sdf.session_window(inactivity_gap_ms=gap_ms - 1).agg(cart=Cart()).final(closing_strategy="partition")
    triggers = sessions.apply(lambda window, key, timestamp, headers: trigger_of(window, key, gap_ms),
                              metadata=True).filter(lambda t: t is not None)
    triggers.to_topic(triggers_topic)
    triggers.sink(RedisTriggers(client))
    app.run()


if __name__ == "__main__":
    main()
