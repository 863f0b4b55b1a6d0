"""Redis, materialized from the job's Kafka outputs (a read_committed loader).

Python functions in Flink get no checkpoint hook, so a Redis write from inside
the job could be lost or repeated at a failure (DESIGN.md). The job therefore
writes its outputs to Kafka: the profile's two changelogs at-least-once, as each
change happens (the live changes of ``operators.live`` carry the user's ``version``,
the models step's sessions part its session's close, ``propensity_ms``; ``_APPLY_LIVE``
and ``_APPLY_PARTS`` apply a change only when newer than what the profile holds, so a
replay after a failure never leaves a profile older), and the trending windows,
triggers and model snapshots exactly-once, visible at the checkpoint that commits
them. This loader reads them under read_committed, keeps the newest value
per key in a batch, and writes absolute values to Redis together with its next
offsets in one MULTI/EXEC transaction (``loader:offsets``). Writes and offsets land
together or not at all, so a crash or restart neither loses nor re-applies a
batch; and since the values are absolute, even a replay would leave Redis identical.
(The offsets that count live in Redis for that atomicity; the loaders' Kafka consumer
group only assigns the partitions, and gets the offsets committed after, for monitoring.)

Every record about a user (live changes, the sessions part, triggers, segment changes,
erasures) is keyed by the user id, on topics of as many partitions, so it lands on the
partition Kafka's default partitioner gives that key on each topic; the group's range
assignor gives one loader the same partition number of every topic: one loader applies
all of a user's records.

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
  (a SET), so a replay of the same sessions adds nothing. The job writes each trigger
  twice, at-least-once as it is emitted (``topic_triggers_live``: the fast path) and
  exactly-once at the checkpoint; the first to arrive adds the entry
- ``models:snapshot`` STRING: the newest model snapshot (JSON), for ``personalize models``

Erasure (``personalize forget``, the erasures topic): the user's profile, its trigger
stream entries (found through ``personalize:triggers:by_user:{user}``, a HASH entry id ->
trigger id the trigger script keeps), those trigger ids and its consent mark are deleted
in one script, and the user is listed in ``personalize:loader:erased`` with the erasure's
time: no profile part of state begun before it (its ``epoch``) and no trigger of a session
that ended by then is written afterwards, in whatever order the topics are read.

The loader's own keys live under ``personalize:`` (no category or user id can name
one of them): its offsets, the users whose consent is withdrawn, the trending window
ends, its partitions' owner tokens, and ``personalize:loader:dead_letters``, a STREAM of the records it
could not read (topic, partition, offset, reason; the newest 10,000), which it skips
instead of stopping. (The trigger id set keeps its name beside the stream it guards.)

Fencing (``Materializer``): at each assignment a loader writes a new owner token on its
partitions and every transaction checks them, so a loader that paused past its group
session writes nothing stale once another was given its partitions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import orjson
import redis as redis_lib

from personalize import credentials, logs
from personalize.errors import ServiceUnavailable
from personalize.settings import Settings
from operators import live
from operators.triggers import format_cents

log = logs.get(__name__)

PROFILE_PREFIX = "profile:"
PROFILE_PART = "sessions"  # the models step's part (operators/actions.py)
LIVE_PART = "live"  # the live changelog's records (operators/live.py): one part, the user's whole live state
TRENDING_PREFIX = "trending:"
INTERNAL = "personalize:"
TRENDING_WINDOWS = INTERNAL + "trending:window_end_ms"
OFFSETS_KEY = INTERNAL + "loader:offsets"
DEAD_LETTERS_KEY = INTERNAL + "loader:dead_letters"
DEAD_LETTERS_KEPT = 10_000
RETRY_MAX_S = 30.0  # the longest wait between two tries while Redis does not answer
OWNER_PREFIX = INTERNAL + "loader:owner:"       # + "{topic}:{partition}" -> "{token} {holder}"
OWNER_TOKENS = INTERNAL + "loader:owner_token"  # INCR: every assignment gets a greater token
TRIGGER_STREAM = "triggers:cart_abandonment"
TRIGGER_IDS = "triggers:cart_abandonment:ids"
TRIGGERS_BY_USER = INTERNAL + "triggers:by_user:"  # + user -> HASH stream entry id -> trigger id
ERASED_KEY = INTERNAL + "loader:erased"  # user -> the newest erasure's requested_ms
MODELS_KEY = "models:snapshot"
NO_CONSENT_KEY = INTERNAL + "loader:no_consent"  # user -> event time consent was withdrawn at
# a mark of an older loader ("1"): withdrawn at an unknown time, so until consent is given again
NO_TIME = 2**63 - 1
CHANGES_PER_SCRIPT = 500  # profile changes one script call applies
# apply live profile changes (operators/live.py), each only when it is newer than its
# profile: its version above the one the profile holds (versions are decimal strings:
# compared by length, then as text, since Lua's numbers are doubles), and its consent flag
# from after any withdrawal marked. A withdrawal marks the user (the newest event time it
# is from) and deletes the profile; consent given again clears the mark.
# KEYS[1]: the no-consent marks, KEYS[2..]: the changes' profiles; ARGV[1]: ttl ms (0:
# none), then per change: user, version, consent ('1'/'0'), consent_ms, n, the n fields to
# delete (the session in progress's, when none is open), m, then m values field, value, ...
# Reply per change: 1 written, -1 deleted (consent withdrawn), 0 not newer (skipped), or
# the error Redis gave it (say WRONGTYPE: another writer's key), the others applied all the same
_APPLY_LIVE = """
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local ttl = tonumber(ARGV[1])
local function apply(key, user, version, consent, at_s, n, gone, m, kv)
  local stored = redis.call('HGET', key, 'version')
  if stored and not newer(version, stored) then return 0 end
  local at = tonumber(at_s)
  local mark = redis.call('HGET', KEYS[1], user)
  if mark == '1' then mark = '9223372036854775807' end
  if consent == '0' then
    if (not mark) or tonumber(mark) < at then redis.call('HSET', KEYS[1], user, at_s) end
    redis.call('DEL', key)
    return -1
  end
  if mark and tonumber(mark) >= at then return 0 end
  if mark then redis.call('HDEL', KEYS[1], user) end
  if n > 0 then redis.call('HDEL', key, unpack(ARGV, gone, gone + n - 1)) end
  redis.call('HSET', key, unpack(ARGV, kv, kv + m - 1))
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  return 1
end
local out, i = {}, 2
for k = 2, #KEYS do
  local n = tonumber(ARGV[i + 4])
  local gone = i + 5
  local m = tonumber(ARGV[gone + n])
  local kv = gone + n + 1
  local ok, result = pcall(apply, KEYS[k], ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], n, gone, m, kv)
  if not ok then result = type(result) == 'table' and result.err or tostring(result) end
  out[#out + 1] = result
  i = kv + m
end
return out
"""
# write the models step's profile part (operators/actions.py: the session fields, the
# propensity and the segment at a session's close), at-least-once like the live changes: a
# part applies only when newer than the one the profile holds (its session's close,
# ``propensity_ms``, above the profile's; 0: a part of a release without it, always newer),
# so a replay after a failure never leaves the profile older; and none from before the
# user's consent was withdrawn: a part of a marked user is written only when it consents at
# a later event time (consent given again; the live change that clears the mark may come later).
# KEYS[1]: the no-consent marks, KEYS[2..]: the profiles; ARGV[1]: ttl ms, then per part:
# user, consent ('1'/'0'), consent_ms, version, m, then m values field, value, ...
# Reply per part: 1 written, 0 skipped (from before a withdrawal, or not newer), or the
# error Redis gave it
_APPLY_PARTS = """
local ttl = tonumber(ARGV[1])
local function apply(key, user, consent, at, version, m, kv)
  local mark = redis.call('HGET', KEYS[1], user)
  if mark == '1' then mark = '9223372036854775807' end
  if mark and (consent == '0' or tonumber(mark) >= at) then return 0 end
  if version > 0 then
    local held = redis.call('HGET', key, 'propensity_ms')
    if held and tonumber(held) >= version then return 0 end
  end
  if m > 0 then redis.call('HSET', key, unpack(ARGV, kv, kv + m - 1)) end
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  return 1
end
local out, i = {}, 2
for k = 2, #KEYS do
  local m = tonumber(ARGV[i + 4])
  local ok, result = pcall(apply, KEYS[k], ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]),
                           m, i + 5)
  if not ok then result = type(result) == 'table' and result.err or tostring(result) end
  out[#out + 1] = result
  i = i + 5 + m
end
return out
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
    """Another loader took this loader's partitions (their owner tokens changed in Redis)."""


class _Fenced(Exception):
    """A partition of this loader's batch carries another loader's owner token."""


def _holder() -> str:
    import os
    import socket
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def loader_group(settings: Settings) -> str:
    """The loaders' Kafka consumer group: the setting, else one per Redis database and job
    (its live changelog topic): loaders writing the same database share it, others do not."""
    import hashlib

    if settings.loader_group:
        return settings.loader_group
    target = f"{settings.redis_url}\n{settings.topic_profile_live}".encode()
    return "personalize-redis-loader-" + hashlib.sha256(target).hexdigest()[:16]


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
    its derived fields out; it never stops the loader. The live function derives
    ``revenue``, ``updated_ms``, ``active_hours`` and ``session_cart_value`` itself;
    records of a release before it get them here."""
    out = {k: str(v) for k, v in fields.items() if k not in _NOT_WRITTEN and v is not None}
    if part in (LIVE_PART, "totals"):
        _derive(out)
    return out


_NOT_WRITTEN = frozenset(("consent", "consent_ms", "epoch", "version"))


def _derive(out: dict) -> None:
    if "revenue_cents" in out and "revenue" not in out:
        out["revenue"] = format_cents(int(out["revenue_cents"]))
    if "last_seen_ms" in out and "updated_ms" not in out:
        out["updated_ms"] = out["last_seen_ms"]  # event time, so a replay writes the same value
    if "events_by_hour" in out and "active_hours" not in out:
        out["active_hours"] = active_hours(out["events_by_hour"])
    if "session_cart_value_cents" in out:
        out["session_cart_value"] = format_cents(int(out.pop("session_cart_value_cents")))


def _version(fields: dict) -> int:
    value = fields.get("version")
    return value if isinstance(value, int) else 0


def part_version(fields: dict) -> int:
    """A sessions part's version: its session's close (``propensity_ms``; 0 when a part of
    an earlier release lacks it)."""
    value = fields.get("propensity_ms")
    return value if isinstance(value, int) else 0


def live_args(user: str, fields: dict) -> list:
    """One live change of ``user`` as ``_APPLY_LIVE`` takes it in its ARGV: the record's
    fields as they come (the live function writes them as the profile shows them; redis-py
    packs numbers itself, and no field but the consent is a boolean), but its version,
    consent and epoch."""
    if "updated_ms" in fields:
        kv = [x for name, value in fields.items() if value is not None and name not in _NOT_WRITTEN
              for x in (name, value)]
        gone = [name for name in live.SESSION_FIELDS if fields.get(name) is None]
    else:  # a record of a release before the live function derived them
        mapping = profile_fields(LIVE_PART, fields)
        kv = [x for item in mapping.items() for x in item]
        gone = [name for name in live.SESSION_FIELDS if name not in mapping]
    version = fields.get("version") or 0
    return [user, version, "1" if consents(fields) else "0", max(consent_ms(fields), 0),
            len(gone), *gone, 2 + len(kv), "version", version, *kv]


def _dead_letter(rec, exc: Exception) -> dict:
    """What the loader keeps of a record it cannot read: where it is, and why."""
    return {"topic": rec.topic(), "partition": rec.partition(), "offset": rec.offset(),
            "reason": f"{type(exc).__name__}: {exc}"[:1000]}


def _part(key: bytes | None, live_topic: bool) -> tuple[str, str]:
    """(user, part) of a profile record: keyed by the user id (a JSON key {user_id, part}
    on the models step's topic of releases before it was keyed by user)."""
    if key is None:
        raise ValueError("a profile change without a key")
    if not live_topic and key.startswith(b'{"user_id"'):
        parsed = orjson.loads(key)
        return str(parsed["user_id"]), str(parsed["part"])
    return key.decode(), LIVE_PART if live_topic else PROFILE_PART


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


def loader_topics(settings: Settings) -> list[str]:
    """The topics the loaders apply to Redis."""
    s = settings
    return [s.topic_profile_live, s.topic_profile_updates, s.topic_trending, s.topic_triggers,
            s.topic_triggers_live, s.topic_model_snapshots, s.topic_erasures]


def committed_ends(settings: Settings, topics: list[str] | None = None, timeout_s: float = 15) -> tuple[dict, dict]:
    """The committed ends (last stable offsets) and the beginnings of every partition of
    ``topics`` (default: the loaders' topics that exist), now, as {(topic, partition): offset}."""
    from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, **credentials.librdkafka(settings)})
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise ServiceUnavailable(f"Kafka does not answer at {settings.bootstrap_servers} "
                                 f"({exc.args[0].str()})") from None
    wanted = loader_topics(settings) if topics is None else topics
    tps = [TopicPartition(t, p) for t in wanted if t in metadata.topics for p in metadata.topics[t].partitions]
    if not tps:
        return {}, {}
    out = []
    for spec in (OffsetSpec.latest(), OffsetSpec.earliest()):
        futures = admin.list_offsets({tp: spec for tp in tps}, isolation_level=IsolationLevel.READ_COMMITTED,
                                     request_timeout=timeout_s)
        out.append({(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()})
    return out[0], out[1]


def loader_lag(settings: Settings, stored: dict, timeout_s: float = 5) -> int:
    """Records of the job's committed output the loaders have not applied: per partition of
    their topics, its committed end less the offset Redis holds (``stored``: the offsets
    hash, ``{"topic:partition": offset}``), summed."""
    ends, begins = committed_ends(settings, timeout_s=timeout_s)
    held = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in stored.items()}
    return sum(max(0, end - max(held.get(f"{t}:{p}", -1), begins[(t, p)])) for (t, p), end in ends.items())


