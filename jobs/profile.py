"""The profile job: Avro events -> decode (a Java scalar function in SQL, once per event)
-> each user's live state in one JVM function (``operators.live``) -> the live profile
changelog on Kafka (at-least-once, per-user versions, no checkpoint wait); trending
products and dead letters on Kafka (exactly-once); closed sessions -> session fields,
models, segment changes and cart-abandonment triggers (Python, once per session) -> the
profile's sessions part (at-least-once, versioned by the session's close) and the
trigger and segment-change feeds (exactly-once; triggers also at-least-once for the
Redis stream's fast path).

Redis is materialized from the changelogs by ``sinks.redis``: the profile's parts as soon
as they are written (a change applies only when newer than what the profile holds), the
trending windows and the feeds once their checkpoint commits them (read_committed).
"""

from __future__ import annotations

import argparse
import sys

from operators import actions, decode, live, windows
from personalize import credentials
from personalize.settings import Settings
from sinks import kafka as kafka_sinks

SOURCE = "events_source"
CHECKED_VIEW = "events_checked"
EVENTS_VIEW = "events_clean"
DEAD_LETTERS = "dead_letter_sink"
PROFILE_LIVE = "profile_live_sink"
LIVE_TOMBSTONES = "profile_live_tombstones_sink"
LIVE_VIEW = "live_changes"
PROFILE_SESSIONS = "profile_sessions_sink"
TRENDING = "trending_sink"
TRIGGERS = "triggers_sink"
TRIGGERS_LIVE = "triggers_live_sink"
SEGMENT_CHANGES = "segment_changes_sink"
MODEL_SNAPSHOTS = "model_snapshots_sink"
ACTIONS_VIEW = "session_actions"
ERASURES_SOURCE = "erasures_source"
ERASURES_VIEW = "erasures_applied"
DECODE_FUNCTION = "personalize.decode.DecodeEvent"
ERASED_SINCE_FUNCTION = "personalize.decode.ErasureFunction$Superseded"
ERASURE_APPLIED_FUNCTION = "personalize.decode.ErasureFunction$Applied"
DECODE_ERASURE_FUNCTION = "personalize.decode.ErasureFunction$Decode"
BATCHES_CLASS = "personalize.profile.SessionBatches"
BATCHES_UID = "model-batches"
BATCHES_NAME = "closed sessions in batches for the models"


def _row_type(columns):
    from pyflink.common import Types

    kinds = {
        "STRING": Types.STRING(),
        "BIGINT": Types.LONG(),
        "INT": Types.INT(),
        "BOOLEAN": Types.BOOLEAN(),
        "BYTES": Types.PRIMITIVE_ARRAY(Types.BYTE()),
    }
    return Types.ROW_NAMED([c for c, _ in columns], [kinds[t] for _, t in columns])


def configure(t_env, settings: Settings, *, bounded: bool) -> None:
    """The SQL planner's settings for the windows (mini-batch itself is switched on in ``build``)."""
    config = t_env.get_config()
    config.set("table.local-time-zone", "UTC")
    # LAST_VALUE/MAX tricks aside, every aggregate here merges; one phase keeps one state per key
    config.set("table.optimizer.agg-phase-strategy", "ONE_PHASE")
    # every profile part has its own key (user_id, part): no upsert materialization needed
    config.set("table.exec.sink.upsert-materialize", "NONE")
    # explicit uids on the SQL operators too, so a savepoint maps back onto the
    # same query at another parallelism (the DataStream operators set their own)
    config.set("table.exec.uid.generation", "ALWAYS")
    config.set("table.exec.mini-batch.allow-latency", "2 s")
    config.set("table.exec.mini-batch.size", "50000")
    # per-user state of the non-window operators (the totals aggregate) expires after this
    # long without an update for the user; windows clean up as they close. 0 ms: never
    config.set("table.exec.state.ttl", f"{settings.state_ttl_ms} ms")
    if not bounded:
        config.set("table.exec.source.idle-timeout", f"{settings.idle_timeout_ms} ms")


