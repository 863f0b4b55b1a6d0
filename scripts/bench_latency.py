"""Live latency (a benchmark, not a test): how soon a trigger arrives after its session's
gap expired, or (``--profile-rate``) how soon an event is in its user's profile.

A live run (``personalize run``, unbounded, fresh state; or ``--peer quix|bytewax``:
a peer of `make bench-peers`, bench/) is fed abandoned sessions at a fixed rate, each
a product view and a cart add of a new user with event time = now, then heartbeat
page views (another user) so the watermark keeps moving after the last session. For
every trigger: the wall-clock delay from the moment its session's gap expired (last
event + gap, event time = wall clock at send) to its arrival in Kafka (read_committed)
and in the Redis stream. Prints p50/p95/p99/max of each and the settings that bound it.

The gap is short (``--gap-ms``, 10 s) so a run takes minutes: the delay after the gap
expires does not depend on the gap's length. Any PERSONALIZE_* setting in the
environment applies to the product (e.g. PERSONALIZE_CHECKPOINT_INTERVAL_MS).

Profile freshness (``--profile-rate EVENTS_PER_S``): the product is fed page and product
views of ``--users`` users at that rate, event time = now; a probe user among them gets
every ``PROBE_EVERY``-th event, and a reader polls the probes' ``n_events`` in Redis every
20 ms (``POLL_S``): per probe event, the wall-clock delay from its send to the moment its
count shows in ``profile:{user}``. Prints p50/p95/p99/max and the rate actually sent.

Usage: python scripts/bench_latency.py [--rate SESSIONS_PER_S] [--seconds S] [--gap-ms MS] [--peer quix|bytewax]
       python scripts/bench_latency.py --profile-rate EVENTS_PER_S [--users N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (scripts/bench.py)
import peers  # noqa: E402  (scripts/peers.py)

STREAM = "triggers:cart_abandonment"
PEER_KNOBS = {
    "quix": "commit interval 5 s (Quix's default), a session closes at its last event + 2 gaps",
    "bytewax": "a clock per user: a session closes 5 s (its wait) after its gap expired, by the system clock; "
               "sinks write as they receive",
}


def event(user: str, kind: str, at: int, product: str | None = None) -> dict:
    return {"event_id": uuid.uuid4().hex, "event_type": kind, "user_id": user, "session_id": None,
            "event_time": at, "product_id": product, "category": "c1" if product else None,
            "price": 12.5 if product else None, "quantity": 1, "consent_analytics": True,
            "consent_personalization": True, "consent_marketing": True, "context": None}


def _varint(n: int) -> bytes:
    """Avro's zigzag varint of a long."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class FastEvents:
    """The Avro bytes of ``event(user, kind, at, product)`` built by hand from parts encoded
    once: at 20,000 events/s fastavro's writer and uuid4 took a fifth of a core on the machine
    the product is measured on. The event id is a counter (unique per run). ``check`` compares
    the bytes with the codec's for every kind the benchmark sends."""

    def __init__(self, codec) -> None:
        import struct

        self.codec = codec
        self.header = codec._header
        self.run = uuid.uuid4().hex[:16].encode()
        self.n = 0
        symbols = codec.schema["fields"][1]["type"]["symbols"]
        self.kinds = {k: _varint(symbols.index(k)) for k in symbols}
        price = b"\x02" + struct.pack("<d", 12.5)
        # after event_time: product/category/price unions, quantity 1, three consents true, no context
        self.tails = {None: b"\x00\x00\x00" + _varint(1) + b"\x01\x01\x01\x00"}
        self.tails["p1"] = (b"\x02" + _varint(2) + b"p1" + b"\x02" + _varint(2) + b"c1" + price
                            + _varint(1) + b"\x01\x01\x01\x00")
        self.users: dict[str, bytes] = {}

    def event_id(self) -> str:
        self.n += 1
        return (self.run + b"%016x" % self.n).decode()

    def encode(self, user: str, kind: str, at: int, product: str | None = None, event_id: str | None = None) -> bytes:
        event_id = event_id or self.event_id()
        u = self.users.get(user)
        if u is None:
            raw = user.encode()
            u = self.users[user] = _varint(len(raw)) + raw + b"\x00"  # user_id, session_id null
        return b"".join((self.header, _varint(32), event_id.encode(), self.kinds[kind], u, _varint(at),
                         self.tails[product]))

    def check(self) -> None:
        for kind, product in (("page_view", None), ("product_view", "p1")):
            record = event("probe-1", kind, 1_765_000_000_123, product)
            record["event_id"] = self.event_id()
            mine = self.encode("probe-1", kind, 1_765_000_000_123, product, record["event_id"])
            if mine != self.codec.encode(record):
                raise AssertionError(f"bench-latency: the hand-built {kind} bytes differ from the codec's")


