"""Plain Kafka clients (kafka-python) for the CLI and tests: produce, read to the end.

Reading "to the end" under read_committed stops on position, not on the last
record's offset: transaction markers occupy offsets (DESIGN.md, Kafka pitfalls).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, NoBrokersAvailable

from personalize import credentials
from personalize.errors import ServiceUnavailable
from personalize.settings import Settings


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


def _unavailable(settings: Settings, exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"Kafka does not answer at {settings.bootstrap_servers} ({type(exc).__name__}): "
        "start it with `personalize stack up` or set PERSONALIZE_BOOTSTRAP_SERVERS"
    )


RECEIVE_MAX_BYTES = 128 * 1024 * 1024


def _consumer(settings: Settings, client_id: str, read_committed: bool, **extra) -> KafkaConsumer:
    """A group-less consumer (offsets are the caller's business), or a one-line error naming Kafka's address."""
    credentials.check_kafka(settings)
    try:
        return KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=client_id,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed" if read_committed else "read_uncommitted",
            # a fetch holding one ~1 MiB record exceeds kafka-python's default frame limit
            receive_message_max_bytes=RECEIVE_MAX_BYTES,
            **credentials.kafka_python(settings),
            **extra,
        )
    except NoBrokersAvailable as exc:
        raise _unavailable(settings, exc) from exc


def producer(settings: Settings, **overrides) -> KafkaProducer:
    config = dict(
        bootstrap_servers=settings.bootstrap_servers,
        client_id="personalize-producer",
        acks="all",
        linger_ms=20,
        batch_size=256 * 1024,
        compression_type=None,
        enable_idempotence=True,  # keeps per-user order across retries
        max_in_flight_requests_per_connection=1,  # kafka-python requires 1 with idempotence
        retries=5,
        **credentials.kafka_python(settings),
    )
    config.update(overrides)
    credentials.check_kafka(settings)
    try:
        return KafkaProducer(**config)
    except NoBrokersAvailable as exc:
        raise _unavailable(settings, exc) from exc


def produce(
    settings: Settings,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes, int | None]],
) -> int:
    """Send (key, value, timestamp_ms) tuples, flush, and return how many were acknowledged."""
    prod = producer(settings)
    sent = 0
    failures: list[BaseException] = []
    try:
        for key, value, ts in records:
            prod.send(topic, key=key, value=value, timestamp_ms=ts).add_errback(failures.append)
            sent += 1
        prod.flush(timeout=120)
        if failures:
            raise failures[0]  # a refused record fails the whole call: nothing is lost in silence
    except KafkaError as exc:
        raise ServiceUnavailable(f"producing to {topic!r} at {settings.bootstrap_servers} failed: {exc}") from exc
    finally:
        prod.close(timeout=10)
    return sent


def _from_beginning(settings: Settings, consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to ``consumer`` at its beginning."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise ServiceUnavailable(f"topic {topic!r} does not exist at {settings.bootstrap_servers}")
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    return tps


def read_to_end(
    settings: Settings,
    topic: str,
    read_committed: bool = True,
    timeout_s: float = 60.0,
    start_offsets: dict[int, int] | None = None,
) -> Iterator[Record]:
    """Every record of ``topic`` from its beginning to the end offsets current now.

    With ``read_committed`` the end is the last stable offset: aborted and open
    transactions are not read.
    """
    consumer = _consumer(settings, "personalize-reader", read_committed, auto_offset_reset="earliest")
    try:
        tps = _from_beginning(settings, consumer, topic)
        for tp in tps:
            if start_offsets and tp.partition in start_offsets:
                consumer.seek(tp, start_offsets[tp.partition])
        ends = consumer.end_offsets(tps)
        pending = {tp for tp in tps if consumer.position(tp) < ends[tp]}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                left = {f"{tp.partition}": (consumer.position(tp), ends[tp]) for tp in pending}
                raise ServiceUnavailable(f"reading {topic!r} did not reach the end in {timeout_s:.0f}s: {left}")
            batches = consumer.poll(timeout_ms=500)
            for tp, msgs in batches.items():
                for m in msgs:
                    if m.offset < ends[tp]:
                        yield Record(m.topic, m.partition, m.offset, m.timestamp, m.key, m.value)
            for tp in list(pending):
                if consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        consumer.close()


def follow(settings: Settings, topic: str, stop=lambda: False) -> Iterator[Record]:
    """Every committed record of ``topic`` from its beginning, then new ones as they come, until ``stop()``."""
    consumer = _consumer(settings, "personalize-follower", True, auto_offset_reset="earliest")
    try:
        _from_beginning(settings, consumer, topic)
        while not stop():
            for msgs in consumer.poll(timeout_ms=500).values():
                for m in msgs:
                    yield Record(m.topic, m.partition, m.offset, m.timestamp, m.key, m.value)
    finally:
        consumer.close()


def offsets(settings: Settings, topic: str, read_committed: bool = True) -> tuple[dict[int, int], dict[int, int]]:
    """(beginning, end) offsets per partition of ``topic``; end is the last stable offset."""
    consumer = _consumer(settings, "personalize-offsets", read_committed)
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise ServiceUnavailable(f"topic {topic!r} does not exist at {settings.bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        begin = consumer.beginning_offsets(tps)
        end = consumer.end_offsets(tps)
        return {tp.partition: begin[tp] for tp in tps}, {tp.partition: end[tp] for tp in tps}
    finally:
        consumer.close()
