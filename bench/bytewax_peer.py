"""A peer of `make bench-peers`: the product's core workload as a Bytewax dataflow.

Written the way Bytewax's documentation has a user write it (a ``Dataflow`` of
operators: ``KafkaSource``, ``key_on``, ``stateful_map`` for the per-user counts,
``fold_window`` with an ``EventClock`` and a ``SessionWindower`` for the sessions,
``KafkaSink`` and dynamic sinks for Redis), with the rules of bench/peer_rules.py
(../shared/DESIGN.md's, which the benchmark checks). Per-user sessions: a gap of
PEER_GAP_MS or more ends one (the windower's gap is PEER_GAP_MS - 1 ms: it joins an
event within the gap inclusive, as the product's ``SESSION`` of gap - 1 ms does).

Bytewax's clock is per key: a user's watermark is the user's newest event time - 5 s
(the product's out-of-orderness) plus the system time since that event arrived, and
a session closes once its user's watermark passes its last event + the gap, or at the
end of the input (PEER_TAIL=0: the source stops at the topic's end, as a backfill).
PEER_WAKE=system (the clock's default: the runtime wakes a key when its close time
comes by the system clock) is for live traffic; PEER_WAKE=none (``to_system_utc``
returning None, as the clock's documentation offers) is for a backfill of old event
times, where every close time is already past by the system clock.

Guarantees: none beyond the run (no recovery configured; Bytewax's Kafka sink is not
transactional: at-least-once with recovery). No models run here. It imports nothing
of the product, and nothing of the product imports it.

Settings from the environment: PEER_BROKERS, PEER_INPUT, PEER_TRIGGERS, PEER_REDIS
(host:port/db), PEER_GAP_MS, PEER_OUT_OF_ORDERNESS_MS (how long the clock waits
for late events: the product's bound, 5000 by default), PEER_TAIL (1, default: wait
for new events; 0: stop at the topic's end), PEER_WAKE (system, default; or none),
PEER_PROCESSES (1, default: one process, one worker; N: a cluster of N processes on
loopback, one worker each).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
import redis
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.operators.windowing import EventClock, SessionWindower, fold_window
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from peer_rules import (AvroDecoder, add_to_cart, merge_carts, new_cart, trigger_of, update_profile, write_profiles,
                        write_triggers)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class _Partition(StatelessSinkPartition):
    def __init__(self, client: redis.Redis, write):
        self.client, self.write = client, write

    def write_batch(self, items) -> None:
        self.write(self.client, items)


class RedisSink(DynamicSink):
    """A Redis client per worker; ``write(client, items)`` writes each batch."""

    def __init__(self, url: str, write):
        self.url, self.write = url, write

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        host_port, db = self.url.rsplit("/", 1)
        host, port = host_port.rsplit(":", 1)
        return _Partition(redis.Redis(host=host, port=int(port), db=int(db)), self.write)


def profile_step(profile: dict | None, event: dict):
    profile = update_profile(profile, event)
    return profile, profile


def session_start() -> dict:
    return {"cart": new_cart(), "start": None, "end": None}


def session_add(session: dict, event: dict) -> dict:
    at = event["event_time"]
    add_to_cart(session["cart"], event, at)
    session["start"] = at if session["start"] is None else min(session["start"], at)
    session["end"] = at if session["end"] is None else max(session["end"], at)
    return session


def session_merge(a: dict, b: dict) -> dict:
    merge_carts(a["cart"], b["cart"])
    a["start"], a["end"] = min(a["start"], b["start"]), max(a["end"], b["end"])
    return a


def build(env) -> Dataflow:
    gap_ms = int(env.get("PEER_GAP_MS", "1800000"))
    redis_url = env["PEER_REDIS"]
    decode = AvroDecoder()
    wake = env.get("PEER_WAKE", "system")
    if wake not in ("system", "none"):
        raise SystemExit(f"PEER_WAKE must be system or none, not {wake!r}")

    flow = Dataflow("peer")
    source = KafkaSource([env["PEER_BROKERS"]], [env["PEER_INPUT"]], tail=env.get("PEER_TAIL", "1") != "0",
                         add_config={"isolation.level": "read_committed"})
    events = op.map("decode", op.input("events", flow, source), lambda msg: decode(msg.value))
    by_user = op.key_on("user", events, lambda e: e["user_id"])

    profiles = op.stateful_map("profile", by_user, profile_step)
    op.output("profiles", profiles, RedisSink(redis_url, lambda client, items: write_profiles(client, dict(items))))

    wait = timedelta(milliseconds=int(env.get("PEER_OUT_OF_ORDERNESS_MS", "5000")))
    clock = EventClock(ts_getter=lambda e: EPOCH + timedelta(milliseconds=e["event_time"]),
                       wait_for_system_duration=wait,
                       **({"to_system_utc": lambda _: None} if wake == "none" else {}))
    sessions = fold_window("session", by_user, clock, SessionWindower(gap=timedelta(milliseconds=gap_ms - 1)),
                           session_start, session_add, session_merge)
    late = op.count_final("late", op.map("late-key", sessions.late, lambda kv: kv[0]), lambda _: "late")
    op.inspect("late-report", late, lambda step, kv: print(f"peer: {kv[1]} late events", file=sys.stderr))

    triggers = op.filter_map("trigger", sessions.down, lambda kv: trigger_of(
        kv[1][1]["cart"], kv[0], kv[1][1]["start"], kv[1][1]["end"], gap_ms))
    op.output("triggers-redis", triggers, RedisSink(redis_url, write_triggers))
    op.output("triggers-kafka", op.map("message", triggers, lambda t: KafkaSinkMessage(t["user_id"], json.dumps(t))),
              KafkaSink([env["PEER_BROKERS"]], env["PEER_TRIGGERS"]))
    return flow


def main() -> int:
    """One process, or PEER_PROCESSES of them: this one (process 0) starts the others and
    waits for them, each a worker of one cluster on loopback (Bytewax's -i/-a)."""
    from bytewax.run import cli_main

    env = os.environ
    processes = int(env.get("PEER_PROCESSES", "1"))
    if processes == 1:
        cli_main(build(env))
        return 0
    if "PEER_PROCESS_ID" in env:
        cli_main(build(env), process_id=int(env["PEER_PROCESS_ID"]), addresses=env["PEER_ADDRESSES"].split(";"))
        return 0
    ports = []
    for _ in range(processes):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    addresses = ";".join(f"127.0.0.1:{port}" for port in ports)
    others = [subprocess.Popen([sys.executable, __file__], env=dict(env, PEER_PROCESS_ID=str(i), PEER_ADDRESSES=addresses))
              for i in range(1, processes)]
    try:
        cli_main(build(env), process_id=0, addresses=addresses.split(";"))
    finally:
        codes = [other.wait() for other in others]
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main())
