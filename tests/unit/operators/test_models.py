"""Online models: progressive validation, no outcome in the propensity features,
stable segment ids across mini-batches, named segments, debounced segment changes."""

import pickle
import random

from operators import models as m
from operators.sessions import FIELD_SEP, ITEM_SEP


def session(**over):
    base = {"user_id": "u1", "start_ms": 0, "end_ms": 600_000, "n_events": 9, "n_page_views": 1,
            "n_product_views": 5, "n_searches": 1, "n_cart_adds": 1, "n_cart_removes": 0, "n_checkouts": 0,
            "n_purchases": 0, "revenue_cents": 0, "browse_end_ms": 500_000,
            "cart_moves": FIELD_SEP.join(("+", "p1", "1", "1000", "100")), "categories": ITEM_SEP.join("aab"),
            "consent_personalization": True, "consent_marketing": True}
    base.update(over)
    return base


def test_propensity_features_hold_nothing_of_checkout_purchase_or_revenue():
    before = m.UserHistory(sessions=2, purchase_sessions=1, revenue_cents=5000, last_end_ms=-3_600_000)
    browsing = m.propensity_features(session(), before)
    bought = m.propensity_features(session(n_checkouts=1, n_purchases=1, revenue_cents=1000, end_ms=700_000,
                                           n_events=11), before)
    assert browsing == bought


def test_progressive_validation_scores_before_learning_and_learns_a_separable_signal():
    model = m.Propensity()
    rng = random.Random(1)
    for _ in range(2000):
        cart = rng.random() < 0.5
        y = cart and rng.random() < 0.8
        x = {"cart": 1.0 if cart else 0.0, "noise": rng.random()}
        p = model.predict_one(x)
        model.learn_one(x, y, p)
    metrics = model.metrics()
    assert metrics["samples"] == 2000 and metrics["roc_auc"] > 0.8
    assert 0 < metrics["log_loss"] < 0.69


def test_history_after_a_session_counts_sessions_purchases_and_revenue():
    h = m.UserHistory().after(session(n_purchases=2, revenue_cents=300)).after(session(start_ms=10_000_000,
                                                                                      end_ms=10_000_500))
    assert (h.sessions, h.purchase_sessions, h.revenue_cents, h.last_end_ms) == (2, 1, 300, 10_000_500)


def test_affinity_is_the_share_of_the_top_category():
    assert m.affinity(ITEM_SEP.join("aab")) == 2 / 3 and m.affinity(None) == 0.0


def _blobs(rng, centers, n):
    out = []
    for _ in range(n):
        c = rng.choice(centers)
        out.append({k: c[k] + rng.gauss(0, 0.05) for k in m.SEGMENT_FEATURES})
    return out


def test_segment_ids_stay_with_their_centroids_when_kmeans_reorders_them():
    seg = m.Segmenter(k=2, batch=50)
    seg._match({0: {"monetary": 2.0}, 1: {"monetary": -2.0}})
    first = dict(seg.ids)
    seg._match({0: {"monetary": -1.9}, 1: {"monetary": 2.1}})  # the same two centroids, swapped and drifted
    assert seg.ids[1] == first[0] and seg.ids[0] == first[1]


def test_segmenter_learns_per_mini_batch_and_predicts_stable_named_segments():
    rng = random.Random(3)
    spender = dict.fromkeys(m.SEGMENT_FEATURES, 0.0) | {"monetary": 5.0, "frequency": 3.0}
    browser = dict.fromkeys(m.SEGMENT_FEATURES, 0.0) | {"engagement": 4.0}
    seg = m.Segmenter(k=2, batch=40)
    assert seg.predict_one(spender) is None  # nothing learned yet
    learned = [seg.learn_one(x) for x in _blobs(rng, [spender, browser], 400)]
    assert sum(learned) == 10 and seg.version == "kmeans-k2-b10"
    a, b = seg.predict_one(spender), seg.predict_one(browser)
    assert a != b and {a, b} == set(seg.names)
    assert seg.names[a] == "high-value frequent buyer" and seg.names[b] == "browser"
    ids = (a, b)
    for x in _blobs(rng, [spender, browser], 200):
        seg.learn_one(x)
    assert (seg.predict_one(spender), seg.predict_one(browser)) == ids


def test_a_new_segment_is_taken_only_after_it_held_and_the_first_at_once():
    h = m.UserHistory()
    h, changed = m.debounce(h, "s1", holds=2)
    assert changed and h.segment == "s1"
    h, changed = m.debounce(h, "s2", holds=2)
    assert not changed and h.segment == "s1"
    h, changed = m.debounce(h, "s1", holds=2)  # back: the pending move is forgotten
    assert not changed and h.pending is None
    h, _ = m.debounce(h, "s2", holds=2)
    h, changed = m.debounce(h, "s2", holds=2)
    assert changed and h.segment == "s2"
    h, changed = m.debounce(h, None, holds=2)
    assert not changed and h.segment == "s2"


def test_models_survive_pickling_as_flink_state_does():
    models = m.Models.new(k=3, batch=8)
    rng = random.Random(5)
    for i in range(40):
        x = {"a": rng.random(), "b": rng.random()}
        models.propensity.learn_one(x, rng.random() < 0.5, models.propensity.predict_one(x))
        models.segmenter.learn_one({"frequency": rng.random(), "monetary": rng.random()})
    copy = pickle.loads(pickle.dumps(models))
    probe = {"a": 0.3, "b": 0.9}
    assert copy.propensity.predict_one(probe) == models.propensity.predict_one(probe)
    assert copy.snapshot() == models.snapshot()
