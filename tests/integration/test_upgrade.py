"""Savepoints of earlier releases restore into this code: every savepoint under
tests/fixtures/savepoints (taken by scripts/savepoint_fixture.py with the release
named in its meta.json) is restored by `personalize run --from-savepoint`, over the
same events in a topic of the same name, and the job goes on where that release
stopped: the models keep counting from their sample count at the stop, users'
histories, totals and windows go on (every profile field equals an independent
computation over both halves of the traffic), and only the sessions after the stop
trigger, each once. A savepoint of a release this one cannot map (tests/fixtures/
savepoints-refused: the release before the models issue, and the last one before the
live profile) is refused in one line that
says to start without it, and starting without it (the README's migration) rebuilds
every profile from the topic."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from personalize import kafkaio, topics
from tests.conftest import CLI
from tests.integration.test_profile_job import _interrupt, job_stack, profiles
from tests.integration.test_triggers_job import (
    _snapshot, _wait_for_samples, check_triggers, consented_sessions, expected_profile_fields, expected_triggers,
    kafka_triggers, send_events)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "savepoints").glob("*/meta.json"))
# savepoints of releases this one cannot restore (their meta.json says why)
REFUSED = sorted((ROOT / "tests" / "fixtures" / "savepoints-refused").glob("*/meta.json"))
# the fixtures holding the events their savepoints were taken over (before.jsonl.gz, after.jsonl.gz)
FIXTURES_BY_NAME = {p.parent.name: p for p in FIXTURES + REFUSED if (p.parent / "before.jsonl.gz").exists()}


def read(path: Path) -> list[dict]:
    """Events as scripts/savepoint_fixture.py wrote them: gzipped JSON lines."""
    with gzip.open(path, "rb") as f:
        return [json.loads(line) for line in f]


def test_there_is_a_savepoint_of_an_earlier_release_to_restore():
    assert FIXTURES, "tests/fixtures/savepoints holds no savepoint: scripts/savepoint_fixture.py takes one"


@pytest.mark.parametrize("meta_path", FIXTURES, ids=[p.parent.name for p in FIXTURES])
def test_a_savepoint_of_an_earlier_release_restores_and_the_job_goes_on_where_it_stopped(stack, tmp_path, meta_path):
    fixture = meta_path.parent
    meta = json.loads(meta_path.read_text())
    before, after = read(fixture / "before.jsonl.gz"), read(fixture / "after.jsonl.gz")
    own = job_stack(stack, redis_db=6, PERSONALIZE_TOPIC_EVENTS=meta["topic"],
                    PERSONALIZE_STATE_DIR=str(tmp_path / "state"), **meta["settings"])
    s = own.settings
    topics.delete(s, [s.topic_events])
    topics.ensure(s, [s.topic_events], partitions=len(meta["end_offsets"]), local_stack=True)
    assert send_events(own, before) == len(before)
    # the savepoint's source offsets point at these very records
    assert {str(p): o for p, o in kafkaio.offsets(s, s.topic_events)[1].items()} == meta["end_offsets"]
    assert send_events(own, after) == len(after)
    savepoint = shutil.copytree(fixture / "savepoint", tmp_path / "savepoint")

    proc = subprocess.Popen([*CLI, "run", "--from-savepoint", str(savepoint)], env=own.env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    want = meta["samples"] + consented_sessions(after)
    try:
        assert _wait_for_samples(own, proc, want) == want  # fresh models would count consented_sessions(after)
    finally:
        out = _interrupt(proc)
    assert f"running from {savepoint}" in out
    assert _snapshot(own)["propensity"]["samples"] == want

    # only the sessions after the stop trigger (the source resumed at the savepoint's offsets), each once
    check_triggers(own, expected_triggers(after))
    assert len(kafka_triggers(own)) == len(expected_triggers(after))

    # every profile written after the restore counts both halves: totals, windows and
    # session histories came back from the savepoint
    users_after = {e["user_id"] for e in after}
    want_profiles = {u: p for u, p in expected_profile_fields(before + after, s.recent_window_ms,
                                                             s.recent_slide_ms).items() if u in users_after}
    got = profiles(own)
    assert set(got) == set(want_profiles)
    assert any(p["n_sessions"] == "2" for p in want_profiles.values())
    mismatches = [(u, f, got[u].get(f), v) for u, p in want_profiles.items() for f, v in p.items()
                  if got[u].get(f) != v]
    assert not mismatches, (sorted({f for _, f, _, _ in mismatches}), mismatches[:10])
    assert sum("segment" in p for p in got.values()) > len(got) // 2  # the restored centroids assign at once


@pytest.mark.parametrize("meta_path", REFUSED, ids=[p.parent.name for p in REFUSED])
def test_a_savepoint_this_release_cannot_map_is_refused_and_starting_without_it_rebuilds_every_profile(
        stack, tmp_path, meta_path):
    # the refused savepoint was taken over the first half of the restorable fixture's events
    meta = json.loads(meta_path.read_text())
    events_of = FIXTURES_BY_NAME[meta["events_of"]].parent
    before, after = read(events_of / "before.jsonl.gz"), read(events_of / "after.jsonl.gz")
    own = job_stack(stack, redis_db=6, PERSONALIZE_STATE_DIR=str(tmp_path / "state"), **meta["settings"])
    s = own.settings
    topics.ensure(s, [s.topic_events], local_stack=True)
    assert send_events(own, before + after) == len(before) + len(after)
    savepoint = shutil.copytree(meta_path.parent / "savepoint", tmp_path / "savepoint")
    done = subprocess.run([*CLI, "run", "--from-savepoint", str(savepoint)], env=own.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("personalize: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"cannot resume from {savepoint}" in lines[0] and "start without it" in lines[0], lines[0]
    assert "allowNonRestoredState" not in lines[0]  # Flink's own CLI flag: not ours to offer

    # the migration the message names: `personalize run` without it reads the topic from the
    # earliest offset, and every profile comes out as if the job had never stopped
    proc = subprocess.Popen([*CLI, "run"], env=own.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    want = consented_sessions(before) + consented_sessions(after)
    try:
        assert _wait_for_samples(own, proc, want) == want
    finally:
        out = _interrupt(proc)
    assert "running from" not in out
    want_profiles = expected_profile_fields(before + after, s.recent_window_ms, s.recent_slide_ms)
    got = profiles(own)
    assert set(got) == set(want_profiles)
    mismatches = [(u, f, got[u].get(f), v) for u, p in want_profiles.items() for f, v in p.items()
                  if got[u].get(f) != v]
    assert not mismatches, (sorted({f for _, f, _, _ in mismatches}), mismatches[:10])
    check_triggers(own, expected_triggers(before + after))
