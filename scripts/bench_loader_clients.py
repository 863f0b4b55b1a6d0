"""kafka-python against confluent-kafka for the Redis loader's read (a benchmark, not a test):
N records shaped like the live changelog's (JSON ~450 bytes, keyed by user id) produced
once into a topic of their own on the local stack, then read from the beginning to the
end and parsed with orjson as the loader does, twice per client, alternating; prints
wall and CPU seconds per client. Needs the ``bench`` extra (confluent-kafka).

Usage: python scripts/bench_loader_clients.py [N]   (default 200000; `personalize stack up` first)
"""
import resource
import sys
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from personalize import kafkaio, topics  # noqa: E402
from personalize.settings import Settings  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
s = Settings.from_env()
topic = f"clients-{uuid.uuid4().hex[:6]}"
topics.ensure(s, [topic], local_stack=True)
value = {"version": 15699287591840001, "epoch": 0, "consent": True, "consent_ms": 1569928759184, "n_events": 19,
         **{f"n_{t}": 3 for t in ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout", "purchase", "search")},
         "revenue_cents": 0, "first_seen_ms": 1569890684283, "last_seen_ms": 1569928759184,
         "events_by_hour": "8,0,0,0,6,0,0,0,0,0,0,5,0,0,0,0,0,0,0,0,0,0,0,0", "recent_events": 5,
         "recent_product_views": 2, "recent_window_end_ms": 1569928800000, "session_start_ms": 1569928643861,
         "session_events": 5, "session_product_views": 3, "session_products": 2}
p = kafkaio.producer(s, linger_ms=50)
for i in range(N):
    p.send(topic, key=f"user-{i}".encode(), value=orjson.dumps(value))
p.flush(); p.close()

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime

def kafka_python():
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, group_id=None, enable_auto_commit=False,
                      isolation_level="read_committed", auto_offset_reset="earliest", max_poll_records=20_000,
                      fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
    tps = [TopicPartition(topic, q) for q in c.partitions_for_topic(topic)]
    c.assign(tps); c.seek_to_beginning(*tps)
    ends = c.end_offsets(tps); n = 0
    while any(c.position(tp) < ends[tp] for tp in tps):
        for recs in c.poll(timeout_ms=500).values():
            for r in recs:
                orjson.loads(r.value); r.key.decode(); n += 1
    c.close(); return n

def confluent():
    from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
    c = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": f"g-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "isolation.level": "read_committed", "auto.offset.reset": "earliest"})
    meta = c.list_topics(topic).topics[topic].partitions
    c.assign([TopicPartition(topic, q, OFFSET_BEGINNING) for q in meta])
    n = 0
    while n < N:
        for m in c.consume(num_messages=10_000, timeout=0.5):
            if m.error(): continue
            orjson.loads(m.value()); m.key().decode(); n += 1
    c.close(); return n

for name, fn in (("kafka-python", kafka_python), ("confluent-kafka", confluent), ("kafka-python", kafka_python), ("confluent-kafka", confluent)):
    w, c0 = time.monotonic(), cpu()
    n = fn()
    print(f"{name}: {n:,} records in {time.monotonic() - w:.2f} s wall, {cpu() - c0:.2f} s CPU "
          f"({n / (time.monotonic() - w):,.0f}/s)", flush=True)
topics.delete(s, [topic])
