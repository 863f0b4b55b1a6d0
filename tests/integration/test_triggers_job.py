"""Models and cart-abandonment triggers through the real stack: every abandoned session
yields exactly one trigger in Kafka (read_committed) and in the Redis stream, equal
to an independent computation; a replay adds nothing to Redis; consent is honoured;
the propensity model learns (progressive ROC AUC)."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections import Counter, defaultdict
from decimal import Decimal

import pytest

import schemas
from personalize import credentials, kafkaio, produce, topics
from tests.integration.test_profile_job import GAP_MS, job_stack, profiles, run_bounded

pytestmark = pytest.mark.slow

NAMESPACE = uuid.UUID("6f1d3c2a-5b7e-4e8f-9a0b-1c2d3e4f5a6b")  # DESIGN: ids from (user, session start)


def sessions_of(events: list[dict]) -> list[list[dict]]:
    """Per user in event-time order, a new session when an event comes a gap or more after the previous."""
    by_user: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        by_user[e["user_id"]].append(e)
    out = []
    for evs in by_user.values():
        evs.sort(key=lambda e: e["event_time"])
        current = [evs[0]]
        for prev, e in zip(evs, evs[1:]):
            if e["event_time"] - prev["event_time"] >= GAP_MS:
                out.append(current)
                current = []
            current.append(e)
        out.append(current)
    return out


def expected_triggers(events: list[dict]) -> dict[str, dict]:
    """trigger_id -> (user, start, end, cart value in cents) for every abandoned session."""
    want = {}
    for session in sessions_of(events):
        if any(e["event_type"] == "purchase" for e in session) or not session[-1]["consent_marketing"]:
            continue
        net: Counter = Counter()
        price: dict[str, tuple[int, int]] = {}
        for e in session:
            if e["event_type"] == "add_to_cart":
                net[e["product_id"]] += e["quantity"]
                cents = int(Decimal(str(e["price"] or 0)).quantize(Decimal("0.01")) * 100)  # Taobao: no price
                price[e["product_id"]] = max(price.get(e["product_id"], (-1, -1)), (e["event_time"], cents))
            elif e["event_type"] == "remove_from_cart":
                net[e["product_id"]] -= e["quantity"]
        lines = {p: q for p, q in net.items() if q > 0}
        if not lines:
            continue
        user, start = session[0]["user_id"], session[0]["event_time"]
        tid = str(uuid.uuid5(NAMESPACE, f"cart_abandonment|{user}|{start}"))
        want[tid] = {"user_id": user, "session_start_ms": start, "session_end_ms": session[-1]["event_time"],
                     "cart_value_cents": sum(q * price[p][1] for p, q in lines.items()),
                     "lines": {p: (q, price[p][1]) for p, q in lines.items()}}
    return want


def kafka_triggers(stack) -> list[dict]:
    codec = schemas.codec("trigger")
    return [codec.decode(r.value) for r in kafkaio.read_to_end(stack.settings, stack.settings.topic_triggers)]


def stream_entries(stack) -> list[dict]:
    r = credentials.redis_client(stack.settings, decode_responses=True)
    return [fields for _, fields in r.xrange("triggers:cart_abandonment")]


def _cents(value) -> int:
    return int(Decimal(str(value)) * 100)


def check_triggers(stack, want: dict[str, dict], copies: int = 1) -> None:
    """Each expected trigger ``copies`` times in the topic (read_committed; a replay re-sends),
    once in the Redis stream, with the expected session, cart lines and value."""
    got = kafka_triggers(stack)
    assert Counter(t["trigger_id"] for t in got) == Counter({tid: copies for tid in want})
    for t in got:
        w = want[t["trigger_id"]]
        assert (t["user_id"], t["session_start_ms"], t["session_end_ms"]) == \
            (w["user_id"], w["session_start_ms"], w["session_end_ms"])
        assert {line["product_id"]: (line["quantity"], _cents(line["price"])) for line in t["cart"]} == w["lines"], t
        assert _cents(t["cart_value"]) == w["cart_value_cents"], t
        assert t["emitted_ms"] == t["session_end_ms"] + GAP_MS
    entries = stream_entries(stack)
    assert Counter(e["trigger_id"] for e in entries) == Counter({tid: 1 for tid in want})  # each id once
    for e in entries:
        w = want[e["trigger_id"]]
        cart = {line["product_id"]: (line["quantity"], _cents(line["price"])) for line in json.loads(e["cart"])}
        assert (e["user_id"], int(e["session_start_ms"]), cart, _cents(e["cart_value"])) == \
            (w["user_id"], w["session_start_ms"], w["lines"], w["cart_value_cents"]), e


SPEC = produce.TrafficSpec(users=400, sessions_per_user=2, no_personalization_rate=0.15, no_marketing_rate=0.2,
                           jitter_ms=2000, seed=11)


@pytest.fixture(scope="module")
def synthetic(stack):
    own = job_stack(stack, redis_db=5, PERSONALIZE_TRENDING_TOP_N="2")  # ties at the cut: the order decides
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    events = produce.generate(SPEC)
    codec = schemas.codec("user_event")
    sent = kafkaio.produce(s, s.topic_events, [(e["user_id"].encode(), codec.encode(e), e["event_time"])
                                               for e in produce.send_order(events, SPEC.jitter_ms, SPEC.seed)])
    assert sent == len(events)
    summary = run_bounded(own)
    assert summary["dead letters"] == 0
    return own, events


def test_every_abandoned_synthetic_session_yields_one_trigger_in_kafka_and_redis(synthetic):
    own, events = synthetic
    want = expected_triggers(events)
    assert 150 < len(want) < 500  # the spec abandons about 60 % of carts
    check_triggers(own, want)
    assert set(Counter(t["trigger_id"] for t in kafka_triggers(own)).values()) == {1}  # exactly once


def test_users_without_consent_get_no_profile_score_segment_or_trigger(synthetic):
    own, events = synthetic
    last = {}
    for e in sorted(events, key=lambda e: e["event_time"]):
        last[e["user_id"]] = e
    no_personal = {u for u, e in last.items() if not e["consent_personalization"]}
    no_marketing = {u for u, e in last.items() if not e["consent_marketing"]}
    assert no_personal and no_marketing
    got = profiles(own)
    assert not no_personal & set(got)
    assert all("propensity" in p for u, p in got.items())  # everyone else has a score
    triggers = kafka_triggers(own)
    assert not {t["user_id"] for t in triggers} & no_marketing
    for t in triggers:
        if t["user_id"] in no_personal:
            assert t["propensity"] is None and t["segment"] is None
    codec = schemas.codec("segment_change")
    changes = [codec.decode(r.value) for r in kafkaio.read_to_end(own.settings, own.settings.topic_segment_changes)]
    assert changes and not {c["user_id"] for c in changes} & no_personal
    segments = {u: p.get("segment") for u, p in got.items()}
    # the newest change of each user is the segment in its profile
    newest = {}
    for c in sorted(changes, key=lambda c: c["changed_ms"]):
        newest[c["user_id"]] = c["new_segment"]
    assert all(segments[u] == s for u, s in newest.items())


def test_the_models_learn_from_every_consented_session_and_beat_chance(synthetic):
    own, events = synthetic
    done = own.cli("models")
    assert done.returncode == 0, done.stderr
    snapshot = json.loads(done.stdout)
    consented = [s for s in sessions_of(events) if s[-1]["consent_personalization"]]
    assert snapshot["propensity"]["samples"] == len(consented)
    assert snapshot["propensity"]["positives"] == sum(any(e["event_type"] == "purchase" for e in s)
                                                      for s in consented)
    # beats chance: ~680 sessions, ~210 buying; under chance the AUC's standard error here is
    # ~0.024, so 0.6 is four of them above 0.5. (Was 0.65 for River's per-session model; the
    # mini-batch model's progressive AUC over so few sessions carries its cold start: 0.64 seen.
    # Its quality is judged against a batch ceiling in scripts/models_eval.py.)
    assert snapshot["propensity"]["roc_auc"] > 0.6, snapshot["propensity"]
    assert snapshot["sessions_seen"] == len(sessions_of(events))
    sizes = {sid: seg["users"] for sid, seg in snapshot["segments"].items()}
    in_profiles = Counter(p["segment"] for p in profiles(own).values() if "segment" in p)
    assert {k: v for k, v in sizes.items() if v} == dict(in_profiles)
    assert all(seg["name"] for seg in snapshot["segments"].values())


def test_the_triggers_command_prints_the_topic_as_json_lines(synthetic):
    own, events = synthetic
    done = own.cli("triggers")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert {t["trigger_id"] for t in lines} == set(expected_triggers(events))
    assert all(set(t) == {"trigger_id", "kind", "user_id", "session_start_ms", "session_end_ms", "cart",
                          "cart_value", "propensity", "segment", "emitted_ms"} for t in lines)
    done = own.cli("triggers", "--limit", "3")
    assert len(done.stdout.splitlines()) == 3


def test_a_second_bounded_run_adds_no_stream_entry_and_no_new_trigger_id(synthetic):
    own, events = synthetic
    before = stream_entries(own)
    run_bounded(own)
    assert stream_entries(own) == before
    check_triggers(own, expected_triggers(events), copies=2)  # the replay re-sent each trigger once more


def test_triggers_follow_prints_a_trigger_that_arrives_after_it_started(synthetic):
    """Runs after the replay test of this module: it adds a trigger of its own to the topic."""
    import queue
    import signal
    import subprocess
    import threading

    from tests.conftest import CLI, ROOT

    own, events = synthetic
    codec = schemas.codec("trigger")
    proc = subprocess.Popen([*CLI, "triggers", "--follow"], env=own.env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def next_line(deadline_s: float = 30) -> dict:
        try:
            return json.loads(lines.get(timeout=deadline_s))
        except queue.Empty:
            raise AssertionError(f"no trigger printed within {deadline_s:.0f} s") from None

    try:
        in_topic = kafka_triggers(own)
        seen = {next_line()["trigger_id"] for _ in in_topic}
        assert seen == set(expected_triggers(events))  # the topic from its beginning
        late = {"trigger_id": f"follow-{uuid.uuid4()}", "kind": "cart_abandonment", "user_id": "follower",
                "session_start_ms": 1_000, "session_end_ms": 2_000,
                "cart": [{"product_id": "p1", "quantity": 2, "price": Decimal("1.50")}],
                "cart_value": Decimal("3.00"), "propensity": None, "segment": None, "emitted_ms": 2_000 + GAP_MS}
        s = own.settings
        assert kafkaio.produce(s, s.topic_triggers, [(b"follower", codec.encode(late), 2_000)]) == 1
        line = next_line()  # within the deadline, while it keeps following
        assert line["trigger_id"] == late["trigger_id"] and line["cart"] == [
            {"product_id": "p1", "quantity": 2, "price": "1.50"}] and line["cart_value"] == "3.00"
        assert proc.poll() is None  # still following
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def _snapshot(stack) -> dict | None:
    raw = credentials.redis_client(stack.settings).get("models:snapshot")
    return json.loads(raw) if raw else None


def _wait_for_samples(stack, proc, want: int, timeout_s: float = 240) -> int:
    import time

    deadline = time.monotonic() + timeout_s
    seen = -1
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        snap = _snapshot(stack)
        seen = snap["propensity"]["samples"] if snap else -1
        if seen >= want:
            return seen
        time.sleep(1)
    return seen


def _clock(at_ms: int) -> list[dict]:
    """Events of users without consent on every partition: they move the watermark past the sessions."""
    return [{"event_id": f"clock-{k}-{at_ms}", "event_type": "page_view", "user_id": f"clock-{k}",
             "session_id": None, "event_time": at_ms, "product_id": None, "category": None, "price": None,
             "quantity": 1, "consent_analytics": False, "consent_personalization": False,
             "consent_marketing": False, "context": None} for k in range(8)]


def two_phases(users: int, seeds: tuple[int, int]) -> tuple[list[dict], list[dict], int, int]:
    """Two halves of one session per user, the second starting after the first half's clock events."""
    first = produce.generate(produce.TrafficSpec(users=users, sessions_per_user=1, jitter_ms=0, seed=seeds[0]))
    clock1 = max(e["event_time"] for e in first) + 3 * 3_600_000
    second = produce.generate(produce.TrafficSpec(users=users, sessions_per_user=1, jitter_ms=0, seed=seeds[1],
                                                  start_ms=clock1 + 3_600_000))
    clock2 = max(e["event_time"] for e in second) + 3 * 3_600_000
    return first, second, clock1, clock2


