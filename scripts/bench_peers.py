"""`make bench-peers`: the product and its Python peers over the same events, one table.

1. Events once per size, in topic ``bench-peers-<USERS>``: the synthetic traffic of
   `make bench` (scripts/bench.py), then one page view per partition three session
   gaps after the last event. Quix Streams needs them: it closes a session when its
   partition's watermark passes the last event + 2 gaps, and at the end of a topic
   nothing else moves it (the product's bounded run and Bytewax's bounded source close
   every session at the end of their input; all count these events like any other).
2. The product: ``personalize run --bounded`` from a fresh start (scripts/bench.py's
   run, its Redis database 9 flushed), sampled as `make bench` samples it.
3. Each peer (scripts/peers.py; bench/, in bench/.venv) from a fresh start, Redis
   database 2 flushed: Quix Streams (a new consumer group and state directory; done
   when its committed offsets reach the end of the topic, then stopped) and Bytewax
   (a source that stops at the topic's end; done when its process exits).
4. Outputs checked equal, per peer: the trigger ids, cart values and carts in each Redis
   stream and the peer's Kafka topic; every user's n_events and n_<type> in the profiles.
5. Live trigger latency of each (scripts/bench_latency.py), unless --no-latency.

Prints a Markdown table; writes a chart (events/s, p99) when matplotlib is installed.
Exit 0 when every peer that finished produced the product's outputs; 1 when one
differs; 2 when none finished.

At the default size (100,000 users, 1,001,022 events) Quix Streams does not finish: its
session windows close by sweeping every key of the partition (``closing_strategy=
"partition"``, the one that closes a silent user's session) whenever the watermark
passes the earliest expiry, so its time grows with the square of the users; it is
stopped after --peer-timeout (300 s) and its row says how far it came and its rate in
its last minute. ``--users 20000`` gives a table where it finishes and is checked.

Usage: python scripts/bench_peers.py [--users N] [--peers quix,bytewax] [--peer-timeout S]
                                     [--no-latency] [--chart PATH]
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
import peers  # noqa: E402  (scripts/peers.py)

PEER_REDIS_DB = 2
DEFAULT_USERS = 100_000  # 1,001,022 events
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


def run_peer(settings, peer, topic: str, client, timeout_s: float, processes: int) -> dict:
    """A peer from a fresh start until it has read the whole topic (its process ended at
    the topic's end, or its group committed it), or ``timeout_s`` passed (then ``wall_s``
    is None and ``committed`` says how far it came), or it failed (``failure``: the last
    line it wrote); its figures."""
    from personalize import kafkaio, topics

    client.flushdb()
    client.config_resetstat()
    begin, end = kafkaio.offsets(settings, topic, read_committed=False)
    total = sum(end[p] - begin[p] for p in end)
    tag = uuid.uuid4().hex[:8]
    group, triggers = f"bench-peer-{tag}", f"bench-peer-{tag}-triggers"
    topics.ensure(settings, [triggers], local_stack=True)
    with tempfile.TemporaryDirectory(prefix=f"{peer.key}-state-") as state:
        env = dict(os.environ, PEER_BROKERS=settings.bootstrap_servers, PEER_INPUT=topic, PEER_GROUP=group,
                   PEER_TRIGGERS=triggers, PEER_REDIS=f"127.0.0.1:{settings.redis_port}/{PEER_REDIS_DB}",
                   PEER_GAP_MS=str(settings.session_gap_ms), PEER_OUT_OF_ORDERNESS_MS=str(settings.out_of_orderness_ms),
                   PEER_STATE_DIR=state, PEER_PROCESSES=str(processes),
                   **peer.backfill)
        print(f"bench: the peer {peer.label} over {topic}", file=sys.stderr, flush=True)
        log = open(Path(state) / "peer.log", "w+")
        started = time.monotonic()
        proc = subprocess.Popen(peer.command(), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: its replicas stop with it
        sampler = bench.Sampler(proc.pid, client)
        sampler.start()
        # committed: unknown (None) for a peer that commits no offsets (Bytewax) until it ends
        done_s, count, shown = None, None if peer.exits_at_end else 0, started
        seen: list[tuple[float, int]] = []  # (seconds, committed) every 10 s: the rate near the end
        while True:
            exited = proc.poll() is not None
            now = time.monotonic()
            if peer.exits_at_end:
                if exited:
                    done_s, count = (now - started, total) if proc.returncode == 0 else (None, None)
                    break
            else:
                count = committed(settings, group, topic)
                if count >= total:
                    done_s = now - started
                    break
                if exited:
                    break
            if now - started > timeout_s:
                print(f"bench: {peer.label} did not finish within {timeout_s:.0f} s: stopped", file=sys.stderr)
                break
            if now - shown >= 10:
                if count is not None:
                    seen.append((now - started, count))
                so_far = (f"committed {count:,} of {total:,} events ({100 * count / total:.1f} %)"
                          if not peer.exits_at_end else f"{client.dbsize():,} profiles written")
                print(f"progress: {peer.label} {so_far} after {now - started:.0f} s", file=sys.stderr, flush=True)
                shown = now
            time.sleep(0.2 if peer.exits_at_end else 0.5)
        ran_s = time.monotonic() - started
        bench.stop(proc, group=True)
        sampler.done.set()
        sampler.join()
        log.seek(0)
        tail = log.read().strip().splitlines()[-20:]
        log.close()
        failure = None  # the last line it wrote, when it failed: a row of the table all the same
        if done_s is None and proc.returncode not in (0, -15):
            print(f"bench: error: {peer.label} failed:\n" + "\n".join(tail), file=sys.stderr)
            failure = next((line.strip() for line in reversed(tail) if line.strip()),
                           f"exit status {proc.returncode}")
        # its processes' RSS summed at each sample, the largest sum
        peak = max(sampler.peak["total"], bench.Sampler._rss(proc.pid))
        kafka_ids = {json.loads(r.value)["trigger_id"] for r in kafkaio.read_to_end(settings, triggers)}
        topics.delete(settings, [triggers])
        late = [(t, c) for t, c in seen if t >= seen[-1][0] - 60] if seen else []
        last_rate = (late[-1][1] - late[0][1]) / (late[-1][0] - late[0][0]) if len(late) > 1 else None
        return {"wall_s": done_s, "committed": count, "total": total, "timeout_s": timeout_s, "rss": peak,
                "ran_s": ran_s, "failure": failure,
                "last_minute_rate": last_rate, "cpu_s": sampler.cpu_s(),
                "redis_peak": sampler.peak["redis"], "kafka_ids": kafka_ids, "log": tail}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench-peers", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=DEFAULT_USERS)
    parser.add_argument("--peers", default="quix,bytewax",
                        help=f"which peers, comma-separated, of {', '.join(peers.PEERS)}")
    parser.add_argument("--chart", default=str(ROOT / "docs" / "bench-peers.png"))
    parser.add_argument("--peer-processes", type=int, default=os.cpu_count() or 1,
                        help="processes of each peer (default: the machine's cores; Quix Streams: replicas in one "
                             "consumer group, Bytewax: a cluster of processes)")
    parser.add_argument("--no-latency", action="store_true", help="leave out the live trigger latency runs")
    parser.add_argument("--peer-timeout", type=float, default=300.0,
                        help="stop a peer after this many seconds if it has not read the whole topic")
    args = parser.parse_args(argv)
    chosen = [k.strip() for k in args.peers.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in peers.PEERS]
    if unknown or not chosen:
        print(f"bench-peers: --peers takes {', '.join(peers.PEERS)} (comma-separated), not {args.peers!r}",
              file=sys.stderr)
        return 2
    if args.peer_processes < 1:
        print("bench-peers: --peer-processes must be at least 1", file=sys.stderr)
        return 2
    if args.users < 1:
        print("bench-peers: --users must be at least 1", file=sys.stderr)
        return 2
    if not peers.PYTHON.exists():
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
    runs = {}
    for key in chosen:
        run = run_peer(settings, peers.PEERS[key], topic, peer_redis, args.peer_timeout, args.peer_processes)
        run["triggers"], run["counts"] = stream_triggers(peer_redis), profile_counts(peer_redis)
        runs[key] = run

    latency = {}
    if not args.no_latency:  # live: 50 abandoned sessions/s for 60 s, gap 10 s (scripts/bench_latency.py)
        for who in ("product", *chosen):
            run = bench_latency.measure(50.0, 60.0, 10_000, None if who == "product" else who)
            if run is None or len(run["stream"]) < run["sent"]:
                print(f"bench-peers: the {who}'s live latency run lost triggers or did not start", file=sys.stderr)
                return 1
            latency[who] = run

    known = bench.known_abandonments(args.users, base.session_gap_ms)
    events = product["events"]
    product_wall = product["startup_s"] + product["e2e_s"]
    product_rss = product["sampler"].peak["total"]
    product_col = [
        f"{events:,} ({args.users:,})", f"{product_wall:.1f} s", f"{events / product_wall:,.0f}",
        f"{events / product['e2e_s']:,.0f}", _cpu(product["cpu_s"], product_wall), f"{product_rss / 2**20:,.0f} MiB",
        f"{product['redis_peak'] / 2**20:,.0f} MiB", f"{len(product_triggers):,}", f"{len(product_counts):,}", "yes",
        "exactly-once (Kafka transactions at checkpoints)"]
    cols = [("product (PyFlink)", product_col)]
    verdicts = []
    for key, run in runs.items():
        peer = peers.PEERS[key]
        if run["wall_s"] is not None:
            wall, rate = f"{run['wall_s']:.1f} s", f"{events / run['wall_s']:,.0f}"
        elif run["failure"] is not None:
            wall, rate = f"failed after {run['ran_s']:.0f} s ({run['failure']})", "-"
        elif run["committed"] is None:
            wall, rate = f"did not finish in {run['timeout_s']:.0f} s", "-"
        else:
            wall = f"did not finish in {run['timeout_s']:.0f} s ({run['committed']:,} of {run['total']:,} committed)"
            rate = f"under {run['committed'] / run['ran_s']:,.0f}"
            if run["last_minute_rate"] is not None:
                rate += f" ({run['last_minute_rate']:,.0f} in its last minute)"
        cols.append((f"peer ({peer.label})", [
            "same topic", wall, rate, "-", _cpu(run["cpu_s"], run["wall_s"] or run["ran_s"]),
            f"{run['rss'] / 2**20:,.0f} MiB", f"{run['redis_peak'] / 2**20:,.0f} MiB",
            f"{len(run['triggers']):,}", f"{len(run['counts']):,}", "no", peer.guarantee]))
        if run["wall_s"] is None:
            verdicts.append((peer, None, None, None))
            continue
        same_triggers = product_triggers == run["triggers"] and set(run["triggers"]) == run["kafka_ids"]
        differ = [u for u in set(product_counts) | set(run["counts"]) if product_counts.get(u) != run["counts"].get(u)]
        verdicts.append((peer, run["wall_s"] / product_wall, same_triggers, differ))
    names = [
        "events (users)", "wall clock, process start to last Redis write", "events/s over that",
        "events/s from the first record read (product: its summary's end to end)",
        "CPU, user + system, of all its processes (cores busy on average over the wall clock)",
        "peak RSS (product: JVM + loader processes; peer: its processes)", "peak Redis used_memory",
        f"triggers in the Redis stream (generator's abandoned sessions: {known:,})", "profiles",
        "models per session (segments, propensity)", "trigger feed guarantee"]
    q = bench_latency.quantile
    for where, what in (("Kafka (read_committed)", "kafka"), ("Redis stream", "stream")):
        if latency:
            names.append(f"live trigger latency after the gap expired, {where} (p50 / p99; 3,000 sessions, gap 10 s)")
            for who, (_, col) in zip(("product", *runs), cols):
                col.append(f"{q(latency[who][what], 0.5):.1f} / {q(latency[who][what], 0.99):.1f} s")
    print("\n| measure | " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * (len(cols) + 1))
    for i, name in enumerate(names):
        print(f"| {name} | " + " | ".join(col[i] for _, col in cols) + " |")
    ok = True
    for peer, ratio, same_triggers, differ in verdicts:
        if ratio is None:
            why = "it failed" if runs[peer.key]["failure"] else "it did not finish; --peer-timeout gives it longer"
            print(f"\n{peer.label}: outputs NOT COMPARED ({why})")
            continue
        print(f"\n{peer.label}: ratio of events/s over the wall clock, product / peer: {ratio:.2f}")
        print(f"{peer.label}: outputs: triggers (ids, users, starts, carts, values) "
              f"{'EQUAL' if same_triggers else 'DIFFER'}; per-user counts "
              f"{'EQUAL' if not differ else f'DIFFER for {len(differ):,} users, e.g. {sorted(differ)[:3]}'}")
        ok = ok and same_triggers and not differ
    p99 = {w: q(run["stream"], 0.99) for w, run in latency.items()}
    walls = {"product": product_wall, **{k: r["wall_s"] for k, r in runs.items()}}
    _chart(args.chart, events, walls, p99,
           {k: r["committed"] / r["ran_s"] for k, r in runs.items() if r["committed"] is not None})
    if all(ratio is None for _, ratio, _, _ in verdicts):
        return 2  # nothing compared
    return 0 if ok else 1


def _cpu(seconds: float, wall_s: float) -> str:
    return f"{seconds:,.0f} core-s ({seconds / wall_s:.2f})"


def _chart(path: str, events: int, walls: dict[str, float | None], p99: dict[str, float],
           lower_bounds: dict[str, float] | None = None) -> None:
    """events/s over the wall clock (a peer that did not finish: hatched, its rate up to
    the stop, a lower bound of its time) and live p99 latency; one colour per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench-peers: matplotlib not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return
    label = {"product": "product\n(PyFlink)", **{k: f"peer\n({p.label})" for k, p in peers.PEERS.items()}}
    colour = {"product": "#4c72b0", "quix": "#dd8452", "bytewax": "#55a868"}
    lower_bounds = lower_bounds or {}
    fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (key, wall) in enumerate(walls.items()):
        if wall is not None:
            ax.bar(i, events / wall, color=colour[key])
        else:
            rate = lower_bounds.get(key, 0)
            ax.bar(i, rate, color="white", edgecolor=colour[key], hatch="//")
            ax.annotate("did not finish" + ("\n(rate until stopped)" if rate else ""), (i, rate), ha="center",
                        va="bottom")
    ax.set_xticks(range(len(walls)), [label[k] for k in walls])
    ax.set_ylabel("events/s, process start to last Redis write")
    ax.set_title(f"Backfill: same {events:,} events, outputs checked")
    if p99:
        right.bar([label[k] for k in p99], list(p99.values()), color=[colour[k] for k in p99])
        right.set_ylabel("seconds after the session's gap expired")
        right.set_title("Live: p99 trigger latency to the Redis stream (gap 10 s)")
    bench.save_chart(fig, path, "bench-peers")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
