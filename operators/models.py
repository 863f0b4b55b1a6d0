"""Online models on closed sessions, with River's verbs.

- ``Propensity``: P(purchase) of a session from the user's profile before it and
  the session up to its last browsing event (no checkout, no purchase, no revenue
  in the features: the outcome must not leak). Progressive validation: predict,
  update ROC AUC and log loss, then learn the label.
- ``Segmenter``: KMeans over scaled profile vectors (recency, frequency, monetary
  value, engagement, category affinity), learned per mini-batch. Segment ids are
  stable: after every batch the new centroids are matched to the previous ones
  (nearest first), so a drifting centroid keeps its id; each segment is named from
  its centroid.
- ``Debounce``: a user's new segment is taken only after it held this many
  consecutive session closes.

Everything here is plain Python (picklable, unit-tested); ``operators.actions``
keeps it in Flink keyed state.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from river import cluster, compose, linear_model, metrics, optim, preprocessing

from operators.sessions import ITEM_SEP
from operators.triggers import net_cart

HOUR_MS = 3_600_000
SEGMENT_FEATURES = ("recency", "frequency", "monetary", "engagement", "cart", "affinity")


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
        categories = dict(self.categories or ())
        for name in (session["categories"] or "").split(ITEM_SEP):
            if name:
                categories[name] = categories.get(name, 0) + 1
        revenue = session["revenue_cents"] or 0
        return UserHistory(
            sessions=self.sessions + 1,
            purchase_sessions=self.purchase_sessions + (1 if session["n_purchases"] > 0 else 0),
            revenue_cents=self.revenue_cents + revenue,
            last_end_ms=session["end_ms"],
            segment=self.segment, pending=self.pending, pending_count=self.pending_count,
            session_ms_total=self.session_ms_total + session["end_ms"] - session["start_ms"],
            last=(session["start_ms"], session["n_events"], session["n_cart_adds"], session["n_cart_removes"],
                  session["n_purchases"], revenue),
            categories=categories,
        )

    def top_categories(self, n: int = 3) -> list[tuple[str, int]]:
        """The user's most frequent categories, most events first, ties by name."""
        return sorted((self.categories or {}).items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def affinity(categories: str | None) -> float:
    """Share of the session's categorised events in its most frequent category (0 when none)."""
    names = [c for c in (categories or "").split(ITEM_SEP) if c]
    if not names:
        return 0.0
    return Counter(names).most_common(1)[0][1] / len(names)


def propensity_features(session: dict, before: UserHistory, *, lines: list | None = None,
                        focus: float | None = None) -> dict[str, float]:
    """The session so far and the profile before it; nothing of checkout or purchase.
    ``lines`` (net cart) and ``focus`` (affinity) when the caller has them already."""
    lines = net_cart(session["cart_moves"]) if lines is None else lines
    browse_end = session["browse_end_ms"] if session["browse_end_ms"] is not None else session["start_ms"]
    recency_h = (session["start_ms"] - before.last_end_ms) / HOUR_MS if before.last_end_ms is not None else 0.0
    return {
        "first_session": 1.0 if before.sessions == 0 else 0.0,
        "prior_sessions": math.log1p(before.sessions),
        "prior_purchase_rate": before.purchase_sessions / before.sessions if before.sessions else 0.0,
        "prior_revenue": math.log1p(before.revenue_cents / 100),
        "recency_h": math.log1p(max(recency_h, 0.0)),
        "page_views": math.log1p(session["n_page_views"]),
        "product_views": math.log1p(session["n_product_views"]),
        "searches": math.log1p(session["n_searches"]),
        "cart_adds": math.log1p(session["n_cart_adds"]),
        "cart_removes": math.log1p(session["n_cart_removes"]),
        "cart_lines": float(len(lines)),
        "cart_value": math.log1p(sum(q * c for _, q, c in lines) / 100),
        "browse_min": math.log1p(max(browse_end - session["start_ms"], 0) / 60_000),
        "affinity": affinity(session["categories"]) if focus is None else focus,
    }


def segment_features(session: dict, after: UserHistory, before: UserHistory, *,
                     focus: float | None = None) -> dict[str, float]:
    """The profile after the session: recency, frequency, monetary value, engagement, cart, affinity."""
    recency_h = (session["start_ms"] - before.last_end_ms) / HOUR_MS if before.last_end_ms is not None else 0.0
    return {
        "recency": math.log1p(max(recency_h, 0.0)),
        "frequency": math.log1p(after.sessions),
        "monetary": math.log1p(after.revenue_cents / 100),
        "engagement": math.log1p(session["n_events"]),
        "cart": math.log1p(session["n_cart_adds"]),
        "affinity": affinity(session["categories"]) if focus is None else focus,
    }


class Propensity:
    def __init__(self, learning_rate: float = 0.05):
        self.model = compose.Pipeline(
            preprocessing.StandardScaler(),
            linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate)),
        )
        self.roc_auc = metrics.ROCAUC()
        self.log_loss = metrics.LogLoss()
        self.samples = 0
        self.positives = 0

    def predict_one(self, x: dict[str, float]) -> float:
        return float(self.model.predict_proba_one(x).get(True, 0.5))

    def learn_one(self, x: dict[str, float], y: bool, predicted: float) -> None:
        """Progressive validation: the metrics see the prediction made before learning."""
        self.roc_auc.update(y, predicted)
        self.log_loss.update(y, predicted)
        self.model.learn_one(x, y)
        self.samples += 1
        self.positives += int(y)

    def metrics(self) -> dict:
        return {
            "samples": self.samples,
            "positives": self.positives,
            "roc_auc": round(float(self.roc_auc.get()), 6) if self.samples else None,
            "log_loss": round(float(self.log_loss.get()), 6) if self.samples else None,
        }