def _java_function(t_env, name: str, class_name: str, *args) -> None:
    """Register an instance of a class of operators/jvm, built with ``args`` (strings, or
    dicts for a java.util.Map), as the SQL function ``name``.

    The jar (built by `make setup` into lib/udf) is on pipeline.jars, or given to `flink
    run --jarfile`: the user class loader, where create_java_temporary_function finds it.
    An instance carries its arguments inside the job (the pseudonym key, Kafka credentials),
    so they appear in no SQL text, plan or operator name."""
    from pyflink.java_gateway import get_gateway

    gateway = get_gateway()
    cls = gateway.jvm.Thread.currentThread().getContextClassLoader().loadClass(class_name)
    types = gateway.new_array(gateway.jvm.Class, len(args))
    values = gateway.new_array(gateway.jvm.Object, len(args))
    for i, arg in enumerate(args):
        if isinstance(arg, dict):
            java_map = gateway.jvm.java.util.HashMap()
            for k, v in arg.items():
                java_map.put(k, v)
            types[i], values[i] = gateway.jvm.Class.forName("java.util.Map"), java_map
        else:
            types[i], values[i] = gateway.jvm.Class.forName("java.lang.String"), arg
    t_env._j_tenv.createTemporarySystemFunction(name, cls.getConstructor(types).newInstance(values))


def erasure_functions(t_env, settings: Settings) -> None:
    """``decode_event`` honouring the erasures topic, and the erasure path's functions
    (operators/jvm: ErasureFunction), each reading the topic with the job's credentials."""
    kafka = {"bootstrap.servers": settings.bootstrap_servers, **credentials.kafka_java(settings)}
    _java_function(t_env, "decode_event", DECODE_FUNCTION, settings.pseudonym_key, settings.topic_erasures, kafka)
    _java_function(t_env, windows.ERASED_SINCE, ERASED_SINCE_FUNCTION, settings.topic_erasures, kafka)
    _java_function(t_env, "erasure_applied", ERASURE_APPLIED_FUNCTION, settings.topic_erasures, kafka)
    _java_function(t_env, "decode_erasure", DECODE_ERASURE_FUNCTION)


def decoded_events(t_env, source: str, settings: Settings):
    """The source's records, each decoded once by the JVM function, behind a barrier.

    The planner copies a function call into every consumer of its result (DESIGN.md):
    ``to_data_stream`` -> ``from_data_stream`` right after the decode makes it run
    once per record whatever reads it (and so reads the erasures it knows once). The
    watermark the record met at the source (``wm``) is taken before the barrier, so
    lateness is what the source saw."""
    from pyflink.table import Schema

    erasure_functions(t_env, settings)
    raw = t_env.sql_query(
        f"SELECT `value`, `topic`, `partition`, `offset`, `ts`, CURRENT_WATERMARK(`ts`) AS wm, "
        f"decode_event(`value`) AS d FROM {source}")
    return t_env.from_data_stream(
        t_env.to_data_stream(raw),
        Schema.new_builder().watermark("ts", "SOURCE_WATERMARK()").build(),
    )


def model_batches(t_env, packed_sql: str, settings: Settings):
    """The packed session rows (one STRING column) in batches, as a KeyedStream on the
    constant key 0: keyed in the JVM and batched there (operators/jvm: SessionBatches,
    ``model_batch`` rows, ``model_flush_ms`` after a batch's first, or the end of input),
    so one row crosses into Python per batch, not per closed session.

    ``DataStream.key_by`` runs its key selector in Python: every row would cross into
    Python and back once more only to be given the key (PyFlink's ``AddKey``). Here the
    SQL emits the (key, value) rows that ``AddKey`` would, and the keyed streams are built
    as ``key_by`` builds them (PyFlink 2.2's own ``KeyByKeySelector`` on field 0); the
    keyed process function receives the value, the batch's rows in order."""
    from pyflink.common import Types
    from pyflink.datastream.data_stream import DataStream, KeyedStream
    from pyflink.java_gateway import get_gateway

    from personalize.flink import java_static

    gateway = get_gateway()
    rows = t_env.to_append_stream(t_env.sql_query(f"SELECT 0 AS k, session FROM ({packed_sql})"),
                                  Types.ROW([Types.INT(), Types.STRING()]))
    key_type = Types.ROW([Types.INT()]).get_java_type_info()
    j_keyed = rows._j_data_stream.keyBy(gateway.jvm.KeyByKeySelector(), key_type)
    j_batches = java_static(BATCHES_CLASS, "batched",
                            (j_keyed, "org.apache.flink.streaming.api.datastream.KeyedStream"),
                            *((value, "java.lang.String") for value in (
                                BATCHES_UID, BATCHES_NAME, str(settings.model_batch), str(settings.model_flush_ms))))
    return KeyedStream(j_batches.keyBy(gateway.jvm.KeyByKeySelector(), key_type),
                       Types.BASIC_ARRAY(Types.STRING()), DataStream(j_batches))


