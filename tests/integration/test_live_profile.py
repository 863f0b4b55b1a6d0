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


def test_each_event_shows_in_the_live_profile_without_a_checkpoint_and_the_closed_session_leaves_it(stack, tmp_path):
    own = job_stack(stack, redis_db=10, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_CHECKPOINT_INTERVAL_MS=str(CHECKPOINT_MS), PERSONALIZE_SESSION_GAP_MS=str(GAP_MS),
                    PERSONALIZE_OUT_OF_ORDERNESS_MS="0", PERSONALIZE_WATERMARK_EMIT="on-event")
    s = own.settings
    topics.ensure(s, [s.topic_events], partitions=1, local_stack=True)
    codec = schemas.codec("user_event")
    r = credentials.redis_client(s, decode_responses=True)
    now = lambda: int(time.time() * 1000)  # noqa: E731

    def send(e: dict) -> None:
        assert kafkaio.produce(s, s.topic_events, [(e["user_id"].encode(), codec.encode(e), e["event_time"])]) == 1

    send(event("warm-up", 0, now(), "page_view"))
    proc = _start(own)
    try:
        wait_until("the job reads (a first profile)", lambda: r.exists("profile:warm-up"), proc, 240)
        steps = [("page_view", None, None, None, 1), ("product_view", "p1", "shoes", 10.0, 1),
                 ("product_view", "p2", "bags", 5.5, 1), ("add_to_cart", "p1", "shoes", 10.0, 2),
                 ("add_to_cart", "p2", "bags", 5.5, 1), ("remove_from_cart", "p2", "bags", 5.5, 1),
                 ("add_to_cart", "p1", "shoes", 9.5, 1), ("product_view", "p3", "shoes", 3.0, 1)]
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
    finally:
        _interrupt(proc)
