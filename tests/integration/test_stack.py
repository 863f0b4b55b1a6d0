"""`personalize stack up|down|status` against real Kafka and Redis processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import redis

from personalize import credentials, topics
from tests.conftest import Stack, free_port, stack_env, start_stack


def pids(stack: Stack) -> dict[str, int]:
    return {s: int((stack.settings.stack_dir / f"{s}.pid").read_text()) for s in ("kafka", "redis")}


def test_status_reports_both_services_running_with_their_addresses(stack):
    done = stack.cli("stack", "status")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(l.startswith("kafka") and "running" in l and f"127.0.0.1:{stack.settings.kafka_port}" in l for l in lines)
    assert any(l.startswith("redis") and "running" in l and f"redis://127.0.0.1:{stack.settings.redis_port}/0" in l
               for l in lines)


def test_up_twice_starts_nothing_new(stack):
    before = pids(stack)
    done = stack.cli("stack", "up")
    assert done.returncode == 0, done.stderr
    assert pids(stack) == before
    assert done.stderr.count("already running") == 2


def test_a_taken_port_is_one_line_naming_the_port_and_setting_and_starts_nothing(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        env = stack_env(free_port(), free_port(), taken, tmp_path)
        done = Stack(None, env).cli("stack", "up")
    assert done.returncode == 2
    assert done.stderr == (
        f"personalize: error: port {taken} (for redis) is already in use on 127.0.0.1: "
        "set PERSONALIZE_REDIS_PORT to a free port\n"
    )
    assert not (tmp_path / "redis.pid").exists() and not (tmp_path / "kafka.pid").exists()


def test_job_topics_exist_with_configured_partitions_and_no_time_retention(stack):
    from kafka.admin import ConfigResource, ConfigResourceType

    client = topics.admin(stack.settings)
    try:
        described = {t["topic"]: t for t in client.describe_topics(list(stack.settings.topics))}
        for name in stack.settings.topics:
            assert len(described[name]["partitions"]) == stack.settings.partitions, name
        configs = client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, stack.settings.topic_events)])
        entries = {c[0]: c[1] for c in configs[0].resources[0][4]}
        assert entries["retention.ms"] == "-1"
    finally:
        client.close()


@pytest.mark.slow
def test_killed_kafka_is_reported_down_and_down_purge_starts_the_next_up_empty(tmp_path):
    own = start_stack(tmp_path / "own")
    try:
        r = credentials.redis_client(own.settings)
        r.set("left-behind", "1")
        topics.ensure(own.settings, ["left-behind"], local_stack=True)

        os.kill(pids(own)["kafka"], signal.SIGKILL)
        time.sleep(1)
        done = own.cli("stack", "status")
        assert done.returncode == 1
        kafka_line = next(l for l in done.stdout.splitlines() if l.startswith("kafka"))
        redis_line = next(l for l in done.stdout.splitlines() if l.startswith("redis"))
        assert " down " in kafka_line and "is gone" in kafka_line
        assert " running " in redis_line

        done = own.cli("stack", "down", "--purge")
        assert done.returncode == 0 and done.stdout.startswith("stopped: redis"), done.stdout + done.stderr
        assert not (own.settings.stack_dir / "kafka").exists()

        done = own.cli("stack", "up", timeout=180)
        assert done.returncode == 0, done.stderr
        assert credentials.redis_client(own.settings).get("left-behind") is None
        assert "left-behind" not in topics.list_topics(own.settings)
        assert set(own.settings.topics) <= topics.list_topics(own.settings)
    finally:
        own.cli("stack", "down", "--purge")


@pytest.mark.slow
def test_down_stops_only_what_the_stack_started_and_up_finds_the_data_again(tmp_path):
    """An outside redis-server (the same program, another folder) survives `down`, even when
    the stack's pid file names it (a stale file whose pid was reused); Kafka's and Redis's
    data written before `down` are there after `up`."""
    import shutil
    import subprocess

    from personalize import kafkaio

    own = start_stack(tmp_path / "own")
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    outside_port = free_port()
    outside = subprocess.Popen([shutil.which("redis-server"), "--port", str(outside_port), "--bind", "127.0.0.1",
                                "--save", ""], cwd=outside_dir, stdout=subprocess.DEVNULL)
    try:
        s = own.settings
        credentials.redis_client(s).set("written", "before down")
        topics.ensure(s, ["kept"], local_stack=True)
        assert kafkaio.produce(s, "kept", [(b"k", b"before down", 1)]) == 1
        deadline = time.monotonic() + 10
        while not _answers(outside_port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _answers(outside_port)

        stack_pids = pids(own)
        done = own.cli("stack", "down")
        assert done.returncode == 0 and done.stdout.strip() == "stopped: kafka, redis", done.stdout + done.stderr
        assert not any(_running(pid) for pid in stack_pids.values())
        assert outside.poll() is None and _answers(outside_port)

        # a stale pid file naming a process the stack did not start: not stopped
        (s.stack_dir / "redis.pid").write_text(f"{outside.pid}\n")
        done = own.cli("stack", "down")
        assert done.stdout.strip() == "stopped: nothing was running", done.stdout + done.stderr
        assert outside.poll() is None and _answers(outside_port)

        done = own.cli("stack", "up", timeout=180)
        assert done.returncode == 0, done.stderr
        assert pids(own)["redis"] != outside.pid
        assert credentials.redis_client(s).get("written") == b"before down"
        assert [r.value for r in kafkaio.read_to_end(s, "kept")] == [b"before down"]
    finally:
        own.cli("stack", "down", "--purge")
        outside.kill()
        outside.wait()


def _answers(port: int) -> bool:
    try:
        return redis.Redis(port=port, socket_connect_timeout=0.5).ping()
    except redis.ConnectionError:
        return False


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_redis_keeps_its_writes_across_a_kill_and_a_down_up(tmp_path):
    """The local Redis runs with the append-only file: a write survives kill -9 of Redis
    (not only the last snapshot), and a plain down/up after that."""
    own = start_stack(tmp_path / "own")
    try:
        r = credentials.redis_client(own.settings)
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        r.set("written", "before the kill")
        time.sleep(1.5)  # appendfsync everysec
        os.kill(pids(own)["redis"], signal.SIGKILL)
        time.sleep(0.5)
        done = own.cli("stack", "up", timeout=180)
        assert done.returncode == 0, done.stderr
        assert credentials.redis_client(own.settings).get("written") == b"before the kill"
        assert own.cli("stack", "down").returncode == 0
        assert own.cli("stack", "up", timeout=180).returncode == 0
        assert credentials.redis_client(own.settings).get("written") == b"before the kill"
    finally:
        own.cli("stack", "down", "--purge")
