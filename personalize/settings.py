"""One frozen settings object, read from ``PERSONALIZE_*`` environment variables.

Flags override it with ``dataclasses.replace``; nothing deeper in the code holds
a literal host, port, topic or folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from personalize.errors import ConfigError

PREFIX = "PERSONALIZE_"
KAFKA_PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def project_root() -> Path:
    """The source checkout this package runs from, else the current folder."""
    here = Path(__file__).resolve().parents[1]
    if (here / "setup.cfg").is_file():
        return here
    return Path.cwd()


@dataclass(frozen=True)
class Settings:
    """Everything a command or job needs to know about its environment."""

    # local stack
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    redis_port: int = 6379
    kafka_heap: str = "512m"
    stack_dir: Path = dataclasses.field(default_factory=lambda: project_root() / ".stack")
    lib_dir: Path = dataclasses.field(default_factory=lambda: project_root() / "lib")
    # where the job finds its services (default: the local stack). The Redis URL may
    # carry a user and password (redis://user:password@host:port/db) and rediss:// for TLS
    bootstrap_servers: str = ""
    redis_url: str = dataclasses.field(default="", repr=False)
    # credentials, passed to every client (the job's Kafka connector, the CLI, the loader,
    # redis-py); the local stack requires the same ones when they are set (`stack up`).
    # Kafka: security.protocol PLAINTEXT, SASL_PLAINTEXT, SASL_SSL or SSL; SASL mechanism
    # PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with its user and password; TLS: a PEM file of
    # the CA certificates to trust, and for mutual TLS a PEM file holding the client's
    # certificate chain and its (unencrypted PKCS#8) private key
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = dataclasses.field(default="", repr=False)
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    # Redis AUTH (ACL user, default "default") and TLS trust (PEM), besides the URL's own
    redis_username: str = ""
    redis_password: str = dataclasses.field(default="", repr=False)
    redis_ssl_cafile: Path | None = None
    # pseudonymised ids: with a key, the decode replaces every user id by its keyed
    # HMAC-SHA256 (operators/decode.py: pseudonym), so state, topics and Redis hold no raw
    # id; `personalize profile` (and `forget`) take the raw id and apply the same. At least
    # 16 characters; changing it makes every user a new one
    pseudonym_key: str = dataclasses.field(default="", repr=False)
    # topics
    topic_events: str = "events"
    topic_triggers: str = "triggers"
    topic_segment_changes: str = "segment-changes"
    topic_dlq: str = "events-dlq"
    # internal: the job's profile changelog (compacted) and trending windows,
    # materialized into Redis by a read_committed loader (sinks/redis.py)
    topic_profile_updates: str = "profile-updates"
    topic_trending: str = "trending-products"
    # internal: the models' snapshot (metrics, segments), read into Redis for `personalize models`
    topic_model_snapshots: str = "model-snapshots"
    # erasure requests (`personalize forget`, Avro Erasure keyed by user, compacted): read by
    # the job's decode (the user's earlier events are dropped) and by the Redis loader
    topic_erasures: str = "erasures"
    partitions: int = 2
    # event time and windows (DESIGN.md, Semantics)
    out_of_orderness_ms: int = 5_000
    # source watermarks: "on-periodic" (every 200 ms) or "on-event" (after every
    # record: lateness then does not depend on timing, at some cost in speed)
    watermark_emit: str = "on-periodic"
    idle_timeout_ms: int = 30_000
    # an event more than this ahead of the wall clock when read is a dead letter (its
    # producer's clock runs ahead); the watermark never passes the wall clock either
    max_ahead_ms: int = 60_000
    session_gap_ms: int = 30 * 60_000
    # a session's lists (cart moves, categories, product views) keep their first this many
    # items each: a session that never closes (a bot) holds bounded state (operators/sessions.py)
    session_list_limit: int = 1_000
    activity_window_ms: int = 60 * 60_000
    recent_window_ms: int = 30 * 60_000
    recent_slide_ms: int = 5 * 60_000
    trending_window_ms: int = 5 * 60_000
    trending_top_n: int = 10
    # online models (operators/models.py): k segments, the clusterer learns per
    # mini-batch of this many profiles, a new segment must hold this many
    # consecutive session closes before it is emitted
    segment_count: int = 5
    segment_batch: int = 64
    segment_debounce: int = 2
    # session closes are buffered in Flink state and run through the models in
    # batches of this many, or after this long in processing time (a trigger waits up
    # to this long: 200 ms cut the live p99 by 0.5 s against 1 s and cost the catch-up
    # nothing measurable, docs/benchmarks.md; the models learn per segment_batch either way)
    model_batch: int = 256
    model_flush_ms: int = 200
    # the live profile sink keeps the newest row per user for this long / this many users
    # before it writes them (operators/live.py): a user busier than that is written once
    # per flush, not per event. Bounded runs write at checkpoints and at the end
    profile_flush_ms: int = 100
    profile_flush_rows: int = 200_000
    # the Kafka consumer group of the Redis loaders (sinks/redis.py); empty: one named after
    # the Redis database and the live changelog topic, so every loader writing one
    # database from one job's topics shares it (a loader per process, any number)
    loader_group: str = ""
    # per-user state expires after this long without a write for the user (processing
    # time): the profile aggregate's state in Flink (table.exec.state.ttl), the user's
    # history in the models step, and profile:{user} in Redis (PEXPIRE), so a user
    # inactive this long is forgotten everywhere at once and comes back as a new one.
    # Windows' state goes when they close. 0 keeps per-user state for ever
    state_ttl_ms: int = 30 * 24 * 3_600_000
    # flink
    # a standalone cluster (`personalize cluster up`): REST/web UI and JobManager RPC ports;
    # `personalize submit` and `stop` talk to flink_address (default 127.0.0.1:<rest port>)
    flink_rest_port: int = 8081
    flink_rpc_port: int = 6123
    flink_address: str = ""
    cluster_slots: int = 2
    parallelism: int = 1
    # an exactly-once trigger is visible (read_committed) only after the checkpoint that
    # commits it: with the 5 s out-of-orderness this gives a live p99 of ~11 s after the gap
    # expired (10 s: ~16 s; 2 s: ~8 s but a 100k-user catch-up ~25 % slower; scripts/bench_latency.py,
    # scripts/bench_catchup.py)
    checkpoint_interval_ms: int = 5_000
    # where keyed state lives: "hashmap" (the JVM heap: fastest; a checkpoint copies it all)
    # or "rocksdb" (native memory and local disk, incremental checkpoints: for state that
    # outgrows the heap; docs/benchmarks.md, "State backend": 100k users 5-6x slower on RocksDB)
    state_backend: str = "hashmap"
    # the embedded Flink's JVM heap (-Xmx): what the job's state and its working set need,
    # not Java's default of a quarter of the machine (docs/benchmarks.md: 100,000 users run
    # in 1g with a JVM RSS of 1.4 GB; 1,000,000 users need 8g: GC took 37 % of the JVM's CPU in 3g)
    jvm_heap: str = "1g"
    # more options for the embedded Flink's JVM, after the project's own and the heap's; for
    # 1,000,000 users with an 8g heap "-Xms8g -XX:MaxTenuringThreshold=2 -XX:ParallelGCThreads=1"
    # took GC from 29 to 14.5 % of the JVM's CPU (docs/benchmarks.md; at 100,000 users -Xms1g
    # would take the product's RSS over 2 GiB)
    jvm_options: str = ""
    # bounded runs commit at the end; a checkpoint in between only costs time (and
    # must come before the sink's 10 min transaction timeout)
    bounded_checkpoint_interval_ms: int = 300_000
    # an unbounded run restarts after a failure (a broker or TaskManager gone) from its newest
    # checkpoint, waiting 1 s doubling to restart_max_delay_ms between tries, at most
    # restart_attempts tries in a row (30 at up to 30 s: about 13 minutes of outage); the
    # count starts again after an hour without failure
    restart_attempts: int = 30
    restart_max_delay_ms: int = 30_000
    # Kafka transactions of the exactly-once sinks: the output of a checkpoint the job has
    # not committed when it goes down is aborted by the broker after this long, so it bounds
    # how long a job may stay down and still commit it on restart; at most the broker's
    # transaction.max.timeout.ms (15 min by default and on the local stack)
    transaction_timeout_ms: int = 600_000
    # checkpoints and savepoints of unbounded runs (default: <stack_dir>/flink)
    state_dir: Path | None = None
    max_parallelism: int = 128
    # logs: "console" or "json"
    log_format: str = "console"
    # the HTTP API (`personalize serve`, personalize/serve.py): where it listens (loopback by
    # default), the bearer tokens every /v1 route requires (comma-separated: several at once
    # while one is rotated out; secrets), the browser origins CORS allows (comma-separated;
    # none: CORS off), and the loader's lag in records beyond which /readyz answers 503 (0: not checked)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_tokens: str = dataclasses.field(default="", repr=False)
    api_cors_origins: str = ""
    api_max_loader_lag: int = 100_000
    # Prometheus metrics of `personalize run` and `personalize load` (0: none): the job's through
    # Flink's own reporter (the plugin PyFlink ships) on the first free port of this one and the
    # nine after it, the Redis loader's (prometheus-client) on the first free one of the ten
    # after those. Off by default: Flink's reporter listens on every interface, not loopback only
    metrics_port: int = 0

    def __post_init__(self) -> None:
        for name in ("kafka_port", "kafka_controller_port", "redis_port", "flink_rest_port", "flink_rpc_port",
                     "api_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise ConfigError(f"{env_name(name)} must be a port between 1 and 65535, got {port}")
        ports = [self.kafka_port, self.kafka_controller_port, self.redis_port]
        if len(set(ports)) != len(ports):
            raise ConfigError(
                "PERSONALIZE_KAFKA_PORT, PERSONALIZE_KAFKA_CONTROLLER_PORT and "
                f"PERSONALIZE_REDIS_PORT must differ, got {ports}"
            )
        for name in ("partitions", "parallelism", "checkpoint_interval_ms", "bounded_checkpoint_interval_ms", "idle_timeout_ms", "session_gap_ms",
                     "activity_window_ms", "recent_window_ms", "recent_slide_ms", "trending_window_ms",
                     "trending_top_n", "profile_flush_ms", "profile_flush_rows", "segment_count", "segment_batch",
                     "segment_debounce", "model_batch", "model_flush_ms", "cluster_slots",
                     "restart_attempts", "restart_max_delay_ms", "transaction_timeout_ms", "max_ahead_ms",
                     "session_list_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{env_name(name)} must be at least 1, got {getattr(self, name)}")
        if self.state_ttl_ms < 0:
            raise ConfigError(f"PERSONALIZE_STATE_TTL_MS must be 0 (no expiry) or more, got {self.state_ttl_ms}")
        if self.out_of_orderness_ms < 0:
            raise ConfigError(f"PERSONALIZE_OUT_OF_ORDERNESS_MS must be 0 or more, got {self.out_of_orderness_ms}")
        if self.recent_window_ms % self.recent_slide_ms:
            raise ConfigError(
                "PERSONALIZE_RECENT_WINDOW_MS must be a multiple of PERSONALIZE_RECENT_SLIDE_MS, "
                f"got {self.recent_window_ms} and {self.recent_slide_ms}"
            )
        if self.state_backend not in ("hashmap", "rocksdb"):
            raise ConfigError(f"PERSONALIZE_STATE_BACKEND must be 'hashmap' or 'rocksdb', got {self.state_backend!r}")
        if self.watermark_emit not in ("on-periodic", "on-event"):
            raise ConfigError(f"PERSONALIZE_WATERMARK_EMIT must be 'on-periodic' or 'on-event', got {self.watermark_emit!r}")
        if self.log_format not in ("console", "json"):
            raise ConfigError(f"PERSONALIZE_LOG_FORMAT must be 'console' or 'json', got {self.log_format!r}")
        bad = next((o for o in self.jvm_options.split() if not o.startswith("-")), None)
        if bad is not None:
            raise ConfigError(f"PERSONALIZE_JVM_OPTIONS must be JVM options, each starting with '-', got {bad!r}")
        for name in ("kafka_heap", "jvm_heap"):
            heap = getattr(self, name)
            if not heap or not heap[:-1].isdigit() or heap[-1] not in "mMgG":
                raise ConfigError(f"{env_name(name)} must look like 512m or 1g, got {heap!r}")
        if self.kafka_security_protocol not in KAFKA_PROTOCOLS:
            raise ConfigError(f"PERSONALIZE_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(KAFKA_PROTOCOLS)}, "
                              f"got {self.kafka_security_protocol!r}")
        if self.kafka_sasl_mechanism not in SASL_MECHANISMS:
            raise ConfigError(f"PERSONALIZE_KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}, "
                              f"got {self.kafka_sasl_mechanism!r}")
        if self.kafka_sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ConfigError(f"PERSONALIZE_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                              "PERSONALIZE_KAFKA_SASL_USERNAME and PERSONALIZE_KAFKA_SASL_PASSWORD")
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "redis_ssl_cafile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{env_name(name)} names no file: {path}")
        for name in ("kafka_sasl_username", "kafka_sasl_password"):
            if '"' in getattr(self, name) or "\\" in getattr(self, name):
                raise ConfigError(f"{env_name(name)} may not hold a double quote or a backslash (JAAS quoting)")
        if self.metrics_port and not 1 <= self.metrics_port <= 65535 - 19:
            raise ConfigError(f"PERSONALIZE_METRICS_PORT must be 0 (no metrics) or a port up to 65516 (it and the "
                              f"19 after it), got {self.metrics_port}")
        if self.api_max_loader_lag < 0:
            raise ConfigError(f"PERSONALIZE_API_MAX_LOADER_LAG must be 0 (not checked) or more, got {self.api_max_loader_lag}")
        short = [t for t in self.api_token_list if len(t) < 16 or any(c.isspace() for c in t)]
        if short:
            raise ConfigError(f"PERSONALIZE_API_TOKENS must be comma-separated tokens of at least 16 characters "
                              f"without spaces (random secrets), got one of {len(short[0])}")
        bad_origin = next((o for o in self.api_cors_origin_list if o != "*" and "://" not in o), None)
        if bad_origin is not None:
            raise ConfigError(f"PERSONALIZE_API_CORS_ORIGINS must be origins such as https://shop.example, got {bad_origin!r}")
        if self.pseudonym_key and len(self.pseudonym_key) < 16:
            raise ConfigError(f"PERSONALIZE_PSEUDONYM_KEY must be at least 16 characters (a random secret), "
                              f"got {len(self.pseudonym_key)}")
        # derived defaults: the local stack's addresses
        if not self.bootstrap_servers:
            object.__setattr__(self, "bootstrap_servers", f"127.0.0.1:{self.kafka_port}")
        if not self.flink_address:
            object.__setattr__(self, "flink_address", f"127.0.0.1:{self.flink_rest_port}")
        if not self.redis_url:
            object.__setattr__(self, "redis_url", f"redis://127.0.0.1:{self.redis_port}/0")
        if self.redis_ssl_cafile is not None and not self.redis_url.startswith("rediss://"):
            raise ConfigError("PERSONALIZE_REDIS_SSL_CAFILE is for TLS: set PERSONALIZE_REDIS_URL to a rediss:// URL")
        object.__setattr__(self, "stack_dir", Path(self.stack_dir).resolve())
        object.__setattr__(self, "lib_dir", Path(self.lib_dir).resolve())
        state = Path(self.state_dir) if self.state_dir else self.stack_dir / "flink"
        object.__setattr__(self, "state_dir", state.resolve())

    @property
    def kafka_sasl(self) -> bool:
        return self.kafka_security_protocol.startswith("SASL_")

    @property
    def kafka_tls(self) -> bool:
        return self.kafka_security_protocol in ("SSL", "SASL_SSL")

    @property
    def api_token_list(self) -> tuple[str, ...]:
        """The API's bearer tokens (``api_tokens``, comma-separated)."""
        return tuple(t.strip() for t in self.api_tokens.split(",") if t.strip())

    @property
    def api_cors_origin_list(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.api_cors_origins.split(",") if o.strip())

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret these settings hold: never printed or logged (``redact``)."""
        found = [self.kafka_sasl_password, self.redis_password, urlsplit(self.redis_url).password or "",
                 self.pseudonym_key, *self.api_token_list]
        return tuple(s for s in found if s)

    @property
    def redis_address(self) -> str:
        """The Redis URL without its password, for messages."""
        return redact_url(self.redis_url)

    def user_key(self, user_id: str) -> str:
        """The id the job keeps for this raw user id (its pseudonym when there is a key)."""
        from operators.decode import pseudonym

        return pseudonym(user_id, self.pseudonym_key)

    def redact(self, text: str) -> str:
        """``text`` with every secret of these settings replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    @property
    def topic_profile_live(self) -> str:
        """Internal: the live profile changelog (operators/live.py), at-least-once and keyed by
        user id, beside the exactly-once one: a transaction open on a partition holds back
        what read_committed readers see of it, non-transactional records included."""
        return f"{self.topic_profile_updates}-live"

    @property
    def topic_triggers_live(self) -> str:
        """Internal: the triggers again, at-least-once, as the models step emits them (live runs
        only): the Redis loader's fast path to the trigger stream (once per trigger_id there),
        beside the exactly-once feed that read_committed consumers see at checkpoints."""
        return f"{self.topic_triggers}-live"

    @property
    def topics(self) -> tuple[str, ...]:
        """The job's topics, created by ``stack up`` when missing."""
        return (self.topic_events, self.topic_triggers, self.topic_segment_changes, self.topic_dlq)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every field from ``PERSONALIZE_<FIELD>``; unknown names are refused."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for key, raw in environ.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):].lower()
            if name not in fields:
                continue  # other tools may share the prefix; not ours to refuse
            values[name] = _parse(fields[name], key, raw)
        if "log_format" not in values and environ.get("CI", "").lower() in ("1", "true", "yes"):
            values["log_format"] = "json"
        return cls(**values)


def redact_url(url: str) -> str:
    """A URL with the password of its user part replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def _parse(field: dataclasses.Field, key: str, raw: str) -> object:
    kind = field.type
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {raw!r}") from None
    if kind == "Path | None" and not raw.strip():
        return None
    if kind in ("Path", "Path | None"):
        return Path(raw).expanduser()
    return raw.strip()