class _Metrics:
    """The loader's Prometheus metrics (the process's default registry; one set per process)."""

    _made = None

    def __new__(cls):
        if cls._made is None:
            from prometheus_client import Counter, Gauge, Histogram

            made = super().__new__(cls)
            made.records = Counter("personalize_loader_records", "records applied to Redis, by the topic's role",
                                   ["role"])
            made.profile_writes = Counter("personalize_loader_profile_writes", "profile changes written")
            made.stream_added = Counter("personalize_loader_triggers_added",
                                        "new entries in the Redis trigger stream (once per trigger_id)")
            made.dead_letters = Counter("personalize_loader_dead_letters",
                                        "records skipped (unreadable) and writes Redis refused", ["reason"])
            made.erasures = Counter("personalize_loader_erasures", "erasures applied")
            made.lag = Gauge("personalize_loader_lag_records",
                             "records of the assigned partitions not yet applied (high watermark less position)")
            made.freshness = Histogram(
                "personalize_loader_freshness_seconds",
                "from a live change's newest event time to its write in Redis (live runs: event time is now)",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600))
            cls._made = made
        return cls._made


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


DRAIN_BATCH = 20_000  # records a drain applies in one Redis transaction
FOLLOW_BATCH = 20_000  # records a following loader applies at most in one transaction
POLL_BATCH = 5_000  # messages one consume() call returns at most
LAG_EVERY_S = 1.0  # a following loader measures its lag (the metric) at most this often
FENCED_TRIES = 3  # transactions in a row refused for another loader's owner token before giving up


