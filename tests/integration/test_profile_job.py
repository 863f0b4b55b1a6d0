"""The profile job through the real stack: replay -> bounded PyFlink run -> Redis profiles,
checked against an independent computation over the same file."""

from __future__ import annotations

import csv
import json
import datetime as dt
import re
import signal
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest

import schemas
from personalize import credentials, kafkaio, produce, smoke, topics
from personalize.settings import Settings
from tests.conftest import CLI, ROOT, Stack

REES46 = ROOT.parent / "shared" / "data" / "rees46-2019-10-01.csv"
GAP_MS = 30 * 60_000
TYPES = {"view": "product_view", "cart": "add_to_cart", "purchase": "purchase"}

pytestmark = pytest.mark.slow


def job_stack(stack: Stack, redis_db: int, **extra: str) -> Stack:
    """The session stack with uuid-named topics and a Redis database of this test's own."""
    tag = uuid.uuid4().hex[:10]
    env = dict(stack.env)
    env.update(
        PERSONALIZE_TOPIC_EVENTS=f"events-{tag}",
        PERSONALIZE_TOPIC_DLQ=f"dlq-{tag}",
        PERSONALIZE_TOPIC_TRIGGERS=f"triggers-{tag}",
        PERSONALIZE_TOPIC_SEGMENT_CHANGES=f"segments-{tag}",
        PERSONALIZE_TOPIC_PROFILE_UPDATES=f"profiles-{tag}",
        PERSONALIZE_TOPIC_TRENDING=f"trending-{tag}",
        PERSONALIZE_TOPIC_MODEL_SNAPSHOTS=f"models-{tag}",
        PERSONALIZE_TOPIC_ERASURES=f"erasures-{tag}",
        PERSONALIZE_REDIS_URL=f"redis://127.0.0.1:{stack.settings.redis_port}/{redis_db}",
    )
    env.update(extra)  # a test may name a topic itself
    own = Stack(Settings.from_env(env), env)
    credentials.redis_client(own.settings).flushdb()
    return own


# a live run that closes sessions and writes to Redis within seconds (the live tests
# that send events one by one and wait for each effect)
QUICK_LIVE = dict(PERSONALIZE_SESSION_GAP_MS="1000", PERSONALIZE_OUT_OF_ORDERNESS_MS="0",
                  PERSONALIZE_CHECKPOINT_INTERVAL_MS="1000", PERSONALIZE_WATERMARK_EMIT="on-event",
                  PERSONALIZE_MODEL_FLUSH_MS="200")