def checked_sql(decoded: str, settings: Settings) -> str:
    """Every record with its reason (NULL for a usable, on-time event). An event more than
    ``max_ahead_ms`` ahead of the wall clock when read comes from a clock that runs ahead:
    a dead letter (the watermark does not follow it either, ``sinks.kafka.events_source``)."""
    fields = ", ".join(f"CAST(d.{name} AS {sql}) AS {name}" if sql == "INT" else f"d.{name} AS {name}"
                       for name, sql in decode.EVENT_COLUMNS)
    return f"""
        SELECT {fields}, d.epoch AS epoch, MOD(d.event_time_ms / 3600000, 24) AS hour_of_day, ts AS rowtime,
               `value`, `topic`, `partition`, `offset`, wm,
               CASE WHEN d.reason IS NOT NULL THEN d.reason
                    WHEN TO_TIMESTAMP_LTZ(d.event_time_ms, 3) <> ts
                      THEN CONCAT('record timestamp ', CAST({windows.epoch_ms('ts')} AS STRING),
                                  ' differs from event_time ', CAST(d.event_time_ms AS STRING))
                    WHEN ts > CURRENT_TIMESTAMP + {windows.interval(settings.max_ahead_ms)}
                      THEN CONCAT('event_time ', CAST(d.event_time_ms AS STRING), ' is more than ',
                                  '{settings.max_ahead_ms} ms ahead of the clock (PERSONALIZE_MAX_AHEAD_MS)')
                    WHEN ts <= wm THEN '{decode.LATE}'
               END AS reason
        FROM {decoded}"""