def send_events(stack, events: list[dict]) -> int:
    codec = schemas.codec("user_event")
    s = stack.settings
    return kafkaio.produce(s, s.topic_events, [(e["user_id"].encode(), codec.encode(e), e["event_time"])
                                               for e in events])


def consented_sessions(events: list[dict]) -> int:
    return sum(1 for x in sessions_of(events) if x[-1]["consent_personalization"])


def test_an_unbounded_run_stopped_with_a_savepoint_resumes_the_same_models_and_loses_no_trigger(stack, tmp_path):
    from tests.integration.test_profile_job import _interrupt, _start

    own = job_stack(stack, redis_db=6, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_CHECKPOINT_INTERVAL_MS="2000", PERSONALIZE_MODEL_FLUSH_MS="200")
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    first, second, clock1, clock2 = two_phases(150, (21, 22))
    send = lambda batch: send_events(own, batch)  # noqa: E731
    consented = consented_sessions

    send(first + _clock(clock1))
    proc = _start(own)
    want1 = consented(first)
    assert _wait_for_samples(own, proc, want1) == want1
    _interrupt(proc)
    stopped = _snapshot(own)["propensity"]

    send(second + _clock(clock2))
    proc = _start(own)
    want2 = want1 + consented(second)
    assert _wait_for_samples(own, proc, want2) == want2  # a fresh model would stop at consented(second)
    _interrupt(proc)
    resumed = _snapshot(own)["propensity"]
    bought = lambda events: sum(any(e["event_type"] == "purchase" for e in x)  # noqa: E731
                                for x in sessions_of(events) if x[-1]["consent_personalization"])
    assert stopped["positives"] == bought(first)
    assert resumed["samples"] == want2 and resumed["positives"] == bought(first) + bought(second)

    want = expected_triggers(first + second)
    assert want
    check_triggers(own, want)  # each abandoned session once in Kafka and in Redis, across the restart
    assert set(Counter(t["trigger_id"] for t in kafka_triggers(own)).values()) == {1}


