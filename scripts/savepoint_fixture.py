"""Take a savepoint with this release, for the upgrade test of later releases.

    .venv/bin/python scripts/savepoint_fixture.py    # starts the dev stack if needed

Writes ``tests/fixtures/savepoints/<commit>/``: the savepoint (Flink's canonical
format, relocatable), the events it was taken over (``before.jsonl.gz``: read by
the job before the stop) and the events a later release reads after restoring it
(``after.jsonl.gz``), and ``meta.json`` (the topic, its end offsets at the stop, the
settings the state depends on, the models' sample count at the stop).
``tests/integration/test_upgrade.py`` restores every savepoint there into the
code under test. Take a new one when a release changes the job's state; keep the
old ones while their restore is supported (README, "Model state").

Both halves are synthetic traffic of 700 users, one session each (more than the
models' warm-up of 512 sessions: the savepoint holds centroids and users' segments),
with clock events three hours after each half (``tests/integration/test_triggers_job``'s
two phases): every session of the first half is closed and learned before the stop.
"""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from personalize import credentials, kafkaio, produce, topics  # noqa: E402
from personalize.settings import Settings  # noqa: E402
import bench  # noqa: E402  (scripts/bench.py)
import schemas  # noqa: E402

TOPIC = "upgrade-fixture-events"
USERS = 700
SEEDS = (21, 22)
# settings the savepoint's state depends on (the restore passes the same)
STATE_SETTINGS = {"PERSONALIZE_CHECKPOINT_INTERVAL_MS": "2000", "PERSONALIZE_MODEL_FLUSH_MS": "200"}
HOUR_MS = 3_600_000


def clock(at_ms: int) -> list[dict]:
    """Events of users without consent on every partition: they move the watermark past the sessions."""
    return [{"event_id": f"clock-{k}-{at_ms}", "event_type": "page_view", "user_id": f"clock-{k}",
             "session_id": None, "event_time": at_ms, "product_id": None, "category": None, "price": None,
             "quantity": 1, "consent_analytics": False, "consent_personalization": False,
             "consent_marketing": False, "context": None} for k in range(8)]


def halves() -> tuple[list[dict], list[dict]]:
    first = produce.generate(produce.TrafficSpec(users=USERS, sessions_per_user=1, jitter_ms=0, seed=SEEDS[0]))
    clock1 = max(e["event_time"] for e in first) + 3 * HOUR_MS
    second = produce.generate(produce.TrafficSpec(users=USERS, sessions_per_user=1, jitter_ms=0, seed=SEEDS[1],
                                                  start_ms=clock1 + HOUR_MS))
    clock2 = max(e["event_time"] for e in second) + 3 * HOUR_MS
    return first + clock(clock1), second + clock(clock2)


def send(settings: Settings, events: list[dict]) -> int:
    codec = schemas.codec("user_event")
    return kafkaio.produce(settings, settings.topic_events,
                           [(e["user_id"].encode(), codec.encode(e), e["event_time"]) for e in events])


def write_events(path: Path, events: list[dict]) -> None:
    with gzip.open(path, "wb") as f:
        for e in events:
            f.write(orjson.dumps(e) + b"\n")


def main() -> int:
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True,
                           capture_output=True, check=True).stdout.strip()
    if dirty:
        print("savepoint_fixture: commit first: the fixture is named after the commit that took it", file=sys.stderr)
        return 2
    out = ROOT / "tests" / "fixtures" / "savepoints" / commit
    if out.exists():
        print(f"savepoint_fixture: {out} exists", file=sys.stderr)
        return 2
    cli = [sys.executable, "-m", "personalize.cli"]
    if subprocess.run([*cli, "stack", "up"], cwd=ROOT).returncode != 0:
        return 1
    work = Path(tempfile.mkdtemp(prefix="savepoint-fixture-"))
    env = bench.bench_env(Settings.from_env(), TOPIC, redis_db=14)  # output topics of its own
    env.update(PERSONALIZE_STATE_DIR=str(work / "state"), **STATE_SETTINGS)
    settings = Settings.from_env(env)
    topics.delete(settings, [TOPIC])
    topics.ensure(settings, [TOPIC], local_stack=True)
    redis = credentials.redis_client(settings)
    redis.flushdb()
    before, after = halves()
    assert send(settings, before) == len(before)
    consented = count_consented_sessions(before, settings.session_gap_ms)

    proc = subprocess.Popen([*cli, "run"], env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 300
    samples = -1
    while samples < consented:
        if proc.poll() is not None or time.monotonic() > deadline:
            print(f"savepoint_fixture: the job stopped or took too long ({samples} of {consented} sessions)",
                  file=sys.stderr)
            proc.kill()
            return 1
        raw = redis.get("models:snapshot")
        samples = json.loads(raw)["propensity"]["samples"] if raw else -1
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=180)
    savepoint = next(line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith("savepoint "))
    _, end = kafkaio.offsets(settings, TOPIC)

    out.mkdir(parents=True)
    shutil.copytree(savepoint, out / "savepoint")
    write_events(out / "before.jsonl.gz", before)
    write_events(out / "after.jsonl.gz", after)
    meta = {"commit": commit, "taken": time.strftime("%Y-%m-%d"), "topic": TOPIC,
            "end_offsets": {str(p): o for p, o in sorted(end.items())}, "settings": STATE_SETTINGS,
            "samples": samples, "models": json.loads(redis.get("models:snapshot"))["model_version"]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    topics.delete(settings, [TOPIC])
    bench._drop_outputs(settings)
    print(f"savepoint of {commit} in {out.relative_to(ROOT)} ({samples} sessions learned)")
    return 0


def count_consented_sessions(events: list[dict], gap_ms: int) -> int:
    """Sessions (a gap of ``gap_ms``) whose latest event consents to personalization."""
    by_user: dict[str, list[dict]] = {}
    for e in sorted(events, key=lambda e: e["event_time"]):
        by_user.setdefault(e["user_id"], []).append(e)
    n = 0
    for evs in by_user.values():
        last = evs[0]
        for e in evs[1:]:
            if e["event_time"] - last["event_time"] >= gap_ms:
                n += last["consent_personalization"]
            last = e
        n += last["consent_personalization"]
    return n


if __name__ == "__main__":
    sys.exit(main())