def build(env, t_env, settings: Settings, *, bounded: bool, group_id: str = "personalize-profile-job"):
    """Define the whole pipeline; return the statement set that runs it."""

    configure(t_env, settings, bounded=bounded)
    t_env.execute_sql(kafka_sinks.events_source(SOURCE, settings, bounded=bounded, group_id=group_id))
    t_env.execute_sql(kafka_sinks.dead_letter_sink(DEAD_LETTERS, settings))
    t_env.execute_sql(kafka_sinks.profile_live_sink(PROFILE_LIVE, settings, live.LIVE_COLUMNS))
    t_env.execute_sql(kafka_sinks.keyed_bytes_sink(LIVE_TOMBSTONES, settings, settings.topic_profile_live,
                                                   sink="erasures"))
    # the sessions part is state for serving, like the live rows: at-least-once, written as the
    # models step emits it; the loader applies a part only when newer (its propensity_ms)
    t_env.execute_sql(kafka_sinks.keyed_bytes_sink(PROFILE_SESSIONS, settings, settings.topic_profile_updates,
                                                   sink=actions.PROFILE_PART, at_least_once=True))
    t_env.execute_sql(kafka_sinks.trending_sink(TRENDING, settings))
    t_env.execute_sql(kafka_sinks.keyed_bytes_sink(TRIGGERS, settings, settings.topic_triggers))
    t_env.execute_sql(kafka_sinks.keyed_bytes_sink(TRIGGERS_LIVE, settings, settings.topic_triggers_live,
                                                   at_least_once=True))
    t_env.execute_sql(kafka_sinks.keyed_bytes_sink(SEGMENT_CHANGES, settings, settings.topic_segment_changes))
    t_env.execute_sql(kafka_sinks.keyed_bytes_sink(MODEL_SNAPSHOTS, settings, settings.topic_model_snapshots))

    t_env.create_temporary_view("events_decoded", decoded_events(t_env, SOURCE, settings))
    t_env.create_temporary_view(CHECKED_VIEW, t_env.sql_query(checked_sql("events_decoded", settings)))
    columns = ", ".join(name for name, _ in decode.EVENT_COLUMNS)
    t_env.create_temporary_view(EVENTS_VIEW, t_env.sql_query(
        f"SELECT {columns}, epoch, hour_of_day, rowtime FROM {CHECKED_VIEW} WHERE reason IS NULL"))

    # erasure requests, each let through once this TaskManager's erasure filters know it
    t_env.execute_sql(kafka_sinks.events_source(ERASURES_SOURCE, settings, bounded=bounded,
                                                group_id=f"{group_id}-erasures", topic=settings.topic_erasures))
    t_env.create_temporary_view(ERASURES_VIEW, t_env.sql_query(f"""
        SELECT e.user_id AS user_id, e.requested_ms AS requested_ms
        FROM (SELECT decode_erasure(`value`) AS e FROM {ERASURES_SOURCE})
        WHERE e.user_id IS NOT NULL AND erasure_applied(e.user_id, e.requested_ms)"""))

    # each user's live state in one JVM operator: its changes, and its closed sessions
    t_env.create_temporary_view(LIVE_VIEW, live.changes(t_env, EVENTS_VIEW, settings, bounded=bounded))

    # closed sessions (about one row per nine events) and erasures -> session fields,
    # models and triggers in Python, keyed by a constant: the models are one global object
    packed = f"{live.closed_sessions(LIVE_VIEW)} UNION ALL {actions.erasure_rows(ERASURES_VIEW)}"
    acted = (
        model_batches(t_env, packed, settings)
        .process(actions.actions_function(settings), output_type=_row_type(actions.ACTION_COLUMNS))
        .uid("models-triggers")
        .name("session fields, models, segments, cart-abandonment triggers")
    )
    t_env.create_temporary_view(ACTIONS_VIEW, t_env.from_data_stream(acted))

    # The SQL aggregations emit one update per key per mini-batch, not per event.
    # Only from here on: to_data_stream above is planned when it is called, and
    # with mini-batch on, a processing-time mini-batch assigner would stand between
    # the source and what reads its watermark (every replayed event would look late).
    t_env.get_config().set("table.exec.mini-batch.enabled", "true")
    t_env.create_temporary_function("dead_letter", decode.dead_letter_udf())

    statements = t_env.create_statement_set()
    # the dead-letter UDF runs for unusable records only (the filter runs first, in the JVM)
    statements.add_insert_sql(f"""
        INSERT INTO {DEAD_LETTERS}
        SELECT user_id,
               dead_letter(`value`, `topic`, `partition`, `offset`, {windows.epoch_ms('rowtime')}, reason,
                           CASE WHEN reason = '{decode.LATE}' THEN {windows.epoch_ms('wm')} END),
               rowtime
        FROM {CHECKED_VIEW} WHERE reason IS NOT NULL AND reason <> '{decode.ERASED}'""")
    statements.add_insert_sql(f"INSERT INTO {PROFILE_LIVE} {live.live_rows(LIVE_VIEW)}")
    statements.add_insert_sql(f"INSERT INTO {TRENDING} {windows.trending(EVENTS_VIEW, settings)}")
    # every record about a user keyed by the user id (one partition per user on every topic);
    # a forgotten user's tombstones (NULL values): one per profile topic, and one on the
    # triggers and segment changes (the row of the sessions part carries it)
    for sink, key, column, tombstones in (
            (PROFILE_SESSIONS, "`user_id`", "`profile`", f"tombstone = '{actions.PROFILE_PART}'"),
            (LIVE_TOMBSTONES, "`user_id`", "CAST(NULL AS BYTES)", f"tombstone = '{actions.LIVE_PART}'"),
            (TRIGGERS, "`user_id`", "`trigger`", f"tombstone = '{actions.PROFILE_PART}'"),
            (SEGMENT_CHANGES, "`user_id`", "`segment_change`", f"tombstone = '{actions.PROFILE_PART}'"),
            (MODEL_SNAPSHOTS, "`user_id`", "`snapshot`", "FALSE")):
        statements.add_insert_sql(
            f"INSERT INTO {sink} SELECT {key}, {column}, TO_TIMESTAMP_LTZ(ts_ms, 3) FROM {ACTIONS_VIEW} "
            f"WHERE {column} IS NOT NULL OR {tombstones}")
    # the Redis trigger stream's fast path (the feed itself stays exactly-once on its topic)
    statements.add_insert_sql(f"INSERT INTO {TRIGGERS_LIVE} SELECT `user_id`, `trigger`, TO_TIMESTAMP_LTZ(ts_ms, 3) "
                              f"FROM {ACTIONS_VIEW} WHERE `trigger` IS NOT NULL")
    return statements


def main(argv: list[str] | None = None) -> int:
    """Run the job as a plain script (``python -m jobs.profile``), e.g. under ``flink run -py``."""
    parser = argparse.ArgumentParser(prog="jobs.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--bounded", action="store_true")
    parser.add_argument("--no-wait", action="store_true",
                        help="return once the job is submitted (`flink run`, `personalize submit`)")
    args = parser.parse_args(argv)
    from personalize.flink import environments

    settings = Settings.from_env()
    env, t_env = environments(settings)
    result = build(env, t_env, settings, bounded=args.bounded).execute()
    if not args.no_wait:
        result.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
