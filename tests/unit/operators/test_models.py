"""Online models: no outcome in the propensity features, progressive validation,
mini-batch k-means as Sculley's update with stable ids and unique names, debounced
segment changes, and model state in an explicit format that round-trips."""

import numpy as np
import orjson
import pytest

from operators import models as m
from operators.sessions import FIELD_SEP, ITEM_SEP

HOUR = 3_600_000


def session(**over):
    base = {"user_id": "u1", "start_ms": 10 * HOUR, "end_ms": 10 * HOUR + 600_000, "n_events": 9,
            "n_page_views": 1, "n_product_views": 5, "n_searches": 1, "n_cart_adds": 2, "n_cart_removes": 1,
            "n_checkouts": 0, "n_purchases": 0, "revenue_cents": 0, "outcome_ms": None,
            "cart_moves": ITEM_SEP.join(FIELD_SEP.join(m) for m in (
                ("+", "p1", "1", "1000", str(10 * HOUR + 100_000)),
                ("+", "p2", "2", "500", str(10 * HOUR + 200_000)),
                ("-", "p2", "1", "500", str(10 * HOUR + 250_000)))),
            "categories": ITEM_SEP.join("aab"),
            "viewed": ITEM_SEP.join(FIELD_SEP.join(v) for v in (
                ("p1", "a", str(10 * HOUR + 50_000)), ("p1", "a", str(10 * HOUR + 90_000)),
                ("p2", "b", str(10 * HOUR + 150_000)), ("p3", "", str(10 * HOUR + 300_000)))),
            "consent_personalization": True, "consent_marketing": True}
    base.update(over)
    return base


def features(s, before=None):
    return dict(zip(m.PROPENSITY_FEATURES, m.propensity_features(s, before or m.UserHistory())))


def test_each_propensity_feature_reads_the_session_up_to_its_first_checkout_or_purchase():
    browsing = session()
    x = features(browsing)
    # views 4 (p1 twice): distinct 3, one repeat, p1 and p2 were carted: 3 views of carted products
    assert x["views"] == pytest.approx(np.log1p(4)) and x["distinct_products"] == pytest.approx(np.log1p(3))
    assert x["repeat_views"] == pytest.approx(np.log1p(1)) and x["carted_views"] == pytest.approx(np.log1p(3))
    assert x["distinct_categories"] == pytest.approx(np.log1p(2)) and x["affinity"] == pytest.approx(2 / 3)
    assert x["cart_adds"] == pytest.approx(np.log1p(2)) and x["cart_removes"] == pytest.approx(np.log1p(1))
    assert x["cart_lines"] == 2.0 and x["cart_value"] == pytest.approx(np.log1p(15.0))
    # "now" is the last view or cart move: 300 s in; the last add was at 200 s
    assert x["browse_min"] == pytest.approx(np.log1p(5.0)) and x["since_cart_add_min"] == pytest.approx(np.log1p(100 / 60))
    assert (x["hour_sin"], x["hour_cos"]) == pytest.approx((np.sin(2 * np.pi * 10 / 24), np.cos(2 * np.pi * 10 / 24)))
    # the same session that goes on to check out and buy, with more browsing and a cart add
    # after the checkout, and its counts, end and revenue changed: the features are the same
    outcome = 10 * HOUR + 400_000
    bought = session(
        n_checkouts=1, n_purchases=2, revenue_cents=2000, end_ms=outcome + 900_000, n_events=20, n_cart_adds=3,
        outcome_ms=outcome,
        cart_moves=browsing["cart_moves"] + ITEM_SEP + FIELD_SEP.join(("+", "p9", "5", "99", str(outcome + 10))),
        viewed=browsing["viewed"] + ITEM_SEP + FIELD_SEP.join(("p8", "z", str(outcome + 5))),
        categories=browsing["categories"] + ITEM_SEP + "z")
    assert features(bought) == x
    # an event at the very moment of the outcome is not "before" it
    at_outcome = session(outcome_ms=10 * HOUR + 300_000)
    assert features(at_outcome)["views"] == pytest.approx(np.log1p(3))


