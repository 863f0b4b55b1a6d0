"""The profile job: Avro events -> decode/validate (Python, once per event) -> JVM windows
-> profile changelog, trending products and dead letters on Kafka (exactly-once);
closed sessions -> models, segment changes and cart-abandonment triggers (Python,
once per session) -> Kafka (exactly-once).

Redis is materialized from the changelog by ``sinks.redis`` (a read_committed
loader), so every Redis write follows a committed Flink checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from operators import actions, decode, sessions, windows
from personalize.settings import Settings
from sinks import kafka as kafka_sinks

SOURCE = "events_source"
EVENTS_VIEW = "events_clean"
DEAD_LETTERS = "dead_letter_sink"
PROFILE_UPDATES = "profile_updates_sink"
TRENDING = "trending_sink"
TRIGGERS = "triggers_sink"
SEGMENT_CHANGES = "segment_changes_sink"
MODEL_SNAPSHOTS = "model_snapshots_sink"
ACTIONS_VIEW = "session_actions"


def _row_type(columns):
    from pyflink.common import Types

    kinds = {
        "STRING": Types.STRING(),
        "BIGINT": Types.LONG(),
        "INT": Types.INT(),
        "BOOLEAN": Types.BOOLEAN(),
        "BYTES": Types.PRIMITIVE_ARRAY(Types.BYTE()),
        "MAP<STRING, STRING>": Types.MAP(Types.STRING(), Types.STRING()),
    }
    return Types.ROW_NAMED([c for c, _ in columns], [kinds[t] for _, t in columns])


def configure(t_env, settings: Settings, *, bounded: bool) -> None:
    """The SQL planner's settings for the windows (mini-batch itself is switched on in ``build``)."""
    config = t_env.get_config()
    config.set("table.local-time-zone", "UTC")
    # LAST_VALUE (newest session, newest sliding window) has no merge: no local-global split
    config.set("table.optimizer.agg-phase-strategy", "ONE_PHASE")
    # every profile part has its own key (user_id, part): no upsert materialization needed
    config.set("table.exec.sink.upsert-materialize", "NONE")
    # explicit uids on the SQL operators too, so a savepoint maps back onto the
    # same query at another parallelism (the DataStream operators set their own)
    config.set("table.exec.uid.generation", "ALWAYS")
    config.set("table.exec.mini-batch.allow-latency", "2 s")
    config.set("table.exec.mini-batch.size", "50000")
    if not bounded:
        config.set("table.exec.source.idle-timeout", f"{settings.idle_timeout_ms} ms")


def build(env, t_env, settings: Settings, *, bounded: bool, group_id: str = "personalize-profile-job"):
    """Define the whole pipeline; return the statement set that runs it."""
    from pyflink.common import Types
    from pyflink.datastream import OutputTag
    from pyflink.table import Schema

    configure(t_env, settings, bounded=bounded)
    t_env.execute_sql(kafka_sinks.events_source(SOURCE, settings, bounded=bounded, group_id=group_id))
    t_env.execute_sql(kafka_sinks.dead_letter_sink(DEAD_LETTERS, settings))
    t_env.execute_sql(kafka_sinks.profile_updates_sink(PROFILE_UPDATES, settings, bounded=bounded))
    t_env.execute_sql(kafka_sinks.trending_sink(TRENDING, settings))
    t_env.execute_sql(kafka_sinks.keyed_bytes_sink(TRIGGERS, settings, settings.topic_triggers))
    t_env.execute_sql(kafka_sinks.keyed_bytes_sink(SEGMENT_CHANGES, settings, settings.topic_segment_changes))
    t_env.execute_sql(kafka_sinks.keyed_bytes_sink(MODEL_SNAPSHOTS, settings, settings.topic_model_snapshots))

    raw = t_env.to_data_stream(t_env.sql_query(f"SELECT `value`, `topic`, `partition`, `offset`, `ts` FROM {SOURCE}"))
    dead_letter_tag = OutputTag("dead-letters", _row_type(decode.DEAD_LETTER_COLUMNS))
    events = (
        raw.process(decode.decode_function(dead_letter_tag), output_type=_row_type(decode.EVENT_COLUMNS))
        .uid("decode-validate")
        .name("decode Avro, validate, split late")
    )
    letters = events.get_side_output(dead_letter_tag)

    t_env.create_temporary_view(
        EVENTS_VIEW,
        t_env.from_data_stream(
            events,
            Schema.new_builder()
            .column_by_expression("rowtime", "TO_TIMESTAMP_LTZ(event_time_ms, 3)")
            .watermark("rowtime", "SOURCE_WATERMARK()")
            .build(),
        ),
    )
    t_env.create_temporary_view("dead_letters", t_env.from_data_stream(letters))

    # closed sessions (about one row per ten events) -> models and triggers in Python,
    # keyed by a constant: the models are one global object (operators/actions.py)
    closes = t_env.to_data_stream(t_env.sql_query(sessions.session_closes(EVENTS_VIEW, settings)))
    acted = (
        closes.key_by(lambda row: 0, key_type=Types.INT())
        .process(actions.actions_function(settings), output_type=_row_type(actions.ACTION_COLUMNS))
        .uid("models-triggers")
        .name("models, segments, cart-abandonment triggers")
    )
    t_env.create_temporary_view(ACTIONS_VIEW, t_env.from_data_stream(acted))

    # The SQL aggregations emit one update per key per mini-batch, not per event.
    # Only from here on: to_data_stream above is planned when it is called, and
    # with mini-batch on, a processing-time mini-batch assigner would stand between
    # the source and the Python functions and hand them wall-clock watermarks
    # (every replayed event would look late).
    t_env.get_config().set("table.exec.mini-batch.enabled", "true")

    statements = t_env.create_statement_set()
    statements.add_insert_sql(
        f"INSERT INTO {DEAD_LETTERS} SELECT user_id, `value`, TO_TIMESTAMP_LTZ(ts_ms, 3) FROM dead_letters"
    )
    # one insert per sink table: each Kafka sink has its own transactional id prefix
    model_part = f"SELECT user_id, 'models' AS part, fields FROM {ACTIONS_VIEW} WHERE kind = 'profile'"
    parts = " UNION ALL ".join(f"({q})" for q in [*windows.profile_parts(EVENTS_VIEW, settings), model_part])
    statements.add_insert_sql(f"INSERT INTO {PROFILE_UPDATES} {parts}")
    statements.add_insert_sql(f"INSERT INTO {TRENDING} {windows.trending(EVENTS_VIEW, settings)}")
    for sink, kind in ((TRIGGERS, "trigger"), (SEGMENT_CHANGES, "segment_change"), (MODEL_SNAPSHOTS, "models")):
        statements.add_insert_sql(
            f"INSERT INTO {sink} SELECT user_id, `value`, TO_TIMESTAMP_LTZ(ts_ms, 3) FROM {ACTIONS_VIEW} "
            f"WHERE kind = '{kind}'"
        )
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