def quantile(delays: list[float], q: float) -> float:
    d = sorted(delays)
    return d[min(len(d) - 1, int(q * len(d)))]


def percentiles(delays: list[float]) -> str:
    if not delays:
        return "none arrived"
    return (f"p50 {quantile(delays, 0.5):.2f} s, p95 {quantile(delays, 0.95):.2f} s, "
            f"p99 {quantile(delays, 0.99):.2f} s, max {max(delays):.2f} s ({len(delays):,})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench-latency", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="abandoned sessions per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long sessions are sent")
    parser.add_argument("--gap-ms", type=int, default=10_000)
    parser.add_argument("--peer", choices=sorted(peers.PEERS), help="a peer instead of the product")
    parser.add_argument("--profile-rate", type=float, help="measure profile freshness at this many events per second")
    parser.add_argument("--users", type=int, default=100_000, help="users of the profile freshness traffic")
    args = parser.parse_args(argv)
    if args.profile_rate:
        fresh = measure_profile(args.profile_rate, args.seconds, args.users)
        if fresh is None:
            return 1
        print(f"\nproduct: {fresh['sent']:,} events sent in {fresh['send_s']:.1f} s ({fresh['sent'] / fresh['send_s']:,.0f}/s, "
              f"asked {args.profile_rate:,.0f}/s) over {args.users:,} users; {fresh['knobs']}")
        print("| event in profile:{user} after its send | product |\n|---|---|")
        print(f"| n_events of {len(fresh['delays']):,} probe events | {percentiles(fresh['delays'])} |")
        missing = fresh["probes"] - len(fresh["delays"])
        if missing:
            print(f"bench-latency: {missing:,} of {fresh['probes']:,} probe events never showed", file=sys.stderr)
        return 0 if not missing else 1
    result = measure(args.rate, args.seconds, args.gap_ms, args.peer)
    if result is None:
        return 1
    who = f"peer ({peers.PEERS[args.peer].label})" if args.peer else "product"
    print(f"\n{who}: {result['sent']:,} sessions sent at {args.rate:g}/s, gap {args.gap_ms} ms; {result['knobs']}")
    print(f"| trigger arrives after the gap expired | {who} |\n|---|---|")
    print(f"| in Kafka (read_committed) | {percentiles(result['kafka'])} |")
    print(f"| in the Redis stream | {percentiles(result['stream'])} |")
    missing = result["sent"] - len(result["stream"])
    if missing:
        print(f"bench-latency: {missing:,} of {result['sent']:,} triggers never reached the Redis stream", file=sys.stderr)
    return 0 if not missing else 1


PROBE_EVERY = 20  # every this many events is a probe's (the reader polls the probes only)
PROBES = 200
# the probes' profiles are read every this long: 200 reads a poll, on the machine measured
# (every 5 ms, the poller and its 40,000 reads a second took a tenth of a core)
POLL_S = 0.02


