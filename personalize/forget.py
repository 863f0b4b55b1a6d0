"""``personalize forget USER_ID``: an erasure request, and waiting until Redis holds nothing of the user.

The request is an Avro ``Erasure`` (schemas/erasure.avsc) on the compacted erasures
topic, keyed by the user as the job keeps it (its pseudonym under
PERSONALIZE_PSEUDONYM_KEY), with ``requested_ms`` the wall clock now. The job's decode
drops the user's events up to that time (a replay too), starts the user's windows and
history anew after it and writes tombstones for the user's keys; the Redis loader
deletes the profile, the trigger stream entries and ids (sinks/redis.py). Logs name
the user by a digest only (``sinks.redis.user_digest``).
"""

from __future__ import annotations

import time

from personalize import kafkaio, logs, topics
from personalize.errors import ServiceUnavailable
from personalize.settings import Settings

log = logs.get(__name__)


def request(settings: Settings, user_id: str, now_ms: int | None = None) -> tuple[str, int]:
    """Write the erasure request; return the id as the job keeps it and the request's time."""
    import schemas
    from sinks.redis import user_digest

    user = settings.user_key(user_id)
    requested_ms = int(time.time() * 1000) if now_ms is None else now_ms
    topics.ensure(settings, [settings.topic_erasures], local_stack=True, configs={"cleanup.policy": "compact"})
    value = schemas.codec("erasure").encode({"user_id": user, "requested_ms": requested_ms})
    kafkaio.produce(settings, settings.topic_erasures, [(user.encode("utf-8"), value, requested_ms)])
    log.info("erasure requested", user=user_digest(user), requested_ms=requested_ms, topic=settings.topic_erasures)
    return user, requested_ms


def left_in_redis(client, user: str) -> list[str]:
    """The keys and trigger stream entries of ``user`` Redis still holds (none once forgotten).
    The stream is read in chunks: it holds every trigger ever written."""
    from sinks import redis as loader

    left = [key for key in (loader.PROFILE_PREFIX + user, loader.TRIGGERS_BY_USER + user) if client.exists(key)]
    start, wanted = "-", user.encode("utf-8")
    while chunk := client.xrange(loader.TRIGGER_STREAM, min=start, count=10_000):
        left += [f"{loader.TRIGGER_STREAM} entry {entry_id.decode()}" for entry_id, fields in chunk
                 if fields.get(b"user_id") == wanted]
        start = "(" + chunk[-1][0].decode()
    if client.hexists(loader.NO_CONSENT_KEY, user):
        left.append(f"{loader.NO_CONSENT_KEY} field")
    return left


def wait_applied(settings: Settings, user: str, requested_ms: int, timeout_s: float) -> None:
    """Wait until the Redis loader applied the erasure (its mark, polled), then until nothing
    of the user is left (checked once a second: that reads the whole trigger stream)."""
    from sinks import redis as loader

    client = loader.redis_client(settings)
    deadline = time.monotonic() + timeout_s
    left: list[str] = []
    while True:
        mark = client.hget(loader.ERASED_KEY, user)
        if mark is not None and int(mark) >= requested_ms:
            left = left_in_redis(client, user)
            if not left:
                log.info("erasure complete in Redis", user=loader.user_digest(user))
                return
        if time.monotonic() > deadline:
            if left:
                # counted, not named: the keys hold the id
                raise ServiceUnavailable(f"the loader applied the erasure, but Redis still holds {len(left)} of the "
                                         "user's keys or trigger stream entries (written by a loader before the "
                                         "per-user trigger index?)")
            raise ServiceUnavailable(
                f"the erasure is written, but the Redis loader had not applied it after {timeout_s:.0f} s: "
                "it is applied when `personalize run` (or `personalize load`) runs")
        time.sleep(1.0 if mark is not None else 0.2)
