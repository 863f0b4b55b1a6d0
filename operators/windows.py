"""The windows, as Flink SQL over the decoded event view: they run in the JVM.

Per-event stateful work stays in Flink's JVM operators, and there it is the number
and shape of operators that costs (DESIGN.md): each query here is written once,
emits typed rows, and nothing re-aggregates a window's results (no retraction
chain, no string map). Per event, four keyed JVM operators:

- ``totals``   continuous GROUP BY user: counts per event type, revenue (integer
               cents), first/last seen, events per hour of day (UTC), of the
               events with personalization consent, and the flag of the user's
               latest event
- ``recent``   sliding (HOP) window per user: events and product views in each
               window; the profile keeps the newest (the upsert sink keeps the
               last row per user, and windows fire in end order)
- sessions     one SESSION window per user (``operators.sessions``), shared by the
               profile's session fields and the models: its closed sessions are
               folded per user once, in ``operators.actions``
- ``trending`` global tumbling window: top products per category (Window Top-N)

Each profile part is an upsert keyed by (user_id, part) on the profile changelog
topic, which the Redis loader merges into ``profile:{user_id}``.

Erasure (``personalize forget``): every per-user query groups by (user_id, epoch), the
time of the user's newest erasure the decode knew when it read the event (0: none), so a
forgotten user's next event starts from nothing; a row of state older than the user's
newest erasure is not written (``erased_since``, a JVM function over the erasures the
TaskManager knows) and that state is never read again: it expires (state TTL).
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


def _count_of(event_type: str, where: str = "") -> str:
    return f"COUNT(*) FILTER (WHERE event_type = '{event_type}'{where})"


def revenue(where: str = "") -> str:
    """Revenue in cents of the purchases (that meet ``where``); a purchase without a price
    (Taobao logs carry none) adds 0, so the sum is never NULL."""
    return f"SUM(CASE WHEN event_type = 'purchase'{where} THEN COALESCE(price_cents, 0) * quantity ELSE 0 END)"


REVENUE = revenue()
# the profile counts only events that carry personalization consent: what a user did
# while consent was withdrawn is never written, not even after consent is given again
CONSENTED = " AND consent_personalization"
# the consent flag of the user's latest event by event time, as a mergeable MAX
# (LAST_VALUE cannot merge, so it cannot run in session windows): the event time
# shifted left one bit with the flag in the low bit; MAX of these keeps the newest
CONSENT_KEY = "MAX(event_time_ms * 2 + CASE WHEN consent_personalization THEN 1 ELSE 0 END)"


def _consent(key: str) -> str:
    return f"MOD({key}, 2) = 1"


def _consent_ms(key: str) -> str:
    """The event time of the latest event (event times are never negative: Kafka's are not)."""
    return f"{key} / 2"


# the typed columns of each SQL profile part (besides user_id and part): (name, SQL type)
TOTALS_COLUMNS = (
    ("n_events", "BIGINT"),
    *((f"n_{t}", "BIGINT") for t in EVENT_TYPES),
    ("revenue_cents", "BIGINT"),
    ("first_seen_ms", "BIGINT"),
    ("last_seen_ms", "BIGINT"),
    ("events_by_hour", "STRING"),
    ("consent", "BOOLEAN"),
    # the time of the event the flag is from: the Redis loader orders consent changes
    # and parts by it (not a profile field)
    ("consent_ms", "BIGINT"),
    # the user's erasure this state began after (0: none); the loader drops a part of
    # before the user's newest erasure (not a profile field)
    ("epoch", "BIGINT"),
)
RECENT_COLUMNS = (
    ("recent_events", "BIGINT"),
    ("recent_product_views", "BIGINT"),
    ("recent_window_end_ms", "BIGINT"),
    ("consent", "BOOLEAN"),
    ("consent_ms", "BIGINT"),
    ("epoch", "BIGINT"),
)


def not_erased(erasure_filter: bool) -> str:
    """The WHERE clause that keeps rows of state no erasure has superseded since."""
    return f"WHERE NOT {ERASED_SINCE}(user_id, epoch)" if erasure_filter else ""


def totals(view: str, erasure_filter: bool = True) -> str:
    """One continuous aggregate per user and epoch (mini-batched: one update per user per batch)."""
    counts = ", ".join(f"{_count_of(t, CONSENTED)} AS n_{t}" for t in EVENT_TYPES)
    hours = ", ".join(f"COUNT(*) FILTER (WHERE hour_of_day = {h}{CONSENTED}) AS h{h}" for h in range(24))
    seen = "CASE WHEN consent_personalization THEN event_time_ms END"
    per_user = f"""
        SELECT user_id, epoch, COUNT(*) FILTER (WHERE consent_personalization) AS n_events, {counts},
               {revenue(CONSENTED)} AS revenue_cents, MIN({seen}) AS first_seen_ms, MAX({seen}) AS last_seen_ms,
               {hours}, {CONSENT_KEY} AS consent_key
        FROM {view} GROUP BY user_id, epoch"""
    by_hour = ", ".join(f"CAST(h{h} AS STRING)" for h in range(24))
    return f"""
        SELECT user_id, 'totals' AS part, n_events, {', '.join(f'n_{t}' for t in EVENT_TYPES)}, revenue_cents,
               first_seen_ms, last_seen_ms, CONCAT_WS(',', {by_hour}) AS events_by_hour,
               {_consent('consent_key')} AS consent, {_consent_ms('consent_key')} AS consent_ms, epoch
        FROM ({per_user}) {not_erased(erasure_filter)}"""


def recent(view: str, settings: Settings, erasure_filter: bool = True) -> str:
    """Sliding windows per user, straight to the changelog: the newest window wins per user.

    Each event lands in ``recent_window_ms / recent_slide_ms`` windows; that ratio
    is what the window costs (``scripts/bench_windows.py recent``)."""
    per_window = f"""
        SELECT user_id, 'recent' AS part, COUNT(*) FILTER (WHERE consent_personalization) AS recent_events,
               {_count_of('product_view', CONSENTED)} AS recent_product_views,
               {epoch_ms('window_end')} AS recent_window_end_ms,
               {_consent(CONSENT_KEY)} AS consent, {_consent_ms(CONSENT_KEY)} AS consent_ms, epoch
        FROM TABLE(HOP(TABLE {view}, DESCRIPTOR(rowtime),
                       {interval(settings.recent_slide_ms)}, {interval(settings.recent_window_ms)}))
        GROUP BY user_id, epoch, window_start, window_end"""
    return f"SELECT * FROM ({per_window}) {not_erased(erasure_filter)}"


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
