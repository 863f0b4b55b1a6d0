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
- ``trending:{category}`` ZSET: product -> views in the newest trending window
  (``personalize:trending:window_end_ms``, a HASH category -> window end, beside it)
- ``triggers:cart_abandonment`` STREAM: one entry per trigger_id, ever. A Lua
  script adds the entry only when the id is new to ``triggers:cart_abandonment:ids``
  (a SET), so a replay of the same sessions adds nothing
- ``models:snapshot`` STRING: the newest model snapshot (JSON), for ``personalize models``

The loader's own keys live under ``personalize:`` (no category or user id can name
one of them): its offsets, the users whose consent is withdrawn, the trending window
ends, and ``personalize:loader:dead_letters``, a STREAM of the records it could not
read (topic, partition, offset, reason; the newest 10,000), which it skips instead of
stopping. (The trigger id set keeps its name beside the stream it guards.)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import orjson
import redis as redis_lib

from personalize import logs
from personalize.errors import ServiceUnavailable
from personalize.settings import Settings
from operators.triggers import format_cents

log = logs.get(__name__)

PROFILE_PREFIX = "profile:"
TRENDING_PREFIX = "trending:"
INTERNAL = "personalize:"
TRENDING_WINDOWS = INTERNAL + "trending:window_end_ms"
OFFSETS_KEY = INTERNAL + "loader:offsets"
DEAD_LETTERS_KEY = INTERNAL + "loader:dead_letters"
DEAD_LETTERS_KEPT = 10_000
RETRY_MAX_S = 30.0  # the longest wait between two tries while Redis does not answer
TRIGGER_STREAM = "triggers:cart_abandonment"
TRIGGER_IDS = "triggers:cart_abandonment:ids"
MODELS_KEY = "models:snapshot"
NO_CONSENT_KEY = INTERNAL + "loader:no_consent"
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


def _dead_letter(rec, exc: Exception) -> dict:
    """What the loader keeps of a record it cannot read: where it is, and why."""
    return {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
            "reason": f"{type(exc).__name__}: {exc}"[:1000]}


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
    dead_letters: int = 0


