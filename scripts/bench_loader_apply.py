"""The Redis loader's cost per live record (a benchmark, not a test): N live-changelog
records of ~30 fields, as the live function writes them, through ``Materializer._apply``
into the local stack's Redis (database 9, flushed first). Prints the loader's Python CPU
(``time.process_time``) and Redis's (``INFO cpu``) per record.

Usage: .venv/bin/python scripts/bench_loader_apply.py [N]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personalize.settings import Settings  # noqa: E402
from sinks import redis as loader  # noqa: E402

RECORD = {
    "version": 17_330_000_000_000_001, "epoch": 0, "consent": True, "consent_ms": 1_733_000_000_000,
    "n_events": 12, "n_page_view": 3, "n_product_view": 5, "n_add_to_cart": 2, "n_remove_from_cart": 0,
    "n_checkout": 1, "n_purchase": 1, "n_search": 0, "revenue_cents": 12345, "revenue": "123.45",
    "first_seen_ms": 1_733_000_000_000, "last_seen_ms": 1_733_000_100_000, "updated_ms": 1_733_000_100_000,
    "events_by_hour": ",".join(["0"] * 20 + ["3", "4", "5", "0"]), "active_hours": "22,21,20",
    "recent_events": 4, "recent_product_views": 2, "recent_window_end_ms": 1_733_000_400_000,
    "session_start_ms": 1_733_000_000_000, "session_events": 5, "session_product_views": 3, "session_products": 2,
    "session_cart": '[{"product_id":"p1","quantity":1,"price":"9.99"}]', "session_cart_value": "9.99",
    "session_last_cart_add_ms": 1_733_000_050_000, "session_top_category": "shoes", "session_propensity": "0.123456",
}


class _Message:
    """What the loader reads of a confluent-kafka message."""

    def __init__(self, topic: str, key: bytes, value: bytes, offset: int):
        self._topic, self._key, self._value, self._offset = topic, key, value, offset

    def topic(self):
        return self._topic

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def key(self):
        return self._key

    def value(self):
        return self._value


class _NoCommit:
    def commit(self, **_):
        pass


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    settings = dataclasses.replace(Settings.from_env(), redis_url="redis://127.0.0.1:6379/9")
    m = loader.Materializer(settings)
    m.redis.flushdb()
    topic = settings.topic_profile_live
    m.owner = "1 bench"
    m.redis.set(f"{loader.OWNER_PREFIX}{topic}:0", m.owner)
    m.consumer = _NoCommit()
    records = [_Message(topic, f"u{i}".encode(), orjson.dumps({**RECORD, "version": RECORD["version"] + i}), i)
               for i in range(n)]
    before = m.redis.info("cpu")
    cpu = time.process_time()
    m._apply({(topic, 0): records}, {(topic, 0): n})
    python_s = time.process_time() - cpu
    after = m.redis.info("cpu")
    redis_s = sum(after[k] - before[k] for k in ("used_cpu_sys", "used_cpu_user"))
    print(f"{n:,} live records: loader Python {1e6 * python_s / n:.1f} us, Redis {1e6 * redis_s / n:.1f} us "
          f"per record ({m.stats.profile_writes:,} profiles written)")
    return 0 if m.stats.profile_writes == n else 1


if __name__ == "__main__":
    raise SystemExit(main())