class FastProducer:
    """confluent-kafka behind kafka-python's ``send``/``flush``/``close``: the benchmark's own
    producer must not be what limits the rate (kafka-python's reached ~10,800 events/s here
    with the rest of the machine busy); idempotent, acks=all, as the CLI's producer."""

    def __init__(self, settings, linger_ms: int):
        from confluent_kafka import Producer

        from personalize import credentials

        self._producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "linger.ms": linger_ms,
                                   "enable.idempotence": True, "acks": "all",
                                   "queue.buffering.max.messages": 1_000_000,
                                   **credentials.librdkafka(settings)})
        self._sent = 0

    def send(self, topic: str, *, key: bytes, value: bytes, timestamp_ms: int) -> None:
        while True:
            try:
                self._producer.produce(topic, key=key, value=value, timestamp=timestamp_ms)
                break
            except BufferError:  # the local queue is full: let it drain
                self._producer.poll(0.05)
        self._sent += 1
        if self._sent % 1000 == 0:
            self._producer.poll(0)  # delivery reports

    def flush(self) -> None:
        if self._producer.flush(60) != 0:
            raise RuntimeError("bench-latency: events not delivered within 60 s")

    def close(self) -> None:
        self._producer.flush(10)


def _start_product(settings_env: dict, topic: str):
    """A fresh unbounded ``personalize run`` over ``topic`` (its log in a temporary folder)."""
    state = tempfile.mkdtemp(prefix="bench-live-")
    settings_env["PERSONALIZE_STATE_DIR"] = state
    log = open(Path(state) / "run.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "personalize.cli", "run"], env=settings_env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, log


def _wait_reading(proc, log, producer, topic: str, client, codec) -> bool:
    """Heartbeats until the job writes their profile (the whole path runs); False when it never does."""
    ready_by = time.monotonic() + 180
    while True:
        now_ms = int(time.time() * 1000)
        producer.send(topic, key=b"heartbeat", value=codec.encode(event("heartbeat", "page_view", now_ms)),
                      timestamp_ms=now_ms)
        producer.flush()
        if client.exists("profile:heartbeat"):
            return True
        if proc.poll() is not None or time.monotonic() > ready_by:
            log.seek(0)
            print("bench-latency: the run never wrote a profile:\n" + log.read()[-3000:], file=sys.stderr)
            return False
        time.sleep(0.5)


def measure_profile(rate: float, seconds: float, users: int) -> dict | None:
    """One live run of the product fed ``rate`` events/s (see the module's doc): per probe
    event, seconds from its send to its count in the profile (``delays``)."""
    import redis

    import schemas
    from personalize import topics
    from personalize.settings import Settings

    base = Settings.from_env()
    topic = f"bench-fresh-{uuid.uuid4().hex[:8]}"
    env = bench.bench_env(base, topic)
    if bench.cli("stack", "up", env=env).returncode != 0:
        print("bench-latency: `personalize stack up` failed", file=sys.stderr)
        return None
    settings = Settings.from_env(env)
    topics.ensure(settings, [topic], local_stack=True)
    client = redis.Redis.from_url(env["PERSONALIZE_REDIS_URL"])
    client.flushdb()
    proc, log = _start_product(env, topic)
    codec = schemas.codec("user_event")
    fast = FastEvents(codec)
    fast.check()
    producer = FastProducer(settings, linger_ms=2)
    try:
        if not _wait_reading(proc, log, producer, topic, client, codec):
            return None
        print(f"bench-latency: product reading; {rate:,.0f} events/s for {seconds:g} s over {users:,} users",
              file=sys.stderr, flush=True)
        sent_at: dict[tuple[str, int], float] = {}  # (probe, its n_events after the event) -> wall time sent
        shown: dict[tuple[str, int], float] = {}
        counts = [0] * PROBES
        stop = threading.Event()

        def read() -> None:
            reader = redis.Redis.from_url(env["PERSONALIZE_REDIS_URL"])
            keys = [f"profile:probe-{i}" for i in range(PROBES)]
            while not stop.is_set():
                with reader.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.hget(key, "n_events")
                    values = pipe.execute()
                now = time.time()
                for i, value in enumerate(values):
                    n = int(value) if value is not None else 0
                    for k in range(n, 0, -1):  # every count up to the one read has shown
                        if (f"probe-{i}", k) in shown:
                            break
                        shown[(f"probe-{i}", k)] = now
                time.sleep(POLL_S)

        poller = threading.Thread(target=read, daemon=True)
        poller.start()
        started = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - started) < seconds:
            while sent < elapsed * rate:
                now_ms = int(time.time() * 1000)
                if sent % PROBE_EVERY == 0:
                    probe = (sent // PROBE_EVERY) % PROBES
                    user = f"probe-{probe}"
                    counts[probe] += 1
                    sent_at[(user, counts[probe])] = time.time()
                else:
                    user = f"u-{sent % users}"
                kind = "product_view" if sent % 3 else "page_view"
                producer.send(topic, key=user.encode(), timestamp_ms=now_ms,
                              value=fast.encode(user, kind, now_ms, "p1" if kind == "product_view" else None))
                sent += 1
            time.sleep(0.001)
        send_s = time.monotonic() - started
        producer.flush()
        deadline = time.monotonic() + 60
        while len(sent_at.keys() & shown.keys()) < len(sent_at) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        poller.join(timeout=5)
        delays = [shown[k] - t for k, t in sent_at.items() if k in shown]
        knobs = (f"live changelog flush {settings.profile_flush_ms} ms, checkpoint every "
                 f"{settings.checkpoint_interval_ms} ms (not waited for), Redis polled every ~{POLL_S * 1000:.0f} ms")
        return {"sent": sent, "send_s": send_s, "probes": len(sent_at), "delays": delays, "knobs": knobs}
    finally:
        producer.close()
        bench.stop(proc, timeout_s=120)
        topics.delete(settings, [topic])
        bench._drop_outputs(settings)


def measure(rate: float, seconds: float, gap_ms: int, peer: str | None) -> dict | None:
    """One live run (see the module's doc): per trigger, seconds from its gap's expiry to its
    arrival in Kafka (``kafka``) and in the Redis stream (``stream``); None when the run
    never started."""
    import redis
    from kafka import KafkaConsumer

    import schemas
    from personalize import topics
    from personalize.settings import Settings

    base = Settings.from_env()
    topic = f"bench-live-{uuid.uuid4().hex[:8]}"
    env = bench.bench_env(base, topic)
    env["PERSONALIZE_SESSION_GAP_MS"] = str(gap_ms)
    if bench.cli("stack", "up", env=env).returncode != 0:
        print("bench-latency: `personalize stack up` failed", file=sys.stderr)
        return None
    settings = Settings.from_env(env)
    topics.ensure(settings, [topic, settings.topic_triggers], local_stack=True)
    client = redis.Redis.from_url(env["PERSONALIZE_REDIS_URL"])
    client.flushdb()
    state = tempfile.mkdtemp(prefix="bench-live-")
    if peer:
        env.update(PEER_BROKERS=settings.bootstrap_servers, PEER_INPUT=topic, PEER_GROUP=f"live-{topic}",
                   PEER_TRIGGERS=settings.topic_triggers, PEER_REDIS=f"127.0.0.1:{settings.redis_port}/9",
                   PEER_GAP_MS=str(gap_ms), PEER_OUT_OF_ORDERNESS_MS=str(settings.out_of_orderness_ms),
                   PEER_STATE_DIR=state, **peers.PEERS[peer].live)
        cmd = peers.PEERS[peer].command()
    else:
        env["PERSONALIZE_STATE_DIR"] = state  # a fresh start, no checkpoint of an earlier run
        cmd = [sys.executable, "-m", "personalize.cli", "run"]
    log = open(Path(state) / "run.log", "w+")
    # a peer in its own process group, so that its replicas or cluster processes stop with it
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=bool(peer))

    arrived_kafka: dict[str, float] = {}
    arrived_redis: dict[str, float] = {}
    stop = threading.Event()

    def read_kafka() -> None:
        consumer = KafkaConsumer(settings.topic_triggers, bootstrap_servers=settings.bootstrap_servers,
                                 isolation_level="read_committed", auto_offset_reset="earliest",
                                 enable_auto_commit=False, fetch_max_wait_ms=50)
        codec = None if peer else schemas.codec("trigger")
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=100).values():
                now = time.time()
                for r in records:
                    if r.value is None:
                        continue
                    t = json.loads(r.value) if peer else codec.decode(r.value)
                    arrived_kafka.setdefault(t["user_id"], now)
        consumer.close()

    def read_redis() -> None:
        last = "0-0"
        while not stop.is_set():
            for _, entries in client.xread({STREAM: last}, count=10_000, block=100) or ():
                now = time.time()
                for entry_id, fields in entries:
                    last = entry_id
                    arrived_redis.setdefault(fields[b"user_id"].decode(), now)

    readers = [threading.Thread(target=read_kafka, daemon=True), threading.Thread(target=read_redis, daemon=True)]
    for r in readers:
        r.start()

    # wait until the job reads: a heartbeat makes a profile once the whole path runs
    codec = schemas.codec("user_event")
    producer = FastProducer(settings, linger_ms=5)
    if not _wait_reading(proc, log, producer, topic, client, codec):
        bench.stop(proc, timeout_s=5, group=bool(peer))
        return None
    print(f"bench-latency: {peer or 'product'} reading; {rate:g} sessions/s for "
          f"{seconds:g} s, gap {gap_ms} ms", file=sys.stderr, flush=True)

    expiry: dict[str, float] = {}  # user -> wall time its session's gap expired
    started = time.monotonic()
    sent = 0
    end_heartbeats = started + seconds + gap_ms / 1000 * 3 + 30
    next_heartbeat = 0.0
    while time.monotonic() < end_heartbeats:
        elapsed = time.monotonic() - started
        while elapsed < seconds and sent < elapsed * rate:
            user = f"live-{sent}"
            now_ms = int(time.time() * 1000)
            for kind, product in (("product_view", "p1"), ("add_to_cart", "p1")):
                producer.send(topic, key=user.encode(), value=codec.encode(event(user, kind, now_ms, product)),
                              timestamp_ms=now_ms)
            expiry[user] = now_ms / 1000 + gap_ms / 1000
            sent += 1
        if time.monotonic() >= next_heartbeat:  # keeps the watermark moving on both partitions
            now_ms = int(time.time() * 1000)
            for i in range(settings.partitions * 4):
                key = f"heartbeat-{i}"
                producer.send(topic, key=key.encode(), value=codec.encode(event(key, "page_view", now_ms)),
                              timestamp_ms=now_ms)
            next_heartbeat = time.monotonic() + 0.2
        time.sleep(0.005)
        if len(arrived_redis.keys() & expiry.keys()) == len(expiry) == sent and elapsed > seconds:
            break
    producer.flush()
    producer.close()
    stop.set()
    for r in readers:
        r.join(timeout=5)
    bench.stop(proc, timeout_s=120, group=bool(peer))
    topics.delete(settings, [topic])
    bench._drop_outputs(settings)  # the triggers topic among them

    kafka = [arrived_kafka[u] - expiry[u] for u in expiry if u in arrived_kafka]
    stream = [arrived_redis[u] - expiry[u] for u in expiry if u in arrived_redis]
    knobs = (PEER_KNOBS[peer] if peer else
             f"watermark every 200 ms ({settings.watermark_emit}), out-of-orderness {settings.out_of_orderness_ms} ms, "
             f"idleness {settings.idle_timeout_ms} ms, checkpoint every {settings.checkpoint_interval_ms} ms, "
             f"models flush {settings.model_flush_ms} ms")
    return {"sent": sent, "kafka": kafka, "stream": stream, "knobs": knobs}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
