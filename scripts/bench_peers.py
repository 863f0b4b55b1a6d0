"""`make bench-peers`: the product and its Python peer over the same events, one table.

1. Events once per size, in topic ``bench-peers-<USERS>``: the synthetic traffic of
   `make bench` (scripts/bench.py), then one page view per partition three session
   gaps after the last event. The peer needs them: Quix Streams closes a session when
   its partition's watermark passes the last event + 2 gaps, and at the end of a
   topic nothing else moves it (the product's bounded run closes every window at the
   end of its input, and counts these events like any other).
2. The product: ``personalize run --bounded`` from a fresh start (scripts/bench.py's
   run, its Redis database 9 flushed), sampled as `make bench` samples it.
3. The peer (bench/quix_peer.py, Quix Streams, in bench/.venv): a new consumer group,
   a new state directory and Redis database 2 flushed; done when its committed offsets
   reach the end of the topic (it commits after its sinks flushed); then stopped.
4. Outputs checked equal: the trigger ids, cart values and carts in each Redis stream
   and the peer's Kafka topic; every user's n_events and n_<type> in the profiles.

Prints a Markdown table; writes a chart (events/s) when matplotlib is installed.

The default size is 20,000 users (200,202 events), not `make bench`'s 100,000: the
peer's session windows close by sweeping every key of the partition (Quix Streams'
``closing_strategy="partition"``, the one that closes a silent user's session), so its
time grows with the square of the users; at 100,000 it did not finish in 15 minutes.

Usage: python scripts/bench_peers.py [--users N] [--peer-timeout S] [--chart PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (scripts/bench.py)
import bench_latency  # noqa: E402  (scripts/bench_latency.py)

PEER_PYTHON = ROOT / "bench" / ".venv" / "bin" / "python"
PEER_APP = ROOT / "bench" / "quix_peer.py"
PEER_REDIS_DB = 2
STREAM = "triggers:cart_abandonment"
EVENT_TYPES = ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout", "purchase", "search")
COUNTS = ("n_events", *(f"n_{t}" for t in EVENT_TYPES))


def clock_events(settings, users: int) -> list[tuple[bytes, bytes, int]]:
    """One page view per partition of the events topic, three session gaps after the last event."""
    import schemas
    from kafka.partitioner.default import murmur2

    from personalize.produce import generate

    last = max(e["event_time"] for spec in bench.specs(users) for e in generate(spec)[-1:])
    at = last + 3 * settings.session_gap_ms
    keys, n = {}, 0
    while len(keys) < settings.partitions:  # a key for each partition, by Kafka's default partitioner
        key = f"bench-clock-{n}".encode()
        keys.setdefault((murmur2(key) & 0x7FFFFFFF) % settings.partitions, key)
        n += 1
    codec = schemas.codec("user_event")
    out = []
    for key in keys.values():
        event = {"event_id": f"{key.decode()}-{at}", "event_type": "page_view", "user_id": key.decode(),
                 "session_id": None, "event_time": at, "product_id": None, "category": None, "price": None,
                 "quantity": 1, "consent_analytics": True, "consent_personalization": True,
                 "consent_marketing": True, "context": None}
        out.append((key, codec.encode(event), at))
    return out


def stream_triggers(client) -> dict[str, tuple]:
    """trigger_id -> (user, session start, cart value, cart) from a Redis trigger stream."""
    out, start = {}, "-"
    while True:
        chunk = client.xrange(STREAM, min=start, count=10_000)
        for entry_id, f in chunk:
            cart = sorted((line["product_id"], int(line["quantity"]), _cents(line["price"]))
                          for line in json.loads(f[b"cart"]))
            out[f[b"trigger_id"].decode()] = (f[b"user_id"].decode(), int(f[b"session_start_ms"]),
                                              _cents(f[b"cart_value"].decode()), tuple(cart))
        if len(chunk) < 10_000:
            return out
        start = "(" + chunk[-1][0].decode()


def _cents(value) -> int:
    return int(Decimal(str(value)) * 100)


def profile_counts(client) -> dict[str, tuple]:
    out = {}
    keys = list(client.scan_iter("profile:*", count=10_000))
    for i in range(0, len(keys), 5_000):
        pipe = client.pipeline(transaction=False)
        for key in keys[i:i + 5_000]:
            pipe.hmget(key, COUNTS)
        for key, values in zip(keys[i:i + 5_000], pipe.execute()):
            out[key.decode().split(":", 1)[1]] = tuple(int(v or 0) for v in values)
    return out


def committed(settings, group: str, topic: str) -> int:
    """How many records of ``topic`` the consumer group has committed."""
    from personalize import topics

    client = topics.admin(settings)
    try:
        offsets = client.list_consumer_group_offsets(group)
    finally:
        client.close()
    return sum(o.offset for tp, o in offsets.items() if tp.topic == topic and o.offset >= 0)


def run_peer(settings, topic: str, client, timeout_s: float) -> dict | None:
    """The peer from a fresh start until it committed the whole topic, or ``timeout_s``
    passed (then ``wall_s`` is None and ``committed`` says how far it came); its figures."""
    from personalize import kafkaio, topics

    client.flushdb()
    client.config_resetstat()
    begin, end = kafkaio.offsets(settings, topic, read_committed=False)
    total = sum(end[p] - begin[p] for p in end)
    tag = uuid.uuid4().hex[:8]
    group, triggers = f"bench-peer-{tag}", f"bench-peer-{tag}-triggers"
    topics.ensure(settings, [triggers], local_stack=True)
    with tempfile.TemporaryDirectory(prefix="quix-state-") as state:
        env = dict(os.environ, PEER_BROKERS=settings.bootstrap_servers, PEER_INPUT=topic, PEER_GROUP=group,
                   PEER_TRIGGERS=triggers, PEER_REDIS=f"127.0.0.1:{settings.redis_port}/{PEER_REDIS_DB}",
                   PEER_GAP_MS=str(settings.session_gap_ms), PEER_STATE_DIR=state)
        print(f"bench: the peer (Quix Streams) over {topic}", file=sys.stderr, flush=True)
        log = open(Path(state) / "peer.log", "w+")
        started = time.monotonic()
        proc = subprocess.Popen([str(PEER_PYTHON), str(PEER_APP)], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        sampler = bench.Sampler(proc.pid, client)
        sampler.start()
        done_s, count, shown = None, 0, started
        while proc.poll() is None:
            count = committed(settings, group, topic)
            now = time.monotonic()
            if count >= total:
                done_s = now - started
                break
            if now - started > timeout_s:
                print(f"bench: the peer did not finish within {timeout_s:.0f} s: stopped", file=sys.stderr)
                break
            if now - shown >= 10:
                print(f"progress: peer committed {count:,} of {total:,} events ({100 * count / total:.1f} %) "
                      f"after {now - started:.0f} s", file=sys.stderr, flush=True)
                shown = now
            time.sleep(0.5)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        sampler.done.set()
        sampler.join()
        log.seek(0)
        tail = log.read().strip().splitlines()[-20:]
        log.close()
        if done_s is None and proc.returncode not in (0, -15):
            print("bench: error: the peer failed:\n" + "\n".join(tail), file=sys.stderr)
            return None
        peak = max(sampler.peak["python"], bench.Sampler._rss(proc.pid))
        kafka_ids = {json.loads(r.value)["trigger_id"] for r in kafkaio.read_to_end(settings, triggers)}
        topics.delete(settings, [triggers])
        return {"wall_s": done_s, "committed": count, "total": total, "timeout_s": timeout_s, "rss": peak, "redis_peak": sampler.peak["redis"], "kafka_ids": kafka_ids}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench-peers", description=__doc__.splitlines()[0])
    # 20,000 users (200,202 events): the peer's session closing grows with the square of the
    # users (docs/benchmarks.md); at 100,000 it did not finish in 15 minutes
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--chart", default=str(ROOT / "docs" / "bench-peers.png"))
    parser.add_argument("--no-latency", action="store_true", help="leave out the live trigger latency runs")
    parser.add_argument("--peer-timeout", type=float, default=900.0,
                        help="stop the peer after this many seconds if it has not read the whole topic")
    args = parser.parse_args(argv)
    if not PEER_PYTHON.exists():
        print("bench-peers: bench/.venv is missing: run `make bench-peers` (it creates it)", file=sys.stderr)
        return 2

    import redis

    from personalize.settings import Settings

    base = Settings.from_env()
    topic = f"bench-peers-{args.users}"
    env = bench.bench_env(base, topic)
    if bench.cli("stack", "up", env=env).returncode != 0:
        print("bench-peers: `personalize stack up` failed", file=sys.stderr)
        return 2
    settings = Settings.from_env(env)
    if not bench.ensure_events(env, settings, topic, args.users, extra=lambda: clock_events(settings, args.users)):
        return 1

    product_redis = redis.Redis.from_url(env["PERSONALIZE_REDIS_URL"])
    product = bench.run_job(env, settings, product_redis, topic)
    if product is None:
        return 1
    product_triggers, product_counts = stream_triggers(product_redis), profile_counts(product_redis)

    peer_redis = redis.Redis(host="127.0.0.1", port=settings.redis_port, db=PEER_REDIS_DB)
    peer = run_peer(settings, topic, peer_redis, args.peer_timeout)
    if peer is None:
        return 1
    finished = peer["wall_s"] is not None
    peer_triggers, peer_counts = stream_triggers(peer_redis), profile_counts(peer_redis)

    latency = {}
    if not args.no_latency:  # live: 50 abandoned sessions/s for 60 s, gap 10 s (scripts/bench_latency.py)
        for who, is_peer in (("product", False), ("peer", True)):
            run = bench_latency.measure(50.0, 60.0, 10_000, is_peer)
            if run is None or len(run["stream"]) < run["sent"]:
                print(f"bench-peers: the {who}'s live latency run lost triggers or did not start", file=sys.stderr)
                return 1
            latency[who] = run

    known = bench.known_abandonments(args.users, base.session_gap_ms)
    same_triggers = product_triggers == peer_triggers and set(peer_triggers) == peer["kafka_ids"]
    same_counts = product_counts == peer_counts
    differ = [u for u in set(product_counts) | set(peer_counts) if product_counts.get(u) != peer_counts.get(u)]
    events = product["events"]
    product_wall = product["startup_s"] + product["e2e_s"]
    product_rss = product["sampler"].peak["jvm"] + product["sampler"].peak["python"] + product["sampler"].peak["shards"]
    if finished:
        peer_wall, peer_rate = f"{peer['wall_s']:.1f} s", f"{events / peer['wall_s']:,.0f}"
    else:
        peer_wall = f"did not finish in {peer['timeout_s']:.0f} s ({peer['committed']:,} of {peer['total']:,} committed)"
        peer_rate = f"under {peer['committed'] / peer['timeout_s']:,.0f}"
    rows = [
        ("events (users)", f"{events:,} ({args.users:,})", "same topic"),
        ("wall clock, process start to last Redis write", f"{product_wall:.1f} s", peer_wall),
        ("events/s over that", f"{events / product_wall:,.0f}", peer_rate),
        ("events/s from the first record read (product: its summary's end to end)",
         f"{events / product['e2e_s']:,.0f}", "-"),
        ("peak RSS (product: JVM + loader processes; peer: its process)",
         f"{product_rss / 2**20:,.0f} MiB", f"{peer['rss'] / 2**20:,.0f} MiB"),
        ("peak Redis used_memory", f"{product['redis_peak'] / 2**20:,.0f} MiB", f"{peer['redis_peak'] / 2**20:,.0f} MiB"),
        ("triggers in the Redis stream (generator's abandoned sessions: " + f"{known:,})",
         f"{len(product_triggers):,}", f"{len(peer_triggers):,}"),
        ("profiles", f"{len(product_counts):,}", f"{len(peer_counts):,}"),
        ("models per session (segments, propensity)", "yes", "no"),
    ]
    q = bench_latency.quantile
    rows += [(f"live trigger latency after the gap expired, {where} (p50 / p99; 3,000 sessions, gap 10 s)",
              *(f"{q(latency[w][key], 0.5):.1f} / {q(latency[w][key], 0.99):.1f} s" for w in ("product", "peer")))
             for where, key in (("Kafka read_committed", "kafka"), ("Redis stream", "stream")) if latency]
    print("\n| measure | product (PyFlink) | peer (Quix Streams 3.28.1) |\n|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")
    if not finished:
        print("\noutputs: NOT COMPARED (the peer did not finish; --peer-timeout gives it longer)")
        return 2
    print(f"\nratio product / peer, events/s over the wall clock: {peer['wall_s'] / product_wall:.2f}")
    print(f"outputs: triggers (ids, users, starts, carts, values) {'EQUAL' if same_triggers else 'DIFFER'}; "
          f"per-user counts {'EQUAL' if same_counts else f'DIFFER for {len(differ):,} users, e.g. {sorted(differ)[:3]}'}")
    p99 = {w: q(run["stream"], 0.99) for w, run in latency.items()}
    _chart(args.chart, events, product_wall, peer["wall_s"], p99)
    return 0 if same_triggers and same_counts else 1


def _chart(path: str, events: int, product_s: float, peer_s: float, p99: dict[str, float]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench-peers: matplotlib not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return
    names, colors = ["product (PyFlink)", "peer (Quix Streams)"], ["#4c72b0", "#dd8452"]
    fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 4))
    ax.bar(names, [events / product_s, events / peer_s], color=colors)
    ax.set_ylabel("events/s, process start to last Redis write")
    ax.set_title(f"Backfill: same {events:,} events, same outputs")
    if p99:
        right.bar(names, [p99["product"], p99["peer"]], color=colors)
        right.set_ylabel("seconds after the session's gap expired")
        right.set_title("Live: p99 trigger latency to the Redis stream (gap 10 s)")
    bench.save_chart(fig, path, "bench-peers")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
