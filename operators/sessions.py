"""Closed sessions, one row each, for the models and the cart-abandonment triggers.

A session window per user in the JVM (the same gap rule as the profile's
``sessions`` part) sums what the models and triggers need and lists the cart moves
and categories as short strings; only these rows, about one per ten events, reach
Python (``operators.actions``). Columns are SESSION_COLUMNS.
"""

from __future__ import annotations

from operators.windows import REVENUE, _count_of, interval
from personalize.settings import Settings

# separators inside the listed strings (ASCII unit/record separators: in no id)
FIELD_SEP = "\x1f"
ITEM_SEP = "\x1e"

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
    # the last event that is neither checkout nor purchase: the session "so far"
    # for the propensity model ends there, so the outcome leaks into no feature
    ("browse_end_ms", "BIGINT"),
    ("cart_moves", "STRING"),
    ("categories", "STRING"),
    ("consent_personalization", "BOOLEAN"),
    ("consent_marketing", "BOOLEAN"),
)


def _latest_flag(column: str) -> str:
    """The flag of the session's latest event, as a mergeable MAX (see windows.CONSENT_KEY)."""
    key = f"MAX(event_time_ms * 2 + CASE WHEN {column} THEN 1 ELSE 0 END)"
    return f"MOD({key}, 2) = 1"


def session_closes(view: str, settings: Settings) -> str:
    """One row per closed session (SESSION_COLUMNS), emitted when the watermark passes its end + gap."""
    gap = interval(settings.session_gap_ms - 1)
    # LISTAGG wants a literal separator: a Unicode-escaped string literal
    sep, item = (f"U&'\\{ord(c):04X}'" for c in (FIELD_SEP, ITEM_SEP))
    move = (
        f"CASE WHEN event_type IN ('add_to_cart', 'remove_from_cart') THEN CONCAT_WS({sep}, "
        "CASE WHEN event_type = 'add_to_cart' THEN '+' ELSE '-' END, product_id, CAST(quantity AS STRING), "
        "COALESCE(CAST(price_cents AS STRING), ''), CAST(event_time_ms AS STRING)) END"
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
               MAX(CASE WHEN event_type NOT IN ('checkout', 'purchase') THEN event_time_ms END) AS browse_end_ms,
               LISTAGG({move}, {item}) AS cart_moves,
               LISTAGG(category, {item}) AS categories,
               {_latest_flag('consent_personalization')} AS consent_personalization,
               {_latest_flag('consent_marketing')} AS consent_marketing
        FROM TABLE(SESSION(TABLE {view} PARTITION BY user_id, DESCRIPTOR(rowtime), {gap}))
        GROUP BY user_id, window_start, window_end"""