def expected_profile_fields(events: list[dict], recent_ms: int, slide_ms: int) -> dict[str, dict[str, str]]:
    """Every field of every profile the job should write (users whose latest event consents to
    personalization), computed straight from the events, as the strings Redis holds; the
    models' ``propensity`` and ``segment`` fields are checked apart. Only events with
    personalization consent count, and only sessions whose latest event consents."""
    by_user: dict[str, list[dict]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e["event_time"]):
        by_user[e["user_id"]].append(e)
    sessions: dict[str, list[list[dict]]] = defaultdict(list)
    for session in sessions_of(events):
        if session[-1]["consent_personalization"]:
            sessions[session[0]["user_id"]].append(session)
    out = {}
    for user, evs in by_user.items():
        if not evs[-1]["consent_personalization"]:
            continue
        evs = [e for e in evs if e["consent_personalization"]]
        cents = lambda e: int(Decimal(str(e["price"])).quantize(Decimal("0.01")) * 100) * e["quantity"]  # noqa: E731
        fmt = lambda c: f"{c // 100}.{c % 100:02d}"  # noqa: E731
        p: dict[str, str] = {f"n_{t}": str(sum(e["event_type"] == t for e in evs))
                             for t in ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout",
                                       "purchase", "search")}
        revenue = sum(cents(e) for e in evs if e["event_type"] == "purchase")
        hours = Counter(dt.datetime.fromtimestamp(e["event_time"] / 1000, dt.timezone.utc).hour for e in evs)
        last = evs[-1]["event_time"]
        # the recent window ends at the slide boundary after the user's newest event
        window_end = last - last % slide_ms + slide_ms
        recent = [e for e in evs if e["event_time"] >= window_end - recent_ms]
        p.update(n_events=str(len(evs)), revenue_cents=str(revenue), revenue=fmt(revenue),
                 first_seen_ms=str(evs[0]["event_time"]), last_seen_ms=str(last), updated_ms=str(last),
                 events_by_hour=",".join(str(hours[h]) for h in range(24)),
                 active_hours=",".join(str(h) for h in sorted(hours, key=lambda h: (-hours[h], h))[:3]),
                 recent_events=str(len(recent)),
                 recent_product_views=str(sum(e["event_type"] == "product_view" for e in recent)),
                 recent_window_end_ms=str(window_end))
        closed = sessions[user]
        total_ms = sum(s[-1]["event_time"] - s[0]["event_time"] for s in closed)
        avg_ms = total_ms // len(closed)
        newest = closed[-1]
        count = lambda t: str(sum(e["event_type"] == t for e in newest))  # noqa: E731
        p.update(n_sessions=str(len(closed)), session_ms_total=str(total_ms), avg_session_ms=str(avg_ms),
                 avg_session_s=f"{avg_ms // 1000}.{avg_ms % 1000:03d}",
                 last_session_start_ms=str(newest[0]["event_time"]), last_session_events=str(len(newest)),
                 last_session_cart_adds=count("add_to_cart"), last_session_cart_removes=count("remove_from_cart"),
                 last_session_purchases=count("purchase"),
                 last_session_revenue=fmt(sum(cents(e) for e in newest if e["event_type"] == "purchase")),
                 propensity_ms=str(newest[-1]["event_time"] + GAP_MS))
        categories = Counter(e["category"] for x in closed for e in x if e["category"])
        for rank, (name, n) in enumerate(sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))[:3], start=1):
            p[f"top_category_{rank}"], p[f"top_category_{rank}_events"] = name, str(n)
        out[user] = p
    return out


