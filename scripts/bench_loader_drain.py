"""A Redis loader's drain alone (a benchmark, not a test): N live rows and N sessions parts,
as the job writes them, produced once into topics of their own (``--produce``), then drained
by a fresh loader into the local stack's Redis (database 8, flushed first): wall clock,
the loader process's CPU and Redis's CPU.

Usage: .venv/bin/python scripts/bench_loader_drain.py --produce [N]   # prints the TAG
       .venv/bin/python scripts/bench_loader_drain.py TAG             # one drain
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_loader_apply import RECORD  # noqa: E402
from personalize import kafkaio, topics  # noqa: E402
from personalize.settings import Settings  # noqa: E402

PART = {"n_sessions": 2, "session_ms_total": 1000, "avg_session_ms": 500, "avg_session_s": "0.500",
        "last_session_start_ms": 1, "last_session_events": 4, "last_session_cart_adds": 1,
        "last_session_cart_removes": 0, "last_session_purchases": 0, "last_session_revenue": "0.00",
        "consent": True, "consent_ms": 5, "epoch": 0, "propensity": "0.123456", "propensity_ms": 9,
        "segment": "s1", "segment_name": "browsers"}


def settings_for(tag: str) -> Settings:
    return dataclasses.replace(
        Settings.from_env(), topic_profile_updates=f"drain-{tag}-profiles", topic_trending=f"drain-{tag}-trending",
        topic_triggers=f"drain-{tag}-triggers", topic_model_snapshots=f"drain-{tag}-models",
        topic_erasures=f"drain-{tag}-erasures", redis_url="redis://127.0.0.1:6379/8")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--produce":
        n = int(argv[1]) if len(argv) > 1 else 150_000
        tag = uuid.uuid4().hex[:8]
        s = settings_for(tag)
        topics.ensure(s, [s.topic_profile_updates, s.topic_profile_live, s.topic_trending, s.topic_triggers,
                          s.topic_model_snapshots, s.topic_erasures], local_stack=True)
        kafkaio.produce(s, s.topic_profile_live, [(f"u{i}".encode(), orjson.dumps({**RECORD, "version": RECORD["version"] + i}),
                                                   1000) for i in range(n)])
        kafkaio.produce(s, s.topic_profile_updates, [(f"u{i}".encode(), orjson.dumps(PART), 1000) for i in range(n)])
        print(tag)
        return 0
    from sinks.redis import Materializer

    s = settings_for(argv[0])
    loader = Materializer(s, group=f"bench-drain-{uuid.uuid4().hex[:8]}")
    loader.redis.flushdb()
    keys = ("used_cpu_sys", "used_cpu_user", "used_cpu_sys_children", "used_cpu_user_children")
    before = loader.redis.info("cpu")
    wall, cpu = time.monotonic(), time.process_time()
    stats = loader.drain()
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    after = loader.redis.info("cpu")
    print(f"drain of {stats.records:,} records: {wall:.1f} s wall, loader {cpu:.1f} s CPU, "
          f"Redis {sum(after[k] - before[k] for k in keys):.1f} s CPU ({stats.profile_writes:,} profile writes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