def test_propensity_history_features_read_the_history_before_the_session():
    before = m.UserHistory(sessions=4, purchase_sessions=1, revenue_cents=5000, last_end_ms=10 * HOUR - 2 * HOUR)
    x = features(session(), before)
    assert x["first_session"] == 0.0 and x["prior_sessions"] == pytest.approx(np.log1p(4))
    assert x["prior_purchase_rate"] == 0.25 and x["prior_revenue"] == pytest.approx(np.log1p(50))
    assert x["recency_h"] == pytest.approx(np.log1p(2))
    assert features(session())["first_session"] == 1.0


def test_scores_auc_equals_the_exact_rank_statistic_on_distinct_bins():
    rng = np.random.default_rng(3)
    p = (rng.permutation(1000) + 0.5) / 1000  # one score per bin: the binned AUC is exact
    y = rng.random(1000) < p
    scores = m.Scores()
    scores.update_many(p, y)
    pos, neg = p[y], p[~y]
    exact = (pos[:, None] > neg[None, :]).mean()
    assert scores.roc_auc() == pytest.approx(exact, abs=1e-12)
    assert scores.metrics()["samples"] == 1000 and scores.metrics()["positives"] == int(y.sum())
    assert sum(c["sessions"] for c in scores.metrics()["calibration"]) == 1000


def test_the_propensity_scores_before_it_learns_and_learns_a_separable_signal():
    model = m.Propensity()
    rng = np.random.default_rng(1)
    for _ in range(60):
        X = rng.random((64, len(m.PROPENSITY_FEATURES)))
        y = (X[:, 13] > 0.5) & (rng.random(64) < 0.9)
        model.scores.update_many(model.predict_proba_many(X), y)
        model.learn_many(X, y)
    metrics = model.scores.metrics()
    assert metrics["samples"] == 3840 and metrics["roc_auc"] > 0.8 and 0 < metrics["log_loss"] < 0.69


def test_a_mini_batch_moves_each_centroid_to_the_count_weighted_mean_of_its_points():
    seg = m.Segmenter(k=2, warmup=4)
    seg.scaler.n, seg.scaler.sum, seg.scaler.sumsq = 4, np.zeros(6), np.full(6, 4.0)  # frozen: identity
    seg.centroids = np.array([[0.0] * 6, [1.5] * 6])
    seg.counts = np.array([3.0, 1.0])
    batch = np.array([[0.25] * 6, [0.5] * 6, [1.9] * 6])  # two points to centroid 0, one to centroid 1
    seg.learn_many(batch)
    # centroid 0: (3 * 0 + 0.25 + 0.5) / (3 + 2) = 0.15; centroid 1: (1 * 1.5 + 1.9) / (1 + 1) = 1.7
    assert seg.centroids[0] == pytest.approx([0.15] * 6) and seg.centroids[1] == pytest.approx([1.7] * 6)
    assert list(seg.counts) == [5.0, 2.0]


def test_a_profile_far_out_on_a_feature_counts_as_clip_standard_units():
    seg = m.Segmenter(k=2, warmup=4)
    seg.scaler.n, seg.scaler.sum, seg.scaler.sumsq = 4, np.zeros(6), np.full(6, 4.0)  # frozen: identity
    seg.centroids = np.array([[0.0] * 6, [1.5] * 6])
    seg.counts = np.array([1.0, 1.0])
    seg.learn_many(np.array([[-0.2] * 6, [50.0, 1.5, 1.5, 1.5, 1.5, 1.5]]))  # 50 sd out on recency
    # the outlier moves centroid 1 as a point at CLIP (2.0) on that feature would: (1.5 + 2) / 2
    assert seg.centroids[1] == pytest.approx([1.75, 1.5, 1.5, 1.5, 1.5, 1.5])
    assert seg.predict_many(np.array([[1e6] * 6, [-1e6] * 6])) == ["s1", "s0"]


