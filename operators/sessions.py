"""Closed sessions, one row each, for the models and the cart-abandonment triggers.

A session window per user in the JVM (the same gap rule as the profile's
``sessions`` part) sums what the models and triggers need and lists the cart moves,
categories and product views as short strings; only these rows, about one per ten
events, reach Python (``operators.actions``). A row crosses into Python as ONE
string column (``PACKED``: the SESSION_COLUMNS joined by ``COLUMN_SEP``): PyFlink
converts a row field by field, and each crossing of a 19-field row cost more than
the models themselves (measured, docs/benchmarks.md). ``unpack`` gives the dict.
"""

from __future__ import annotations

from operators.windows import REVENUE, _count_of, interval, not_erased
from personalize.settings import Settings

# separators inside the listed strings (ASCII unit/record separators: in no id)
FIELD_SEP = "\x1f"
ITEM_SEP = "\x1e"
COLUMN_SEP = "\x1d"
PACKED = (("session", "STRING"),)
# LISTAGG(item, ITEM_SEP) of the first Settings.session_list_limit items (a JVM aggregate,
# registered by jobs.profile.session_functions): a session that never closes holds bounded state
BOUNDED_LIST = "bounded_list"

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


def _latest_flag(column: str) -> str:
    """The flag of the session's latest event, as a mergeable MAX (see windows.CONSENT_KEY)."""
    key = f"MAX(event_time_ms * 2 + CASE WHEN {column} THEN 1 ELSE 0 END)"
    return f"MOD({key}, 2) = 1"


def _read_bigint(text: str) -> int | None:
    return int(text) if text else None


# how each packed column is read back (``_as_text`` wrote it): '' is NULL, booleans are '1'/'0'
_READERS = tuple(
    (name, {"BIGINT": _read_bigint, "STRING": lambda t: t or None, "BOOLEAN": lambda t: t == "1"}[sql])
    for name, sql in SESSION_COLUMNS
)


def unpack(packed: str) -> dict:
    """The SESSION_COLUMNS of a packed session row (``session_closes``), typed."""
    return {name: read(text) for (name, read), text in zip(_READERS, packed.split(COLUMN_SEP), strict=True)}


def session_closes(view: str, settings: Settings, erasure_filter: bool = True) -> str:
    """One row per closed session, its SESSION_COLUMNS packed in one string (``unpack``),
    emitted when the watermark passes the session's end + gap (none of state an erasure
    of the user superseded since)."""
    columns = ", ".join(_as_text(name, sql) for name, sql in SESSION_COLUMNS)
    return (f"SELECT CONCAT_WS(U&'\\{ord(COLUMN_SEP):04X}', {columns}) AS session "
            f"FROM ({session_rows(view, settings)}) {not_erased(erasure_filter)}")


def _as_text(name: str, sql: str) -> str:
    # CONCAT_WS skips NULLs: every column becomes a non-NULL string ('' for NULL)
    if sql == "BOOLEAN":
        return f"CASE WHEN {name} THEN '1' ELSE '0' END"
    return f"COALESCE(CAST({name} AS STRING), '')"


def session_rows(view: str, settings: Settings) -> str:
    """One typed row per closed session (SESSION_COLUMNS)."""
    gap = interval(settings.session_gap_ms - 1)
    # a Unicode-escaped string literal: no control character in the SQL text
    sep = f"U&'\\{ord(FIELD_SEP):04X}'"
    move = (
        f"CASE WHEN event_type IN ('add_to_cart', 'remove_from_cart') THEN CONCAT_WS({sep}, "
        "CASE WHEN event_type = 'add_to_cart' THEN '+' ELSE '-' END, product_id, CAST(quantity AS STRING), "
        "COALESCE(CAST(price_cents AS STRING), ''), CAST(event_time_ms AS STRING)) END"
    )
    view_item = (
        f"CASE WHEN event_type = 'product_view' THEN CONCAT_WS({sep}, COALESCE(product_id, ''), "
        "COALESCE(category, ''), CAST(event_time_ms AS STRING)) END"
    )
    return f"""
        SELECT user_id,
               MIN(event_time_ms) AS start_ms,
               MAX(event_time_ms) AS end_ms,
               COUNT(*) AS n_events,
               {_count_of('page_view')} AS n_page_views,
               {_count_of('product_view')} AS n_product_views,
               {_count_of('search')} AS n_searches,
               {_count_of('add_to_cart')} AS n_cart_adds,
               {_count_of('remove_from_cart')} AS n_cart_removes,
               {_count_of('checkout')} AS n_checkouts,
               {_count_of('purchase')} AS n_purchases,
               {REVENUE} AS revenue_cents,
               MIN(CASE WHEN event_type IN ('checkout', 'purchase') THEN event_time_ms END) AS outcome_ms,
               {BOUNDED_LIST}({move}) AS cart_moves,
               {BOUNDED_LIST}(category) AS categories,
               {BOUNDED_LIST}({view_item}) AS viewed,
               {_latest_flag('consent_personalization')} AS consent_personalization,
               {_latest_flag('consent_marketing')} AS consent_marketing,
               epoch
        FROM TABLE(SESSION(TABLE {view} PARTITION BY (user_id, epoch), DESCRIPTOR(rowtime), {gap}))
        GROUP BY user_id, epoch, window_start, window_end"""
