"""The loader rides out a Redis restart: while Redis does not answer it waits with
backoff, and when it answers again it resumes from the offsets Redis holds, not from
its own memory. Here Redis comes back from an older copy of its data (as a Redis
without an append-only file loses its newest writes): the loader must write those
records again, and every profile and trigger ends exactly once."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from decimal import Decimal

import orjson
import pytest
import redis

import schemas
from personalize import kafkaio, topics
from personalize.flink import free_port
from personalize.settings import Settings
from sinks.redis import Materializer
from tests.integration.test_profile_job import job_stack

pytestmark = pytest.mark.slow


def start_redis(port: int, folder) -> subprocess.Popen:
    proc = subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                             "--dir", str(folder), "--appendonly", "yes", "--appendfsync", "always",
                             "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            if client.ping():
                return proc
        except redis.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"redis-server on port {port} did not start")


def until(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f}s: {what() if callable(what) else what}"
        time.sleep(0.2)


def batch(s: Settings, users: range, n_events: int) -> None:
    codec = schemas.codec("trigger")
    profiles = [(f"u{i}".encode(), orjson.dumps({"n_events": n_events, "consent": True}), 1_000) for i in users]
    triggers = [(f"u{i}".encode(), codec.encode({
        "trigger_id": f"t-{i}", "kind": "cart_abandonment", "user_id": f"u{i}", "session_start_ms": i,
        "session_end_ms": i + 1, "cart": [], "cart_value": Decimal("0.00"), "propensity": None, "segment": None,
        "emitted_ms": i + 2}), 1_000) for i in users]
    assert kafkaio.produce(s, s.topic_profile_updates, profiles) == len(profiles)
    assert kafkaio.produce(s, s.topic_triggers, triggers) == len(triggers)


def following(loader: Materializer) -> tuple[threading.Event, threading.Thread, list[BaseException]]:
    """The loader following its topics in a thread until the event is set; what it raised."""
    stop, failures = threading.Event(), []

    def follow():
        try:
            loader.follow(stop.is_set)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            failures.append(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return stop, thread, failures


def test_the_loader_waits_out_a_redis_restart_and_rewrites_what_redis_lost(stack, tmp_path):
    port = free_port()
    data, older = tmp_path / "redis", tmp_path / "redis-older"
    data.mkdir()
    own = job_stack(stack, redis_db=12)  # (its own Redis below; this only names the topics)
    env = dict(own.env, PERSONALIZE_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    s = Settings.from_env(env)
    topics.ensure(s, [s.topic_profile_updates, s.topic_trending, s.topic_triggers, s.topic_model_snapshots],
                  local_stack=True)
    proc = start_redis(port, data)
    client = redis.Redis(port=port, decode_responses=True)
    loader = Materializer(s)
    stop, thread, failures = following(loader)
    try:
        batch(s, range(0, 50), 1)
        until(lambda: client.xlen("triggers:cart_abandonment") == 50, "batch A in Redis")
        shutil.copytree(data, older)  # Redis's data as it was after batch A

        batch(s, range(50, 100), 2)
        until(lambda: client.xlen("triggers:cart_abandonment") == 100, "batch B in Redis")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shutil.rmtree(data)
        shutil.copytree(older, data)  # it comes back without batch B
        batch(s, range(100, 120), 3)  # while Redis is down: the loader must wait
        time.sleep(2)
        assert thread.is_alive() and not failures
        proc = start_redis(port, data)
        until(lambda: client.xlen("triggers:cart_abandonment") == 120 and client.exists("profile:u50"),
              "batch B written again and batch C written")
    finally:
        stop.set()
        thread.join(timeout=30)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    assert not failures, failures
    # every profile exactly as its newest record says, every trigger once in the stream
    proc = start_redis(port, data)
    try:
        for i in range(120):
            assert client.hgetall(f"profile:u{i}") == {"n_events": str(1 if i < 50 else 2 if i < 100 else 3)}
        ids = [f["trigger_id"] for _, f in client.xrange("triggers:cart_abandonment")]
        assert sorted(ids) == sorted(f"t-{i}" for i in range(120))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