def expected_purchased(events: list[dict], kept: int = 20) -> dict[str, list[str]]:
    """Per user: the ``kept`` newest distinct products bought with personalization consent,
    newest first (a product at the time of its newest purchase; ties by id)."""
    newest: dict[str, dict[str, int]] = defaultdict(dict)
    for e in events:
        if e["event_type"] == "purchase" and e["consent_personalization"] and e["product_id"]:
            held = newest[e["user_id"]]
            held[e["product_id"]] = max(held.get(e["product_id"], e["event_time"]), e["event_time"])
    return {u: [p for p, _ in sorted(b.items(), key=lambda pt: (-pt[1], pt[0]))[:kept]] for u, b in newest.items()}


def expected_trending(events: list[dict], window_ms: int, top_n: int) -> dict[str, dict[str, float]]:
    """trending:{category}: the newest tumbling window with analytics-consented product views of
    the category, its top products by views (ties by product id)."""
    views: dict[str, Counter] = defaultdict(Counter)
    for e in events:
        if e["event_type"] == "product_view" and e["consent_analytics"]:
            views[e["category"] or ""][(e["event_time"] - e["event_time"] % window_ms, e["product_id"])] += 1
    out = {}
    for category, counts in views.items():
        newest = max(start for start, _ in counts)
        ranked = sorted(((p, n) for (start, p), n in counts.items() if start == newest), key=lambda pn: (-pn[1], pn[0]))
        out[f"trending:{category or '(none)'}"] = {p: float(n) for p, n in ranked[:top_n]}
    return out


