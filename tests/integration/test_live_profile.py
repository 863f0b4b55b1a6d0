"""The live path: during a live run every event reaches its user's profile without waiting
for a checkpoint, with the session in progress (its start, events, product views, distinct
products, net cart and value, last cart add, top category) as an independent computation
over the events sent so far gives it; when the session closes its live fields go."""

from __future__ import annotations

import time
from collections import Counter
from decimal import Decimal

import orjson
import pytest

import schemas
from personalize import credentials, kafkaio, topics
from tests.integration.test_profile_job import _interrupt, _start, job_stack, wait_until

pytestmark = pytest.mark.slow

GAP_MS = 2_000
# the checkpoint interval of the run: far longer than the test, so nothing it sees waited for one
CHECKPOINT_MS = 600_000
# an event must show within this (the benchmark measures the real figure: scripts/bench_latency.py)
SHOWS_WITHIN_S = 10.0


def event(user: str, n: int, t: int, kind: str, product: str | None = None, category: str | None = None,
          price: float | None = None, quantity: int = 1) -> dict:
    return {"event_id": f"{user}-{n}", "event_type": kind, "user_id": user, "session_id": None, "event_time": t,
            "product_id": product, "category": category, "price": price, "quantity": quantity,
            "consent_analytics": True, "consent_personalization": True, "consent_marketing": True, "context": None}


def expected_session(events: list[dict]) -> dict[str, str]:
    """The live fields of a session in progress, straight from its events."""
    cents = lambda e: int(Decimal(str(e["price"])).quantize(Decimal("0.01")) * 100)  # noqa: E731
    added, removed, price = Counter(), Counter(), {}
    for e in events:
        if e["event_type"] == "add_to_cart":
            added[e["product_id"]] += e["quantity"]
            price[e["product_id"]] = cents(e)  # the latest add's price (event times grow here)
        elif e["event_type"] == "remove_from_cart":
            removed[e["product_id"]] += e["quantity"]
    lines = [(p, added[p] - removed[p], price[p]) for p in sorted(added) if added[p] - removed[p] > 0]
    categories = Counter(e["category"] for e in events if e["category"])
    out = {
        "session_start_ms": str(events[0]["event_time"]),
        "session_events": str(len(events)),
        "session_product_views": str(sum(e["event_type"] == "product_view" for e in events)),
        "session_products": str(len({e["product_id"] for e in events
                                     if e["event_type"] in ("product_view", "add_to_cart")})),
    }
    if lines:
        out["session_cart"] = orjson.dumps([{"product_id": p, "quantity": q, "price": f"{c // 100}.{c % 100:02d}"}
                                            for p, q, c in lines]).decode()
        value = sum(q * c for _, q, c in lines)
        out["session_cart_value"] = f"{value // 100}.{value % 100:02d}"
    adds = [e["event_time"] for e in events if e["event_type"] == "add_to_cart"]
    if adds:
        out["session_last_cart_add_ms"] = str(max(adds))
    if categories:
        out["session_top_category"] = sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return out


SESSION_FIELDS = ("session_start_ms", "session_events", "session_product_views", "session_products",
                  "session_cart", "session_cart_value", "session_last_cart_add_ms", "session_top_category")
SHOPPING = [("page_view", None, None, None, 1), ("product_view", "p1", "shoes", 10.0, 1),
            ("product_view", "p2", "bags", 5.5, 1), ("add_to_cart", "p1", "shoes", 10.0, 2),
            ("add_to_cart", "p2", "bags", 5.5, 1), ("remove_from_cart", "p2", "bags", 5.5, 1),
            ("add_to_cart", "p1", "shoes", 9.5, 1), ("product_view", "p3", "shoes", 3.0, 1)]


def now() -> int:
    return int(time.time() * 1000)


def live_run(stack, tmp_path, checkpoint_ms: int):
    """A stack of the test's own for a live run (one partition, watermark per event, no
    out-of-orderness, a short gap): its settings, a Redis client, and a send of one event."""
    own = job_stack(stack, redis_db=10, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_CHECKPOINT_INTERVAL_MS=str(checkpoint_ms), PERSONALIZE_SESSION_GAP_MS=str(GAP_MS),
                    PERSONALIZE_OUT_OF_ORDERNESS_MS="0", PERSONALIZE_WATERMARK_EMIT="on-event")
    s = own.settings
    topics.ensure(s, [s.topic_events], partitions=1, local_stack=True)
    codec = schemas.codec("user_event")

    def send(e: dict) -> None:
        assert kafkaio.produce(s, s.topic_events, [(e["user_id"].encode(), codec.encode(e), e["event_time"])]) == 1

    return own, credentials.redis_client(s, decode_responses=True), send


