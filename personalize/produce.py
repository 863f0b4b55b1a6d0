"""``personalize produce``: synthetic shopper traffic, Avro to ``events``.

Each user shops in sessions (at least two gaps apart): a landing page view,
product views and searches, cart adds and sometimes a remove, then either a
checkout and purchase of the net cart or an abandoned cart (at about the
abandonment rate; loyal users and bigger carts buy more often, see
``purchase_chance``). Consent flags follow a configurable mix; records are sent in an order
jittered against event time (out-of-orderness within ``jitter_ms``).
Deterministic for a given seed and start.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

from personalize import kafkaio, topics
from personalize.settings import Settings

CATEGORIES = ("electronics.smartphone", "electronics.audio", "appliances.kitchen", "apparel.shoes",
              "computers.notebook", "furniture.living_room", "kids.toys", "sport.bicycle")


@dataclass(frozen=True)
class TrafficSpec:
    users: int = 1000
    sessions_per_user: int = 2
    abandonment_rate: float = 0.6
    no_personalization_rate: float = 0.05
    no_marketing_rate: float = 0.1
    jitter_ms: int = 2000
    gap_ms: int = 30 * 60_000
    start_ms: int = 1_569_888_000_000  # 2019-10-01T00:00:00Z
    seed: int = 7


LOYAL_SHARE = 0.3


def purchase_chance(abandonment_rate: float, loyal: bool, cart_lines: int) -> float:
    """P(purchase) of a session with a cart: higher for loyal users and bigger carts, so
    the propensity model has something to learn; about 1 - abandonment_rate on average."""
    loyalty = 1.5 if loyal else 0.8  # 0.3 * 1.5 + 0.7 * 0.8 = 1.01
    basket = 0.6 + 0.25 * min(cart_lines, 4) if cart_lines > 1 else 0.7
    return min(1.0, (1 - abandonment_rate) * loyalty * basket)


def generate(spec: TrafficSpec) -> list[dict]:
    """Every event, in event-time order."""
    rng = random.Random(spec.seed)
    events: list[dict] = []
    for u in range(spec.users):
        user = f"user-{u}"
        personalization = rng.random() >= spec.no_personalization_rate
        marketing = rng.random() >= spec.no_marketing_rate
        loyal = rng.random() < LOYAL_SHARE
        t = spec.start_ms + rng.randrange(0, 3_600_000)
        for s in range(spec.sessions_per_user):
            n = 0

            def emit(etype, product=None, category=None, price=None, quantity=1):
                nonlocal n, t
                events.append({
                    "event_id": f"{user}-{s}-{n}", "event_type": etype, "user_id": user,
                    "session_id": f"{user}-s{s}", "event_time": t, "product_id": product,
                    "category": category, "price": price, "quantity": quantity,
                    "consent_analytics": True, "consent_personalization": personalization,
                    "consent_marketing": marketing,
                    "context": {"device": rng.choice(("mobile", "desktop")), "country": None, "referrer": None},
                })
                n += 1
                t += rng.randrange(5_000, 120_000)

            emit("page_view")
            cart: dict[str, tuple[str, float, int]] = {}
            for _ in range(rng.randrange(2, 8)):
                category = rng.choice(CATEGORIES)
                product = f"p{rng.randrange(500)}"
                price = round(rng.uniform(3, 900), 2)
                if rng.random() < 0.15:
                    emit("search", category=category)
                emit("product_view", product, category, price)
                if rng.random() < 0.35:
                    qty = rng.randrange(1, 3)
                    emit("add_to_cart", product, category, price, qty)
                    have = cart.get(product, (category, price, 0))[2]
                    cart[product] = (category, price, have + qty)
            if cart and rng.random() < 0.2:
                product = rng.choice(sorted(cart))
                category, price, qty = cart.pop(product)
                emit("remove_from_cart", product, category, price, qty)
            if cart and rng.random() < purchase_chance(spec.abandonment_rate, loyal, len(cart)):
                emit("checkout")
                for product, (category, price, qty) in sorted(cart.items()):
                    emit("purchase", product, category, price, qty)
            t += spec.gap_ms * 2 + rng.randrange(0, 6 * 3_600_000)
    events.sort(key=lambda e: e["event_time"])
    return events


def send_order(events: list[dict], jitter_ms: int, seed: int) -> list[dict]:
    """The order records are sent in: event time plus up to ``jitter_ms`` of noise."""
    if jitter_ms <= 0:
        return events
    rng = random.Random(seed + 1)
    return sorted(events, key=lambda e: e["event_time"] + rng.randrange(jitter_ms))


def produce(settings: Settings, spec: TrafficSpec, topic: str | None = None, progress=sys.stderr) -> tuple[int, float]:
    """Generate and send; return (events sent, events/s achieved)."""
    import schemas

    topic = topic or settings.topic_events
    topics.ensure(settings, [topic], local_stack=True)
    codec = schemas.codec("user_event")
    events = send_order(generate(spec), spec.jitter_ms, spec.seed)
    total = len(events)
    started = time.monotonic()

    def records():
        for i, e in enumerate(events, start=1):
            if progress and i % 50_000 == 0:
                rate = i / (time.monotonic() - started)
                print(f"produce: {i}/{total} events ({rate:,.0f}/s)", file=progress, flush=True)
            yield e["user_id"].encode(), codec.encode(e), e["event_time"]

    sent = kafkaio.produce(settings, topic, records())
    return sent, sent / max(time.monotonic() - started, 1e-9)