def test_every_profile_field_and_the_trending_keys_equal_an_independent_computation(synthetic):
    own, events = synthetic
    s = own.settings
    assert any(e["event_type"] == "purchase" and e["quantity"] > 1 for e in events)  # revenue is price x quantity
    want = expected_profile_fields(events, s.recent_window_ms, s.recent_slide_ms)
    got = profiles(own)
    assert set(got) == set(want)
    models_fields = {"propensity", "segment", "segment_name", "version", "purchased_products"}
    bought = expected_purchased(events)
    assert {u: json.loads(p["purchased_products"]) for u, p in got.items() if "purchased_products" in p} == \
        {u: b for u, b in bought.items() if u in want}
    assert any(len(b) > 1 for b in bought.values())
    # the version: the newest event time x 10,000 + the changes since (closes, older events)
    newest = {u: max(e["event_time"] for e in events if e["user_id"] == u) for u in want}
    assert {u: int(p["version"]) // 10_000 for u, p in got.items()} == newest
    assert all(int(p["version"]) % 10_000 >= 1 for p in got.values())  # the last session closed after it
    mismatches = [(u, f, got[u].get(f), v) for u, p in want.items() for f, v in p.items() if got[u].get(f) != v]
    assert not mismatches, (sorted({f for _, f, _, _ in mismatches}), mismatches[:10])
    extra = {u: set(got[u]) - set(p) - models_fields for u, p in want.items() if set(got[u]) - set(p) - models_fields}
    assert not extra, list(extra.items())[:5]
    for user, p in got.items():
        assert re.fullmatch(r"0\.\d{6}|1\.000000", p["propensity"]), (user, p["propensity"])
        assert ("segment" in p) == ("segment_name" in p)
    r = credentials.redis_client(s, decode_responses=True)
    trending = expected_trending(events, s.trending_window_ms, s.trending_top_n)
    assert {k: dict(r.zrange(k, 0, -1, withscores=True)) for k in r.scan_iter("trending:*")} == trending
