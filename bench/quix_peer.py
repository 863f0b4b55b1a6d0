"""A peer of `make bench-peers`: the product's core workload as a Quix Streams application.

Written the way Quix Streams' documentation has a user write it (one
``Application``, a ``StreamingDataFrame``, stateful ``apply``, a session window
with a mergeable aggregator, ``to_topic`` and batching sinks), with the rules of
bench/peer_rules.py (../shared/DESIGN.md's, which the benchmark checks). Per-user
sessions: a gap of PEER_GAP_MS or more ends one, as the product's ``SESSION`` of gap -
1 ms does; Quix closes a session when its partition's watermark passes its last
event + 2 gaps, sweeping every key of the partition (``closing_strategy="partition"``,
the one that closes a silent user's session).

It imports nothing of the product, and nothing of the product imports it. No models
run here (the product also scores and learns every session): the table says so.

Settings from the environment: PEER_BROKERS, PEER_INPUT, PEER_GROUP, PEER_TRIGGERS,
PEER_REDIS (host:port/db), PEER_GAP_MS, PEER_STATE_DIR, PEER_GUARANTEE
(exactly-once, default, as the product's trigger topic; or at-least-once),
PEER_PROCESSES (1, default; N: this process starts N - 1 replicas in its consumer group).
"""

from __future__ import annotations

import os
import subprocess
import sys

import redis
from peer_rules import (AvroDecoder, add_to_cart, merge_carts, new_cart, trigger_of, update_profile, write_profiles,
                        write_triggers)
from quixstreams import Application
from quixstreams.dataframe.windows.aggregations import BaseAggregator
from quixstreams.models.serializers import Deserializer
from quixstreams.sinks import BatchingSink, SinkBatch


class SingleObjectAvro(Deserializer):
    def __init__(self):
        super().__init__()
        self.decode = AvroDecoder()

    def __call__(self, value: bytes, ctx):
        return self.decode(value)


def profile_step(event: dict, state) -> dict:
    profile = update_profile(state.get("profile"), event)
    state.set("profile", profile)
    return profile


class Cart(BaseAggregator):
    """A session's net cart, purchases and latest marketing consent; mergeable (sessions merge)."""

    @property
    def state_suffix(self) -> str:
        return "cart-v1"

    def initialize(self):
        return new_cart()

    def agg(self, old, event, timestamp):
        return add_to_cart(old, event, timestamp)

    def merge(self, a, b):
        return merge_carts(a, b)

    def result(self, value):
        return value


class RedisProfiles(BatchingSink):
    """profile:{user} hashes, the newest per user of each checkpoint's batch."""

    def __init__(self, client: redis.Redis):
        super().__init__()
        self.client = client

    def write(self, batch: SinkBatch) -> None:
        write_profiles(self.client, {item.key: item.value for item in batch})


class RedisTriggers(BatchingSink):
    def __init__(self, client: redis.Redis):
        super().__init__()
        self.client = client

    def write(self, batch: SinkBatch) -> None:
        write_triggers(self.client, (item.value for item in batch))


def main() -> None:
    env = os.environ
    gap_ms = int(env.get("PEER_GAP_MS", "1800000"))
    host_port, db = env["PEER_REDIS"].rsplit("/", 1)
    host, port = host_port.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), db=int(db))
    app = Application(broker_address=env["PEER_BROKERS"], consumer_group=env["PEER_GROUP"],
                      auto_offset_reset="earliest", state_dir=env.get("PEER_STATE_DIR", "state"),
                      processing_guarantee=env.get("PEER_GUARANTEE", "exactly-once"))
    events = app.topic(env["PEER_INPUT"], key_deserializer="str", value_deserializer=SingleObjectAvro())
    triggers_topic = app.topic(env["PEER_TRIGGERS"], key_serializer="str", value_serializer="json")

    sdf = app.dataframe(events)
    profiles = sdf.apply(profile_step, stateful=True)
    profiles.sink(RedisProfiles(client))

    # the product's SESSION of gap - 1 ms: events gap_ms or more apart are two sessions
    sessions = sdf.session_window(inactivity_gap_ms=gap_ms - 1).agg(cart=Cart()).final(closing_strategy="partition")
    # Quix's window end is exclusive: the last event is at end - 1
    triggers = sessions.apply(lambda window, key, timestamp, headers: trigger_of(
        window["cart"], key, window["start"], window["end"] - 1, gap_ms), metadata=True).filter(lambda t: t is not None)
    triggers.to_topic(triggers_topic)
    triggers.sink(RedisTriggers(client))
    app.run()


def replicas() -> list[subprocess.Popen]:
    """PEER_PROCESSES - 1 more copies of this application in the same consumer group (Quix
    Streams scales out by replicas: the partitions are shared among them)."""
    if "PEER_REPLICA" in os.environ:
        return []
    n = int(os.environ.get("PEER_PROCESSES", "1"))
    state = os.environ.get("PEER_STATE_DIR", "state")
    return [subprocess.Popen([sys.executable, __file__],
                             env=dict(os.environ, PEER_REPLICA=str(i), PEER_STATE_DIR=f"{state}/{i}"))
            for i in range(1, n)]


if __name__ == "__main__":
    others = replicas()
    try:
        main()
    finally:
        for other in others:
            other.terminate()
            other.wait()
