"""Unbounded catch-up (a benchmark, not a test): how long `personalize run` (unbounded,
exactly-once, checkpointing) takes to work through a backlog, by checkpoint interval.

The backlog is `make bench`'s topic (``bench-events-<users>``, produced once and kept).
Each run starts fresh (a new state folder, Redis database 9 flushed, output topics of
its own) and is timed from process start to the last change in Redis (profile keys,
trigger stream entries) once nothing has changed for ``--quiet-s``: an unbounded run
never ends, and the last sessions of the backlog stay open (no later event moves the
watermark; idleness is off for the run), so "caught up" is "Redis stopped changing". This is the throughput cost of
a shorter checkpoint interval, the other side of the live trigger latency
(scripts/bench_latency.py).

Usage: python scripts/bench_catchup.py [--users 100000] [--checkpoint-ms 10000 5000 2000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (scripts/bench.py)

STREAM = "triggers:cart_abandonment"


def catch_up(users: int, checkpoint_ms: int, quiet_s: float, timeout_s: float) -> dict | None:
    """One unbounded run over the backlog from a fresh start: seconds to the last Redis change."""
    import redis

    from personalize import kafkaio
    from personalize.settings import Settings

    topic = f"bench-events-{users}"
    env = bench.bench_env(Settings.from_env(), topic)
    if bench.cli("stack", "up", env=env).returncode != 0:
        print("bench-catchup: `personalize stack up` failed", file=sys.stderr)
        return None
    settings = Settings.from_env(env)
    if not bench.ensure_events(env, settings, topic, users):
        return None
    begin, end = kafkaio.offsets(settings, topic)
    events = sum(end[p] - begin[p] for p in end)
    client = redis.Redis.from_url(env["PERSONALIZE_REDIS_URL"])
    client.flushdb()
    state = tempfile.mkdtemp(prefix="bench-catchup-")
    # no idleness: 30 s after the backlog's last record a quiet partition would let the
    # watermark close a few more sessions, a tail that lands inside one run's quiet
    # period and after another's (seen: +21 triggers, +30 s in one run of three)
    env.update(PERSONALIZE_STATE_DIR=state, PERSONALIZE_CHECKPOINT_INTERVAL_MS=str(checkpoint_ms),
               PERSONALIZE_IDLE_TIMEOUT_MS=str(3_600_000))
    print(f"bench-catchup: {events:,} events, checkpoint every {checkpoint_ms} ms", file=sys.stderr, flush=True)
    log = open(Path(state) / "run.log", "w+")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "personalize.cli", "run"], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    seen, changed, reported = None, started, started
    try:
        while True:
            time.sleep(0.5)
            if proc.poll() is not None:
                log.seek(0)
                print("bench-catchup: the run ended:\n" + log.read()[-3000:], file=sys.stderr)
                return None
            now = time.monotonic()
            state_now = (client.dbsize(), client.xlen(STREAM))
            if state_now != seen:
                seen, changed = state_now, now
            if seen[0] and now - changed >= quiet_s:
                break
            if now - started > timeout_s:
                print(f"bench-catchup: still changing after {timeout_s:.0f} s; stopped", file=sys.stderr)
                return None
            if now - reported >= 10:
                print(f"bench-catchup: {now - started:.0f} s, {seen[0]:,} Redis keys, {seen[1]:,} triggers",
                      file=sys.stderr, flush=True)
                reported = now
        # the profile changelog the run wrote (end offsets: its records and each transaction's
        # commit markers): every checkpoint flushes it, so it grows as the interval shrinks
        profile_offsets = sum(kafkaio.offsets(settings, settings.topic_profile_updates)[1].values())
    finally:
        bench.stop(proc, timeout_s=120)
        bench._drop_outputs(settings)
    seconds = changed - started
    return {"checkpoint_ms": checkpoint_ms, "events": events, "seconds": seconds, "keys": seen[0],
            "triggers": seen[1], "events_per_s": events / seconds, "profile_offsets": profile_offsets}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench-catchup", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000, help="make bench's traffic for this many users")
    parser.add_argument("--checkpoint-ms", type=int, nargs="+", default=[10_000, 5_000, 2_000])
    parser.add_argument("--quiet-s", type=float, default=15.0, help="no Redis change this long: caught up")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args(argv)
    rows = []
    for interval in args.checkpoint_ms:
        row = catch_up(args.users, interval, args.quiet_s, args.timeout_s)
        if row is None:
            return 1
        rows.append(row)
    print(f"\nunbounded catch-up over make bench's {rows[0]['events']:,} events ({args.users:,} users), fresh state")
    print("| checkpoint interval | process start to last Redis change | events/s | Redis keys | triggers "
          "| profile-updates offsets |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint_ms'] / 1000:g} s | {r['seconds']:.1f} s | {r['events_per_s']:,.0f} | {r['keys']:,} "
              f"| {r['triggers']:,} | {r['profile_offsets']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
