"""The live profile: each user's whole state in one keyed JVM operator, updated per event.

``changes`` puts the job's events through operators/jvm's personalize.profile.LiveState:
the events view's rows, keyed by user id in the JVM, into a keyed function
(``LiveStateFunction``) that holds per user the totals of the events with
personalization consent, events by hour, the sliding "recent" window as slices, and the
sessions still open, with their net cart. After every change (an event, or a session
closing on its event-time timer) it emits a ``live`` row: the user's profile fields, with
the score of the session so far under the newest propensity model (``session_propensity``:
the models step publishes its weights and scaler on the model-snapshots topic, which a
thread in the JVM follows), and a ``version`` that only grows (the newest event time x
10,000 + the changes since). Each closed session also comes out as a ``closed`` row, its
SESSION_COLUMNS packed in one string for the models' Python step
(``operators.sessions.unpack``): Python sees closed sessions only.

The state is the JVM object itself (changed in place on the heap backend), and rows cross
between the SQL and the function as Flink's internal rows: a Java process table function
with the same logic cost about 10 us an event against 1-2 here (scripts/bench_windows.py).

The live rows go to the live changelog topic at-least-once, without waiting for a
checkpoint (``sinks.kafka.profile_live_sink`` keeps the newest row per user for
``profile_flush_ms``); the Redis loader applies a row only when its version is newer
than the profile's, so a replay after a failure repeats values but never leaves a
profile older than the newest event applied.

Recent window: the consented events (and product views) of the ``recent_window_ms``
ending at the slice boundary (``recent_slide_ms``) after the user's newest event.
"""

from __future__ import annotations

from operators.windows import EVENT_TYPES, not_erased
from personalize.settings import Settings

CLASS = "personalize.profile.LiveState"
LIVE, CLOSED = "live", "closed"
# the operator's uid (savepoints map its state by it; the process table function of earlier
# releases was "live-profile", a state this one does not read)
UID = "live-state"
NAME = "live state per user"

# the function's output after the user id: see LiveStateFunction.OUTPUT
LIVE_COLUMNS = (
    ("version", "BIGINT"),
    ("epoch", "BIGINT"),
    ("consent", "BOOLEAN"),
    ("consent_ms", "BIGINT"),
    ("n_events", "BIGINT"),
    *((f"n_{t}", "BIGINT") for t in EVENT_TYPES),
    ("revenue_cents", "BIGINT"),
    ("first_seen_ms", "BIGINT"),
    ("last_seen_ms", "BIGINT"),
    ("events_by_hour", "STRING"),
    ("recent_events", "BIGINT"),
    ("recent_product_views", "BIGINT"),
    ("recent_window_end_ms", "BIGINT"),
    # the session in progress (absent when none is open)
    ("session_start_ms", "BIGINT"),
    ("session_events", "BIGINT"),
    ("session_product_views", "BIGINT"),
    ("session_products", "BIGINT"),
    ("session_cart", "STRING"),
    ("session_cart_value", "STRING"),
    ("session_last_cart_add_ms", "BIGINT"),
    ("session_top_category", "STRING"),
    # the newest propensity model's score of the session so far (no model published yet: absent)
    ("session_propensity", "STRING"),
    # derived, as the profile shows them (the loader writes a row's fields as they come)
    ("revenue", "STRING"),
    ("updated_ms", "BIGINT"),
    ("active_hours", "STRING"),
    # the newest distinct products bought with personalization consent, newest first (a JSON
    # array of ids, at most UserState.BOUGHT_KEPT; absent before the first purchase)
    ("purchased_products", "STRING"),
)
# the fields of the session in progress as Redis holds them: a change without a session
# open deletes them from the profile
SESSION_FIELDS = ("session_start_ms", "session_events", "session_product_views", "session_products",
                  "session_cart", "session_cart_value", "session_last_cart_add_ms", "session_top_category",
                  "session_propensity")


def function_args(settings: Settings, *, bounded: bool = False) -> tuple:
    """The live state's settings, as LiveState.changes takes them after the uid and name:
    gap, recent window and slide, list limit, state TTL, whether the run is bounded (a
    backfill's live rows come at session closes only: its sink keeps each user's newest row
    until the end anyway), and the models' snapshot topic with the Kafka properties to read
    it (the job's credentials)."""
    from personalize import credentials

    kafka = {"bootstrap.servers": settings.bootstrap_servers, **credentials.kafka_java(settings)}
    return (str(settings.session_gap_ms), str(settings.recent_window_ms), str(settings.recent_slide_ms),
            str(settings.session_list_limit), str(settings.state_ttl_ms), str(bounded).lower(),
            settings.topic_model_snapshots, kafka)


def live_rows(view: str, erasure_filter: bool = True) -> str:
    """The live rows of ``view`` (``changes``), but none of state an erasure superseded since."""
    columns = ", ".join(name for name, _ in LIVE_COLUMNS)
    where = not_erased(erasure_filter)
    return (f"SELECT user_id, {columns} FROM {view} "
            f"{where + ' AND' if where else 'WHERE'} kind = '{LIVE}'")


def closed_sessions(view: str, erasure_filter: bool = True) -> str:
    """The packed closed-session rows of ``view`` (one STRING column, ``session``)."""
    where = not_erased(erasure_filter)
    return f"SELECT session FROM {view} {where + ' AND' if where else 'WHERE'} kind = '{CLOSED}'"


def changes(t_env, view: str, settings: Settings, *, bounded: bool):
    """Every change of every user's live state (both kinds of rows) from the events of
    ``view``, as a table: operators/jvm's LiveState.changes, called through the gateway
    (the class is in the udf jar, found by the user class loader as the job's functions are).
    Both readers (the live rows' sink, the models' closed sessions) read the one operator."""
    from pyflink.java_gateway import get_gateway
    from pyflink.table import Table

    from personalize.flink import java_static

    *strings, kafka = function_args(settings, bounded=bounded)
    java_kafka = get_gateway().jvm.java.util.HashMap()
    for key, value in kafka.items():
        java_kafka.put(key, value)
    # a query's columns are all physical (the view's computed rowtime too), as the DataStream needs
    events = t_env.sql_query(f"SELECT * FROM {view}")
    changed = java_static(CLASS, "changes",
                          (t_env._j_tenv, "org.apache.flink.table.api.bridge.java.StreamTableEnvironment"),
                          (events._j_table, "org.apache.flink.table.api.Table"),
                          *((value, "java.lang.String") for value in (UID, NAME, *strings)),
                          (java_kafka, "java.util.Map"))
    return Table(changed, t_env)