def _distance(a: dict[str, float], b: dict[str, float]) -> float:
    return sum((a.get(k, 0.0) - b.get(k, 0.0)) ** 2 for k in set(a) | set(b))


def segment_name(centroid: dict[str, float], others: list[dict[str, float]] | None = None) -> str:
    """A readable name from a centroid in standard units, read against the other
    centroids (their mean is the reference), so k segments get distinct traits."""
    reference = {k: sum(o.get(k, 0.0) for o in others) / len(others) for k in SEGMENT_FEATURES} if others else {}
    rel = {k: centroid.get(k, 0.0) - reference.get(k, 0.0) for k in SEGMENT_FEATURES}
    hi = {k: v > 0.3 for k, v in rel.items()}
    if hi["monetary"] and hi["frequency"]:
        return "high-value frequent buyer"
    if hi["monetary"]:
        return "big spender"
    if hi["recency"]:
        return "lapsed, returning"
    if hi["frequency"]:
        return "frequent visitor"
    if hi["cart"]:
        return "cart filler"
    if hi["engagement"]:
        return "browser"
    if hi["affinity"]:
        return "category loyalist"
    return "casual visitor"


class Segmenter:
    """KMeans on standardized profile vectors, learned per mini-batch, with stable ids."""

    def __init__(self, k: int, batch: int, seed: int = 42):
        self.k = k
        self.batch_size = batch
        self.scaler = preprocessing.StandardScaler()
        self.kmeans = cluster.KMeans(n_clusters=k, halflife=0.3, sigma=1.0, seed=seed)
        self.pending: list[dict[str, float]] = []
        self.batches = 0
        self.ids: dict[int, str] = {}           # KMeans cluster index -> stable id
        self.centroids: dict[str, dict] = {}    # stable id -> centroid (standard units)
        self.names: dict[str, str] = {}

    @property
    def version(self) -> str:
        return f"kmeans-k{self.k}-b{self.batches}"

    def learn_one(self, x: dict[str, float]) -> bool:
        """Queue a profile; learn the queued mini-batch when it is full. True when it learned."""
        self.pending.append(x)
        if len(self.pending) < self.batch_size:
            return False
        self.learn_many(self.pending)
        self.pending = []
        return True

    def learn_many(self, xs: list[dict[str, float]]) -> None:
        for x in xs:
            self.scaler.learn_one(x)
        for x in xs:
            self.kmeans.learn_one(self.scaler.transform_one(x))
        self.batches += 1
        self._match({i: {k: float(v) for k, v in c.items()} for i, c in self.kmeans.centers.items()})

    def _match(self, centers: dict[int, dict[str, float]]) -> None:
        """Give each new centroid the id of the nearest previous one, nearest pairs first."""
        if not self.centroids:
            self.ids = {i: f"s{n}" for n, i in enumerate(sorted(centers))}
        else:
            pairs = sorted(
                (_distance(self.centroids[sid], c), sid, i)
                for sid in self.centroids for i, c in centers.items()
            )
            ids: dict[int, str] = {}
            taken: set[str] = set()
            for _, sid, i in pairs:
                if i not in ids and sid not in taken:
                    ids[i] = sid
                    taken.add(sid)
            self.ids = ids
        self.centroids = {self.ids[i]: c for i, c in centers.items()}
        everyone = list(self.centroids.values())
        self.names = {sid: segment_name(c, everyone) for sid, c in self.centroids.items()}

    def predict_one(self, x: dict[str, float]) -> str | None:
        """The stable segment id, or None before the first mini-batch was learned."""
        if not self.batches:
            return None
        return self.ids[self.kmeans.predict_one(self.scaler.transform_one(x))]


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
    """The job's models and what they report (one instance, in keyed state)."""

    propensity: Propensity
    segmenter: Segmenter
    segment_sizes: Counter = field(default_factory=Counter)
    sessions: int = 0
    updated_ms: int = 0

    @classmethod
    def new(cls, k: int, batch: int) -> Models:
        return cls(Propensity(), Segmenter(k, batch))

    def snapshot(self) -> dict:
        seg = self.segmenter
        return {
            "propensity": self.propensity.metrics(),
            "segments": {
                sid: {"name": seg.names.get(sid), "users": self.segment_sizes.get(sid, 0),
                      "centroid": {k: round(float(v), 4) for k, v in sorted(seg.centroids.get(sid, {}).items())}}
                for sid in sorted(seg.centroids)
            },
            "model_version": seg.version,
            "sessions_seen": self.sessions,
            "updated_ms": self.updated_ms,
        }