DRAIN_BATCH = 200_000  # records a drain applies in one Redis transaction


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
        self._seek_to_stored(consumer, tps)
        return consumer, tps

    def _seek_to_stored(self, consumer, tps) -> None:
        """Position every partition at the offset Redis holds (its beginning when none)."""
        stored = self.redis.hgetall(self.offsets_key)
        for tp in tps:
            offset = stored.get(f"{tp.topic}:{tp.partition}".encode())
            if offset is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, int(offset))

    def _apply_or_wait(self, consumer, tps, batches, give_up) -> None:
        """Apply a batch; while Redis does not answer, wait with backoff (1 s doubling to
        RETRY_MAX_S) and then resume from the offsets Redis holds, not from memory: a
        Redis that restarted without its newest writes gets them again."""
        delay = 1.0
        while True:
            counted = replace(self.stats, users=set(self.stats.users))  # a failed batch is counted again
            try:
                if batches is not None:
                    self._apply(consumer, batches)
                else:
                    self._seek_to_stored(consumer, tps)
                return
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, redis_lib.BusyLoadingError) as exc:
                self.stats = counted
                if give_up():
                    raise ServiceUnavailable(
                        f"Redis at {self.settings.redis_url} did not come back ({type(exc).__name__}): "
                        "start it with `personalize stack up`") from None
                log.warning("Redis unavailable, the loader waits", url=self.settings.redis_url,
                            error=type(exc).__name__, retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                batches = None  # what was fetched may be applied or not: Redis's offsets say which

    def drain(self, timeout_s: float = 600) -> LoadStats:
        """Apply everything committed up to the end offsets current now, then return."""
        consumer, tps = self._consumer()
        deadline = time.monotonic() + timeout_s
        try:
            ends = consumer.end_offsets(tps)
            while any(consumer.position(tp) < ends[tp] for tp in tps):
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(f"the Redis loader did not reach the end of its topics in {timeout_s:.0f}s")
                # polls gathered into one batch of up to DRAIN_BATCH records: a user's parts
                # (and repeated updates of one part) merge into one HSET (measured: a 355k-record
                # drain wrote 299k HSETs in polls of 20k)
                batches: dict = {}
                count = 0
                while count < DRAIN_BATCH and any(consumer.position(tp) < ends[tp] for tp in tps):
                    polled = consumer.poll(timeout_ms=500)
                    for tp, records in polled.items():
                        batches.setdefault(tp, []).extend(records)
                        count += len(records)
                    if not polled and time.monotonic() > deadline:
                        break
                self._apply_or_wait(consumer, tps, batches, lambda: time.monotonic() > deadline)
        finally:
            consumer.close()
        return self.stats

    def follow(self, stop) -> LoadStats:
        """Apply committed records as they come until ``stop()`` is true (unbounded runs);
        a Redis outage is waited out (until ``stop()``)."""
        consumer, tps = self._consumer()
        try:
            while not stop():
                batches = consumer.poll(timeout_ms=500)
                if batches:
                    self._apply_or_wait(consumer, tps, batches, stop)
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
        unreadable: list[dict] = []
        for tp, records in batches.items():
            self.stats.records += len(records)
            if tp.topic == topics.topic_profile_updates:
                for rec in records:
                    try:
                        key = orjson.loads(rec.key)
                        part = (str(key["user_id"]), str(key["part"]))
                        value = orjson.loads(rec.value) if rec.value is not None else None
                        if value is not None and not isinstance(value, dict):
                            raise ValueError(f"a profile part is a JSON object, not {type(value).__name__}")
                    except Exception as exc:  # noqa: BLE001 - any unreadable record is skipped with its reason
                        unreadable.append(_dead_letter(rec, exc))
                        continue
                    latest[part] = value
            elif tp.topic == topics.topic_trending:
                for rec in records:
                    try:
                        row = orjson.loads(rec.value)
                        trending.append({"category": row["category"], "product_id": str(row["product_id"]),
                                         "views": int(row["views"]), "window_end_ms": int(row["window_end_ms"])})
                    except Exception as exc:  # noqa: BLE001
                        unreadable.append(_dead_letter(rec, exc))
            elif tp.topic == topics.topic_triggers:
                codec = schemas.codec("trigger")
                for rec in records:
                    try:
                        triggers.append(codec.decode(rec.value))
                    except Exception as exc:  # noqa: BLE001
                        unreadable.append(_dead_letter(rec, exc))
            elif tp.topic == topics.topic_model_snapshots and records:
                snapshot = records[-1].value  # one partition: the last is the newest
        pipe = self.redis.pipeline(transaction=True)
        for letter in unreadable:
            pipe.xadd(DEAD_LETTERS_KEY, letter, maxlen=DEAD_LETTERS_KEPT, approximate=True)
            log.warning("loader skipped a record it cannot read", **{k: v for k, v in letter.items()})
        self.stats.dead_letters += len(unreadable)
        self._added_at: list[int] = []  # positions of the trigger scripts' replies (1: added)
        self._profiles(pipe, latest.items())
        self._trending(pipe, trending)
        self._triggers(pipe, triggers)
        if snapshot is not None:
            pipe.set(MODELS_KEY, snapshot)
        pipe.hset(self.offsets_key, mapping={f"{tp.topic}:{tp.partition}": consumer.position(tp) for tp in batches})
        # a command Redis refuses (say a profile key some other writer made a string) is
        # kept as a dead letter; the rest of the batch and its offsets stand
        replies = pipe.execute(raise_on_error=False)
        refused = [r for r in replies if isinstance(r, redis_lib.ResponseError)]
        if refused:
            for error in refused:
                log.warning("Redis refused a loader write", error=str(error))
                self.redis.xadd(DEAD_LETTERS_KEY, {"reason": f"Redis refused a write: {error}"[:1000]},
                                maxlen=DEAD_LETTERS_KEPT, approximate=True)
            self.stats.dead_letters += len(refused)
        self.stats.stream_added += sum(replies[i - 1] for i in self._added_at if isinstance(replies[i - 1], int))

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
