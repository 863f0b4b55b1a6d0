"""A real Taobao UserBehavior log (no prices, no sessions, no consent columns) through the
whole job: every profile and every trigger equals an independent computation over the file.

Events a format simply lacks are valid: a purchase without a price adds 0 to revenue
(it once crashed the loader with ``KeyError: 'last_session_revenue_cents'``)."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter, defaultdict

import pytest

from tests.conftest import ROOT
from tests.integration.test_profile_job import GAP_MS, job_stack, profiles, run_bounded
from tests.integration.test_triggers_job import check_triggers, expected_triggers, kafka_triggers

TAOBAO = ROOT.parent / "shared" / "data" / "taobao-user-behavior-1k.jsonl"
BEHAVIOR = {"pv": "product_view", "fav": "product_view", "cart": "add_to_cart", "buy": "purchase"}  # data/README.md

pytestmark = pytest.mark.slow


def taobao_events() -> list[dict]:
    """The file's rows as events, read straight from the JSON lines."""
    events = []
    for line in TAOBAO.read_text().splitlines():
        row = json.loads(line)
        when = dt.datetime.fromisoformat(row["ts"].replace("Z", "+00:00"))
        events.append({"user_id": str(row["user_id"]), "event_time": int(when.timestamp() * 1000),
                       "event_type": BEHAVIOR[row["behavior"]], "product_id": str(row["item_id"]),
                       "price": None, "quantity": 1, "consent_marketing": True, "consent_personalization": True})
    return events


@pytest.fixture(scope="module")
def taobao(stack):
    own = job_stack(stack, redis_db=7)
    done = own.cli("replay", str(TAOBAO))
    assert done.returncode == 0, done.stderr
    return own, run_bounded(own)


def test_every_taobao_profile_equals_an_independent_computation(taobao):
    check_taobao_profiles(*taobao)


def check_taobao_profiles(own, summary) -> None:
    """Every profile of the Taobao run equals a computation straight from the file."""
    events = taobao_events()
    assert summary["events read"] == len(events) == 1000
    assert summary["dead letters"] == 0 and summary["late events"] == 0
    want: dict[str, Counter] = defaultdict(Counter)
    times: dict[str, list[int]] = defaultdict(list)
    for e in events:
        want[e["user_id"]]["n_events"] += 1
        want[e["user_id"]][f"n_{e['event_type']}"] += 1
        times[e["user_id"]].append(e["event_time"])
    got = profiles(own)
    assert set(got) == set(want) and len(got) == 945  # data/README.md
    for user, counts in want.items():
        have = got[user]
        ts = sorted(times[user])
        sessions = 1 + sum(1 for a, b in zip(ts, ts[1:]) if b - a >= GAP_MS)
        assert {f: int(have.get(f, 0)) for f in counts} == dict(counts), user
        assert (int(have["first_seen_ms"]), int(have["last_seen_ms"])) == (ts[0], ts[-1]), user
        assert int(have["n_sessions"]) == sessions, user
        assert have["revenue"] == "0.00" and have["last_session_revenue"] == "0.00", user


def test_every_abandoned_taobao_cart_yields_one_trigger_with_a_zero_value(taobao):
    own, _ = taobao
    events = taobao_events()
    want = expected_triggers(events)
    carts = {u for u in {e["user_id"] for e in events if e["event_type"] == "add_to_cart"}
             if not any(e["user_id"] == u and e["event_type"] == "purchase" for e in events)}
    assert len(want) == len(carts) > 0
    check_triggers(own, want)
    for t in kafka_triggers(own):
        added = Counter(e["product_id"] for e in events
                        if e["user_id"] == t["user_id"] and e["event_type"] == "add_to_cart")
        assert {(line["product_id"], line["quantity"]) for line in t["cart"]} == set(added.items())
        assert t["cart_value"] == 0


def test_the_taobao_log_gives_the_same_profiles_and_triggers_with_rocksdb_state(stack):
    """PERSONALIZE_STATE_BACKEND=rocksdb (state off the JVM heap, for a million users): the
    same job over the same log gives every profile and trigger of the independent
    computation, as with the default heap state."""
    own = job_stack(stack, redis_db=7, PERSONALIZE_STATE_BACKEND="rocksdb")
    done = own.cli("replay", str(TAOBAO))
    assert done.returncode == 0, done.stderr
    check_taobao_profiles(own, run_bounded(own))
    check_triggers(own, expected_triggers(taobao_events()))
