"""Redis, materialized from the job's Kafka outputs (a read_committed loader).

Python functions in Flink get no checkpoint hook, so a Redis write from inside
the job could be lost or repeated at a failure (DESIGN.md). The job therefore
writes its outputs to Kafka: the live profile changelog at-least-once, as each
change happens (``operators.live``: each record carries the user's ``version``,
and ``_APPLY_LIVE`` applies it only when newer than the profile's, so a replay
after a failure never leaves a profile older), and the sessions part, trending
windows, triggers and model snapshots exactly-once, visible at the checkpoint that
commits them. This loader reads them under read_committed, keeps the newest value
per key in a batch, and writes absolute values to Redis together with its next
offsets in one MULTI/EXEC transaction (``loader:offsets``). Writes and offsets land
together or not at all, so a crash or restart neither loses nor re-applies a
batch; and since the values are absolute, even a replay would leave Redis identical.
(Offsets live in Redis, not in a Kafka consumer group, for that atomicity.)

Keys written:
- ``profile:{user_id}`` HASH: the profile fields of DESIGN.md (and window extras),
  expiring ``state_ttl_ms`` after its last write, as the user's state in the job does;
  deleted when the user's latest event withdrew personalization consent (the user
  is then listed in ``personalize:loader:no_consent`` with that event's time, and no
  part from before it is written; a consented part from after it is, as consent was
  given again)
- ``trending:{category}`` ZSET: product -> views in the newest trending window
  (``personalize:trending:window_end_ms``, a HASH category -> window end, beside it)
- ``triggers:cart_abandonment`` STREAM: one entry per trigger_id, ever. A Lua
  script adds the entry only when the id is new to ``triggers:cart_abandonment:ids``
  (a SET), so a replay of the same sessions adds nothing
- ``models:snapshot`` STRING: the newest model snapshot (JSON), for ``personalize models``

Erasure (``personalize forget``, the erasures topic): the user's profile, its trigger
stream entries (found through ``personalize:triggers:by_user:{user}``, a HASH entry id ->
trigger id the trigger script keeps), those trigger ids and its consent mark are deleted
in one script, and the user is listed in ``personalize:loader:erased`` with the erasure's
time: no profile part of state begun before it (its ``epoch``) and no trigger of a session
that ended by then is written afterwards, in whatever order the topics are read.

The loader's own keys live under ``personalize:`` (no category or user id can name
one of them): its offsets, the users whose consent is withdrawn, the trending window
ends, its leases, and ``personalize:loader:dead_letters``, a STREAM of the records it
could not read (topic, partition, offset, reason; the newest 10,000), which it skips
instead of stopping. (The trigger id set keeps its name beside the stream it guards.)

Fencing: a loader holds a lease per partition it reads (``personalize:loader:lease:
{topic}:{partition}``, "token holder", expiring after ``loader_lease_ms``), renewed in
every transaction it writes and while it waits for records. A second loader waits for
a lease until it runs out (a killed loader's does) and fails with the holder's name if
it is still renewed. Every transaction WATCHes the batch's leases and checks they still
carry this loader's token, so a loader that paused past its lease (another took over,
with a new token) writes nothing more: its EXEC fails and it stops (``LoaderFenced``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import orjson
import redis as redis_lib

from personalize import credentials, logs
from personalize.errors import ServiceUnavailable
from personalize.settings import Settings, project_root
from operators import live
from operators.triggers import format_cents

log = logs.get(__name__)

PROFILE_PREFIX = "profile:"
LIVE_PART = "live"  # the live changelog's records (operators/live.py): one part, the user's whole live state
TRENDING_PREFIX = "trending:"
INTERNAL = "personalize:"
TRENDING_WINDOWS = INTERNAL + "trending:window_end_ms"
OFFSETS_KEY = INTERNAL + "loader:offsets"
DEAD_LETTERS_KEY = INTERNAL + "loader:dead_letters"
DEAD_LETTERS_KEPT = 10_000
RETRY_MAX_S = 30.0  # the longest wait between two tries while Redis does not answer
LEASE_PREFIX = INTERNAL + "loader:lease:"      # + "{topic}:{partition}" -> "{token} {holder}"
LEASE_TOKENS = INTERNAL + "loader:lease_token"  # INCR: every new lease gets a greater token
# take or renew the leases of KEYS[2..] for holder ARGV[1] (ARGV[2]: ttl ms, ARGV[3]: the
# value "token holder" it holds, or ''). Renewed when all still carry that value; taken
# with a new token (INCR KEYS[1]) when each is free or this holder's; else {0, key, value, pttl}
_ACQUIRE = """
local mine, renew = ARGV[3], ARGV[3] ~= ''
for k = 2, #KEYS do
  local v = redis.call('GET', KEYS[k])
  if v and v ~= mine then
    renew = false
    if string.sub(v, string.find(v, ' ', 1, true) + 1) ~= ARGV[1] then
      return {0, KEYS[k], v, redis.call('PTTL', KEYS[k])}
    end
  elseif not v then
    renew = false
  end