def run_bounded(stack: Stack) -> dict[str, int]:
    done = stack.cli("run", "--bounded", timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return run_summary(done.stdout)


def run_summary(stdout: str) -> dict[str, int]:
    """The counts of a bounded run's summary (`personalize run --bounded`)."""
    summary = {}
    for line in stdout.splitlines():
        m = re.match(r"(events read|dead letters|late events|profiles written)\s+(\d+)", line)
        if m:
            summary[m.group(1)] = int(m.group(2))
    return summary


def rees46_events(path: Path) -> list[dict]:
    """The CSV's rows as events, read straight from the file (rows of the wrong width skipped)."""
    events = []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        for row in reader:
            if len(row) != len(header):
                continue
            r = dict(zip(header, row))
            when = dt.datetime.strptime(r["event_time"], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=dt.timezone.utc)
            events.append({"user_id": r["user_id"], "event_time": int(when.timestamp()) * 1000,
                           "event_type": TYPES[r["event_type"]], "product_id": r["product_id"],
                           "price": Decimal(r["price"]).quantize(Decimal("0.01"), ROUND_HALF_EVEN),
                           "quantity": 1, "consent_marketing": True, "consent_personalization": True})
    return events


def expected_rees46_profiles(path: Path) -> dict[str, dict]:
    """Per-user figures computed straight from the CSV."""
    users: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    times: dict[str, list[int]] = defaultdict(list)
    for e in rees46_events(path):
        p = users[e["user_id"]]
        p["n_events"] += 1
        p[f"n_{e['event_type']}"] += 1
        if e["event_type"] == "purchase":
            p["revenue_cents"] += int(e["price"] * 100)
        times[e["user_id"]].append(e["event_time"])
    for user, ts in times.items():
        ts.sort()
        p = users[user]
        p["first_seen_ms"], p["last_seen_ms"] = ts[0], ts[-1]
        p["n_sessions"] = 1 + sum(1 for a, b in zip(ts, ts[1:]) if b - a >= GAP_MS)
    return users


@pytest.fixture(scope="module")
def rees46(stack):
    own = job_stack(stack, redis_db=1)
    done = own.cli("replay", str(REES46))
    assert done.returncode == 0, done.stderr
    assert "1 unreadable rows: line 17436" in done.stdout
    first = run_bounded(own)
    return own, first


def check_counts(stack: Stack, events: list[dict]) -> None:
    """Every user of ``events`` has a profile, and nobody else; n_events and each n_<type> exact."""
    want: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        want[e["user_id"]]["n_events"] += 1
        want[e["user_id"]][f"n_{e['event_type']}"] += 1
    got = profiles(stack)
    assert set(got) == set(want)
    for user, counts in want.items():
        assert {f: int(got[user].get(f, 0)) for f in counts} == dict(counts), user


def profiles(stack: Stack) -> dict[str, dict[str, str]]:
    r = credentials.redis_client(stack.settings, decode_responses=True)
    return {k.split(":", 1)[1]: r.hgetall(k) for k in r.scan_iter("profile:*", count=1000)}


def test_every_rees46_profile_equals_an_independent_computation(rees46):
    own, summary = rees46
    assert summary["events read"] == 17434
    assert summary["dead letters"] == 0 and summary["late events"] == 0
    expected = expected_rees46_profiles(REES46)
    got = profiles(own)
    assert set(got) == set(expected)
    assert summary["profiles written"] == len(expected) == 4504  # shared/data/README.md
    mismatches = []
    for user, want in expected.items():
        have = got[user]
        for field in ("n_events", "n_product_view", "n_add_to_cart", "n_purchase", "n_sessions",
                      "first_seen_ms", "last_seen_ms"):
            if int(have.get(field, 0)) != want.get(field, 0):
                mismatches.append((user, field, have.get(field), want.get(field, 0)))
        cents = want.get("revenue_cents", 0)
        if have["revenue"] != f"{cents // 100}.{cents % 100:02d}":
            mismatches.append((user, "revenue", have["revenue"], cents))
    assert not mismatches, mismatches[:10]
    assert sum(int(p["n_sessions"]) for p in got.values()) == 4518  # shared/data/README.md


def test_every_abandoned_rees46_session_yields_one_trigger(rees46):
    from tests.integration.test_triggers_job import check_triggers, expected_triggers

    own, _ = rees46
    want = expected_triggers(rees46_events(REES46))
    assert len(want) == 49  # cart sessions of the sample that end without a purchase
    check_triggers(own, want)


def test_a_second_bounded_run_over_the_same_topic_changes_no_count(rees46):
    from tests.integration.test_triggers_job import stream_entries

    own, _ = rees46
    entries = stream_entries(own)
    stable = ("n_events", "n_product_view", "n_add_to_cart", "n_purchase", "n_sessions", "revenue",
              "first_seen_ms", "last_seen_ms", "session_ms_total", "events_by_hour", "updated_ms")
    before = {u: {f: p.get(f) for f in stable} for u, p in profiles(own).items()}
    summary = run_bounded(own)
    assert summary["events read"] == 17434
    after = {u: {f: p.get(f) for f in stable} for u, p in profiles(own).items()}
    assert after == before
    assert stream_entries(own) == entries  # the replayed triggers add nothing to Redis


def test_malformed_messages_go_to_the_dead_letter_topic_with_reasons_and_good_ones_count(stack):
    own = job_stack(stack, redis_db=2)
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    codec = schemas.codec("user_event")
    good = smoke.sample_events(300, users=30)
    bad: list[tuple[bytes | None, bytes, int, str]] = []
    t0 = good[0]["event_time"]
    for i in range(200):
        ts = t0 + i * 1000
        kind = i % 5
        key = good[i]["user_id"].encode()  # sent as that user's: counted per user below
        if kind == 0:
            bad.append((key, bytes([i % 256]) * 17, ts, "not single-object encoded"))
        elif kind == 1:
            bad.append((key, b"\xc3\x01" + b"\x00" * 8 + b"junk", ts, "unknown schema fingerprint"))
        elif kind == 2:
            bad.append((key, codec.encode(good[i])[:-9], ts, "invalid Avro datum"))
        elif kind == 3:
            event = dict(good[i], user_id="  ", event_time=ts)
            bad.append((key, codec.encode(event), ts, "user_id is empty"))
        else:
            event = dict(good[i], event_time=ts)
            bad.append((key, codec.encode(event), ts + 7, "differs from event_time"))
    records = [(e["user_id"].encode(), codec.encode(e), e["event_time"]) for e in good]
    mixed = []
    for i, rec in enumerate(records):
        mixed.append(rec)
        if i < len(bad):
            mixed.append(bad[i][:3])
    assert kafkaio.produce(s, s.topic_events, mixed) == 500

    summary = run_bounded(own)
    assert summary["events read"] == 500
    assert summary["dead letters"] == 200 and summary["late events"] == 0

    letters = schemas.codec("dead_letter")
    reasons = [letters.decode(r.value) for r in kafkaio.read_to_end(s, s.topic_dlq)]
    assert len(reasons) == 200
    for letter in reasons:
        assert letter["topic"] == s.topic_events and letter["offset"] >= 0 and letter["original"] is not None
    expected_fragments = sorted(b[3] for b in bad)
    got = sorted(next(f for f in expected_fragments if f in l["reason"]) for l in reasons)
    assert got == expected_fragments
    # per user: the events its profile counts plus the dead letters of its records are what was sent
    source = {(r.partition, r.offset): r for r in kafkaio.read_to_end(s, s.topic_events)}
    assert all(l["original"] == source[(l["partition"], l["offset"])].value for l in reasons)
    sent = Counter(key.decode() for key, _, _ in mixed)
    counted = Counter({user: int(p.get("n_events", 0)) for user, p in profiles(own).items()})
    lettered = Counter(source[(l["partition"], l["offset"])].key.decode() for l in reasons)
    assert counted + lettered == sent


def test_late_events_are_counted_and_dead_lettered_with_reason_late(stack):
    own = job_stack(stack, redis_db=3, PERSONALIZE_WATERMARK_EMIT="on-event")
    s = own.settings
    # one partition: the watermark is that partition's alone, so lateness is exact
    topics.ensure(s, [s.topic_events], partitions=1, local_stack=True)
    codec = schemas.codec("user_event")
    on_time = smoke.sample_events(60, users=1, start_ms=smoke.BASE_MS + 3_600_000)
    late = [dict(e, event_id=f"late-{i}", event_time=smoke.BASE_MS + i * 1000)
            for i, e in enumerate(smoke.sample_events(5, users=1))]
    stream = on_time[:40] + late + on_time[40:]
    assert kafkaio.produce(s, s.topic_events,
                           [(e["user_id"].encode(), codec.encode(e), e["event_time"]) for e in stream]) == 65

    summary = run_bounded(own)
    assert summary["late events"] == 5 and summary["dead letters"] == 5
    letters = [schemas.codec("dead_letter").decode(r.value) for r in kafkaio.read_to_end(s, s.topic_dlq)]
    assert {l["reason"] for l in letters} == {"late"}
    assert all(l["watermark"] >= smoke.BASE_MS + 3_600_000 for l in letters)
    # exactly the late records, each pointing at its own source record
    source = {(r.partition, r.offset): r.value for r in kafkaio.read_to_end(s, s.topic_events)}
    assert all(l["original"] == source[(l["partition"], l["offset"])] for l in letters)
    assert sorted(codec.decode(l["original"])["event_id"] for l in letters) == sorted(e["event_id"] for e in late)
    assert all(l["record_timestamp"] == codec.decode(l["original"])["event_time"] for l in letters)
    assert int(profiles(own)["u0"]["n_events"]) == 60


def wait_until(what: str, check, proc, timeout_s: float = 120):
    """Poll ``check`` while the job process lives; its first truthy result, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


def _wait_for_events(own: Stack, proc, want: int, timeout_s: float = 240) -> int:
    deadline = time.monotonic() + timeout_s
    total = -1
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        total = sum(int(p.get("n_events", 0)) for p in profiles(own).values())
        if total >= want:
            return total
        time.sleep(1)
    return total


def _start(own: Stack):
    return subprocess.Popen([*CLI, "run"], env=own.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _interrupt(proc) -> str:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_unbounded_run_stopped_with_a_savepoint_resumes_without_losing_or_recounting(stack, tmp_path):
    own = job_stack(stack, redis_db=4, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_CHECKPOINT_INTERVAL_MS="2000")
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    codec = schemas.codec("user_event")
    spec = produce.TrafficSpec(users=300, sessions_per_user=2, no_personalization_rate=0.0, jitter_ms=0)
    events = produce.generate(spec)
    half = len(events) // 2
    send = lambda batch: kafkaio.produce(  # noqa: E731
        s, s.topic_events, [(e["user_id"].encode(), codec.encode(e), e["event_time"]) for e in batch])

    assert send(events[:half]) == half
    first = _start(own)
    assert _wait_for_events(own, first, half) == half
    out = _interrupt(first)
    assert "savepoint " in out and "stopped with       " in out

    assert send(events[half:]) == len(events) - half
    second = _start(own)
    assert _wait_for_events(own, second, len(events)) == len(events)
    time.sleep(5)  # a few more checkpoints: nothing may be counted twice
    out = _interrupt(second)
    assert "resumed from       " in out and "savepoint" in out.split("resumed from", 1)[1].splitlines()[0]

    check_counts(own, events)


def test_unbounded_run_stopped_the_moment_it_runs_waits_for_its_tasks_and_takes_its_savepoint(stack, tmp_path):
    # Ctrl-C right after the job is submitted: Flink refuses a savepoint while a task is still
    # being deployed or opening (the models step loads River in open()); the stop waits for them
    own = job_stack(stack, redis_db=4, PERSONALIZE_STATE_DIR=str(tmp_path / "state"))
    topics.ensure(own.settings, [own.settings.topic_events], local_stack=True)
    proc = _start(own)
    lines = iter(proc.stdout.readline, "")
    assert any(line.startswith("job ") and " running" in line for line in lines), proc.stderr.read()[-3000:]
    out = _interrupt(proc)
    assert "savepoint " in out and "stopped with       " in out
    saved = out.split("savepoint ", 1)[1].split()[0]
    assert Path(saved, "_metadata").is_file()


def test_profile_command_prints_json_and_says_so_for_an_unknown_user(rees46):
    own, _ = rees46
    done = own.cli("profile", "541312140")
    assert done.returncode == 0
    profile = json.loads(done.stdout)
    want = expected_rees46_profiles(REES46)["541312140"]
    assert profile["user_id"] == "541312140"
    assert {f: int(profile[f]) for f in ("n_events", "n_product_view", "n_sessions", "first_seen_ms", "last_seen_ms")} \
        == {f: want[f] for f in ("n_events", "n_product_view", "n_sessions", "first_seen_ms", "last_seen_ms")}
    done = own.cli("profile", "no-such-user")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"personalize: no profile for user 'no-such-user' in {own.settings.redis_url}"
    )


def test_late_events_in_a_live_run_over_two_partitions_one_idle_and_exactly_at_the_watermark(stack, tmp_path):
    """The default watermarks (periodic, 5 s out of order) of a live run over two partitions:
    while one partition is quiet the other moves the watermark on (idleness), so the quiet
    one's next old event is late; an event exactly at the watermark is late, one a
    millisecond after it is not. Late events are dead-lettered by event id and counted
    nowhere else: the windows and the totals agree."""
    own = job_stack(stack, redis_db=12, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_IDLE_TIMEOUT_MS="2000", PERSONALIZE_CHECKPOINT_INTERVAL_MS="1000")
    s = own.settings
    assert (s.watermark_emit, s.out_of_orderness_ms) == ("on-periodic", 5_000)
    topics.ensure(s, [s.topic_events], partitions=2, local_stack=True)
    codec = schemas.codec("user_event")
    t0 = smoke.BASE_MS
    base = smoke.sample_events(1, users=1)[0]

    def ev(user: str, n: int, t: int) -> dict:
        return dict(base, event_id=f"{user}-{n}", user_id=user, event_time=t, event_type="page_view",
                    product_id=None, category=None, price=None, quantity=1, consent_personalization=True)

    producer = kafkaio.producer(s)

    def send(partition: int, events: list[dict]) -> None:
        for e in events:
            producer.send(s.topic_events, key=e["user_id"].encode(), value=codec.encode(e), partition=partition,
                          timestamp_ms=e["event_time"])
        producer.flush()

    r = credentials.redis_client(s, decode_responses=True)
    sent: dict[str, list[dict]] = {"a": [], "b": []}
    late: list[dict] = []

    def deliver(partition: int, events: list[dict], are_late: bool = False) -> None:
        send(partition, events)
        (late if are_late else sent[events[0]["user_id"]]).extend(events)

    deliver(0, [ev("a", i, t0 + i * 10_000) for i in range(7)])  # partition 0: user a
    deliver(1, [ev("b", i, t0 + i * 10_000) for i in range(7)])  # partition 1: user b
    proc = _start(own)
    try:
        _wait_for_events(own, proc, 14)
        # only partition 0 moves on, to 20 minutes; partition 1 falls idle after 2 s
        newest = t0 + 20 * 60_000
        viewed = dict(ev("a", 23, t0 + 14 * 60_000), event_type="product_view", product_id="p1", category="c1",
                      consent_analytics=True)
        deliver(0, [ev("a", 10 + i, t0 + (i + 1) * 60_000) if i != 13 else viewed for i in range(19)]
                + [ev("a", 29, newest)])
        # the trending window of a's product view (after t0 + 14 min) closes only once partition 1
        # no longer holds the watermark
        wait_until("the watermark passes the idle partition",
                   lambda: int(r.hget("personalize:trending:window_end_ms", "c1") or 0) > t0 + 14 * 60_000, proc, 60)
        watermark = newest - s.out_of_orderness_ms
        deliver(1, [ev("b", 100, t0 + 10 * 60_000)], are_late=True)  # behind the watermark of partition 0
        deliver(0, [ev("a", 100, watermark)], are_late=True)  # exactly at the watermark
        deliver(0, [ev("a", 101, watermark + 1)])  # a millisecond after it
        deliver(0, [ev("a", 102, newest + 60 * 60_000)])  # moves the watermark on: a's sessions close
        wait_until("every dead letter, a's events and both sessions closed", lambda: (
            len(list(kafkaio.read_to_end(s, s.topic_dlq))) >= len(late)
            and r.hget("profile:a", "n_events") == str(len(sent["a"]))
            and [r.hget(f"profile:{u}", "n_sessions") for u in "ab"] == ["1", "1"]), proc, 60)
    finally:
        _interrupt(proc)
        producer.close()
    dead = [schemas.codec("dead_letter").decode(x.value) for x in kafkaio.read_to_end(s, s.topic_dlq)]
    assert sorted(codec.decode(d["original"])["event_id"] for d in dead) == sorted(e["event_id"] for e in late)
    assert {d["reason"] for d in dead} == {"late"}
    assert all(t0 + 14 * 60_000 < d["watermark"] and d["record_timestamp"] <= d["watermark"] for d in dead), dead
    got = profiles(own)
    for user, events in sent.items():
        assert int(got[user]["n_events"]) == len(events), (user, got[user])
    # the windows took the same events as the totals: a's closed session holds every on-time event but its
    # newest (which opened the next session), none of the late ones; b's session its first 7 events only
    assert (got["a"]["n_sessions"], got["a"]["last_session_events"]) == ("1", str(len(sent["a"]) - 1)), got["a"]
    assert (got["b"]["n_sessions"], got["b"]["last_session_events"]) == ("1", "7"), got["b"]


def test_a_producer_clock_ahead_is_dead_lettered_and_closes_nobody_s_session_early(stack, tmp_path):
    """Live: an event an hour ahead of the wall clock is a dead letter; one 30 s ahead (within
    PERSONALIZE_MAX_AHEAD_MS) counts but moves the watermark no further than the clock, so
    another user's event sent now is not late and its open session with a cart does not close."""
    own = job_stack(stack, redis_db=12, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_CHECKPOINT_INTERVAL_MS="1000", PERSONALIZE_WATERMARK_EMIT="on-event")
    s = own.settings
    assert s.max_ahead_ms == 60_000
    topics.ensure(s, [s.topic_events], partitions=1, local_stack=True)
    codec = schemas.codec("user_event")
    base = smoke.sample_events(1, users=1)[0]
    now = lambda: int(time.time() * 1000)  # noqa: E731

    def ev(user: str, n: int, t: int, kind: str = "page_view", product: str | None = None) -> dict:
        return dict(base, event_id=f"{user}-{n}", user_id=user, event_time=t, event_type=kind, product_id=product,
                    category=None, price=2.5 if product else None, quantity=1, consent_personalization=True,
                    consent_marketing=True)

    def send(*events: dict) -> None:
        assert kafkaio.produce(s, s.topic_events, [(e["user_id"].encode(), codec.encode(e), e["event_time"])
                                                   for e in events]) == len(events)

    t = now()
    send(ev("x", 0, t - 50_000), ev("x", 1, t - 40_000, "add_to_cart", "p1"))  # an open session with a cart
    proc = _start(own)
    r = credentials.redis_client(s, decode_responses=True)
    try:
        _wait_for_events(own, proc, 2)
        ahead = ev("y", 0, now() + 3_600_000)  # a clock an hour ahead
        send(ahead, ev("y", 1, now() + 30_000), ev("x", 2, now(), "product_view", "p2"))
        wait_until("the dead letter and the counted events of x and y", lambda: (
            len(list(kafkaio.read_to_end(s, s.topic_dlq))) >= 1 and r.hget("profile:x", "n_events") == "3"
            and r.hget("profile:y", "n_events") == "1"), proc, 60)
        time.sleep(3)  # a few more checkpoints: no trigger, no closed session
    finally:
        _interrupt(proc)
    letters = [schemas.codec("dead_letter").decode(x.value) for x in kafkaio.read_to_end(s, s.topic_dlq)]
    assert [codec.decode(d["original"])["event_id"] for d in letters] == ["y-0"]
    assert letters[0]["reason"] == (f"event_time {ahead['event_time']} is more than 60000 ms ahead of the clock "
                                    "(PERSONALIZE_MAX_AHEAD_MS)")
    assert list(kafkaio.read_to_end(s, s.topic_triggers)) == []
    assert "n_sessions" not in r.hgetall("profile:x")