class Materializer:
    """Reads the job's Kafka outputs from the offsets Redis holds and applies them to Redis.

    Loaders are members of one Kafka consumer group (``loader_group``). Kafka assigns each
    its partitions with the range assignor: the same partition number of every topic, so a
    user's live changes, session parts, triggers and erasures (all keyed by the user id,
    on topics of as many partitions) reach one loader, which applies them in order. The
    offsets live in Redis, written in the transaction that applies the records; the
    group's offsets in Kafka are committed after it, for lag monitoring only.

    Fencing: at each assignment a loader writes a new owner token on its partitions
    (``personalize:loader:owner:{topic}:{partition}``) before it reads their offsets, and
    every transaction WATCHes those keys and checks they still carry its token. A loader
    that paused past its group session (Kafka gave its partitions to another member, who
    wrote its own token) writes nothing stale: its transaction fails, it re-reads the
    offsets, and the group's next assignment tells it what it owns now."""

    def __init__(self, settings: Settings, offsets_key: str = OFFSETS_KEY, group: str | None = None):
        self.settings = settings
        self.offsets_key = offsets_key
        self.group = group or loader_group(settings)
        self.redis = redis_client(settings)
        self._add_once = self.redis.register_script(_ADD_ONCE)  # EVALSHA, the script sent once
        self._erase = self.redis.register_script(_ERASE)
        self._apply_live = self.redis.register_script(_APPLY_LIVE)
        self._apply_parts = self.redis.register_script(_APPLY_PARTS)
        self.holder = _holder()
        self.owner = ""  # "token holder": what this loader wrote on its partitions at its assignment
        self.assigned: list = []  # the partitions (confluent_kafka.TopicPartition) the group gave it
        self.consumer = None
        self._written: dict[tuple[str, int], int] = {}  # offsets this loader wrote last
        self._revoked = False
        self._fences = 0
        self._give_up = lambda: False
        self.stats = LoadStats()
        self.metrics = _Metrics()
        self._lag_at = -LAG_EVERY_S
        s = settings
        self._roles = {s.topic_profile_live: "live", s.topic_profile_updates: "sessions", s.topic_trending: "trending",
                       s.topic_triggers: "triggers", s.topic_triggers_live: "triggers_live",
                       s.topic_model_snapshots: "models", s.topic_erasures: "erasures"}

    # -- Kafka ---------------------------------------------------------------------------
    def _topics(self) -> list[str]:
        return loader_topics(self.settings)

    def _open(self):
        from confluent_kafka import Consumer, KafkaException

        credentials.check_kafka(self.settings)
        consumer = Consumer({
            "bootstrap.servers": self.settings.bootstrap_servers,
            "group.id": self.group,
            "client.id": "personalize-redis-loader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            # the same partition number of every topic to one member: a user's records together
            "partition.assignment.strategy": "range",
            # a killed loader's partitions go to the others after this long (the broker's
            # minimum is 6 s; librdkafka's default 45 s)
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 2_000,
            # fetch in chunks: a fetch per few records costs the broker and the loader more than
            # the records (make bench: the broker's CPU doubled once the profile's parts were
            # read as the job wrote them); at low rates a fetch waits at most 20 ms for them
            "fetch.min.bytes": 256 * 1024,
            "fetch.wait.max.ms": 20,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "queued.max.messages.kbytes": 16 * 1024,  # the records fetched ahead, per partition
            **credentials.librdkafka(self.settings),
        })
        try:
            existing = consumer.list_topics(timeout=15).topics
        except KafkaException as exc:
            consumer.close()
            raise ServiceUnavailable(
                f"Kafka does not answer at {self.settings.bootstrap_servers} ({exc.args[0].str()}): "
                "start it with `personalize stack up` or set PERSONALIZE_BOOTSTRAP_SERVERS") from None
        self.subscribed = [t for t in self._topics() if t in existing]
        consumer.subscribe(self.subscribed, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)
        self.consumer = consumer
        return consumer

    def _close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()  # leaves the group: the others take its partitions at once
            finally:
                self.consumer = None
                self.assigned = []

    def _on_assign(self, consumer, partitions) -> None:
        self._retrying(lambda: self._own(partitions))
        consumer.assign(partitions)
        self.assigned = list(partitions)
        log.info("Redis loader assigned", group=self.group, partitions=len(partitions))

    def _on_revoke(self, consumer, partitions) -> None:
        self.assigned = []  # eager rebalancing: all of them; what was gathered is dropped
        self._revoked = True

    def _own(self, partitions) -> None:
        """Write a new owner token on ``partitions``, then position each at the offset Redis
        holds (its beginning when none). In this order: a loader that still applies a batch
        of these partitions either commits before the token changes (its offsets are read
        here) or fails on the token."""
        from confluent_kafka import OFFSET_BEGINNING

        self.owner = f"{self.redis.incr(OWNER_TOKENS)} {self.holder}"
        with self.redis.pipeline(transaction=True) as pipe:
            for tp in partitions:
                pipe.set(f"{OWNER_PREFIX}{tp.topic}:{tp.partition}", self.owner)
            pipe.hgetall(self.offsets_key)
            stored = pipe.execute()[-1]
        for tp in partitions:
            offset = stored.get(f"{tp.topic}:{tp.partition}".encode())
            tp.offset = int(offset) if offset is not None else OFFSET_BEGINNING
            if offset is not None:
                self._written[(tp.topic, tp.partition)] = int(offset)
        self._fences = 0

    def _reposition(self) -> None:
        """Go back to the offsets Redis holds for every assigned partition (after a batch that
        was not written, or a Redis that may have lost its newest writes)."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        if not self.assigned:
            return
        stored = self.redis.hgetall(self.offsets_key)
        positions = []
        for tp in self.assigned:
            offset = stored.get(f"{tp.topic}:{tp.partition}".encode())
            positions.append(TopicPartition(tp.topic, tp.partition, int(offset) if offset is not None else OFFSET_BEGINNING))
            if offset is not None:
                self._written[(tp.topic, tp.partition)] = int(offset)
        self.consumer.assign(positions)
        self.assigned = positions

    def _retrying(self, action):
        """``action()``, waiting out a Redis that does not answer (1 s doubling to RETRY_MAX_S)
        until ``self._give_up()``."""
        delay = 1.0
        while True:
            try:
                return action()
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, redis_lib.BusyLoadingError) as exc:
                if self._give_up():
                    raise ServiceUnavailable(
                        f"Redis at {self.settings.redis_address} did not come back ({type(exc).__name__}): "
                        "start it with `personalize stack up`") from None
                log.warning("Redis unavailable, the loader waits", url=self.settings.redis_address,
                            error=type(exc).__name__, retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _gather(self, limit: int, ends: dict | None = None, wait_s: float = 0.5):
        """Up to ``limit`` records as {(topic, partition): [messages]} with the assigned
        partitions' positions after them; None when a rebalance voided what was read. A drain
        (``ends``) stops gathering once its partitions reached their ends."""
        from confluent_kafka import KafkaError, KafkaException

        self._revoked = False
        batch: dict[tuple[str, int], list] = {}
        count = 0
        while count < limit:
            # what is fetched already, at once (consume() with a timeout waits all of it unless
            # the batch fills), else wait for the first record: a follower applies what came
            messages = self.consumer.consume(num_messages=min(POLL_BATCH, limit - count), timeout=0)
            if not messages and not (count and ends is None):
                first = self.consumer.poll(wait_s if not count else 0.05)
                messages = [first] if first is not None else []
            if self._revoked:
                return None
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.fatal():
                        raise KafkaException(error)
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.warning("Redis loader: Kafka reports", error=error.str())
                    continue
                batch.setdefault((message.topic(), message.partition()), []).append(message)
                count += 1
            if not messages:
                break
            if ends is not None and self.assigned and all(tp.offset >= ends.get((tp.topic, tp.partition), 0)
                                     for tp in self.consumer.position(self.assigned)):
                break
        positions = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.position(self.assigned)
                     if tp.offset >= 0} if self.assigned else {}
        return batch, positions

    def _ends(self) -> tuple[dict, dict]:
        """The committed ends (last stable offsets) and the beginnings of every partition of
        the subscribed topics, now."""
        return committed_ends(self.settings, self.subscribed)

    # -- the two ways to run ---------------------------------------------------------------
    def drain(self, timeout_s: float = 600) -> LoadStats:
        """Apply everything committed up to the ends current now, then return."""
        self._open()
        try:
            self._drain(time.monotonic() + timeout_s, timeout_s)
        finally:
            self._close()
        return self.stats

    def follow(self, stop, drain_after: bool = False, timeout_s: float = 600) -> LoadStats:
        """Apply committed records as they come until ``stop()`` is true (a Redis outage is
        waited out until then); with ``drain_after``, then everything committed by that time
        (the end of a bounded run: the job has finished)."""
        self._open()
        try:
            self._give_up = stop
            while not stop():
                gathered = self._gather(FOLLOW_BATCH, wait_s=0.1)
                if gathered is not None:
                    self._apply_or_wait(*gathered)
                self._observe_lag()
            if drain_after:
                self._drain(time.monotonic() + timeout_s, timeout_s)
        finally:
            self._close()
        return self.stats

    def _observe_lag(self) -> None:
        """The lag gauge: per assigned partition, its high watermark (as the last fetch saw it)
        less the consumer's position."""
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        if not self.assigned:
            self.metrics.lag.set(0)
            return
        lag = 0
        try:
            for tp in self.consumer.position(self.assigned):
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0 and tp.offset >= 0:
                    lag += max(0, high - tp.offset)
        except Exception as exc:  # noqa: BLE001 - monitoring only (e.g. in a rebalance)
            log.debug("loader lag not measured", error=str(exc))
            return
        self.metrics.lag.set(lag)

    def _drain(self, deadline: float, timeout_s: float) -> None:
        self._give_up = lambda: time.monotonic() > deadline
        ends, begins = self._ends()
        while True:
            # done when Redis holds every partition at or past its end, whichever loader wrote it
            stored = self._retrying(lambda: self.redis.hgetall(self.offsets_key))
            behind = [key for key, end in ends.items()
                      if max(int(stored.get(f"{key[0]}:{key[1]}".encode(), -1)), begins[key]) < end]
            if not behind:
                return
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"the Redis loader did not reach the end of its topics in {timeout_s:.0f}s "
                                         f"({len(behind)} partitions behind, e.g. {behind[0][0]}:{behind[0][1]})")
            gathered = self._gather(DRAIN_BATCH, ends=ends)
            if gathered is not None:
                self._apply_or_wait(*gathered)

    def _apply_or_wait(self, batch: dict, positions: dict) -> None:
        """Apply a batch. When Redis does not answer, wait (``_retrying``) and go on from the
        offsets Redis holds, not from memory: a Redis that restarted without its newest
        writes gets them again. A batch refused for another loader's token is dropped."""
        if not batch and not any(positions.get(k) != self._written.get(k) for k in positions):
            return
        counted = replace(self.stats, users=set(self.stats.users), deleted=set(self.stats.deleted))
        while True:
            try:
                self._apply(batch, positions)
                self._fences = 0
                return
            except redis_lib.WatchError:  # another loader applied an erasure meanwhile: again
                self.stats = replace(counted, users=set(counted.users), deleted=set(counted.deleted))
            except _Fenced as fenced:
                self.stats = counted
                self._fences += 1
                if self._fences >= FENCED_TRIES:
                    raise LoaderFenced(
                        f"another Redis loader ({fenced.args[0]}) took this loader's partitions and the "
                        f"Kafka group {self.group!r} did not give them back: two loaders outside one group "
                        "write this Redis database (set the same PERSONALIZE_LOADER_GROUP)") from None
                log.warning("another Redis loader owns this loader's partitions now; the batch is dropped",
                            holder=fenced.args[0])
                self._retrying(self._reposition)
                return
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, redis_lib.BusyLoadingError):
                self.stats = counted
                self._retrying(self._reposition)  # waits for Redis, then reads its offsets
                return

    # -- applying a batch ------------------------------------------------------------------
    def _apply(self, batch: dict, positions: dict) -> None:
        import schemas

        topics = self.settings
        latest: dict[tuple[str, str], dict | None] = {}
        trending: list[dict] = []
        triggers: list[dict] = []
        snapshot = None
        unreadable: list[dict] = []
        erasures: dict[str, int] = {}
        for (topic, _), records in batch.items():
            self.stats.records += len(records)
            if topic == topics.topic_profile_live or topic == topics.topic_profile_updates:
                is_live = topic == topics.topic_profile_live
                for rec in records:
                    try:
                        part = _part(rec.key(), is_live)
                        value = rec.value()
                        value = orjson.loads(value) if value is not None else None
                        if value is not None and not isinstance(value, dict):
                            raise ValueError(f"a profile change is a JSON object, not {type(value).__name__}")
                    except Exception as exc:  # noqa: BLE001 - any unreadable record is skipped with its reason
                        unreadable.append(_dead_letter(rec, exc))
                        continue
                    held = latest.get(part)
                    # the newest version of the batch, not the last record (after a failure the
                    # job replays changes older than those it wrote before)
                    if value is None or held is None or (
                            _version(value) > _version(held) if is_live
                            else part_version(value) >= part_version(held)):
                        latest[part] = value
            elif topic == topics.topic_trending:
                for rec in records:
                    try:
                        row = orjson.loads(rec.value())
                        trending.append({"category": row["category"], "product_id": str(row["product_id"]),
                                         "views": int(row["views"]), "window_end_ms": int(row["window_end_ms"])})
                    except Exception as exc:  # noqa: BLE001
                        unreadable.append(_dead_letter(rec, exc))
            elif topic == topics.topic_erasures:
                codec = schemas.codec("erasure")
                for rec in records:
                    if rec.value() is None:
                        continue
                    try:
                        erasure = codec.decode(rec.value())
                        user = erasure["user_id"]
                        erasures[user] = max(erasures.get(user, 0), int(erasure["requested_ms"]))
                    except Exception as exc:  # noqa: BLE001
                        unreadable.append(_dead_letter(rec, exc))
            elif topic == topics.topic_triggers or topic == topics.topic_triggers_live:
                codec = schemas.codec("trigger")
                for rec in records:
                    if rec.value() is None:  # an erasure's tombstone: the erasure itself comes on its topic
                        continue
                    try:
                        triggers.append(codec.decode(rec.value()))
                    except Exception as exc:  # noqa: BLE001
                        unreadable.append(_dead_letter(rec, exc))
            elif topic == topics.topic_model_snapshots and records:
                snapshot = records[-1].value()  # one partition: the last is the newest
        with self.redis.pipeline(transaction=True) as pipe:  # reset (UNWATCH) however it ends
            self._write(pipe, positions, latest, trending, triggers, snapshot, unreadable, erasures)
        for (topic, _), records in batch.items():
            self.metrics.records.labels(self._roles.get(topic, "other")).inc(len(records))
        self._written.update(positions)
        if positions:  # the group's offsets too, for lag monitoring (Redis's are the ones read)
            from confluent_kafka import TopicPartition

            try:
                self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()],
                                     asynchronous=True)
            except Exception as exc:  # noqa: BLE001 - monitoring only (e.g. in a rebalance)
                log.debug("loader offsets not committed to Kafka", error=str(exc))

    def _write(self, pipe, positions, latest, trending, triggers, snapshot, unreadable, erasures) -> None:
        # the owner tokens and the erasure marks are WATCHed: EXEC fails if another loader
        # took a partition (or applied an erasure) meanwhile
        owners = [f"{OWNER_PREFIX}{t}:{p}" for t, p in positions]
        pipe.watch(*owners, ERASED_KEY)
        if owners:
            for key, value in zip(owners, pipe.mget(owners)):
                if value is None or value.decode() != self.owner:
                    raise _Fenced(value.decode().split(" ", 1)[-1] if value else "none")
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
        if unreadable:
            self.metrics.dead_letters.labels("unreadable").inc(len(unreadable))
        self._added_at: list[int] = []  # positions of the trigger scripts' replies (1: added)
        self._changes_at: list[tuple[int, list[str], bool]] = []  # profile scripts: position, users, live
        self._profiles(pipe, latest.items())
        self._trending(pipe, trending)
        self._triggers(pipe, triggers)
        if snapshot is not None:
            pipe.set(MODELS_KEY, snapshot)
        if positions:
            pipe.hset(self.offsets_key, mapping={f"{t}:{p}": o for (t, p), o in positions.items()})
        # a command Redis refuses (say a profile key some other writer made a string) is
        # kept as a dead letter; the rest of the batch and its offsets stand
        replies = pipe.execute(raise_on_error=False)
        refused = [r for r in replies if isinstance(r, redis_lib.ResponseError)]
        self._count_changes(replies)
        if refused:
            for error in refused:
                log.warning("Redis refused a loader write", error=str(error))
                self.redis.xadd(DEAD_LETTERS_KEY, {"reason": f"Redis refused a write: {error}"[:1000]},
                                maxlen=DEAD_LETTERS_KEPT, approximate=True)
            self.stats.dead_letters += len(refused)
            self.metrics.dead_letters.labels("refused").inc(len(refused))
        added = sum(replies[i - 1] for i in self._added_at if isinstance(replies[i - 1], int))
        self.stats.stream_added += added
        self.metrics.stream_added.inc(added)
        for at, user in self._erased_at:
            reply = replies[at - 1]
            profiles, entries = reply if isinstance(reply, list) else (0, 0)
            self.stats.erasures += 1
            self.metrics.erasures.inc()
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
        """Write profile changes, none of state begun before the user's newest erasure.

        The live changes (operators/live.py) carry the flag of the user's latest event and
        its time, so they decide: ``_APPLY_LIVE`` writes one only when its version is newer
        than the profile's, deletes the profile and marks the user in ``no_consent`` with
        that time when the flag is false, and clears the mark when a later event gives
        consent again. The models step's part is written by ``_APPLY_PARTS`` after them, in
        the same transaction, unless a mark says consent was withdrawn after it. Both check
        the marks inside Redis: nothing between a read and a write to race with."""
        ttl = self.settings.state_ttl_ms
        live_changes, parts = [], []
        for (user, part), fields in updates:
            if fields is None or epoch(fields) < self._erased.get(user, 0):
                continue
            (live_changes if part == LIVE_PART else parts).append((user, fields))
        for start in range(0, len(live_changes), CHANGES_PER_SCRIPT):
            chunk = live_changes[start:start + CHANGES_PER_SCRIPT]
            args = [ttl]
            for user, fields in chunk:
                args += live_args(user, fields)
            self._apply_live(keys=[NO_CONSENT_KEY, *(PROFILE_PREFIX + user for user, _ in chunk)], args=args,
                             client=pipe)
            self._changes_at.append((len(pipe), [user for user, _ in chunk],
                                     [fields.get("updated_ms") for _, fields in chunk]))
        for start in range(0, len(parts), CHANGES_PER_SCRIPT):
            chunk = parts[start:start + CHANGES_PER_SCRIPT]
            args: list = [ttl]
            for user, fields in chunk:
                mapping = profile_fields(PROFILE_PART, fields)
                args += [user, "1" if consents(fields) else "0", max(consent_ms(fields), 0), part_version(fields),
                         2 * len(mapping), *(x for kv in mapping.items() for x in kv)]
            self._apply_parts(keys=[NO_CONSENT_KEY, *(PROFILE_PREFIX + user for user, _ in chunk)], args=args,
                              client=pipe)
            self._changes_at.append((len(pipe), [user for user, _ in chunk], None))

    def _count_changes(self, replies) -> None:
        """The stats of this batch's profile changes, from their scripts' replies (a change
        Redis refused is a dead letter with Redis's reason)."""
        now_ms = time.time() * 1000
        written = self.stats.profile_writes
        for at, users, event_times in self._changes_at:
            reply = replies[at - 1]
            if not isinstance(reply, list):
                continue  # the whole script refused: counted with the refused commands
            for k, (user, result) in enumerate(zip(users, reply)):
                if result == 1:
                    if event_times is not None and isinstance(event_times[k], int):
                        self.metrics.freshness.observe(max(0.0, (now_ms - event_times[k]) / 1000))
                    self.stats.profile_writes += 1
                    self.stats.users.add(user)
                    self.stats.deleted.discard(user)
                elif result == -1:
                    self.stats.profiles_deleted += 1
                    self.stats.users.discard(user)
                    self.stats.deleted.add(user)
                elif isinstance(result, bytes):  # Redis refused this change (e.g. WRONGTYPE)
                    reason = f"Redis refused a write: {result.decode(errors='replace')}"[:1000]
                    log.warning("Redis refused a loader write", user=user_digest(user), error=reason)
                    self.redis.xadd(DEAD_LETTERS_KEY, {"reason": reason}, maxlen=DEAD_LETTERS_KEPT, approximate=True)
                    self.stats.dead_letters += 1
                    self.metrics.dead_letters.labels("refused").inc()
        self.metrics.profile_writes.inc(self.stats.profile_writes - written)

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
