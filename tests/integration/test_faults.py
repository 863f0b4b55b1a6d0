"""Faults with real processes, each under a steady stream of known sessions: the Kafka
broker stopped for a minute, the embedded run killed with SIGKILL and started again,
Redis stopped and started again. After each, every profile field equals an independent
computation and every abandoned session has exactly one trigger in Kafka (read_committed)
and one entry in the Redis stream; each test prints events sent / lost / duplicated."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest

from personalize import credentials, topics
from tests.conftest import start_stack
from tests.integration.test_profile_job import _interrupt, _start, job_stack, profiles, wait_until
from tests.integration.test_triggers_job import (
    _clock, _wait_for_samples, check_triggers, consented_sessions, expected_profile_fields, expected_triggers,
    kafka_triggers, send_events, two_phases,
)

pytestmark = pytest.mark.slow

OUTAGE_S = int(os.environ.get("FAULT_OUTAGE_S", "60"))  # longer by hand: FAULT_OUTAGE_S=180


def _pid(stack, service: str) -> int:
    return int((stack.settings.stack_dir / f"{service}.pid").read_text())


def test_a_minute_long_broker_outage_mid_stream_loses_and_repeats_nothing(tmp_path):
    own_stack = start_stack(tmp_path / "stack")  # its own broker: the session's stays up for the other tests
    try:
        own = job_stack(own_stack, redis_db=0, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                        PERSONALIZE_CHECKPOINT_INTERVAL_MS="1000", PERSONALIZE_MODEL_FLUSH_MS="200")
        topics.ensure(own.settings, [own.settings.topic_events], local_stack=True)
        first, second, clock1, clock2 = two_phases(150, (41, 42))
        sent = send_events(own, first + _clock(clock1))
        proc = _start(own)
        try:
            want1 = consented_sessions(first)
            assert _wait_for_samples(own, proc, want1) == want1

            broker = _pid(own_stack, "kafka")
            os.kill(broker, signal.SIGTERM)
            assert _gone([broker], 60)
            time.sleep(OUTAGE_S)
            assert proc.poll() is None, proc.stderr.read()[-3000:]  # still running, the broker still down
            done = own_stack.cli("stack", "up", timeout=180)
            assert done.returncode == 0, done.stderr

            sent += send_events(own, second + _clock(clock2))
            want2 = want1 + consented_sessions(second)
            assert _wait_for_samples(own, proc, want2, timeout_s=300) == want2
            events = first + second
            want = expected_profile_fields(events, own.settings.recent_window_ms, own.settings.recent_slide_ms)
            wait_until("the profiles catch up", lambda: {u: p.get("n_events") for u, p in profiles(own).items()}
                       == {u: p["n_events"] for u, p in want.items()}, proc, 60)
        finally:
            _interrupt(proc)
        tally(own, first + _clock(clock1) + second + _clock(clock2), sent, f"broker stopped {OUTAGE_S} s mid-stream")
    finally:
        own_stack.cli("stack", "down", "--purge")


class SteadyStream:
    """Sends ``events`` (in event-time order) in small batches over about ``seconds``, from
    a thread, whatever the job is doing; ``sent`` counts what the broker acknowledged."""

    def __init__(self, own, events: list[dict], seconds: float, batches: int = 60):
        self.own, self.events, self.sent = own, sorted(events, key=lambda e: e["event_time"]), 0
        self.size = max(1, len(self.events) // batches)
        self.pause = seconds / batches
        self.failures: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for start in range(0, len(self.events), self.size):
                self.sent += send_events(self.own, self.events[start:start + self.size])
                time.sleep(self.pause)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.failures.append(exc)

    def start(self) -> SteadyStream:
        self.thread.start()
        return self

    @property
    def share_sent(self) -> float:
        return self.sent / len(self.events)

    def join(self) -> int:
        self.thread.join(timeout=600)
        assert not self.failures, self.failures
        return self.sent


def traffic(users: int, seed: int) -> list[dict]:
    """Two sessions per user, then clock events that close every session."""
    from personalize import produce

    events = produce.generate(produce.TrafficSpec(users=users, sessions_per_user=2, jitter_ms=0, seed=seed))
    return events + _clock(max(e["event_time"] for e in events) + 3 * 3_600_000)


def tally(own, events: list[dict], sent: int, fault: str) -> None:
    """Lost and duplicated, counted, printed for the note, then held at zero: every profile
    field against the computation, every trigger id's copies in Kafka and in Redis."""
    from tests.integration.test_triggers_job import stream_entries

    sessions = [e for e in events if not e["user_id"].startswith("clock-")]
    want = expected_profile_fields(sessions, own.settings.recent_window_ms, own.settings.recent_slide_ms)
    got = profiles(own)
    wrong = {u for u, p in want.items() for f, v in p.items() if got.get(u, {}).get(f) != v} | (set(got) - set(want))
    triggers = expected_triggers(sessions)
    in_kafka = Counter(t["trigger_id"] for t in kafka_triggers(own))
    in_redis = Counter(e["trigger_id"] for e in stream_entries(own))
    lost = sum(1 for t in triggers if not in_kafka[t] or not in_redis[t])
    duplicated = sum(n - 1 for n in in_kafka.values() if n > 1) + sum(n - 1 for n in in_redis.values() if n > 1)
    print(f"{fault}: events sent {sent}, faults injected 1, triggers {len(triggers)}, profiles {len(want)}, "
          f"lost {lost} triggers and {len(wrong)} profiles, duplicated {duplicated}")
    assert sent == len(events)
    assert not wrong, sorted(wrong)[:10]
    check_triggers(own, triggers)  # each once in Kafka (read_committed) and in Redis, cart lines exact
    assert lost == 0 and duplicated == 0


