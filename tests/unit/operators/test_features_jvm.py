"""The propensity of the session in progress is scored in the JVM (operators/jvm:
personalize.profile.Features and PropensityModel): its features must be the ones the
models step computes in Python for the same session once closed
(``operators.models.propensity_features``), with the same history before it, and its score
the one the Python model gives. The jar's ``FeaturesCorpus`` runs synthetic users' sessions
(and hand-made edge cases) through UserState on its own (a plain ``java -cp``): per session
the live features and score just before it closes, then its packed closed row, which the
Python twin reads."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyflink
import pytest

import schemas
from operators import decode, models as m, triggers
from operators.sessions import unpack
from personalize import jars, produce
from personalize.settings import Settings

GAP_MS = 30 * 60_000


def corpus() -> list[list[list[list]]]:
    """Users, each a list of sessions, each a list of events [type, product, category, cents,
    quantity, consent_personalization, time]."""
    events = produce.generate(produce.TrafficSpec(users=300, sessions_per_user=3, jitter_ms=0, seed=11))
    by_user: dict[str, list[dict]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e["event_time"]):
        by_user[e["user_id"]].append(e)
    users = []
    for evs in by_user.values():
        sessions = [[evs[0]]]
        for prev, e in zip(evs, evs[1:]):
            (sessions.append([e]) if e["event_time"] - prev["event_time"] >= GAP_MS else sessions[-1].append(e))
        users.append([[[e["event_type"], e["product_id"], e["category"],
                        decode.to_cents(e["price"]) if e["price"] is not None else None, e["quantity"],
                        e["consent_personalization"], e["event_time"]] for e in s] for s in sessions])
    t = 1_700_000_000_000
    users.append([[  # a purchase mid-session: nothing after the first checkout counts
        ["product_view", "p1", "c1", 100, 1, True, t], ["add_to_cart", "p1", "c1", 100, 2, True, t + 60_000],
        ["checkout", None, None, None, 1, True, t + 120_000], ["product_view", "p2", "c2", 50, 1, True, t + 180_000],
        ["purchase", "p1", "c1", 100, 2, True, t + 240_000]],
        [  # a second session hours later: a history with a purchase; a remove before its add
        ["remove_from_cart", "p3", "c1", 70, 1, True, t + 5 * 3_600_000],
        ["add_to_cart", "p3", "c1", 70, 3, True, t + 5 * 3_600_000 + 1],
        ["product_view", "p3", "c1", 70, 1, True, t + 5 * 3_600_000 + 2],
        ["product_view", "p3", "c1", 70, 1, True, t + 5 * 3_600_000 + 3]]])
    users.append([[["page_view", None, None, None, 1, False, t]],  # not consented: not in the history
                  [["search", None, None, None, 1, True, t + 3_600_000]]])
    # a cart of 120 lines (a trigger lists the 100 most valuable), ids beyond ASCII and the BMP
    # (Python orders them by code point), a price of 0 and a line removed again
    ids = [f"p{i:03d}" for i in range(117)] + ["ü", "😀", "！"]
    users.append([[["add_to_cart", pid, "c9", (i * 7919) % 100_000, 1 + i % 3, True, t + i]
                   for i, pid in enumerate(ids)]
                  + [["remove_from_cart", "p005", "c9", None, 9, True, t + 200]]])
    return users


def trained() -> m.Propensity:
    rng = np.random.default_rng(3)
    p = m.Propensity()
    for _ in range(5):
        X = rng.normal(1.0, 2.0, size=(64, len(m.PROPENSITY_FEATURES)))
        p.learn_many(X, X[:, 5] + rng.normal(size=64) > 1.0)
    return p


def run_jvm(tmp_path, snapshot: dict, users) -> list[dict]:
    java = shutil.which("java")
    assert java, "java is not on PATH (Java 17 runs the job's JVM side)"
    jar = jars.jars(Settings.from_env(), "udf")[0]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join([json.dumps(snapshot), *(json.dumps({"sessions": u}) for u in users)]) + "\n")
    classpath = f"{jar}{os.pathsep}{Path(pyflink.__file__).parent / 'lib' / '*'}"
    with path.open("rb") as stdin:
        done = subprocess.run([java, "-cp", classpath, "personalize.profile.FeaturesCorpus"], stdin=stdin,
                              capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


@pytest.fixture(scope="module")
def jvm(tmp_path_factory):
    users = corpus()
    model = trained()
    rows = run_jvm(tmp_path_factory.mktemp("features"), {"propensity_model": model.scoring()}, users)
    return users, model, rows


def test_the_live_and_closed_features_of_every_session_equal_the_python_twin_s_for_the_closed_session(jvm):
    users, _, rows = jvm
    assert len(rows) == 2 * sum(len(u) for u in users)  # per session: its live features, then its closed row
    pairs = iter(zip(rows[::2], rows[1::2]))
    for sessions in users:
        history = m.UserHistory()
        for _ in sessions:
            live, closed = next(pairs)
            closed = unpack(closed["packed"])
            want = m.propensity_features(closed, history)
            assert live["features"] == pytest.approx(want, rel=1e-12, abs=1e-12), (closed, live["features"], want)
            if closed["consent_personalization"]:  # the models keep consented sessions only
                # the closed row carries both models' features, which the models step reads
                assert closed["propensity_x"] == pytest.approx(want, rel=1e-12, abs=1e-12)
                before_end = history.last_end_ms
                categories = history.fold(closed)
                assert closed["segment_x"] == pytest.approx(
                    m.segment_features(closed, history, before_end, categories), rel=1e-12, abs=1e-12)
            else:
                assert closed["propensity_x"] is None and closed["segment_x"] is None
    assert sum(len(u) for u in users) > 900


def test_the_trigger_the_jvm_begins_and_the_models_step_completes_is_the_python_record_s_bytes(jvm):
    users, _, rows = jvm
    codec = schemas.codec("trigger")
    rng = random.Random(5)
    closed = [unpack(r["packed"]) for r in rows if "packed" in r]
    due = 0
    for session in closed:
        # what the models step adds: a propensity (none without consent), a segment or none
        propensity = None if rng.random() < 0.3 else round(rng.random(), 6)
        segment = rng.choice([None, "s0", "s3", "ségment"])
        record = triggers.abandonment(session, GAP_MS, propensity, segment)
        if record is None:
            assert session["trigger_prefix"] is None
            continue
        due += 1
        got = triggers.complete(codec.header, session["trigger_prefix"], propensity, segment,
                                session["end_ms"] + GAP_MS)
        assert got == codec.encode(record), record
    assert due > 50
    big = codec.decode(triggers.complete(codec.header, closed[-1]["trigger_prefix"], None, None, 0))
    assert len(big["cart"]) == triggers.MAX_CART_LINES


def test_the_jvm_scores_the_features_as_the_python_model_does(jvm):
    _, model, rows = jvm
    live = [r for r in rows if "features" in r]
    got = np.array([float(r["score"]) for r in live])
    want = model.predict_proba_many(np.array([r["features"] for r in live]))
    assert np.abs(got - want).max() <= 5e-7 + 1e-12
    assert len(set(np.round(want, 3))) > 20  # a model that tells sessions apart


def test_a_snapshot_without_a_model_scores_nothing(tmp_path):
    rows = run_jvm(tmp_path, {"propensity": {}}, corpus()[-2:-1])
    assert [r["score"] for r in rows if "features" in r] == [None, None]
