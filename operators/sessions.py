"""Closed sessions, one row each, for the models and the cart-abandonment triggers.

The live function (``operators.live``: personalize.profile.LiveProfile in the JVM) emits
one row per closed session, about one per ten events, with what the models and triggers
need: counts, and the cart moves, categories and product views as short strings (each
list keeps its first ``session_list_limit`` items: a session that never closes, a bot's,
holds bounded state). A row crosses into Python as ONE string (the SESSION_COLUMNS joined
by ``COLUMN_SEP``): PyFlink converts a row field by field, and each crossing of a 19-field
row cost more than the models themselves (measured, docs/benchmarks.md). ``unpack``
gives the dict.
"""

from __future__ import annotations

# separators inside the listed strings (ASCII unit/record separators: in no id)
FIELD_SEP = "\x1f"
ITEM_SEP = "\x1e"
COLUMN_SEP = "\x1d"

SESSION_COLUMNS = (
    ("user_id", "STRING"),
    ("start_ms", "BIGINT"),
    ("end_ms", "BIGINT"),
    ("n_events", "BIGINT"),
    ("n_page_views", "BIGINT"),
    ("n_product_views", "BIGINT"),
    ("n_searches", "BIGINT"),
    ("n_cart_adds", "BIGINT"),
    ("n_cart_removes", "BIGINT"),
    ("n_checkouts", "BIGINT"),
    ("n_purchases", "BIGINT"),
    ("revenue_cents", "BIGINT"),
    # the first checkout or purchase: the propensity's features read only events before it
    ("outcome_ms", "BIGINT"),
    ("cart_moves", "STRING"),
    ("categories", "STRING"),
    # product views: product, category, event time
    ("viewed", "STRING"),
    ("consent_personalization", "BOOLEAN"),
    ("consent_marketing", "BOOLEAN"),
    # the user's erasure the session began after (0: none; operators.windows, "Erasure")
    ("epoch", "BIGINT"),
)


def _read_bigint(text: str) -> int | None:
    return int(text) if text else None


# how each packed column is read back (LiveProfile wrote it): '' is NULL, booleans are '1'/'0'
_READERS = tuple(
    (name, {"BIGINT": _read_bigint, "STRING": lambda t: t or None, "BOOLEAN": lambda t: t == "1"}[sql])
    for name, sql in SESSION_COLUMNS
)


def unpack(packed: str) -> dict:
    """The SESSION_COLUMNS of a packed closed-session row (UserState.Session.packed in the JVM), typed."""
    return {name: read(text) for (name, read), text in zip(_READERS, packed.split(COLUMN_SEP), strict=True)}