def _wait_for_all(own, proc, events: list[dict], timeout_s: float = 300) -> None:
    sessions = [e for e in events if not e["user_id"].startswith("clock-")]
    want = consented_sessions(sessions)
    assert _wait_for_samples(own, proc, want, timeout_s=timeout_s) == want
    counts = {u: p["n_events"] for u, p in expected_profile_fields(
        sessions, own.settings.recent_window_ms, own.settings.recent_slide_ms).items()}
    wait_until("the profiles catch up", lambda: {u: p.get("n_events") for u, p in profiles(own).items()} == counts,
               proc, 120)


def _finish(own, events: list[dict], proc, stream: SteadyStream) -> None:
    """The rest of the stream sent, every event counted and session learned, the run
    stopped with a savepoint (its last output drained into Redis)."""
    stream.join()
    _wait_for_all(own, proc, events)
    _interrupt(proc)


def _gone(pids: list[int], timeout_s: float = 30) -> bool:
    """Wait until none of ``pids`` runs; whether none does."""
    deadline = time.monotonic() + timeout_s
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(os.path.exists(f"/proc/{p}") for p in pids)


def _streaming_run(stack, tmp_path, redis_db: int, seed: int):
    """A live ``personalize run`` with a steady stream of sessions going, a third of it sent
    and counted: the moment a fault comes. (own stack, events, run process, stream)"""
    own = job_stack(stack, redis_db=redis_db, PERSONALIZE_STATE_DIR=str(tmp_path / "state"),
                    PERSONALIZE_CHECKPOINT_INTERVAL_MS="1000", PERSONALIZE_MODEL_FLUSH_MS="200")
    topics.ensure(own.settings, [own.settings.topic_events], local_stack=True)
    events = traffic(150, seed)
    proc = _start(own)
    stream = SteadyStream(own, events, seconds=40).start()
    # profiles come before any checkpoint (the live changelog): wait for one, so the fault
    # meets a job with committed state to resume from
    checkpoints = own.settings.state_dir / "checkpoints"
    wait_until("a third of the stream sent, profiles written and a checkpoint completed",
               lambda: stream.share_sent > 0.33 and profiles(own) and any(checkpoints.glob("*/chk-*/_metadata")),
               proc, 180)
    return own, events, proc, stream


