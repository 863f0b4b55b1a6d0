"""The windows, as Flink SQL over the decoded event view: they run in the JVM.

Per-event stateful work stays in Flink's JVM operators (DESIGN.md: ~260k events/s
for a session window in SQL against ~3k in a Python window). Each per-user query
yields rows ``(user_id, part, fields)``: one *part* of the profile with its
fields as strings, an upsert keyed by (user_id, part) into the profile changelog
topic, which the Redis loader materializes into ``profile:{user_id}``.

- ``totals``     continuous per-user aggregate: counts per event type, revenue, first/last seen
- ``sessions``   session windows (inactivity gap), then per user: sessions, durations
- ``hours``      tumbling windows per user (activity per hour of day), then per user
- ``recent``     sliding (hop) windows per user: events and product views lately
- ``top_category_N`` per-user top categories (Top-N over category counts)
- trending       global tumbling windows: top products per category (Window Top-N)

Every part carries ``consent``: the personalization flag of the user's latest
event in that part's input, so the loader writes nothing for users without it.
"""

from __future__ import annotations

from personalize.settings import Settings

EVENT_TYPES = ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout", "purchase", "search")
TOP_CATEGORIES = 3


def interval(ms: int) -> str:
    """A SQL interval of exactly ``ms`` milliseconds (day-to-second, millisecond precision)."""
    seconds, millis = divmod(ms, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"INTERVAL '{days} {hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}' DAY TO SECOND(3)"


def _map(**entries: str) -> str:
    pairs = ", ".join(f"'{name}', CAST({expr} AS STRING)" for name, expr in entries.items())
    return f"MAP[{pairs}]"


def _epoch_ms(column: str) -> str:
    """A window bound (TIMESTAMP(3) in UTC) as epoch milliseconds (BIGINT: INT overflows)."""
    return f"CAST(TIMESTAMPDIFF(SECOND, TIMESTAMP '1970-01-01 00:00:00', {column}) AS BIGINT) * 1000"


def _count_of(event_type: str) -> str:
    return f"SUM(CASE WHEN event_type = '{event_type}' THEN 1 ELSE 0 END)"


# a purchase without a price (Taobao logs carry none) adds 0, so the sum is never NULL
REVENUE = "SUM(CASE WHEN event_type = 'purchase' THEN COALESCE(price_cents, 0) * quantity ELSE 0 END)"
# the consent flag of the user's latest event by event time, as a mergeable MAX
# (LAST_VALUE cannot merge, so it cannot run in session windows): the event time
# shifted left one bit with the flag in the low bit; MAX of these keeps the newest
CONSENT_KEY = "MAX(event_time_ms * 2 + CASE WHEN consent_personalization THEN 1 ELSE 0 END)"


def _consent(key: str = "consent_key") -> str:
    """The consent field from per-window consent keys."""
    return f"CASE WHEN MOD(MAX({key}), 2) = 1 THEN 'true' ELSE 'false' END"


def _consent_now() -> str:
    """The consent field straight from events."""
    return f"CASE WHEN MOD({CONSENT_KEY}, 2) = 1 THEN 'true' ELSE 'false' END"


def totals(view: str) -> str:
    counts = {f"n_{t}": _count_of(t) for t in EVENT_TYPES}
    fields = _map(
        n_events="COUNT(*)",
        **counts,
        revenue_cents=REVENUE,
        first_seen_ms="MIN(event_time_ms)",
        last_seen_ms="MAX(event_time_ms)",
        consent=_consent_now(),
    )
    return f"SELECT user_id, 'totals' AS part, {fields} AS fields FROM {view} GROUP BY user_id"


def sessions(view: str, settings: Settings) -> str:
    """Session windows per user. Flink merges windows that touch, so the window gap is
    the configured gap less 1 ms: an event exactly ``gap`` after the previous one
    starts a new session, as DESIGN.md defines it."""
    gap = interval(settings.session_gap_ms - 1)
    per_session = f"""
        SELECT user_id, window_start, window_end,
               COUNT(*) AS n_events,
               {_count_of('add_to_cart')} AS cart_adds,
               {_count_of('remove_from_cart')} AS cart_removes,
               {_count_of('purchase')} AS purchases,
               {REVENUE} AS revenue_cents,
               MIN(event_time_ms) AS start_ms,
               MAX(event_time_ms) AS end_ms,
               {CONSENT_KEY} AS consent_key
        FROM TABLE(SESSION(TABLE {view} PARTITION BY user_id, DESCRIPTOR(rowtime), {gap}))
        GROUP BY user_id, window_start, window_end"""
    fields = _map(
        n_sessions="COUNT(*)",
        session_ms_total="SUM(end_ms - start_ms)",
        avg_session_ms="SUM(end_ms - start_ms) / COUNT(*)",
        last_session_start_ms="MAX(start_ms)",
        last_session_events="LAST_VALUE(n_events)",
        last_session_cart_adds="LAST_VALUE(cart_adds)",
        last_session_cart_removes="LAST_VALUE(cart_removes)",
        last_session_purchases="LAST_VALUE(purchases)",
        last_session_revenue_cents="LAST_VALUE(revenue_cents)",
        consent=_consent(),
    )
    return f"SELECT user_id, 'sessions' AS part, {fields} AS fields FROM ({per_session}) GROUP BY user_id"


def hours(view: str, settings: Settings) -> str:
    """Tumbling activity windows per user, folded into events per hour of day (UTC)."""
    per_window = f"""
        SELECT user_id, window_start, COUNT(*) AS n, {CONSENT_KEY} AS consent_key
        FROM TABLE(TUMBLE(TABLE {view}, DESCRIPTOR(rowtime), {interval(settings.activity_window_ms)}))
        GROUP BY user_id, window_start, window_end"""
    by_hour = ", ".join(
        f"CAST(SUM(CASE WHEN HOUR(window_start) = {h} THEN n ELSE 0 END) AS STRING)" for h in range(24)
    )
    fields = f"MAP['events_by_hour', CONCAT_WS(',', {by_hour}), 'consent', {_consent()}]"
    return f"SELECT user_id, 'hours' AS part, {fields} AS fields FROM ({per_window}) GROUP BY user_id"


def recent(view: str, settings: Settings) -> str:
    """Sliding windows per user; the profile keeps the newest window's figures."""
    per_window = f"""
        SELECT user_id, window_end, COUNT(*) AS n, {_count_of('product_view')} AS n_views,
               {CONSENT_KEY} AS consent_key
        FROM TABLE(HOP(TABLE {view}, DESCRIPTOR(rowtime),
                       {interval(settings.recent_slide_ms)}, {interval(settings.recent_window_ms)}))
        GROUP BY user_id, window_start, window_end"""
    fields = _map(
        recent_events="LAST_VALUE(n)",
        recent_product_views="LAST_VALUE(n_views)",
        recent_window_end_ms=f"MAX({_epoch_ms('window_end')})",
        consent=_consent(),
    )
    return f"SELECT user_id, 'recent' AS part, {fields} AS fields FROM ({per_window}) GROUP BY user_id"


def top_categories(view: str) -> str:
    counts = f"""
        SELECT user_id, category, COUNT(*) AS cnt, {CONSENT_KEY} AS consent_key
        FROM {view} WHERE category IS NOT NULL GROUP BY user_id, category"""
    ranked = f"""
        SELECT user_id, category, cnt, consent_key,
               ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY cnt DESC, category ASC) AS rn
        FROM ({counts})"""
    name = "CONCAT('top_category_', CAST(rn AS STRING))"
    fields = (
        f"MAP[{name}, category, CONCAT({name}, '_events'), CAST(cnt AS STRING), "
        "'consent', CASE WHEN MOD(consent_key, 2) = 1 THEN 'true' ELSE 'false' END]"
    )
    return f"SELECT user_id, {name} AS part, {fields} AS fields FROM ({ranked}) WHERE rn <= {TOP_CATEGORIES}"


def trending(view: str, settings: Settings) -> str:
    """Top products per category per tumbling window, counting only analytics-consented views."""
    counts = f"""
        SELECT window_start, window_end, COALESCE(category, '') AS category, product_id, COUNT(*) AS view_count
        FROM TABLE(TUMBLE(TABLE {view}, DESCRIPTOR(rowtime), {interval(settings.trending_window_ms)}))
        WHERE event_type = 'product_view' AND consent_analytics
        GROUP BY window_start, window_end, COALESCE(category, ''), product_id"""
    ranked = f"""
        SELECT *, ROW_NUMBER() OVER (
            PARTITION BY window_start, window_end, category ORDER BY view_count DESC, product_id ASC) AS rn
        FROM ({counts})"""
    return f"""
        SELECT category, product_id, view_count AS `views`,
               {_epoch_ms('window_end')} AS window_end_ms,
               rn AS `rank`
        FROM ({ranked}) WHERE rn <= {settings.trending_top_n}"""


def profile_parts(view: str, settings: Settings) -> list[str]:
    return [
        totals(view),
        sessions(view, settings),
        hours(view, settings),
        recent(view, settings),
        top_categories(view),
    ]
