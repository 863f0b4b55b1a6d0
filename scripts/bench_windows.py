"""The JVM-only ceiling of the profile job's per-event operators (a benchmark, not a test).

Rows shaped like decoded events come from Flink's ``datagen`` (no Kafka, no Python
per event) and go through the job's own live function (``operators.live``: every
user's state, both kinds of rows) and trending window (``operators.windows``),
configured by ``jobs.profile.configure``, into blackhole sinks. What this takes is
what the windows alone cost on this machine: the job can be no faster. No user is
ever forgotten here (epoch 0), so the erasure filter, which reads the erasures topic
from Kafka, is left out (it runs once per output row, not per event).

Usage: python scripts/bench_windows.py [EVENTS] [USERS] [PART,...]
  EVENTS default 1000000, USERS default 100000; PART any of
  live trending (default: both, one job)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARTS = ("live", "trending")
# one event a minute per user on average, spread over ~17 hours: several sessions,
# hours and sliding windows per user, as in the synthetic traffic
EVENT_SPACING_MS = 60


def main(argv: list[str]) -> int:
    events = int(argv[0]) if argv else 1_000_000
    users = int(argv[1]) if len(argv) > 1 else 100_000
    parts = argv[2].split(",") if len(argv) > 2 else list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"bench_windows: unknown part {', '.join(unknown)} (choose from {', '.join(PARTS)})", file=sys.stderr)
        return 2

    from jobs.profile import configure
    from operators import live, windows
    from personalize.flink import environments
    from personalize.settings import Settings
    from pyflink.table import Schema

    settings = Settings.from_env()
    _, t_env = environments(settings, bounded=True, checkpoint_interval_ms=settings.bounded_checkpoint_interval_ms)
    configure(t_env, settings, bounded=True)
    t_env.execute_sql(f"""
        CREATE TEMPORARY TABLE gen (seq BIGINT, r INT) WITH (
          'connector' = 'datagen', 'rows-per-second' = '1000000000',
          'fields.seq.kind' = 'sequence', 'fields.seq.start' = '1', 'fields.seq.end' = '{events}',
          'fields.r.min' = '0', 'fields.r.max' = '999')""")
    shaped = t_env.sql_query(f"""
        SELECT CAST(MOD(seq * 7919, {users}) AS STRING) AS user_id,
               CASE WHEN r < 600 THEN 'product_view' WHEN r < 750 THEN 'page_view'
                    WHEN r < 850 THEN 'add_to_cart' WHEN r < 900 THEN 'remove_from_cart'
                    WHEN r < 950 THEN 'checkout' ELSE 'purchase' END AS event_type,
               CAST(MOD(r * 31, 5000) AS STRING) AS product_id, CAST(MOD(r, 40) AS STRING) AS category,
               CAST(r * 13 AS BIGINT) AS price_cents, 1 AS quantity,
               TRUE AS consent_analytics, TRUE AS consent_personalization, TRUE AS consent_marketing,
               1572000000000 + seq * {EVENT_SPACING_MS} AS event_time_ms, CAST(0 AS BIGINT) AS epoch
        FROM gen""")
    # the same rowtime, hour of day and bounded out-of-orderness the job's event view has
    lag = windows.interval(settings.out_of_orderness_ms)
    t_env.create_temporary_view("bench_events", t_env.from_data_stream(
        t_env.to_data_stream(shaped),
        Schema.new_builder()
        .column_by_expression("hour_of_day", "MOD(event_time_ms / 3600000, 24)")
        .column_by_expression("rowtime", "TO_TIMESTAMP_LTZ(event_time_ms, 3)")
        .watermark("rowtime", f"rowtime - {lag}")
        .build()))
    t_env.get_config().set("table.exec.mini-batch.enabled", "true")  # after to_data_stream, as in the job
    statements = t_env.create_statement_set()

    def blackhole(name: str, columns) -> None:
        typed = ", ".join(f"`{c}` {t}" for c, t in columns)
        t_env.execute_sql(f"CREATE TEMPORARY TABLE {name} ({typed}) WITH ('connector' = 'blackhole')")

    if "live" in parts:
        blackhole("live_bh", (("user_id", "STRING"), ("kind", "STRING"), *live.LIVE_COLUMNS, ("session", "STRING")))
        columns = ", ".join(name for name, _ in live.LIVE_COLUMNS)
        t_env.create_temporary_view("live_changes", live.changes(t_env, "bench_events", settings, bounded=True))
        statements.add_insert_sql(f"INSERT INTO live_bh SELECT user_id, kind, {columns}, session FROM live_changes")
    if "trending" in parts:
        blackhole("trending_bh", (("category", "STRING"), ("product_id", "STRING"), ("views", "BIGINT"),
                                  ("window_end_ms", "BIGINT"), ("rank", "BIGINT")))
        statements.add_insert_sql("INSERT INTO trending_bh " + windows.trending("bench_events", settings))

    print(f"windows {','.join(parts)}: {events:,} events for {users:,} users, JVM only (datagen -> blackhole)",
          flush=True)
    started = time.monotonic()
    statements.execute().wait()
    elapsed = time.monotonic() - started
    print(f"windows {elapsed:.1f}s, {events / elapsed:,.0f} events/s including ~10 s of job start and end")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
