"""Smoke job: Avro events through Flink's Kafka source, a Python map, and Flink's
exactly-once Kafka sink, bounded.

Proves the connector jars are wired in, the python executable is right, bounded
reading ends, and transactions commit on the broker. The source is a SQL Kafka
table in raw format (bytes, with topic/partition/offset metadata, DESIGN.md);
the Python map decodes each value's single-object Avro and keys it by user; the
sink is a SQL Kafka table with ``key.fields`` and exactly-once delivery.
"""

from __future__ import annotations

import argparse
import sys

from personalize.settings import Settings
from sinks.kafka import events_source, keyed_bytes_sink


def build(env, t_env, settings: Settings, source_topic: str, sink_topic: str):
    """Define the pipeline; return the table whose insert runs it."""
    from pyflink.common import Row, Types
    from pyflink.datastream import MapFunction

    class DecodeAndKey(MapFunction):
        """Decode the single-object Avro value (fails loudly on a bad one) and key it by user."""

        def open(self, runtime_context):
            import schemas

            self.codec = schemas.codec("user_event")

        def map(self, row):
            event = self.codec.decode(row["value"])
            return Row(event["user_id"], row["value"], row["ts"])

    t_env.execute_sql(events_source("smoke_source", settings, bounded=True, group_id=f"smoke-{source_topic}",
                                    topic=source_topic))
    t_env.execute_sql(keyed_bytes_sink("smoke_sink", settings, sink_topic))
    stream = t_env.to_data_stream(t_env.sql_query("SELECT `value`, `ts` FROM smoke_source"))
    keyed = stream.map(
        DecodeAndKey(),
        output_type=Types.ROW_NAMED(
            ["user_id", "value", "ts"],
            [Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.INSTANT()],
        ),
    ).uid("smoke-decode").name("decode Avro, key by user")
    return t_env.from_data_stream(keyed)


def run(settings: Settings, source_topic: str, sink_topic: str) -> None:
    """Run the bounded smoke job on the embedded local Flink and wait for it to end."""
    from personalize.flink import environments

    env, t_env = environments(settings, checkpoint_interval_ms=1000)
    table = build(env, t_env, settings, source_topic, sink_topic)
    table.execute_insert("smoke_sink").wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--source-topic", required=True)
    parser.add_argument("--sink-topic", required=True)
    args = parser.parse_args(argv)
    run(Settings.from_env(), args.source_topic, args.sink_topic)
    return 0


if __name__ == "__main__":
    sys.exit(main())
