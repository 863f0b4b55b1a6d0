"""Redis, materialized from the job's committed Kafka outputs (read_committed loader).

Python functions in Flink get no checkpoint hook, so a Redis write from inside
the job could be lost or repeated at a failure (DESIGN.md). The job therefore
writes the profile changelog and trending windows to transactional Kafka topics;
this loader reads them under read_committed, keeps the newest value per key in a
batch, and writes absolute values to Redis together with its next offsets in one
MULTI/EXEC transaction (``loader:offsets``). Writes and offsets land together or
not at all, so a crash or restart neither loses nor re-applies a batch; and since
the values are absolute, even a replay would leave Redis identical.
(Offsets live in Redis, not in a Kafka consumer group, for that atomicity.)

Keys written:
- ``profile:{user_id}`` HASH: the profile fields of DESIGN.md (and window extras);
  deleted when the user's latest event withdrew personalization consent (the user
  is then listed in ``loader:no_consent`` and nothing is written for it)
- ``trending:{category}`` ZSET: product -> views in the newest trending window,
  with ``trending:window_end_ms`` (HASH category -> window end) beside it
- ``triggers:cart_abandonment`` STREAM: one entry per trigger_id, ever. A Lua
  script adds the entry only when the id is new to ``triggers:cart_abandonment:ids``
  (a SET), so a replay of the same sessions adds nothing
- ``models:snapshot`` STRING: the newest model snapshot (JSON), for ``personalize models``
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson
import redis as redis_lib

from personalize import logs
from personalize.errors import ServiceUnavailable
from personalize.settings import Settings
from operators.triggers import format_cents

log = logs.get(__name__)

PROFILE_PREFIX = "profile:"
TRENDING_PREFIX = "trending:"
TRENDING_WINDOWS = "trending:window_end_ms"
OFFSETS_KEY = "loader:offsets"
TRIGGER_STREAM = "triggers:cart_abandonment"
TRIGGER_IDS = "triggers:cart_abandonment:ids"
MODELS_KEY = "models:snapshot"
NO_CONSENT_KEY = "loader:no_consent"
# add a stream entry only for a trigger id never seen (KEYS: stream, id set; ARGV: id, field, value, ...)
_ADD_ONCE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
  return 1
end
return 0
"""


def redis_client(settings: Settings) -> redis_lib.Redis:
    client = redis_lib.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30)
    try:
        client.ping()
    except redis_lib.RedisError as exc:
        raise ServiceUnavailable(
            f"Redis does not answer at {settings.redis_url} ({type(exc).__name__}): "
            "start it with `personalize stack up` or set PERSONALIZE_REDIS_URL"
        ) from None
    return client


def active_hours(events_by_hour: str, top: int = 3) -> str:
    """The busiest hours of day (UTC), most events first, ties to the earlier hour."""
    counts = [int(c) for c in events_by_hour.split(",")]
    ranked = sorted((h for h in range(24) if counts[h] > 0), key=lambda h: (-counts[h], h))
    return ",".join(str(h) for h in ranked[:top])


def profile_fields(part: str, fields: dict) -> dict[str, str]:
    """What one part of the changelog writes into the profile hash (values as strings).

    A field the part lacks (a NULL the job left out, an older job's record) leaves
    its derived fields out; it never stops the loader."""
    out = {k: str(v) for k, v in fields.items() if k != "consent" and v is not None}
    if part == "totals":
        if "revenue_cents" in out:
            out["revenue"] = format_cents(int(out["revenue_cents"]))
        if "last_seen_ms" in out:
            out["updated_ms"] = out["last_seen_ms"]  # event time, so a replay writes the same value
        if "events_by_hour" in out:
            out["active_hours"] = active_hours(out["events_by_hour"])
    return out


def consents(fields: dict) -> bool:
    """The personalization flag a part carries (True unless it says false)."""
    return fields.get("consent") not in (False, "false")


@dataclass
class LoadStats:
    records: int = 0
    profile_writes: int = 0
    profiles_deleted: int = 0
    trending_rows: int = 0
    triggers: int = 0
    stream_added: int = 0
    users: set[str] = field(default_factory=set)