end
if not renew then
  mine = redis.call('INCR', KEYS[1]) .. ' ' .. ARGV[1]
end
for k = 2, #KEYS do
  redis.call('SET', KEYS[k], mine, 'PX', ARGV[2])
end
return {1, mine}
"""
# give up the leases of KEYS that still carry ARGV[1]
_RELEASE = """
for k = 1, #KEYS do
  if redis.call('GET', KEYS[k]) == ARGV[1] then redis.call('DEL', KEYS[k]) end
end
return 0
"""
TRIGGER_STREAM = "triggers:cart_abandonment"
TRIGGER_IDS = "triggers:cart_abandonment:ids"
TRIGGERS_BY_USER = INTERNAL + "triggers:by_user:"  # + user -> HASH stream entry id -> trigger id
ERASED_KEY = INTERNAL + "loader:erased"  # user -> the newest erasure's requested_ms
MODELS_KEY = "models:snapshot"
NO_CONSENT_KEY = INTERNAL + "loader:no_consent"  # user -> event time consent was withdrawn at
# a mark of an older loader ("1"): withdrawn at an unknown time, so until consent is given again
NO_TIME = 2**63 - 1
# the loader processes of a drain apply a user's parts from different partitions at the
# same time, so a part may be written just after another process withdrew the user's
# consent (marked it and deleted its profile). Each transaction that writes parts it
# cannot decide on (no ``totals`` in its batch) ends with this script: the profile of
# a user marked by then at or after its oldest part's time is deleted again, before
# anyone can read it. (A part newer than the mark stands: consent was given again.)
# KEYS[1]: the no-consent hash, KEYS[2..]: the profiles; ARGV: per profile its user id and
# its oldest part's time. Reply: 1 per profile deleted.
_DROP_WITHDRAWN = """
local out = {}
for k = 2, #KEYS do
  local mark = redis.call('HGET', KEYS[1], ARGV[2 * k - 3])
  if mark and tonumber(mark) >= tonumber(ARGV[2 * k - 2]) then
    redis.call('DEL', KEYS[k])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
PROFILES_PER_SCRIPT = 1_000
# apply one live profile change (operators/live.py) only when it is newer than the profile:
# its version above the one the profile holds (versions are decimal strings: compared by
# length, then as text, since Lua's numbers are doubles), and its consent flag from after
# any withdrawal marked. A withdrawal marks the user (the newest event time it is from) and
# deletes the profile; consent given again clears the mark. KEYS: the profile, the
# no-consent marks; ARGV: user, version, consent ('1'/'0'), consent_ms, ttl ms (0: none),
# n, the n fields to delete (the session in progress's, when none is open), then field,
# value, ... Reply: 1 written, -1 deleted (consent withdrawn), 0 not newer (skipped)
_APPLY_LIVE = """
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local stored = redis.call('HGET', KEYS[1], 'version')
if stored and not newer(ARGV[2], stored) then return 0 end
local mark = redis.call('HGET', KEYS[2], ARGV[1])
if mark == '1' then mark = '9223372036854775807' end
local at = tonumber(ARGV[4])
if ARGV[3] == '0' then
  if (not mark) or tonumber(mark) < at then redis.call('HSET', KEYS[2], ARGV[1], ARGV[4]) end
  redis.call('DEL', KEYS[1])
  return -1
end
if mark then
  if tonumber(mark) >= at then return 0 end
  redis.call('HDEL', KEYS[2], ARGV[1])
end
local n = tonumber(ARGV[6])
if n > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 7, 6 + n)) end
redis.call('HSET', KEYS[1], unpack(ARGV, 7 + n))
if tonumber(ARGV[5]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return 1
"""
# add a stream entry only for a trigger id never seen, and index it under its user
# (KEYS: stream, id set, the user's index; ARGV: id, field, value, ...)
_ADD_ONCE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  local entry = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
  redis.call('HSET', KEYS[3], entry, ARGV[1])
  return 1
