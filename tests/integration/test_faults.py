"""Faults with real processes: the Kafka broker stopped for a minute under a live run.
The job rides it out with the default restart strategy; nothing lost, nothing repeated."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from personalize import topics
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
            deadline = time.monotonic() + 60
            while os.path.exists(f"/proc/{broker}") and time.monotonic() < deadline:
                time.sleep(0.2)
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
        assert sent == len(events) + 2 * len(_clock(0))
        got = profiles(own)
        wrong = [(u, f, got[u].get(f), v) for u, p in want.items() for f, v in p.items() if got[u].get(f) != v]
        assert set(got) == set(want) and not wrong, (sorted({f for _, f, _, _ in wrong}), wrong[:10])
        check_triggers(own, expected_triggers(events))  # each once in Kafka (read_committed) and in Redis
        assert set(Counter(t["trigger_id"] for t in kafka_triggers(own)).values()) == {1}
    finally:
        own_stack.cli("stack", "down", "--purge")