class Materializer:
    """Reads the profile changelog and trending topics from its committed offsets into Redis."""

    def __init__(self, settings: Settings, offsets_key: str = OFFSETS_KEY):
        self.settings = settings
        self.offsets_key = offsets_key
        self.redis = redis_client(settings)
        self._add_once = self.redis.register_script(_ADD_ONCE)  # EVALSHA, the script sent once
        self.stats = LoadStats()

    def _consumer(self):
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None,
            client_id="personalize-redis-loader",
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_poll_records=20_000,
            fetch_max_bytes=64 * 1024 * 1024,
            receive_message_max_bytes=128 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
        )
        tps = []
        for topic in (self.settings.topic_profile_updates, self.settings.topic_trending,
                      self.settings.topic_triggers, self.settings.topic_model_snapshots):
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                tps.append(TopicPartition(topic, p))
        consumer.assign(tps)
        stored = self.redis.hgetall(self.offsets_key)
        for tp in tps:
            offset = stored.get(f"{tp.topic}:{tp.partition}".encode())
            if offset is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, int(offset))
        return consumer, tps

    def drain(self, timeout_s: float = 600) -> LoadStats:
        """Apply everything committed up to the end offsets current now, then return."""
        consumer, tps = self._consumer()
        try:
            ends = consumer.end_offsets(tps)
            deadline = time.monotonic() + timeout_s
            while any(consumer.position(tp) < ends[tp] for tp in tps):
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(f"the Redis loader did not reach the end of its topics in {timeout_s:.0f}s")
                self._apply(consumer, consumer.poll(timeout_ms=500))
        finally:
            consumer.close()
        return self.stats

    def follow(self, stop) -> LoadStats:
        """Apply committed records as they come until ``stop()`` is true (unbounded runs)."""
        consumer, _ = self._consumer()
        try:
            while not stop():
                batches = consumer.poll(timeout_ms=500)
                if batches:
                    self._apply(consumer, batches)
        finally:
            consumer.close()
        return self.stats

    def _apply(self, consumer, batches) -> None:
        if not batches:
            return
        import schemas

        topics = self.settings
        latest: dict[tuple[str, str], dict | None] = {}
        trending: list[dict] = []
        triggers: list[dict] = []
        snapshot = None
        for tp, records in batches.items():
            self.stats.records += len(records)
            if tp.topic == topics.topic_profile_updates:
                for rec in records:
                    key = orjson.loads(rec.key)
                    latest[(key["user_id"], key["part"])] = orjson.loads(rec.value) if rec.value is not None else None
            elif tp.topic == topics.topic_trending:
                trending.extend(orjson.loads(rec.value) for rec in records)
            elif tp.topic == topics.topic_triggers:
                codec = schemas.codec("trigger")
                triggers.extend(codec.decode(rec.value) for rec in records)
            elif tp.topic == topics.topic_model_snapshots and records:
                snapshot = records[-1].value  # one partition: the last is the newest
        pipe = self.redis.pipeline(transaction=True)
        self._added_at: list[int] = []  # positions of the trigger scripts' replies (1: added)
        self._profiles(pipe, latest.items())
        self._trending(pipe, trending)
        self._triggers(pipe, triggers)
        if snapshot is not None:
            pipe.set(MODELS_KEY, snapshot)
        pipe.hset(self.offsets_key, mapping={f"{tp.topic}:{tp.partition}": consumer.position(tp) for tp in batches})
        replies = pipe.execute()
        self.stats.stream_added += sum(replies[i - 1] for i in self._added_at)

    def _triggers(self, pipe, records: list[dict]) -> None:
        from operators.triggers import as_json

        for record in records:
            entry = as_json(record)
            entry["cart"] = orjson.dumps(entry["cart"]).decode()
            flat = [str(x) for k, v in entry.items() if v is not None for x in (k, v)]
            self._add_once(keys=[TRIGGER_STREAM, TRIGGER_IDS], args=[entry["trigger_id"], *flat], client=pipe)
            self.stats.triggers += 1
            self._added_at.append(len(pipe))

    def _profiles(self, pipe, updates: Iterable[tuple[tuple[str, str], dict | None]]) -> None:
        """Write profile parts, but nothing for a user whose latest event withdrew consent.

        The ``totals`` part carries the flag of the user's latest event of all (the
        other parts only the latest of their own input), so it decides: false deletes
        the profile and marks the user in ``loader:no_consent`` until a newer event
        gives consent again; parts of marked users are not written."""
        updates = list(updates)
        decided = {user: consents(fields) for (user, part), fields in updates
                   if part == "totals" and fields is not None}
        others = sorted({user for (user, _), _ in updates} - set(decided))
        stored = dict(zip(others, self.redis.hmget(NO_CONSENT_KEY, others))) if others else {}
        allowed = {**{u: v is None for u, v in stored.items()}, **decided}
        consenting = [user for user, ok in decided.items() if ok]
        if consenting:
            pipe.hdel(NO_CONSENT_KEY, *consenting)  # one command for the batch
        for user, ok in decided.items():
            if not ok:
                pipe.hset(NO_CONSENT_KEY, user, 1)
                pipe.delete(PROFILE_PREFIX + user)  # no profile without personalization consent
                self.stats.profiles_deleted += 1
                self.stats.users.discard(user)
        merged: dict[str, dict[str, str]] = {}  # one HSET per user per batch
        for (user, part), fields in updates:
            if allowed[user] and fields is not None:
                merged.setdefault(user, {}).update(profile_fields(part, fields))
                self.stats.profile_writes += 1
        for user, mapping in merged.items():
            if mapping:
                pipe.hset(PROFILE_PREFIX + user, mapping=mapping)
                self.stats.users.add(user)

    def _trending(self, pipe, rows: list[dict]) -> None:
        if not rows:
            return
        self.stats.trending_rows += len(rows)
        newest: dict[str, int] = {}
        for row in rows:
            newest[row["category"]] = max(newest.get(row["category"], 0), row["window_end_ms"])
        stored = dict(zip(newest, self.redis.hmget(TRENDING_WINDOWS, list(newest))))
        for category, window_end in newest.items():
            known = int(stored[category]) if stored[category] is not None else -1
            if window_end < known:
                continue
            key = TRENDING_PREFIX + (category or "(none)")
            if window_end > known:
                pipe.delete(key)
                pipe.hset(TRENDING_WINDOWS, category, window_end)
            members = {r["product_id"]: r["views"] for r in rows
                       if r["category"] == category and r["window_end_ms"] == window_end}
            if members:
                pipe.zadd(key, members)
