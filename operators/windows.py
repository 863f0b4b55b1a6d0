"""The windows left in Flink SQL over the decoded event view (they run in the JVM), and
the SQL helpers the job's queries share.

Each user's own state (totals, hours, the sliding "recent" window, sessions) lives in one
keyed JVM function, ``operators.live``; what stays here is global:

- ``trending`` global tumbling window: top products per category (Window Top-N)

Erasure (``personalize forget``): every per-user output row carries ``epoch``, the time
of the user's newest erasure the decode knew when it read the event (0: none), so a
forgotten user's next event starts from nothing; a row of state older than the user's
newest erasure is not written (``erased_since``, a JVM function over the erasures the
TaskManager knows).
"""

from __future__ import annotations

from personalize.settings import Settings

# the SQL function that tells a row of state begun before the user's newest erasure
# (ErasureFunction.Superseded, registered by jobs/profile.py)
ERASED_SINCE = "erased_since"

EVENT_TYPES = ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout", "purchase", "search")


def interval(ms: int) -> str:
    """A SQL interval of exactly ``ms`` milliseconds (day-to-second, millisecond precision)."""
    seconds, millis = divmod(ms, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"INTERVAL '{days} {hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}' DAY TO SECOND(3)"


def epoch_ms(column: str) -> str:
    """A TIMESTAMP(3)/TIMESTAMP_LTZ(3) (UTC session time zone) as epoch milliseconds, BIGINT.

    Whole days since 1970 plus the time of day: TIMESTAMPDIFF returns INT, so seconds
    since 1970 overflow after 2038-01-19 (a 2040 window end came out negative)."""
    ts = f"CAST({column} AS TIMESTAMP(3))"
    day = f"CAST(CAST({ts} AS DATE) AS TIMESTAMP(3))"
    return (f"(CAST(TIMESTAMPDIFF(DAY, TIMESTAMP '1970-01-01 00:00:00', {day}) AS BIGINT) * 86400000"
            f" + CAST(TIMESTAMPDIFF(SECOND, {day}, {ts}) AS BIGINT) * 1000 + EXTRACT(MILLISECOND FROM {ts}))")


def not_erased(erasure_filter: bool) -> str:
    """The WHERE clause that keeps rows of state no erasure has superseded since."""
    return f"WHERE NOT {ERASED_SINCE}(user_id, epoch)" if erasure_filter else ""


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
               {epoch_ms('window_end')} AS window_end_ms,
               rn AS `rank`
        FROM ({ranked}) WHERE rn <= {settings.trending_top_n}"""
