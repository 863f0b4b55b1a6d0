"""Online models on closed sessions, learned per mini-batch, with River's verbs.

- ``Propensity``: P(purchase) of a session from the user's history before it and
  the session *so far*: its product views and cart moves before its first
  checkout or purchase, so the outcome leaks into no feature. River's ``LogisticRegression``
  learns per mini-batch (``learn_many``) on features standardized by a fading
  scaler (the recent ~1,000 sessions' mean and variance), so it follows the traffic
  when the shop changes. Progressive validation: a mini-batch is scored
  before its labels are learned, and ``Scores`` keeps ROC AUC (exact up to 1,000
  score bins), log loss and calibration.
- ``Segmenter``: mini-batch k-means (Sculley 2010) over the profile after the
  session: each mini-batch is assigned to the nearest centroids, then every
  centroid moves toward the mean of its points by their share of its (capped)
  count. Features are standardized by a scaler frozen after warm-up and clipped
  to +-2 standard units, so centroids keep their meaning and a few outliers claim
  none; the first centroids come from k-means++ and a few Lloyd iterations on the
  warm-up profiles. A centroid keeps its index, so segment ids
  (``s0`` ...) are stable by construction; names are read from what sets each
  centroid apart and are unique.
- ``debounce``: a user's new segment is taken only after it held this many
  consecutive session closes.

State is an explicit, versioned format (``Models.to_state``/``from_state``,
``UserHistory.to_state``/``from_state``: JSON bytes), never a pickled class, so
code can move without breaking savepoints (README, "Model state").
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import orjson

from operators.sessions import FIELD_SEP, ITEM_SEP
from operators.triggers import net_lines

HOUR_MS = 3_600_000
STATE_FORMAT = 2  # format 1 (pickled classes) is read no more: README, "Model state"
PROPENSITY_FEATURES = (
    "first_session", "prior_sessions", "prior_purchase_rate", "prior_revenue", "recency_h",
    "views", "distinct_products", "repeat_views", "carted_views", "distinct_categories", "affinity",
    "cart_adds", "cart_removes", "cart_lines", "cart_value", "since_cart_add_min", "browse_min",
    "hour_sin", "hour_cos",
)
SEGMENT_FEATURES = ("recency", "frequency", "monetary", "engagement", "cart", "affinity")
# what a centroid high / low on a feature (against the other centroids) is called
TRAITS = {
    "recency": ("lapsed, returning", "recently active"),
    "frequency": ("frequent visitor", "new visitor"),
    "monetary": ("big spender", "non-buyer"),
    "engagement": ("deep browser", "quick visitor"),
    "cart": ("cart filler", "no-cart browser"),
    "affinity": ("category loyalist", "category explorer"),
}


@dataclass
class UserHistory:
    """What the job knows of one user's closed sessions: the models' inputs and the
    profile's session fields (folded here once per session, in one place)."""

    sessions: int = 0
    purchase_sessions: int = 0
    revenue_cents: int = 0
    last_end_ms: int | None = None
    segment: str | None = None
    pending: str | None = None
    pending_count: int = 0
    session_ms_total: int = 0
    # the newest closed session: start, events, cart adds, cart removes, purchases, revenue (cents)
    last: tuple | None = None
    # events per category over every closed session (for the profile's top categories)
    categories: dict | None = None

    def after(self, session: dict) -> UserHistory:
        """A new history with ``session`` folded in (this one is left as it was)."""
        h = UserHistory(**self.__dict__)
        h.categories = dict(self.categories or ())
        h.fold(session)
        return h

    def fold(self, session: dict) -> list[str]:
        """Fold a closed session into this history, in place; the session's categories."""
        categories = self.categories if self.categories is not None else {}
        names = categories_of(session["categories"])
        for name in names:
            categories[name] = categories.get(name, 0) + 1
        self.categories = categories
        revenue = session["revenue_cents"] or 0
        self.sessions += 1
        self.purchase_sessions += 1 if session["n_purchases"] > 0 else 0
        self.revenue_cents += revenue
        self.last_end_ms = session["end_ms"]
        self.session_ms_total += session["end_ms"] - session["start_ms"]
        self.last = (session["start_ms"], session["n_events"], session["n_cart_adds"], session["n_cart_removes"],
                     session["n_purchases"], revenue)
        return names

    def top_categories(self, n: int = 3) -> list[tuple[str, int]]:
        """The user's most frequent categories, most events first, ties by name."""
        return sorted((self.categories or {}).items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def to_state(self) -> bytes:
        return orjson.dumps([STATE_FORMAT, self.sessions, self.purchase_sessions, self.revenue_cents,
                             self.last_end_ms, self.segment, self.pending, self.pending_count,
                             self.session_ms_total, self.last, self.categories])

    @classmethod
    def from_state(cls, value) -> UserHistory | None:
        """A history from Flink state (None: a new user)."""
        if value is None:
            return None
        fmt, *fields = orjson.loads(value)
        if fmt != STATE_FORMAT:
            raise ValueError(f"user history in state format {fmt}, this code reads {STATE_FORMAT}")
        h = cls(*fields)
        h.last = tuple(h.last) if h.last is not None else None
        return h


def affinity(names: list[str]) -> float:
    """Share of the categorised events in the most frequent category (0 when none)."""
    if not names:
        return 0.0
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return max(counts.values()) / len(names)


def categories_of(categories: str | None) -> list[str]:
    return [c for c in (categories or "").split(ITEM_SEP) if c]


def propensity_features(session: dict, before: UserHistory) -> list[float]:
    """PROPENSITY_FEATURES of a session: the user's history before the session and the
    session's product views and cart moves before its first checkout or purchase (the
    moment the model would score it); "now" is the last of those. Nothing after."""
    cutoff = session["outcome_ms"]
    if cutoff is None:
        cutoff = math.inf
    start = session["start_ms"]
    now = start
    products, categories = [], []
    if session["viewed"]:
        for item in session["viewed"].split(ITEM_SEP):
            product, category, at = item.split(FIELD_SEP)
            at = int(at)
            if at < cutoff:
                products.append(product)
                if category:
                    categories.append(category)
                if at > now:
                    now = at
    carted, kept = set(), []
    adds = removes = 0
    last_add = None
    if session["cart_moves"]:
        for move in session["cart_moves"].split(ITEM_SEP):
            fields = move.split(FIELD_SEP)
            sign, product, at = fields[0], fields[1], int(fields[4])
            if at < cutoff:
                kept.append(fields)
                if at > now:
                    now = at
                if sign == "+":
                    adds += 1
                    carted.add(product)
                    if last_add is None or at > last_add:
                        last_add = at
                else:
                    removes += 1
    lines = net_lines(kept)  # the moves already split: not joined and split again
    distinct = len(set(products))
    recency_h = (start - before.last_end_ms) / HOUR_MS if before.last_end_ms is not None else 0.0
    hour = 2 * math.pi * ((start // HOUR_MS) % 24) / 24
    log1p = math.log1p
    return [
        1.0 if before.sessions == 0 else 0.0,
        log1p(before.sessions),
        before.purchase_sessions / before.sessions if before.sessions else 0.0,
        log1p(before.revenue_cents / 100),
        log1p(recency_h if recency_h > 0 else 0.0),
        log1p(len(products)),
        log1p(distinct),
        log1p(len(products) - distinct),
        log1p(sum(1 for p in products if p in carted)) if carted else 0.0,
        log1p(len(set(categories))),
        affinity(categories),
        log1p(adds),
        log1p(removes),
        float(len(lines)),
        log1p(sum(q * c for _, q, c in lines) / 100),
        log1p((now - last_add) / 60_000) if last_add is not None else 0.0,
        log1p((now - start) / 60_000),
        math.sin(hour),
        math.cos(hour),
    ]


def segment_features(session: dict, after: UserHistory, before_end_ms: int | None,
                     categories: list[str]) -> list[float]:
    """SEGMENT_FEATURES: the profile after the session (recency of this visit, frequency,
    monetary value, engagement, cart, category affinity of the session's ``categories``)."""
    recency_h = (session["start_ms"] - before_end_ms) / HOUR_MS if before_end_ms is not None else 0.0
    return [
        math.log1p(max(recency_h, 0.0)),
        math.log1p(after.sessions),
        math.log1p(after.revenue_cents / 100),
        math.log1p(session["n_events"]),
        math.log1p(session["n_cart_adds"]),
        affinity(categories),
    ]


class FrozenScaler:
    """Mean and standard deviation of the first ``warmup`` rows it learns, then frozen,
    so the features a model reads keep their meaning once warmed up."""

    def __init__(self, width: int, warmup: int):
        self.warmup = warmup
        self.n = 0
        self.sum = np.zeros(width)
        self.sumsq = np.zeros(width)

    def learn_many(self, X: np.ndarray) -> None:
        take = X[: max(self.warmup - self.n, 0)]
        if len(take):
            self.n += len(take)
            self.sum += take.sum(axis=0)
            self.sumsq += (take * take).sum(axis=0)

    @property
    def frozen(self) -> bool:
        return self.n >= self.warmup

    def transform_many(self, X: np.ndarray) -> np.ndarray:
        if not self.n:
            return X.copy()
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sumsq / self.n - mean * mean, 0.0))
        return (X - mean) / np.where(std > 1e-9, std, 1.0)

    def to_state(self) -> dict:
        return {"warmup": self.warmup, "n": self.n, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_state(cls, s: dict) -> FrozenScaler:
        scaler = cls(len(s["sum"]), s["warmup"])
        scaler.n, scaler.sum, scaler.sumsq = s["n"], np.array(s["sum"]), np.array(s["sumsq"])
        return scaler


class FadingScaler:
    """Mean and variance weighted to the recent rows, so the features a model reads follow
    the traffic: a plain running mean and variance for the first ``1 / fading`` rows, then
    exponentially weighted, each row by ``fading`` (River's AdaptiveStandardScaler's update,
    per mini-batch in numpy)."""

    def __init__(self, width: int, fading: float):
        self.fading = fading
        self.n = 0
        self.mean = np.zeros(width)
        self.var = np.zeros(width)

    def learn_many(self, X: np.ndarray) -> None:
        mean, var = self.mean, self.var
        for x in X:
            self.n += 1
            a = max(1.0 / self.n, self.fading)
            d = x - mean
            mean = mean + a * d
            var = (1 - a) * (var + a * d * d)
        self.mean, self.var = mean, var

    def scale(self) -> np.ndarray:
        std = np.sqrt(self.var)
        return np.where(std > 1e-9, std, 1.0)

    def transform_many(self, X: np.ndarray) -> np.ndarray:
        if not self.n:
            return X.copy()
        return (X - self.mean) / self.scale()

    def to_state(self) -> dict:
        return {"fading": self.fading, "n": self.n, "mean": self.mean.tolist(), "var": self.var.tolist()}

    @classmethod
    def from_state(cls, s: dict, fading: float) -> FadingScaler:
        """A scaler from state; a frozen scaler's (an earlier release's propensity) goes on
        from its mean and variance, fading from then on."""
        if "sum" in s:
            scaler = cls(len(s["sum"]), fading)
            scaler.n = s["n"]
            if scaler.n:
                scaler.mean = np.array(s["sum"]) / scaler.n
                scaler.var = np.maximum(np.array(s["sumsq"]) / scaler.n - scaler.mean * scaler.mean, 0.0)
            return scaler
        scaler = cls(len(s["mean"]), s["fading"])
        scaler.n, scaler.mean, scaler.var = s["n"], np.array(s["mean"]), np.array(s["var"])
        return scaler


class Scores:
    """Progressive metrics of a probabilistic classifier: ROC AUC from 1,000 score bins
    (ties within a bin count half: off by at most the pairs sharing a bin), log loss,
    and calibration by tenths of the score; over every score since the start, and over
    the last ``RECENT`` (the same figures, with the log loss of a constant at their base
    rate beside them: what a model that knows nothing would score there)."""

    BINS = 1000
    RECENT = 5000

    def __init__(self):
        self.pos = np.zeros(self.BINS, dtype=np.int64)
        self.neg = np.zeros(self.BINS, dtype=np.int64)
        self.score_sum = np.zeros(self.BINS)
        self.log_loss_sum = 0.0
        # the last RECENT scores and labels, and their bins (added and taken out as they pass)
        self.recent: deque = deque()
        self.r_pos = np.zeros(self.BINS, dtype=np.int64)
        self.r_neg = np.zeros(self.BINS, dtype=np.int64)
        self.r_score_sum = np.zeros(self.BINS)
        self.r_log_loss_sum = 0.0

    def _bin(self, p: np.ndarray) -> np.ndarray:
        return np.minimum((p * self.BINS).astype(np.int64), self.BINS - 1)

    @staticmethod
    def _losses(p: np.ndarray, y: np.ndarray) -> np.ndarray:
        q = np.clip(p, 1e-15, 1 - 1e-15)
        return -np.where(y, np.log(q), np.log(1 - q))

    def _tally(self, p: np.ndarray, y: np.ndarray) -> tuple:
        """Positives and negatives per bin, scores per bin, and the log loss summed, of some scores."""
        b = self._bin(p)
        return (np.bincount(b[y], minlength=self.BINS), np.bincount(b[~y], minlength=self.BINS),
                np.bincount(b, weights=p, minlength=self.BINS), float(self._losses(p, y).sum()))

    def update_many(self, p: np.ndarray, y: np.ndarray) -> None:
        p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=bool)
        tally = self._tally(p, y)
        pos, neg, score_sum, loss = tally
        self.pos += pos
        self.neg += neg
        self.score_sum += score_sum
        self.log_loss_sum += loss
        self._add_recent(p, y, tally)

    def _add_recent(self, p: np.ndarray, y: np.ndarray, tally: tuple | None = None) -> None:
        """Add scores to the recent window (``tally``: theirs, when already counted), taking out
        those it no longer holds."""
        pos, neg, score_sum, loss = tally if tally is not None else self._tally(p, y)
        self.r_pos += pos
        self.r_neg += neg
        self.r_score_sum += score_sum
        self.r_log_loss_sum += loss
        # each as (score, 0/1): the state's flat list is then one chain of them
        self.recent.extend(zip(p.tolist(), y.astype(np.int64).tolist()))
        gone = len(self.recent) - self.RECENT
        if gone > 0:
            old = [self.recent.popleft() for _ in range(gone)]
            pos, neg, score_sum, loss = self._tally(np.array([o[0] for o in old]),
                                                    np.array([o[1] for o in old], dtype=bool))
            self.r_pos -= pos
            self.r_neg -= neg
            self.r_score_sum -= score_sum
            self.r_log_loss_sum -= loss

    @property
    def samples(self) -> int:
        return int(self.pos.sum() + self.neg.sum())

    def roc_auc(self) -> float | None:
        return self._auc(self.pos, self.neg)

    @staticmethod
    def _auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
        P, N = pos.sum(), neg.sum()
        if not P or not N:
            return None
        below = np.concatenate(([0], np.cumsum(neg)[:-1]))  # negatives in lower bins
        return float((pos * (below + neg / 2)).sum() / (P * N))

    def calibration(self) -> list[dict]:
        return self._calibration(self.pos, self.neg, self.score_sum)

    def _calibration(self, pos, neg, score_sum) -> list[dict]:
        out = []
        for tenth in range(10):
            s = slice(tenth * self.BINS // 10, (tenth + 1) * self.BINS // 10)
            n = int(pos[s].sum() + neg[s].sum())
            if n:
                out.append({"scores": f"{tenth / 10:.1f}-{(tenth + 1) / 10:.1f}", "sessions": n,
                            "mean_score": round(float(score_sum[s].sum() / n), 4),
                            "purchase_rate": round(float(pos[s].sum() / n), 4)})
        return out

    def metrics(self) -> dict:
        n = self.samples
        auc = self.roc_auc()
        return {
            "samples": n,
            "positives": int(self.pos.sum()),
            "roc_auc": round(auc, 6) if auc is not None else None,
            "log_loss": round(self.log_loss_sum / n, 6) if n else None,
            "calibration": self.calibration(),
            "recent": self.recent_metrics(),
        }

    def recent_metrics(self) -> dict:
        """The metrics of the last RECENT scores, and the log loss of a constant score at
        their base rate."""
        n = int(self.r_pos.sum() + self.r_neg.sum())
        positives = int(self.r_pos.sum())
        auc = self._auc(self.r_pos, self.r_neg)
        rate = positives / n if n else None
        constant = (0.0 if rate in (0.0, 1.0) else -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
                    ) if n else None
        return {
            "samples": n,
            "positives": positives,
            "roc_auc": round(auc, 6) if auc is not None else None,
            "log_loss": round(self.r_log_loss_sum / n, 6) if n else None,
            "base_rate_log_loss": round(constant, 6) if constant is not None else None,
            "calibration": self._calibration(self.r_pos, self.r_neg, self.r_score_sum),
        }

    def to_state(self) -> dict:
        return {"pos": self.pos.tolist(), "neg": self.neg.tolist(), "score_sum": self.score_sum.tolist(),
                "log_loss_sum": self.log_loss_sum, "recent": list(chain.from_iterable(self.recent))}

    @classmethod
    def from_state(cls, s: dict) -> Scores:
        """Scores from state (an earlier release's have no recent scores: the window starts empty)."""
        scores = cls()
        scores.pos, scores.neg = np.array(s["pos"], dtype=np.int64), np.array(s["neg"], dtype=np.int64)
        scores.score_sum, scores.log_loss_sum = np.array(s["score_sum"]), s["log_loss_sum"]
        flat = s.get("recent") or []
        if flat:
            scores._add_recent(np.array(flat[0::2], dtype=np.float64), np.array(flat[1::2], dtype=bool))
        return scores


class Propensity:
    """River's logistic regression, learned per mini-batch on features scaled by a fading
    scaler (``FADING``: about the last 1,000 sessions), its intercept at ``INTERCEPT_LR``.

    Both chosen on ``scripts/models_eval.py --drift`` (README, "Models"): a scaler frozen
    after warm-up standardized every later shop by the first one's statistics (online AUC
    0.80 and 0.83 of the ceiling on the later sources, log loss 8-12 against the constant's
    0.6-0.7), and River's default intercept rate (0.01) left the intercept near 0, so a
    fading scaler's centred features gave scores far above a 4 % base rate; the frozen
    scaler had hidden that through the hour-of-day features, which it left uncentred."""

    FADING = 0.001
    INTERCEPT_LR = 1.0

    def __init__(self, learning_rate: float = 0.05):
        from river import linear_model, optim

        self.learning_rate = learning_rate
        self.scaler = FadingScaler(len(PROPENSITY_FEATURES), self.FADING)
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate),
                                                     intercept_lr=self.INTERCEPT_LR)
        self.scores = Scores()

    def _frame(self, X: np.ndarray):
        import pandas as pd

        return pd.DataFrame(self.scaler.transform_many(X), columns=PROPENSITY_FEATURES, copy=False)

    def predict_proba_many(self, X: np.ndarray) -> np.ndarray:
        """P(purchase) of each row (0.5 before anything was learned)."""
        if not len(X):
            return np.zeros(0)
        return self.model.predict_proba_many(self._frame(X))[True].to_numpy()

    def learn_many(self, X: np.ndarray, y: np.ndarray) -> None:
        """Learn a mini-batch (its scores were counted when the sessions were scored)."""
        import pandas as pd

        self.scaler.learn_many(X)
        self.model.learn_many(self._frame(X), pd.Series(y))

    def scoring(self) -> dict:
        """What scoring needs, in PROPENSITY_FEATURES order (the JVM scores the session in
        progress with it: operators/jvm, PropensityModel): p = sigmoid(intercept +
        sum(weight * (x - mean) / scale))."""
        n = self.scaler.n
        mean = self.scaler.mean if n else np.zeros(len(PROPENSITY_FEATURES))
        scale = self.scaler.scale() if n else np.ones(len(PROPENSITY_FEATURES))
        return {"features": list(PROPENSITY_FEATURES), "mean": mean.tolist(), "scale": scale.tolist(),
                "weights": [float(self.model.weights.get(f, 0.0)) for f in PROPENSITY_FEATURES],
                "intercept": float(self.model.intercept)}

    def to_state(self) -> dict:
        return {"learning_rate": self.learning_rate, "scaler": self.scaler.to_state(),
                "weights": {k: float(v) for k, v in self.model.weights.items()},
                "intercept": float(self.model.intercept), "iterations": self.model.optimizer.n_iterations,
                "scores": self.scores.to_state()}

    @classmethod
    def from_state(cls, s: dict) -> Propensity:
        from river import utils

        p = cls(s["learning_rate"])
        p.scaler = FadingScaler.from_state(s["scaler"], cls.FADING)
        p.model._weights = utils.VectorDict(dict(s["weights"]))
        p.model.intercept = s["intercept"]
        p.model.optimizer.n_iterations = s["iterations"]
        p.scores = Scores.from_state(s["scores"])
        return p


