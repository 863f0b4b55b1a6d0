"""Kafka tables through Flink's own connector (SQL DDL): the event source and the sinks.

The source reads raw bytes with topic/partition/offset metadata, so a bad record
can go to the dead-letter topic with where it came from (Flink's ``avro`` format
would fail the job on it, DESIGN.md). Event time is the Kafka record timestamp,
with bounded out-of-orderness watermarks generated per partition by the source.
Every sink is transactional (exactly-once, committed at checkpoints) with a
transactional id prefix derived from its topic, stable across restarts.
"""

from __future__ import annotations

from personalize import credentials
from personalize.settings import Settings


def _brokers(settings: Settings) -> str:
    """The connector's broker address and security options (credentials, TLS stores)."""
    props = {"bootstrap.servers": settings.bootstrap_servers, **credentials.kafka_java(settings)}
    return ",\n            ".join(f"'properties.{k}' = '{v.replace(chr(39), chr(39) * 2)}'" for k, v in props.items())


# an at-least-once sink's producer sends as rows come: batched by a short linger (the
# client's default, 0 ms, sent one small request per row at the Python step's pace and
# doubled the broker's CPU in `make bench`)
_BATCHING = """
            'properties.linger.ms' = '20',
            'properties.batch.size' = '262144'"""


def _exactly_once(settings: Settings, topic: str, sink: str = "") -> str:
    """Exactly-once delivery; ``sink`` tells apart several sinks writing to one topic. The
    transaction timeout (settings.transaction_timeout_ms) must stay below the broker's
    transaction.max.timeout.ms (15 min; the sink's default of 1 h is refused)."""
    return f"""
            'sink.delivery-guarantee' = 'exactly-once',
            'sink.transactional-id-prefix' = 'personalize-{topic}{'-' + sink if sink else ''}',
            'properties.transaction.timeout.ms' = '{settings.transaction_timeout_ms}'"""


def events_source(table: str, settings: Settings, *, bounded: bool, group_id: str, topic: str | None = None) -> str:
    """The events topic (or ``topic``) as raw bytes with metadata and event-time watermarks.

    The watermark never passes the wall clock (less the out-of-orderness): one producer
    whose clock runs ahead cannot close others' sessions early or make their on-time
    events late (``jobs.profile.checked_sql`` dead-letters events too far ahead)."""
    from operators.windows import interval

    bounded_opt = "'scan.bounded.mode' = 'latest-offset'," if bounded else ""
    return f"""
        CREATE TEMPORARY TABLE `{table}` (
            `value` BYTES,
            `topic` STRING METADATA VIRTUAL,
            `partition` INT METADATA VIRTUAL,
            `offset` BIGINT METADATA VIRTUAL,
            `ts` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp',
            WATERMARK FOR `ts` AS LEAST(`ts`, CURRENT_TIMESTAMP) - {interval(settings.out_of_orderness_ms)}
        ) WITH (
            'connector' = 'kafka',
            'topic' = '{topic or settings.topic_events}',
            {_brokers(settings)},
            'properties.group.id' = '{group_id}',
            'properties.isolation.level' = 'read_committed',
            'scan.startup.mode' = 'earliest-offset',
            {bounded_opt}
            'scan.watermark.emit.strategy' = '{settings.watermark_emit}',
            'format' = 'raw'
        )"""


def keyed_bytes_sink(table: str, settings: Settings, topic: str, sink: str = "", *, at_least_once: bool = False) -> str:
    """Raw bytes keyed by ``user_id`` (its UTF-8 bytes), record timestamp from ``ts``,
    exactly-once (or at-least-once: written at once, not at the checkpoint)."""
    delivery = f"\n            'sink.delivery-guarantee' = 'at-least-once',{_BATCHING}" if at_least_once else \
        _exactly_once(settings, topic, sink)
    return f"""
        CREATE TEMPORARY TABLE `{table}` (
            `user_id` STRING,
            `value` BYTES,
            `ts` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp'
        ) WITH (
            'connector' = 'kafka',
            'topic' = '{topic}',
            {_brokers(settings)},
            'key.format' = 'raw',
            'key.fields' = 'user_id',
            'value.format' = 'raw',
            'value.fields-include' = 'EXCEPT_KEY',{delivery}
        )"""


def dead_letter_sink(table: str, settings: Settings) -> str:
    """Avro DeadLetter bytes, keyed by user when the event told us who it was."""
    return keyed_bytes_sink(table, settings, settings.topic_dlq)


def profile_live_sink(table: str, settings: Settings, columns) -> str:
    """The live profile changelog (operators/live.py): an upsert per user, keyed by the user id
    (its UTF-8 bytes, the partition Kafka's default partitioner gives it), typed JSON values
    with NULLs left out, at-least-once: written without waiting for a checkpoint.

    The sink keeps only the newest row per user between flushes (every ``profile_flush_ms``,
    at every checkpoint and at the end of input), so a busy user is written once per flush,
    not once per event. Bounded runs flush the same way (their live rows come at session
    closes only), so the loader applies them while the job still runs."""
    flush_ms = settings.profile_flush_ms
    flush_rows = settings.profile_flush_rows
    typed = ",\n            ".join(f"`{name}` {sql}" for name, sql in columns)
    return f"""
        CREATE TEMPORARY TABLE `{table}` (
            `user_id` STRING,
            {typed},
            PRIMARY KEY (`user_id`) NOT ENFORCED
        ) WITH (
            'connector' = 'upsert-kafka',
            'topic' = '{settings.topic_profile_live}',
            {_brokers(settings)},
            'key.format' = 'raw',
            'value.format' = 'json',
            'value.json.encode.ignore-null-fields' = 'true',
            'value.fields-include' = 'EXCEPT_KEY',
            'sink.buffer-flush.max-rows' = '{flush_rows}',
            'sink.buffer-flush.interval' = '{flush_ms} ms',
            'sink.delivery-guarantee' = 'at-least-once',{_BATCHING}
        )"""


def trending_sink(table: str, settings: Settings) -> str:
    return f"""
        CREATE TEMPORARY TABLE `{table}` (
            `category` STRING,
            `product_id` STRING,
            `views` BIGINT,
            `window_end_ms` BIGINT,
            `rank` BIGINT
        ) WITH (
            'connector' = 'kafka',
            'topic' = '{settings.topic_trending}',
            {_brokers(settings)},
            'value.format' = 'json',{_exactly_once(settings, settings.topic_trending)}
        )"""
