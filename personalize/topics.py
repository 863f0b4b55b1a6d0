"""Kafka topics: create the job's topics when missing, list what exists."""

from __future__ import annotations

import time
from collections.abc import Iterable

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, NoBrokersAvailable, TopicAlreadyExistsError

from personalize import credentials
from personalize.errors import ServiceUnavailable
from personalize.settings import Settings

# replayed logs carry 2017-2019 record timestamps: time-based retention would
# delete them at the next check (DESIGN.md, Kafka pitfalls)
LOCAL_TOPIC_CONFIG = {"retention.ms": "-1"}


def admin(settings: Settings, timeout_ms: int = 10_000) -> KafkaAdminClient:
    credentials.check_kafka(settings)
    try:
        return KafkaAdminClient(
            bootstrap_servers=settings.bootstrap_servers,
            client_id="personalize-admin",
            request_timeout_ms=timeout_ms,
            api_version_auto_timeout_ms=timeout_ms,
            **credentials.kafka_python(settings),
        )
    except NoBrokersAvailable:
        raise ServiceUnavailable(
            f"Kafka does not answer at {settings.bootstrap_servers}: start it with `personalize stack up` "
            "or set PERSONALIZE_BOOTSTRAP_SERVERS"
        ) from None


def list_topics(settings: Settings, timeout_ms: int = 10_000) -> set[str]:
    client = admin(settings, timeout_ms)
    try:
        return set(client.list_topics())
    finally:
        client.close()


def ensure(
    settings: Settings,
    names: Iterable[str],
    partitions: int | None = None,
    local_stack: bool = False,
    configs: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    ``local_stack`` turns time-based retention off on the new topics;
    ``configs`` adds topic configs (such as ``cleanup.policy``).
    """
    client = admin(settings)
    try:
        existing = set(client.list_topics())
        wanted = [n for n in dict.fromkeys(names) if n not in existing]
        if not wanted:
            return []
        new = [
            NewTopic(
                name=name,
                num_partitions=partitions or settings.partitions,
                replication_factor=1 if local_stack else -1,
                topic_configs={**(LOCAL_TOPIC_CONFIG if local_stack else {}), **(configs or {})},
            )
            for name in wanted
        ]
        created = []
        for topic in new:
            try:
                client.create_topics([topic], timeout_ms=30_000)
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass  # created meanwhile by someone else: that is what we wanted
            except KafkaError as exc:
                raise ServiceUnavailable(f"creating topic {topic.name!r} on {settings.bootstrap_servers} failed: {exc}") from exc
        return created
    finally:
        client.close()


def delete(settings: Settings, names: Iterable[str], timeout_s: float = 60) -> list[str]:
    """Delete those of the topics that exist and wait until the broker lists none of
    them (a topic of the same name can be created again then); return the names deleted."""
    client = admin(settings)
    try:
        gone = [n for n in dict.fromkeys(names) if n in set(client.list_topics())]
        if gone:
            client.delete_topics(gone, timeout_ms=30_000)
        deadline = time.monotonic() + timeout_s
        while set(gone) & set(client.list_topics()):
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"deleting topics {gone} on {settings.bootstrap_servers} took over {timeout_s:.0f} s")
            time.sleep(0.2)
        return gone
    finally:
        client.close()