end
return 0
"""
# forget a user (KEYS: erased marks, profile, the user's trigger index, stream, id set,
# no-consent marks; ARGV: user, requested_ms). Reply: {profiles deleted, stream entries deleted}
_ERASE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if (not old) or tonumber(old) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local profiles = redis.call('DEL', KEYS[2])
local index = redis.call('HGETALL', KEYS[3])
local entries = 0
for i = 1, #index, 2 do
  entries = entries + redis.call('XDEL', KEYS[4], index[i])
  redis.call('SREM', KEYS[5], index[i + 1])
end
redis.call('DEL', KEYS[3])
redis.call('HDEL', KEYS[6], ARGV[1])
return {profiles, entries}
"""


class LoaderFenced(ServiceUnavailable):
    """Another loader holds (or took over) the leases of this loader's partitions."""


class _LeaseLost(Exception):
    """This loader's lease ran out or was taken before its transaction."""


def _holder() -> str:
    import os
    import socket
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def redis_client(settings: Settings) -> redis_lib.Redis:
    client = credentials.redis_client(settings, socket_connect_timeout=5, socket_timeout=30)
    try:
        client.ping()
    except redis_lib.AuthenticationError as exc:  # NOAUTH and WRONGPASS alike
        given = settings.redis_password or settings.redis_address != settings.redis_url  # in the URL
        what = "refused the credentials" if given else "requires a password"
        raise ServiceUnavailable(
            f"Redis at {settings.redis_address} {what} ({settings.redact(str(exc))}): "
            "set PERSONALIZE_REDIS_PASSWORD (and PERSONALIZE_REDIS_USERNAME for an ACL user)"
        ) from None
    except redis_lib.RedisError as exc:
        raise ServiceUnavailable(
            f"Redis does not answer at {settings.redis_address} ({type(exc).__name__}): "
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
    out = {k: str(v) for k, v in fields.items() if k not in ("consent", "consent_ms", "epoch") and v is not None}
    if part in (LIVE_PART, "totals"):
        if "revenue_cents" in out:
            out["revenue"] = format_cents(int(out["revenue_cents"]))
        if "last_seen_ms" in out:
            out["updated_ms"] = out["last_seen_ms"]  # event time, so a replay writes the same value
        if "events_by_hour" in out:
            out["active_hours"] = active_hours(out["events_by_hour"])
        if "session_cart_value_cents" in out:
            out["session_cart_value"] = format_cents(int(out.pop("session_cart_value_cents")))
    return out


def _version(fields: dict) -> int:
    value = fields.get("version")
    return value if isinstance(value, int) else 0


def live_args(user: str, fields: dict, ttl_ms: int) -> list:
    """``_APPLY_LIVE``'s ARGV for one live change of ``user``."""
    mapping = profile_fields(LIVE_PART, fields)
    mapping["version"] = str(fields.get("version") or 0)
    gone = [name for name in live.SESSION_FIELDS if name not in mapping]
    return [user, mapping["version"], "1" if consents(fields) else "0", max(consent_ms(fields), 0), ttl_ms,
            len(gone), *gone, *(x for kv in mapping.items() for x in kv)]


def _dead_letter(rec, exc: Exception) -> dict:
    """What the loader keeps of a record it cannot read: where it is, and why."""
    return {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
            "reason": f"{type(exc).__name__}: {exc}"[:1000]}


def consents(fields: dict) -> bool:
    """The personalization flag a part carries (True unless it says false)."""
    return fields.get("consent") not in (False, "false")


def consent_ms(fields: dict) -> int:
    """The event time a part's consent flag is from (-1 when an older job's part lacks it)."""
    value = fields.get("consent_ms")
    return int(value) if isinstance(value, int) else -1


def epoch(fields: dict) -> int:
    """The erasure a part's state began after (0: none, or an older job's part)."""
    value = fields.get("epoch")
    return value if isinstance(value, int) else 0


def user_digest(user: str) -> str:
    """How logs name a user: never the id in clear (a pseudonym is hashed once more)."""
    import hashlib

    return "user#" + hashlib.sha256(user.encode("utf-8")).hexdigest()[:16]


def withdrawn_at(mark: bytes | None) -> int | None:
    """The event time in a no-consent mark (None: not marked)."""
    if mark is None:
        return None
    return NO_TIME if mark == b"1" else int(mark)


@dataclass
class LoadStats:
    records: int = 0
    profile_writes: int = 0
    profiles_deleted: int = 0
    trending_rows: int = 0
    triggers: int = 0
    stream_added: int = 0
    users: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)  # profiles deleted (consent withdrawn) and not written since
    dead_letters: int = 0
    erasures: int = 0
    erased_entries: int = 0  # trigger stream entries deleted by erasures

    @staticmethod
    def merged(parts: list[LoadStats], *, in_order: bool = False) -> LoadStats:
        """The stats of several loaders: shards of one drain (concurrent: a deleted profile
        stays deleted, as only the loader of its ``totals`` part writes it again), or
        loaders one after the other (``in_order``: the later one's writes and deletes win)."""
        total = LoadStats()
        for part in parts:
            for name in ("records", "profile_writes", "profiles_deleted", "trending_rows", "triggers",
                         "stream_added", "dead_letters", "erasures", "erased_entries"):
                setattr(total, name, getattr(total, name) + getattr(part, name))
            if in_order:
                total.users = (total.users - part.deleted) | part.users
                total.deleted = (total.deleted - part.users) | part.deleted
            else:
                total.users |= part.users
                total.deleted |= part.deleted
        total.users -= total.deleted
        return total