def test_each_event_shows_in_the_live_profile_without_a_checkpoint_and_the_closed_session_leaves_it(stack, tmp_path):
    """... and the closed session's abandoned cart reaches the Redis trigger stream by the
    fast path, while the exactly-once triggers topic has nothing before a checkpoint."""
    own, r, send = live_run(stack, tmp_path, CHECKPOINT_MS)

    send(event("warm-up", 0, now(), "page_view"))
    proc = _start(own)
    try:
        wait_until("the job reads (a first profile)", lambda: r.exists("profile:warm-up"), proc, 240)
        steps = SHOPPING
        sent: list[dict] = []
        versions, waited = [], []
        for n, (kind, product, category, price, quantity) in enumerate(steps):
            e = event("shopper", n, now(), kind, product, category, price, quantity)
            started = time.monotonic()
            send(e)
            sent.append(e)
            deadline = started + SHOWS_WITHIN_S
            while r.hget("profile:shopper", "n_events") != str(len(sent)):
                assert time.monotonic() < deadline, f"event {n} not in the profile within {SHOWS_WITHIN_S} s"
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                time.sleep(0.02)
            waited.append(time.monotonic() - started)
            got = r.hgetall("profile:shopper")
            want = expected_session(sent)
            assert {f: got.get(f) for f in SESSION_FIELDS} == {f: want.get(f) for f in SESSION_FIELDS}, n
            versions.append(int(got["version"]))
        print(f"live: each event in the profile after {', '.join(f'{w:.2f}' for w in waited)} s")
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        assert r.hget("profile:shopper", "n_add_to_cart") == "3"

        # a later event of another user moves the watermark past the gap: the session closes,
        # and its live fields leave the profile (the totals stay)
        time.sleep(GAP_MS / 1000)
        send(event("clock", 0, now(), "page_view"))
        wait_until("the closed session's live fields gone",
                   lambda: not ({"session_start_ms", "session_events"} & set(r.hgetall("profile:shopper"))), proc, 60)
        got = r.hgetall("profile:shopper")
        assert not set(SESSION_FIELDS) & set(got), got
        assert got["n_events"] == str(len(sent)) and int(got["version"]) > versions[-1]

        def shoppers_triggers() -> list[dict]:
            return [f for _, f in r.xrange("triggers:cart_abandonment") if f["user_id"] == "shopper"]
        wait_until("the abandoned cart's trigger in the Redis stream", shoppers_triggers, proc, 60)
        (entry,) = shoppers_triggers()
        assert entry["session_start_ms"] == str(sent[0]["event_time"])
        assert entry["cart_value"] == expected_session(sent)["session_cart_value"]
        s = own.settings
        assert list(kafkaio.read_to_end(s, s.topic_triggers, timeout_s=10)) == []  # read_committed: no checkpoint yet
    finally:
        _interrupt(proc)


def test_the_session_in_progress_is_scored_by_the_newest_published_propensity_model(stack, tmp_path):
    """Once the models step has published a model (its snapshot, committed at a checkpoint),
    every live change of a session in progress carries ``session_propensity``: the score the
    Python model gives the session's features so far (operators.models), from the JVM."""
    import numpy as np

    from operators import models as m

    own, r, send = live_run(stack, tmp_path, 1000)

    send(event("first", 0, now(), "add_to_cart", "p9", "toys", 4.0, 1))
    proc = _start(own)
    try:
        wait_until("the job reads (a first profile)", lambda: r.exists("profile:first"), proc, 240)
        time.sleep(GAP_MS / 1000)
        send(event("clock", 0, now(), "page_view"))  # closes the first session: the models publish
        wait_until("a model snapshot", lambda: r.get("models:snapshot"), proc, 60)
        model = orjson.loads(r.get("models:snapshot"))["propensity_model"]
        assert model["features"] == list(m.PROPENSITY_FEATURES)
        sent: list[dict] = []
        for n, (kind, product, category, price, quantity) in enumerate(SHOPPING[:5]):
            sent.append(event("shopper", n, now(), kind, product, category, price, quantity))
            send(sent[-1])
        wait_until("the shopper's five events, scored",
                   lambda: r.hget("profile:shopper", "session_events") == "5"
                   and r.hget("profile:shopper", "session_propensity"), proc, 60)
        got = r.hgetall("profile:shopper")
    finally:
        _interrupt(proc)
    # the Python model the snapshot describes, on the features computed in Python
    cents = lambda e: int(round(e["price"] * 100)) if e["price"] is not None else None  # noqa: E731
    moves = [f"{'+' if e['event_type'] == 'add_to_cart' else '-'}\x1f{e['product_id']}\x1f{e['quantity']}\x1f"
             f"{cents(e)}\x1f{e['event_time']}" for e in sent if e["event_type"] in ("add_to_cart", "remove_from_cart")]
    viewed = [f"{e['product_id']}\x1f{e['category']}\x1f{e['event_time']}" for e in sent
              if e["event_type"] == "product_view"]
    session = {"start_ms": sent[0]["event_time"], "outcome_ms": None, "viewed": "\x1e".join(viewed),
               "cart_moves": "\x1e".join(moves)}
    x = np.array(m.propensity_features(session, m.UserHistory()))
    z = model["intercept"] + float(np.dot(model["weights"], (x - model["mean"]) / np.array(model["scale"])))
    assert abs(float(got["session_propensity"]) - 1 / (1 + np.exp(-z))) <= 5e-7, (got, z)