def _sq_distances(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    return ((X[:, None, :] - C[None, :, :]) ** 2).sum(axis=2)


def segment_names(centroids: np.ndarray) -> list[str]:
    """One unique name per centroid (standard units), from what sets it apart from the
    mean of the others: its strongest trait no other segment took, then its second
    strongest when that is clear (over half a standard deviation) and names no other
    segment."""
    k = len(centroids)
    rel = centroids - centroids.mean(axis=0)
    labels = []  # per centroid: (label, strength), strongest first
    for i in range(k):
        order = np.argsort(-np.abs(rel[i]), kind="stable")
        labels.append([(TRAITS[SEGMENT_FEATURES[j]][0 if rel[i][j] > 0 else 1], abs(rel[i][j])) for j in order])
    primary: dict[int, str] = {}
    for i in sorted(range(k), key=lambda i: -labels[i][0][1]):
        taken = set(primary.values())
        primary[i] = next((label for label, _ in labels[i] if label not in taken), f"segment {i}")
    names = []
    for i in range(k):
        others = set(primary.values()) - {primary[i]}
        second = [label for label, strength in labels[i][:3]
                  if strength > 0.5 and label != primary[i] and label not in others][:1]
        names.append(", ".join([primary[i], *second]))
    return names


class Segmenter:
    """Mini-batch k-means (Sculley 2010) with frozen scaling and stable segment ids."""

    LLOYD_ITERATIONS = 10
    CLIP = 2.0           # standard units a feature counts at most: a few outliers claim no centroid
    COUNT_CAP = 10_000   # a centroid's count stops growing here, so it can still follow slow drift
    SAMPLE = 300         # profiles kept (reservoir) for the sampled silhouette
    MIN_SHARE = 0.05     # a centroid drawing less of the recent profiles is reseeded
    SHARE_DECAY = 0.9    # weight of the past in a centroid's share of recent profiles
    SETTLE_BATCHES = 10  # mini-batches after the first centroids before any reseeding

    def __init__(self, k: int, warmup: int = 512, seed: int = 42):
        self.k = k
        self.seed = seed
        self.scaler = FrozenScaler(len(SEGMENT_FEATURES), warmup)
        self.warm: list[list[float]] = []         # raw profiles until the first centroids
        self.centroids: np.ndarray | None = None  # k x features, standard units
        self.counts = np.zeros(k)
        self.shares = np.full(k, 1.0 / k)         # of recent profiles, per centroid (decayed)
        self.reseeded = 0
        self.batches = 0
        self.seen = 0
        self.sample: list[list[float]] = []       # scaled profiles, reservoir
        self.names: dict[str, str] = {}
        self.silhouette: float | None = None

    @property
    def version(self) -> str:
        return f"minibatch-kmeans-k{self.k}-b{self.batches}"

    @staticmethod
    def sid(i: int) -> str:
        return f"s{i}"

    def predict_many(self, X: np.ndarray) -> list[str | None]:
        """The stable segment id of each profile, None before the first centroids."""
        if self.centroids is None or not len(X):
            return [None] * len(X)
        nearest = _sq_distances(self._standard(X), self.centroids).argmin(axis=1)
        return [self.sid(int(i)) for i in nearest]

    def _standard(self, X: np.ndarray) -> np.ndarray:
        """Profiles in frozen standard units, each feature clipped to +-CLIP (winsorized):
        on the REES46 sample the few buyers, 5 and more standard deviations out on
        monetary value, otherwise held a centroid of 2.4 % of the users."""
        return np.clip(self.scaler.transform_many(X), -self.CLIP, self.CLIP)

    def learn_many(self, X: np.ndarray) -> None:
        """One mini-batch: warm-up until the scaler is frozen (then k-means++ and Lloyd on
        the warm-up profiles), afterwards Sculley's update."""
        if not len(X):
            return
        self.scaler.learn_many(X)
        rng = np.random.default_rng([self.seed, self.batches])
        if self.centroids is None:
            self.warm.extend(X.tolist())
            if not self.scaler.frozen or len(self.warm) < self.k:
                return
            self._init(self._standard(np.array(self.warm)), rng)
            self.warm = []
        else:
            Z = self._standard(X)
            nearest = _sq_distances(Z, self.centroids).argmin(axis=1)
            n = np.bincount(nearest, minlength=self.k).astype(float)
            sums = np.zeros_like(self.centroids)
            np.add.at(sums, nearest, Z)
            moved = n > 0
            counts = np.minimum(self.counts + n, self.COUNT_CAP)
            # c <- c + (sum - n c) / count: toward the batch mean of its points, by n / count
            self.centroids[moved] += (sums[moved] - n[moved, None] * self.centroids[moved]) / counts[moved, None]
            self.counts = counts
            self.shares = self.SHARE_DECAY * self.shares + (1 - self.SHARE_DECAY) * n / len(Z)
            self._reseed_underused(Z, rng)
            self._keep_sample(Z, rng)
        self.batches += 1
        self.names = {self.sid(i): name for i, name in enumerate(segment_names(self.centroids))}

    def _reseed_underused(self, Z: np.ndarray, rng) -> None:
        """A centroid that has drawn under MIN_SHARE of the recent profiles moves to a
        profile of this batch far from every centroid (k-means++'s draw), as
        scikit-learn's MiniBatchKMeans reassigns its low-count centers: a segment of a
        handful of users helps no marketer. Its id stays; its name follows it."""
        if self.batches < self.SETTLE_BATCHES:
            return
        for j in np.flatnonzero(self.shares < self.MIN_SHARE):
            d = _sq_distances(Z, self.centroids).min(axis=1)
            total = d.sum()
            if total <= 0:
                return
            self.centroids[j] = Z[rng.choice(len(Z), p=d / total)]
            self.counts[j] = 0.0
            self.shares[j] = 1.0 / self.k  # a fair chance before it is judged again
            self.reseeded += 1

    def _init(self, Z: np.ndarray, rng) -> None:
        # k-means++ seeding, then Lloyd iterations over the warm-up profiles
        centroids = [Z[rng.integers(len(Z))]]
        for _ in range(1, self.k):
            d = _sq_distances(Z, np.array(centroids)).min(axis=1)
            total = d.sum()
            centroids.append(Z[rng.choice(len(Z), p=d / total)] if total > 0 else Z[rng.integers(len(Z))])
        C = np.array(centroids, dtype=float)
        for _ in range(self.LLOYD_ITERATIONS):
            nearest = _sq_distances(Z, C).argmin(axis=1)
            for j in range(self.k):
                if (nearest == j).any():
                    C[j] = Z[nearest == j].mean(axis=0)
        nearest = _sq_distances(Z, C).argmin(axis=1)
        self.centroids = C
        self.counts = np.bincount(nearest, minlength=self.k).astype(float)
        self.shares = self.counts / len(Z)
        self._keep_sample(Z, rng)

    def _keep_sample(self, Z: np.ndarray, rng) -> None:
        for z in Z:
            self.seen += 1
            if len(self.sample) < self.SAMPLE:
                self.sample.append(z.tolist())
            else:
                j = int(rng.integers(self.seen))
                if j < self.SAMPLE:
                    self.sample[j] = z.tolist()

    def sampled_silhouette(self) -> float | None:
        """Mean silhouette of the kept sample of profiles under today's centroids."""
        if self.centroids is None or len(self.sample) < 3:
            return None
        Z = np.array(self.sample)
        labels = _sq_distances(Z, self.centroids).argmin(axis=1)
        if len(set(labels.tolist())) < 2:
            return None
        sq = (Z * Z).sum(axis=1)  # pairwise distances by the Gram matrix: a tenth of the differences' cost
        D = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (Z @ Z.T), 0.0))
        onehot = np.eye(self.k)[labels]                    # n x k
        sizes = onehot.sum(axis=0)
        sums = D @ onehot                                  # distance of each point to each cluster, summed
        own = sizes[labels]
        a = np.where(own > 1, sums[np.arange(len(Z)), labels] / np.maximum(own - 1, 1), 0.0)
        means = np.where(sizes > 0, sums / np.maximum(sizes, 1), np.inf)
        means[np.arange(len(Z)), labels] = np.inf
        b = means.min(axis=1)
        s = np.where((own > 1) & (np.maximum(a, b) > 0), (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
        return float(s.mean())

    def to_state(self) -> dict:
        return {"k": self.k, "seed": self.seed, "scaler": self.scaler.to_state(), "warm": self.warm,
                "centroids": None if self.centroids is None else self.centroids.tolist(),
                "counts": self.counts.tolist(), "shares": self.shares.tolist(), "reseeded": self.reseeded,
                "batches": self.batches, "seen": self.seen,
                "sample": self.sample, "silhouette": self.silhouette}

    @classmethod
    def from_state(cls, s: dict) -> Segmenter:
        seg = cls(s["k"], seed=s["seed"])
        seg.scaler = FrozenScaler.from_state(s["scaler"])
        seg.warm, seg.batches, seg.seen, seg.sample = s["warm"], s["batches"], s["seen"], s["sample"]
        seg.centroids = None if s["centroids"] is None else np.array(s["centroids"])
        seg.counts, seg.shares, seg.reseeded = np.array(s["counts"]), np.array(s["shares"]), s["reseeded"]
        seg.silhouette = s["silhouette"]
        if seg.centroids is not None:
            seg.names = {seg.sid(i): name for i, name in enumerate(segment_names(seg.centroids))}
        return seg


def debounce(history: UserHistory, candidate: str | None, holds: int) -> tuple[UserHistory, bool]:
    """Apply a scoring to the user's segment; True when the segment changed.

    A first segment is taken at once; a different one only after ``holds``
    consecutive scorings agree on it.
    """
    if candidate is None or candidate == history.segment:
        history.pending, history.pending_count = None, 0
        return history, False
    if history.segment is None:
        history.segment, history.pending, history.pending_count = candidate, None, 0
        return history, True
    if candidate == history.pending:
        history.pending_count += 1
    else:
        history.pending, history.pending_count = candidate, 1
    if history.pending_count >= holds:
        history.segment, history.pending, history.pending_count = candidate, None, 0
        return history, True
    return history, False


@dataclass
class Models:
    """The job's models, what they wait to learn, and what they report (one instance, in keyed state).

    Both models learn per mini-batch of ``batch`` consented sessions; the sessions of
    a mini-batch are scored with the models as learned before it, and the metrics
    count each score with its label at once (progressive validation: scored before
    learned), so they cover every scored session, also those still waiting to be learned."""

    propensity: Propensity
    segmenter: Segmenter
    batch: int = 64
    pending_p: list = field(default_factory=list)   # propensity features of the sessions not learned yet
    pending_y: list = field(default_factory=list)   # their labels
    pending_s: list = field(default_factory=list)   # their profiles (segment features)
    segment_sizes: Counter = field(default_factory=Counter)
    learned: int = 0         # mini-batches learned
    segment_moves: int = 0   # users moved from one segment to another
    scored: int = 0          # sessions scored (consented)
    sessions: int = 0
    updated_ms: int = 0

    @classmethod
    def new(cls, k: int, batch: int, warmup: int = 512) -> Models:
        """New models; the segmenter's scaler freezes after ``warmup`` sessions."""
        return cls(Propensity(), Segmenter(k, warmup=warmup), batch=batch)

    FIRST_BATCH = 8  # the first mini-batches grow 8, 16, 32, ... up to ``batch``: a cold model learns sooner

    def batch_now(self) -> int:
        return min(self.batch, self.FIRST_BATCH << min(self.learned, 16))

    def room(self) -> int:
        """Consented sessions until the next mini-batch is learned."""
        return self.batch_now() - len(self.pending_y)

    def learn_pending(self, force: bool = False) -> bool:
        """Learn the waiting mini-batch when it is full (or ``force``). True when it learned."""
        if not self.pending_y or (len(self.pending_y) < self.batch_now() and not force):
            return False
        self.learned += 1
        self.propensity.learn_many(np.array(self.pending_p), np.array(self.pending_y, dtype=bool))
        self.segmenter.learn_many(np.array(self.pending_s))
        self.pending_p, self.pending_y, self.pending_s = [], [], []
        if self.segmenter.batches % 10 == 1 or self.segmenter.silhouette is None:
            self.segmenter.silhouette = self.segmenter.sampled_silhouette()
        return True

    def snapshot(self) -> dict:
        seg = self.segmenter
        users = sum(v for v in self.segment_sizes.values() if v > 0)
        centroids = seg.centroids if seg.centroids is not None else []
        return {
            "propensity": self.propensity.scores.metrics(),
            "segments": {
                seg.sid(i): {"name": seg.names.get(seg.sid(i)), "users": self.segment_sizes.get(seg.sid(i), 0),
                             "share": round(self.segment_sizes.get(seg.sid(i), 0) / users, 4) if users else None,
                             "centroid": {f: round(float(v), 4) for f, v in zip(SEGMENT_FEATURES, c)}}
                for i, c in enumerate(centroids)
            },
            "segment_silhouette_sampled": None if seg.silhouette is None else round(seg.silhouette, 4),
            "segment_moves_per_1000_sessions": round(1000 * self.segment_moves / self.scored, 3) if self.scored else None,
            "segments_reseeded": seg.reseeded,
            "model_version": seg.version,
            # the propensity model itself, for scoring the session in progress in the JVM
            "propensity_model": self.propensity.scoring(),
            "sessions_seen": self.sessions,
            "updated_ms": self.updated_ms,
        }

    def to_state(self) -> bytes:
        return orjson.dumps({
            "format": STATE_FORMAT, "batch": self.batch,
            "propensity": self.propensity.to_state(), "segmenter": self.segmenter.to_state(),
            "pending_p": self.pending_p, "pending_y": self.pending_y, "pending_s": self.pending_s,
            "segment_sizes": dict(self.segment_sizes),
            "learned": self.learned, "segment_moves": self.segment_moves, "scored": self.scored,
            "sessions": self.sessions,
            "updated_ms": self.updated_ms,
        })

    @classmethod
    def from_state(cls, value, k: int, batch: int) -> Models:
        """Models from Flink state (None: new models)."""
        if value is None:
            return cls.new(k, batch)
        s = orjson.loads(value)
        if s["format"] != STATE_FORMAT:
            raise ValueError(f"models in state format {s['format']}, this code reads {STATE_FORMAT}")
        models = cls(Propensity.from_state(s["propensity"]), Segmenter.from_state(s["segmenter"]), batch=s["batch"],
                     pending_p=s["pending_p"], pending_y=s["pending_y"], pending_s=s["pending_s"],
                     segment_sizes=Counter(s["segment_sizes"]),
                     learned=s["learned"], segment_moves=s["segment_moves"], scored=s["scored"], sessions=s["sessions"],
                     updated_ms=s["updated_ms"])
        return models