class VersionWatch:
    """Reads every profile's version and event count over and over, from a thread, and keeps
    what it saw go back: the live changelog is at-least-once, so after a failure the job
    replays changes Redis already holds, and the loader must apply none of them."""

    def __init__(self, own):
        self.redis = credentials.redis_client(own.settings, decode_responses=True)
        self.newest: dict[str, tuple[int, int]] = {}
        self.backwards: list[tuple] = []
        self.reads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            keys = list(self.redis.scan_iter("profile:*", count=1000))
            with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, "version", "n_events")
                seen = pipe.execute()
            for key, (version, n_events) in zip(keys, seen):
                if version is None:
                    continue
                now = (int(version), int(n_events or 0))
                before = self.newest.get(key, (-1, -1))
                if now[0] < before[0] or now[1] < before[1]:
                    self.backwards.append((key, before, now))
                self.newest[key] = max(before, now)
            self.reads += 1
            time.sleep(0.05)

    def __enter__(self) -> VersionWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_the_embedded_run_killed_mid_stream_resumes_from_its_newest_checkpoint(stack, tmp_path):
    """``kill -9`` of ``personalize run`` (its JVM goes with it) while sessions stream in;
    ``personalize run`` again resumes from the newest retained checkpoint: the Kafka
    transactions the dead job left open are aborted, its committed output stands, and the
    loader waits for the dead loader's lease, then goes on from the offsets in Redis."""
    own, events, proc, stream = _streaming_run(stack, tmp_path, 3, 51)
    watch = VersionWatch(own).__enter__()
    try:
        jvms = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _gone(jvms), "the run's JVM outlived it"
        time.sleep(3)  # the stream goes on while nothing runs
        proc = _start(own)
        line = proc.stdout.readline()
        restored = re.search(r"running from (\S+);", line)
        assert restored and re.search(r"/checkpoints/[0-9a-f]{32}/chk-\d+$", restored.group(1)), line
        assert restored.group(1).startswith(str(own.settings.state_dir))
        _finish(own, events, proc, stream)
    finally:
        watch.__exit__()
        if proc.poll() is None:
            proc.kill()
    tally(own, events, stream.sent, "embedded run killed with SIGKILL mid-stream")
    # no profile ever went back to an older version or fewer events, across the kill and the
    # replay of the live changes the dead job had written; no closed session left live fields
    print(f"versions read {watch.reads} times over {len(watch.newest)} profiles, {len(watch.backwards)} went back")
    assert watch.reads > 10 and not watch.backwards, watch.backwards[:5]
    assert not [u for u, p in profiles(own).items() if "session_start_ms" in p]


def test_redis_stopped_and_started_again_mid_stream_the_loader_waits_and_resumes(tmp_path):
    """Redis stops (SIGTERM: it saves its data) while sessions stream in and stays down
    for 20 s; the job goes on committing to Kafka; the loader waits with backoff, and once
    ``stack up`` starts Redis again it resumes from the offsets Redis holds."""
    own_stack = start_stack(tmp_path / "stack")  # its own Redis: the session's stays up for the other tests
    try:
        own, events, proc, stream = _streaming_run(own_stack, tmp_path, 0, 52)
        try:
            server = _pid(own_stack, "redis")
            os.kill(server, signal.SIGTERM)
            assert _gone([server])
            time.sleep(20)
            assert proc.poll() is None, proc.stderr.read()[-3000:]  # the run (and its loader) waits
            done = own_stack.cli("stack", "up", timeout=180)
            assert done.returncode == 0, done.stderr
            _finish(own, events, proc, stream)
        finally:
            if proc.poll() is None:
                proc.kill()
        tally(own, events, stream.sent, "Redis stopped 20 s mid-stream")
    finally:
        own_stack.cli("stack", "down", "--purge")