DRAIN_BATCH = 50_000  # records a drain applies in one Redis transaction


class Materializer:
    """Reads the profile changelog and trending topics from its committed offsets into Redis.

    ``shard`` (number, count): this loader reads the changelog and trigger partitions
    whose number modulo ``count`` is ``number``, and shard 0 the trending and model
    snapshot topics too; ``drain_parallel`` runs one process per shard. Every shard
    keeps its offsets in the same hash (a field per partition), so a single loader
    and a sharded drain take over from each other exactly."""

    def __init__(self, settings: Settings, offsets_key: str = OFFSETS_KEY, shard: tuple[int, int] = (0, 1)):
        self.settings = settings
        self.offsets_key = offsets_key
        self.shard = shard
        self.redis = redis_client(settings)
        self._add_once = self.redis.register_script(_ADD_ONCE)  # EVALSHA, the script sent once
        self._erase = self.redis.register_script(_ERASE)
        self._drop_withdrawn = self.redis.register_script(_DROP_WITHDRAWN)
        self._apply_live = self.redis.register_script(_APPLY_LIVE)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._release = self.redis.register_script(_RELEASE)
        self.holder = _holder()
        self.lease = ""  # "token holder" while this loader holds its partitions' leases
        self._lease_keys: list[str] = []
        self._renewed = 0.0
        self.stats = LoadStats()

    def _owns(self, topic: str, partition: int) -> bool:
        number, count = self.shard
        if topic in (self.settings.topic_profile_updates, self.settings.topic_profile_live, self.settings.topic_triggers,
                     self.settings.topic_erasures):
            return partition % count == number
        return number == 0

    def _consumer(self):
        from kafka import KafkaConsumer, TopicPartition

        credentials.check_kafka(self.settings)
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
            **credentials.kafka_python(self.settings),
        )
        tps = []
        for topic in (self.settings.topic_profile_live, self.settings.topic_profile_updates, self.settings.topic_trending,
                      self.settings.topic_triggers, self.settings.topic_model_snapshots, self.settings.topic_erasures):
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                if self._owns(topic, p):
                    tps.append(TopicPartition(topic, p))
        consumer.assign(tps)
        self._lease_keys = [f"{LEASE_PREFIX}{tp.topic}:{tp.partition}" for tp in tps]
        self._take_lease(wait_s=2 * self.settings.loader_lease_ms / 1000)
        self._seek_to_stored(consumer, tps)
        return consumer, tps

    def _take_lease(self, wait_s: float = 0.0) -> bool:
        """Take or renew the leases of this loader's partitions, waiting up to ``wait_s``
        for another holder's to run out. True when the token is new (the caller re-reads
        its offsets from Redis: another loader may have written meanwhile)."""
        ttl = self.settings.loader_lease_ms
        deadline = time.monotonic() + wait_s
        said = False
        while True:
            reply = self._acquire(keys=[LEASE_TOKENS, *self._lease_keys], args=[self.holder, ttl, self.lease])
            if reply[0] == 1:
                taken = reply[1].decode()
                changed, self.lease, self._renewed = taken != self.lease, taken, time.monotonic()
                return changed
            key, value, left_ms = reply[1].decode(), reply[2].decode(), int(reply[3])
            holder = value.split(" ", 1)[1]
            if time.monotonic() >= deadline:
                raise LoaderFenced(
                    f"another Redis loader ({holder}) holds {key.removeprefix(LEASE_PREFIX)} and renews its "
                    f"lease: stop it before starting this one (a stopped loader's lease runs out after "
                    f"PERSONALIZE_LOADER_LEASE_MS, {ttl} ms)")
            if not said:
                log.info("waiting for another Redis loader's lease to run out", holder=holder,
                         partition=key.removeprefix(LEASE_PREFIX), left_ms=left_ms)
                said = True
            time.sleep(max(0.05, min(0.5, left_ms / 1000, deadline - time.monotonic())))

    def _lease_due(self) -> bool:
        return time.monotonic() - self._renewed > self.settings.loader_lease_ms / 3000  # a third of it, in s

    def _give_up_lease(self) -> None:
        if self.lease and self._lease_keys:
            try:
                self._release(keys=self._lease_keys, args=[self.lease])
            except redis_lib.RedisError:  # Redis gone: the lease runs out on its own
                pass
            self.lease = ""

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
            # a failed batch is counted again
            counted = replace(self.stats, users=set(self.stats.users), deleted=set(self.stats.deleted))
            try:
                if batches:
                    self._apply(consumer, batches)
                # no batch: renew the lease; a new token (it ran out meanwhile), or a retry,
                # re-reads the offsets from Redis (LoaderFenced if another loader holds it)
                elif self._take_lease() or batches is None:
                    self._seek_to_stored(consumer, tps)
                return
            except (redis_lib.WatchError, _LeaseLost):
                # the lease ran out (a pause, a Redis restart) or another loader took it: this
                # batch was not written; next try takes the lease again if it is free
                self.stats = counted
                log.warning("the Redis loader's transaction was interrupted (its lease ran out, or another loader applied an erasure); reading the batch again")
                batches = None
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, redis_lib.BusyLoadingError) as exc:
                self.stats = counted
                if give_up():
                    raise ServiceUnavailable(
                        f"Redis at {self.settings.redis_address} did not come back ({type(exc).__name__}): "
                        "start it with `personalize stack up`") from None
                log.warning("Redis unavailable, the loader waits", url=self.settings.redis_address,
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
                # (and repeated updates of one part) merge into one write (docs/benchmarks.md:
                # bigger batches write less but Redis holds a transaction's commands until EXEC)
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
            self._give_up_lease()
            consumer.close()
        return self.stats

    def follow(self, stop) -> LoadStats:
        """Apply committed records as they come until ``stop()`` is true (unbounded runs);
        a Redis outage is waited out (until ``stop()``)."""
        consumer, tps = self._consumer()
        try:
            while not stop():
                batches = consumer.poll(timeout_ms=500)
                if batches or self._lease_due():  # an idle loader renews its lease too
                    self._apply_or_wait(consumer, tps, batches, stop)
        finally:
            self._give_up_lease()
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
        erasures: dict[str, int] = {}
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
            elif tp.topic == topics.topic_profile_live:
                for rec in records:
                    try:
                        part = (rec.key.decode(), LIVE_PART)
                        value = orjson.loads(rec.value) if rec.value is not None else None
                        if value is not None and not isinstance(value, dict):
                            raise ValueError(f"a live profile change is a JSON object, not {type(value).__name__}")
                    except Exception as exc:  # noqa: BLE001 - any unreadable record is skipped with its reason
                        unreadable.append(_dead_letter(rec, exc))
                        continue
                    # the newest version of the batch, not the last record: after a failure
                    # the job replays changes older than those it wrote before
                    held = latest.get(part)
                    if value is None or held is None or _version(value) > _version(held):
                        latest[part] = value
            elif tp.topic == topics.topic_trending:
                for rec in records:
                    try:
                        row = orjson.loads(rec.value)
                        trending.append({"category": row["category"], "product_id": str(row["product_id"]),
                                         "views": int(row["views"]), "window_end_ms": int(row["window_end_ms"])})
                    except Exception as exc:  # noqa: BLE001
                        unreadable.append(_dead_letter(rec, exc))
            elif tp.topic == topics.topic_erasures:
                codec = schemas.codec("erasure")
                for rec in records:
                    if rec.value is None:
                        continue
                    try:
                        erasure = codec.decode(rec.value)
                        user = erasure["user_id"]
                        erasures[user] = max(erasures.get(user, 0), int(erasure["requested_ms"]))
                    except Exception as exc:  # noqa: BLE001
                        unreadable.append(_dead_letter(rec, exc))
            elif tp.topic == topics.topic_triggers:
                codec = schemas.codec("trigger")
                for rec in records:
                    if rec.value is None:  # an erasure's tombstone: the erasure itself comes on its topic
                        continue
                    try:
                        triggers.append(codec.decode(rec.value))
                    except Exception as exc:  # noqa: BLE001
                        unreadable.append(_dead_letter(rec, exc))
            elif tp.topic == topics.topic_model_snapshots and records:
                snapshot = records[-1].value  # one partition: the last is the newest
        # the transaction writes only while this loader still holds its leases (WATCHed:
        # EXEC fails if one ran out or was taken meanwhile) and renews them at its end
        with self.redis.pipeline(transaction=True) as pipe:  # reset (UNWATCH) however it ends
            self._write(pipe, consumer, batches, latest, trending, triggers, snapshot, unreadable, erasures)

    def _write(self, pipe, consumer, batches, latest, trending, triggers, snapshot, unreadable, erasures) -> None:
        # the erasure marks are WATCHed too: an erasure another loader applies meanwhile
        # makes this transaction fail and the batch is read again against it
        pipe.watch(*self._lease_keys, ERASED_KEY)
        if any(v is None or v.decode() != self.lease for v in pipe.mget(self._lease_keys)):
            raise _LeaseLost
        # (read only when some user was ever forgotten: most batches pay one HLEN)
        users = sorted({user for user, _ in latest} | {t["user_id"] for t in triggers})
        marks = pipe.hmget(ERASED_KEY, users) if users and pipe.hlen(ERASED_KEY) else ()
        self._erased = {user: int(at) for user, at in zip(users, marks) if at is not None}
        for user, at in erasures.items():
            self._erased[user] = max(self._erased.get(user, 0), at)
        pipe.multi()
        self._erasures(pipe, erasures)
        for letter in unreadable:
            pipe.xadd(DEAD_LETTERS_KEY, letter, maxlen=DEAD_LETTERS_KEPT, approximate=True)
            log.warning("loader skipped a record it cannot read", **{k: v for k, v in letter.items()})
        self.stats.dead_letters += len(unreadable)
        self._added_at: list[int] = []  # positions of the trigger scripts' replies (1: added)
        self._live_at: list[tuple[int, str]] = []  # live change scripts: position, user
        self._dropped_at: list[tuple[int, list[tuple[str, int]]]] = []  # drop scripts: position, (user, parts)
        self._profiles(pipe, latest.items())
        self._trending(pipe, trending)
        self._triggers(pipe, triggers)
        if snapshot is not None:
            pipe.set(MODELS_KEY, snapshot)
        pipe.hset(self.offsets_key, mapping={f"{tp.topic}:{tp.partition}": consumer.position(tp) for tp in batches})
        for key in self._lease_keys:
            pipe.pexpire(key, self.settings.loader_lease_ms)
        # a command Redis refuses (say a profile key some other writer made a string) is
        # kept as a dead letter; the rest of the batch and its offsets stand
        replies = pipe.execute(raise_on_error=False)
        self._renewed = time.monotonic()
        refused = [r for r in replies if isinstance(r, redis_lib.ResponseError)]
        self._count_live(replies)
        for at, checked in self._dropped_at:
            flags = replies[at - 1]
            for (user, parts), dropped in zip(checked, flags if isinstance(flags, list) else ()):
                if dropped:
                    self.stats.users.discard(user)
                    self.stats.deleted.add(user)
                    self.stats.profile_writes -= parts
        if refused:
            for error in refused:
                log.warning("Redis refused a loader write", error=str(error))
                self.redis.xadd(DEAD_LETTERS_KEY, {"reason": f"Redis refused a write: {error}"[:1000]},
                                maxlen=DEAD_LETTERS_KEPT, approximate=True)
            self.stats.dead_letters += len(refused)
        self.stats.stream_added += sum(replies[i - 1] for i in self._added_at if isinstance(replies[i - 1], int))
        for at, user in self._erased_at:
            reply = replies[at - 1]
            profiles, entries = reply if isinstance(reply, list) else (0, 0)
            self.stats.erasures += 1
            self.stats.erased_entries += entries
            self.stats.users.discard(user)
            self.stats.deleted.add(user)
            log.info("erasure applied", user=user_digest(user), profiles_deleted=profiles, trigger_entries_deleted=entries)

    def _erasures(self, pipe, erasures: dict[str, int]) -> None:
        """Forget each user in one script (``_ERASE``), before this batch's writes."""
        self._erased_at: list[tuple[int, str]] = []
        for user, at in erasures.items():
            self._erase(keys=[ERASED_KEY, PROFILE_PREFIX + user, TRIGGERS_BY_USER + user, TRIGGER_STREAM,
                              TRIGGER_IDS, NO_CONSENT_KEY], args=[user, at], client=pipe)
            self._erased_at.append((len(pipe), user))

    def _triggers(self, pipe, records: list[dict]) -> None:
        from operators.triggers import as_json

        for record in records:
            erased = self._erased.get(record["user_id"])
            if erased is not None and record["session_end_ms"] <= erased:
                continue  # a session of before the user's erasure
            entry = as_json(record)
            entry["cart"] = orjson.dumps(entry["cart"]).decode()
            flat = [str(x) for k, v in entry.items() if v is not None for x in (k, v)]
            self._add_once(keys=[TRIGGER_STREAM, TRIGGER_IDS, TRIGGERS_BY_USER + record["user_id"]],
                           args=[entry["trigger_id"], *flat], client=pipe)
            self.stats.triggers += 1
            self._added_at.append(len(pipe))

    def _profiles(self, pipe, updates: Iterable[tuple[tuple[str, str], dict | None]]) -> None:
        """Write profile parts, but none from before the user's consent was withdrawn.

        The ``live`` part (operators/live.py) carries the flag of the user's latest event
        and its time, so it decides: ``_APPLY_LIVE`` writes it only when its version is
        newer than the profile's, deletes the profile and marks the user in
        ``no_consent`` with that time when the flag is false, and clears the mark when a
        later event gives consent again. The other parts (the models step's ``sessions``)
        of a marked user are written only if they give consent at a later event time.
        Their marks are read before the transaction, and ``_DROP_WITHDRAWN`` checks them
        again in it, after this batch's live changes: a user's parts sit on different
        topics, which other loader processes may apply at the same time."""
        # nothing of state begun before the user's newest erasure
        updates = [(key, fields) for key, fields in updates
                   if fields is None or epoch(fields) >= self._erased.get(key[0], 0)]
        ttl = self.settings.state_ttl_ms
        for (user, part), fields in updates:
            if part == LIVE_PART and fields is not None:
                self._apply_live(keys=[PROFILE_PREFIX + user, NO_CONSENT_KEY], args=live_args(user, fields, ttl),
                                 client=pipe)
                self._live_at.append((len(pipe), user))
        updates = [(key, fields) for key, fields in updates if key[1] != LIVE_PART and fields is not None]
        marked: dict[str, int] = {}  # user -> event time its consent was withdrawn at
        users = sorted({user for (user, _), _ in updates})
        if users:
            for user, mark in zip(users, self.redis.hmget(NO_CONSENT_KEY, users)):
                if mark is not None:
                    marked[user] = withdrawn_at(mark)
        merged: dict[str, dict[str, str]] = {}  # one HSET per user per batch
        parts: dict[str, int] = {}
        oldest: dict[str, int] = {}
        for (user, part), fields in updates:
            at = consent_ms(fields)
            if user in marked and (not consents(fields) or at <= marked[user]):
                continue  # from before the withdrawal
            merged.setdefault(user, {}).update(profile_fields(part, fields))
            parts[user] = parts.get(user, 0) + 1
            oldest[user] = min(oldest.get(user, at), at)
        for user, mapping in merged.items():
            if mapping:
                pipe.hset(PROFILE_PREFIX + user, mapping=mapping)
                if ttl:  # gone with the user's state in the job (state_ttl_ms)
                    pipe.pexpire(PROFILE_PREFIX + user, ttl)
                self.stats.users.add(user)
                self.stats.deleted.discard(user)
                self.stats.profile_writes += parts[user]
        checked = [user for user, mapping in merged.items() if mapping]
        for start in range(0, len(checked), PROFILES_PER_SCRIPT):
            chunk = checked[start:start + PROFILES_PER_SCRIPT]
            args = [x for user in chunk for x in (user, oldest[user])]
            self._drop_withdrawn(keys=[NO_CONSENT_KEY, *(PROFILE_PREFIX + u for u in chunk)], args=args, client=pipe)
            self._dropped_at.append((len(pipe), [(user, parts[user]) for user in chunk]))

    def _count_live(self, replies) -> None:
        """The stats of this batch's live changes, from their scripts' replies."""
        for at, user in self._live_at:
            reply = replies[at - 1]
            if reply == 1:
                self.stats.profile_writes += 1
                self.stats.users.add(user)
                self.stats.deleted.discard(user)
            elif reply == -1:
                self.stats.profiles_deleted += 1
                self.stats.users.discard(user)
                self.stats.deleted.add(user)

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


def drain_parallel(settings: Settings, workers: int | None = None, timeout_s: float = 600) -> LoadStats:
    """Apply everything committed up to now with ``workers`` loader processes
    (``settings.loader_workers``), one per shard of the partitions: this process runs
    shard 0, ``python -m sinks.redis`` processes the others (the loader parses and packs
    in Python, one core per process; measured in docs/benchmarks.md)."""
    import pickle
    import subprocess
    import sys

    count = workers or settings.loader_workers
    if count <= 1:
        return Materializer(settings).drain(timeout_s)
    # a fresh interpreter per shard, not a fork: the caller may hold a JVM gateway and threads
    procs = []
    for number in range(1, count):
        # run from the project's folder: ``-m sinks.redis`` finds the package there installed or not
        proc = subprocess.Popen([sys.executable, "-m", "sinks.redis"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, cwd=project_root())
        proc.stdin.write(pickle.dumps((settings, (number, count), timeout_s)))
        proc.stdin.close()
        procs.append(proc)
    try:
        parts = [Materializer(settings, shard=(0, count)).drain(timeout_s)]
    finally:
        outcomes = [(proc.stdout.read(), proc.wait()) for proc in procs]
    for out, code in outcomes:
        result = pickle.loads(out) if out else None
        if isinstance(result, BaseException):
            raise result
        if code != 0 or not isinstance(result, LoadStats):
            raise ServiceUnavailable(f"a Redis loader process ended with exit code {code}; see its log above")
        parts.append(result)
    return LoadStats.merged(parts)


def _shard_main() -> int:
    """One shard of ``drain_parallel``: (settings, shard, timeout) pickled on stdin, the
    LoadStats (or the error) pickled on stdout."""
    import pickle
    import sys

    settings, shard, timeout_s = pickle.loads(sys.stdin.buffer.read())
    logs.configure(settings.log_format, secrets=settings.secrets)
    try:
        result: object = Materializer(settings, shard=shard).drain(timeout_s)
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        result = exc
    sys.stdout.buffer.write(pickle.dumps(result))
    return 0


if __name__ == "__main__":
    from sinks.redis import _shard_main as main  # the module's own classes, not __main__'s copies, get pickled

    raise SystemExit(main())