def _blobs(rng, centers, n):
    return np.array([np.array(rng.choice(centers)) + rng.normal(0, 0.05, 6) for _ in range(n)])


def test_segment_ids_stay_with_their_centroids_across_batches_and_names_are_unique():
    rng = np.random.default_rng(3)
    spender = [0, 3, 5, 1, 1, 0.2]
    browser = [0, 0, 0, 4, 0, 0.9]
    idle = [4, 0, 0, 0.5, 0, 0.1]
    seg = m.Segmenter(k=3, warmup=90)
    assert seg.predict_many(np.array([spender])) == [None]  # nothing learned yet
    for _ in range(3):
        seg.learn_many(_blobs(rng, [spender, browser, idle], 30))
    ids = seg.predict_many(np.array([spender, browser, idle]))
    assert len(set(ids)) == 3 and None not in ids
    names = [seg.names[i] for i in ids]
    assert len(set(seg.names.values())) == 3
    assert names[0].startswith("big spender") and names[2].startswith("lapsed")
    for _ in range(20):
        seg.learn_many(_blobs(rng, [spender, browser, idle], 64))
    assert seg.predict_many(np.array([spender, browser, idle])) == ids
    assert 0.5 < seg.sampled_silhouette() <= 1.0


def test_names_are_unique_even_when_centroids_share_their_strongest_trait():
    centroids = np.array([[0, 0, 3, 0, 0, 0], [0, 0, 2.5, 0, 0, 0.1], [0, 0, 2.9, 0.2, 0, 0], [0, 0, -3, 0, 0, 0]])
    names = m.segment_names(centroids)
    assert len(set(names)) == 4


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


def _trained(seed=5):
    models = m.Models.new(k=3, batch=8, warmup=16)
    rng = np.random.default_rng(seed)
    for _ in range(10):
        Xp, Xs = rng.random((8, len(m.PROPENSITY_FEATURES))), rng.random((8, 6))
        y = rng.random(8) < 0.4
        models.propensity.scores.update_many(models.propensity.predict_proba_many(Xp), y)
        models.pending_p, models.pending_s, models.pending_y = Xp.tolist(), Xs.tolist(), y.tolist()
        models.learn_pending()
    models.pending_p, models.pending_y = [[0.5] * len(m.PROPENSITY_FEATURES)], [True]  # a mini-batch half full
    models.pending_s = [[0.1] * 6]
    return models


def test_model_state_is_explicit_json_that_restores_the_same_models():
    models = _trained()
    state = models.to_state()
    assert orjson.loads(state)["format"] == m.STATE_FORMAT  # no pickled class inside
    copy = m.Models.from_state(state, k=3, batch=8)
    probe = np.random.default_rng(9).random((5, len(m.PROPENSITY_FEATURES)))
    assert (copy.propensity.predict_proba_many(probe) == models.propensity.predict_proba_many(probe)).all()
    assert copy.snapshot() == models.snapshot() and copy.to_state() == state
    assert copy.segmenter.predict_many(probe[:, :6]) == models.segmenter.predict_many(probe[:, :6])


def test_user_history_state_round_trips():
    h = m.UserHistory().after(session(n_purchases=2, revenue_cents=300))
    h.segment, h.pending, h.pending_count = "s1", "s2", 1
    assert m.UserHistory.from_state(h.to_state()) == h


def test_state_of_another_format_is_refused_with_its_format_named():
    history = orjson.loads(m.UserHistory().to_state())
    history[0] = 3
    with pytest.raises(ValueError, match="format 3"):
        m.UserHistory.from_state(orjson.dumps(history))
    models = orjson.loads(_trained().to_state())
    models["format"] = 1
    with pytest.raises(ValueError, match="format 1"):
        m.Models.from_state(orjson.dumps(models), k=3, batch=8)


