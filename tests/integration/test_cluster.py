"""The same job on a real standalone Flink cluster (started from the venv's pyflink):
submit, stop with a savepoint, resubmit from it at another parallelism, and every
count, session and trigger is exact across the upgrade; a wrong address is one line."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import Counter

import pytest

from personalize import credentials, topics
from personalize.settings import Settings
from sinks.redis import Materializer
from tests.conftest import Stack, free_port
from tests.integration.test_profile_job import job_stack, profiles
from tests.integration.test_triggers_job import (
    _clock,
    check_triggers,
    consented_sessions,
    expected_profile_fields,
    expected_triggers,
    kafka_triggers,
    send_events,
    two_phases,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(stack):
    env = dict(stack.env, PERSONALIZE_FLINK_REST_PORT=str(free_port()), PERSONALIZE_FLINK_RPC_PORT=str(free_port()))
    own = Stack(Settings.from_env(env), env)
    done = own.cli("cluster", "up", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taskmanagers 1  slots 2/2 free" in done.stdout
    try:
        yield own
    finally:
        own.cli("cluster", "down", timeout=120)
        assert own.cli("cluster", "status").returncode == 1


def _submit(own: Stack, *args: str) -> str:
    done = own.cli("submit", *args, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"job ([0-9a-f]{32}) running on (http://\S+)", done.stdout)
    assert found and found.group(2).startswith(f"http://{own.settings.flink_address}/#/job/running/"), done.stdout
    return found.group(1)


def _stop(own: Stack) -> str:
    done = own.cli("stop", "--savepoint", timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    path = done.stdout.strip().removeprefix("savepoint ")
    assert path.startswith(str(own.settings.state_dir)), done.stdout
    return path


def _wait(own: Stack, events: int, samples: int, timeout_s: float = 300) -> tuple[int, int]:
    """Load Redis from the committed output until every event is counted and every session learned."""
    loader = Materializer(own.settings)
    r = credentials.redis_client(own.settings)
    deadline = time.monotonic() + timeout_s
    seen = (-1, -1)
    while time.monotonic() < deadline:
        loader.drain()
        snapshot = json.loads(r.get("models:snapshot") or "{}")
        seen = (sum(int(p.get("n_events", 0)) for p in profiles(own).values()),
                snapshot.get("propensity", {}).get("samples", -1))
        if seen[0] >= events and seen[1] >= samples:
            return seen
        time.sleep(2)
    return seen


def profiled(events: list[dict]) -> set[str]:
    """Users whose latest event gives personalization consent: only they have a profile."""
    latest = {}
    for e in sorted(events, key=lambda e: e["event_time"]):
        latest[e["user_id"]] = e["consent_personalization"]
    return {u for u, ok in latest.items() if ok}


def _parallelism(own: Stack, job_id: str) -> int:
    with urllib.request.urlopen(f"http://{own.settings.flink_address}/jobs/{job_id}", timeout=10) as response:
        return max(v["parallelism"] for v in json.load(response)["vertices"])


def test_submit_stop_with_savepoint_and_resume_at_parallelism_2_loses_and_repeats_nothing(cluster, tmp_path):
    own = job_stack(cluster, redis_db=7, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_CHECKPOINT_INTERVAL_MS="2000", PERSONALIZE_MODEL_FLUSH_MS="200")
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    first, second, clock1, clock2 = two_phases(120, (31, 32))
    send = lambda batch: send_events(own, batch)  # noqa: E731
    consented = consented_sessions
    counted = lambda evs: sum(1 for e in evs if e["user_id"] in profiled(evs)  # noqa: E731
                              and e["consent_personalization"])  # the halves' consents differ for some users

    send(first + _clock(clock1))
    job = _submit(own, "--parallelism", "1")
    assert _parallelism(own, job) == 1
    want1 = (counted(first), consented(first))
    assert _wait(own, *want1) == want1
    savepoint = _stop(own)

    send(second + _clock(clock2))
    job = _submit(own, "--parallelism", "2", "--from-savepoint", savepoint)
    assert _parallelism(own, job) == 2
    want2 = (counted(first + second), consented(first + second))
    assert _wait(own, *want2) == want2  # a fresh start would count only the second half
    _stop(own)
    Materializer(own.settings).drain()  # what the stop committed last, before Redis is read

    events = first + second
    want = expected_profile_fields(events, s.recent_window_ms, s.recent_slide_ms)
    got = profiles(own)
    assert set(got) == set(want) == profiled(events)
    wrong = [(u, f, got[u].get(f), v) for u, fields in want.items() for f, v in fields.items() if got[u].get(f) != v]
    assert not wrong, (sorted({f for _, f, _, _ in wrong}), wrong[:10])
    check_triggers(own, expected_triggers(events))
    assert set(Counter(t["trigger_id"] for t in kafka_triggers(own)).values()) == {1}


def test_submit_to_a_wrong_address_or_a_stopped_cluster_is_one_line_naming_it(stack):
    for address in (f"127.0.0.1:{free_port()}", f"127.0.0.1:{stack.settings.redis_port}"):
        env = dict(stack.env, PERSONALIZE_FLINK_ADDRESS=address)
        done = Stack(Settings.from_env(env), env).cli("submit", timeout=60)
        assert done.returncode == 3, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"no Flink cluster answers at http://{address}" in lines[0], done.stderr


def _restarts(own: Stack, job_id: str) -> int:
    """Failures the job recovered from, from its exception history (the JobMaster's own
    record; the ``numRestarts`` metric went stale for minutes once the dead TaskManager's
    metric service stopped answering)."""
    with urllib.request.urlopen(f"http://{own.settings.flink_address}/jobs/{job_id}/exceptions",
                                timeout=10) as response:
        return len(json.load(response)["exceptionHistory"]["entries"])


def _state(own: Stack, job_id: str) -> str:
    with urllib.request.urlopen(f"http://{own.settings.flink_address}/jobs/{job_id}", timeout=10) as response:
        return json.load(response)["state"]


def test_a_taskmanager_killed_mid_stream_and_a_new_one_started_the_job_recovers_from_its_checkpoint(cluster, tmp_path):
    """``kill -9`` of the cluster's only TaskManager while sessions stream in; a new one is
    started: the job restarts on it from its newest checkpoint (restarts counted by Flink),
    nothing committed is lost and nothing repeated."""
    import os
    import signal

    from personalize import cluster as flink_cluster
    from tests.integration.test_faults import SteadyStream, tally, traffic

    own = job_stack(cluster, redis_db=7, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_CHECKPOINT_INTERVAL_MS="1000", PERSONALIZE_MODEL_FLUSH_MS="200")
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    events = traffic(150, 53)
    job = _submit(own, "--parallelism", "1")
    stream = SteadyStream(own, events, seconds=40).start()
    loader = Materializer(s)
    deadline = time.monotonic() + 180
    while not (stream.share_sent > 0.33 and profiles(own)) and time.monotonic() < deadline:
        loader.drain()
        time.sleep(1)
    assert profiles(own), "no profile before the fault"
    assert _restarts(own, job) == 0
    pids = [p for p in flink_cluster.taskmanager_pids(s) if os.path.exists(f"/proc/{p}")]
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    flink_cluster.start_taskmanager(s)
    deadline = time.monotonic() + 240
    while not (_restarts(own, job) >= 1 and _state(own, job) == "RUNNING") and time.monotonic() < deadline:
        time.sleep(1)
    restarts = _restarts(own, job)
    assert restarts >= 1 and _state(own, job) == "RUNNING"
    print(f"TaskManager killed: the job restarted {restarts} time(s) and runs again")
    stream.join()
    sessions = [e for e in events if not e["user_id"].startswith("clock-")]
    counted = sum(1 for e in sessions if e["user_id"] in profiled(sessions) and e["consent_personalization"])
    want = (counted, consented_sessions(sessions))
    assert _wait(own, *want) == want
    _stop(own)
    Materializer(s).drain()
    tally(own, events, stream.sent, "TaskManager killed with SIGKILL mid-stream, a new one started")