def test_history_after_a_session_counts_sessions_purchases_and_revenue():
    h = m.UserHistory().after(session(n_purchases=2, revenue_cents=300)).after(session(start_ms=10_000_000,
                                                                                      end_ms=10_000_500))
    assert (h.sessions, h.purchase_sessions, h.revenue_cents, h.last_end_ms) == (2, 1, 300, 10_000_500)


def test_affinity_is_the_share_of_the_top_category():
    assert m.affinity(list("aab")) == 2 / 3 and m.affinity([]) == 0.0


def test_the_fading_scaler_follows_a_shift_and_goes_on_from_a_frozen_scaler_s_state():
    rng = np.random.default_rng(5)
    scaler = m.FadingScaler(2, fading=0.01)
    scaler.learn_many(rng.normal([0.0, 10.0], [1.0, 2.0], size=(2000, 2)))
    # weighted to about the last 100 rows: within a few standard errors of the truth
    assert scaler.mean == pytest.approx([0.0, 10.0], abs=0.6) and scaler.scale() == pytest.approx([1.0, 2.0], rel=0.3)
    scaler.learn_many(rng.normal([5.0, 10.0], [1.0, 2.0], size=(1000, 2)))  # the traffic moves
    assert scaler.mean == pytest.approx([5.0, 10.0], abs=0.6)  # a frozen scaler would still say 0
    # an earlier release's frozen scaler (sums of its warm-up rows) goes on from its statistics
    frozen = {"warmup": 4, "n": 4, "sum": [4.0, 8.0], "sumsq": [8.0, 32.0]}
    restored = m.FadingScaler.from_state(frozen, fading=0.001)
    assert (restored.n, restored.mean.tolist(), restored.var.tolist()) == (4, [1.0, 2.0], [1.0, 4.0])
    again = m.FadingScaler.from_state(restored.to_state(), fading=0.5)
    assert again.fading == 0.001 and again.mean.tolist() == [1.0, 2.0]


def test_the_recent_metrics_are_those_of_the_last_scores_only_and_survive_the_state():
    rng = np.random.default_rng(9)
    scores = m.Scores()
    scores.RECENT = 300
    p = rng.random(1000)
    y = rng.random(1000) < np.where(np.arange(1000) < 700, 0.1, p)  # the last 300 follow the score
    for i in range(0, 1000, 64):
        scores.update_many(p[i:i + 64], y[i:i + 64])
    recent = scores.recent_metrics()
    lp, ly = p[-300:], y[-300:]
    exact = float(np.mean([(a > b) + (a == b) / 2 for a, ya in zip(lp, ly) if ya for b, yb in zip(lp, ly) if not yb]))
    assert recent["samples"] == 300 and recent["positives"] == int(ly.sum())
    assert recent["roc_auc"] == pytest.approx(exact, abs=0.01)  # 1,000 bins: ties within a bin count half
    q = np.clip(lp, 1e-15, 1 - 1e-15)
    assert recent["log_loss"] == pytest.approx(float(-np.mean(np.where(ly, np.log(q), np.log(1 - q)))), abs=1e-6)
    rate = ly.mean()
    assert recent["base_rate_log_loss"] == pytest.approx(-(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)), abs=1e-6)
    assert sum(c["sessions"] for c in recent["calibration"]) == 300
    assert scores.metrics()["samples"] == 1000 and scores.metrics()["recent"] == recent
    restored = m.Scores.from_state(orjson.loads(orjson.dumps(scores.to_state())))
    restored.RECENT = 300
    assert restored.recent_metrics() == recent and restored.metrics()["samples"] == 1000
    # an earlier release's state has no recent scores: the window starts empty
    old = {k: v for k, v in scores.to_state().items() if k != "recent"}
    assert m.Scores.from_state(old).recent_metrics()["samples"] == 0
