"""``personalize run --bounded``: the profile job on the embedded local Flink, with the
Redis loader following its committed output, and a summary at the end.

Counts in the summary come from the topics, not from the job (Python functions
have no accumulators, DESIGN.md): events read = the records between the events
topic's beginning and the end offsets current at start; dead letters and late
events = the dead-letter records this run committed, by reason.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson

from personalize import kafkaio, logs, topics
from personalize.errors import PersonalizeError
from personalize.flink import find_rest_port, records_read, tasks_starting
from personalize.metrics import start_loader_endpoint
from personalize.settings import Settings

log = logs.get(__name__)


@dataclass
class RunSummary:
    events_read: int
    dead_letters: int
    late: int
    reasons: Counter = field(default_factory=Counter)
    profiles_written: int = 0
    profile_writes: int = 0
    changelog_records: int = 0
    triggers: int = 0
    segment_changes: int = 0
    stream_added: int = 0
    models: dict = field(default_factory=dict)
    job_seconds: float = 0.0
    load_seconds: float = 0.0
    total_seconds: float = 0.0
    startup_seconds: float = 0.0      # run start (JVM, planning, submission) to the first record read
    end_to_end_seconds: float = 0.0   # first record read to the last Redis write

    @property
    def end_to_end_per_s(self) -> float:
        return self.events_read / self.end_to_end_seconds if self.end_to_end_seconds else 0.0

    @property
    def events_per_s(self) -> float:
        """Events per second of the job, from its submission to its end (no JVM or planner start-up)."""
        return self.events_read / self.job_seconds if self.job_seconds else 0.0

    def describe(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common(5)) or "none"
        return "\n".join([
            f"events read        {self.events_read}",
            f"dead letters       {self.dead_letters}  ({reasons})",
            f"late events        {self.late}",
            f"profiles written   {self.profiles_written}  ({self.profile_writes} hash writes from "
            f"{self.changelog_records} changelog records)",
            f"triggers           {self.triggers}  ({self.stream_added} new in the Redis stream)",
            f"segment changes    {self.segment_changes}",
            f"propensity model   {_metrics(self.models)}",
            f"segments           {_segments(self.models)}",
            f"job                {self.job_seconds:.1f}s, {self.events_per_s:,.0f} events/s (submission to end: JVM start and planning excluded)",
            f"redis catch-up     {self.load_seconds:.1f}s after the job ended",
            f"start-up           {self.startup_seconds:.1f}s (JVM, planning, submission, to the first record read)",
            f"end to end         {self.end_to_end_seconds:.1f}s, {self.end_to_end_per_s:,.0f} events/s "
            "(first record read to last Redis write)",
            f"total              {self.total_seconds:.1f}s",
        ])


def _metrics(snapshot: dict) -> str:
    p = snapshot.get("propensity") or {}
    if not p.get("samples"):
        return "no sessions scored"
    auc = "n/a (one outcome only)" if p.get("roc_auc") is None else f"{p['roc_auc']:.3f}"
    out = f"{p['samples']} sessions scored, ROC AUC {auc}, log loss {p['log_loss']:.3f} (progressive)"
    r = p.get("recent") or {}
    if r.get("samples") and r["samples"] < p["samples"]:  # the recent window, when it is not all of them
        recent_auc = "n/a" if r.get("roc_auc") is None else f"{r['roc_auc']:.3f}"
        out += (f"; last {r['samples']}: ROC AUC {recent_auc}, log loss {r['log_loss']:.3f} "
                f"(a constant at their base rate: {r['base_rate_log_loss']:.3f})")
    return out


def _segments(snapshot: dict) -> str:
    segs = snapshot.get("segments") or {}
    return ", ".join(f"{sid} {seg['name']}: {seg['users']}" for sid, seg in segs.items()) or "none yet"


def _models(loader) -> dict:
    """The newest model snapshot in Redis (also logged: the models' metrics go to the log)."""
    from sinks.redis import MODELS_KEY

    raw = loader.redis.get(MODELS_KEY)
    snapshot = orjson.loads(raw) if raw else {}
    if snapshot:
        log.info("models", version=snapshot["model_version"], sessions=snapshot["sessions_seen"],
                 **{f"propensity_{k}": v for k, v in snapshot["propensity"].items()},
                 segments={sid: seg["users"] for sid, seg in snapshot["segments"].items()})
    return snapshot


def _committed_since(settings: Settings, topic: str, since: dict[int, int]) -> int:
    """Records committed to ``topic`` since the offsets ``since`` (an erasure's tombstones not counted)."""
    return sum(1 for rec in kafkaio.read_to_end(settings, topic, start_offsets=since) if rec.value is not None)


def ensure_topics(settings: Settings) -> None:
    topics.ensure(settings, settings.topics, local_stack=True)
    topics.ensure(settings, [settings.topic_profile_updates, settings.topic_profile_live, settings.topic_erasures],
                  local_stack=True,
                  configs={"cleanup.policy": "compact"})
    topics.ensure(settings, [settings.topic_trending], local_stack=True)
    # the fast path's triggers are in the exactly-once topic too: an hour is enough for the loader
    topics.ensure(settings, [settings.topic_triggers_live], local_stack=True, configs={"retention.ms": "3600000"})
    topics.ensure(settings, [settings.topic_model_snapshots], local_stack=True, partitions=1,
                  configs={"cleanup.policy": "compact"})


def _dead_letter_counts(settings: Settings, since: dict[int, int]) -> Counter:
    import schemas

    codec = schemas.codec("dead_letter")
    reasons: Counter = Counter()
    for rec in kafkaio.read_to_end(settings, settings.topic_dlq, start_offsets=since):
        reason = codec.decode(rec.value)["reason"]
        reasons["late" if reason == "late" else reason.split(":")[0]] += 1
    return reasons


PROGRESS_EVERY_S = 5.0


def progress_line(read: int, total: int, elapsed_s: float) -> str:
    """``progress: 352,375 of 885,427 events (39.8 %), 14,120 events/s, ~38 s left``."""
    rate = read / elapsed_s if elapsed_s > 0 else 0.0
    share = 100.0 * read / total if total else 100.0
    left = f"~{(total - read) / rate:,.0f} s left" if rate > 0 and read < total else "windows closing"
    return f"progress: {read:,} of {total:,} events ({share:.1f} %), {rate:,.0f} events/s, {left}"


def _wait_with_progress(client, rest_port: int, job_id: str, total: int,
                        every_s: float = PROGRESS_EVERY_S) -> float | None:
    """Until the job ends, print a progress line every few seconds (from the source's
    metrics); return when (monotonic clock) the first record was seen read, if it was."""
    import sys

    first_read: float | None = None
    printed = time.monotonic()
    port = None  # where in rest_port's range Flink's REST endpoint bound
    while True:
        try:
            if str(client.get_job_status().result()) in ("FINISHED", "FAILED", "CANCELED"):
                break
        except Exception:  # the embedded cluster is gone once the job ended: the caller's wait() says how
            break
        time.sleep(0.5 if first_read is None else 1.0)
        if port is None:
            port = find_rest_port(rest_port, job_id)
        read = records_read(port, job_id) if port else None
        if read and first_read is None:
            first_read = printed = time.monotonic()
        if read and time.monotonic() - printed >= every_s:
            printed = time.monotonic()
            print(progress_line(read, total, printed - first_read), file=sys.stderr, flush=True)
    return first_read


def run_bounded(settings: Settings) -> RunSummary:
    """Read ``events`` from the earliest offset to the end current now, fire every window,
    commit every output, bring Redis up to date, and report."""
    from jobs import profile
    from personalize.flink import environments, free_port
    from sinks.redis import Materializer

    started = time.monotonic()
    ensure_topics(settings)
    begin, end = kafkaio.offsets(settings, settings.topic_events)
    events_read = sum(end[p] - begin[p] for p in end)
    _, dlq_before = kafkaio.offsets(settings, settings.topic_dlq)
    _, triggers_before = kafkaio.offsets(settings, settings.topic_triggers)
    _, changes_before = kafkaio.offsets(settings, settings.topic_segment_changes)
    loader = Materializer(settings)
    start_loader_endpoint(settings)
    log.info("bounded run starting", topic=settings.topic_events, events=events_read)

    stop = threading.Event()
    failures: list[BaseException] = []

    def follow() -> None:
        try:  # applies what the job commits while it runs, then the rest once it has finished
            loader.follow(stop.is_set, drain_after=True)
        except BaseException as exc:  # surfaced after the job
            failures.append(exc)
            log.error("redis loader stopped", error=f"{type(exc).__name__}: {exc}")

    follower = threading.Thread(target=follow, name="redis-loader", daemon=True)
    # Plan and submit before the loader thread starts: PyFlink puts the connector
    # jars on the class loader of the Java thread serving this Python thread, and a
    # second Python thread (a py4j garbage-collection call is enough) can make later
    # calls land on another Java thread, which then finds no Kafka connector.
    rest_port = free_port()
    env, t_env = environments(settings, bounded=True, checkpoint_interval_ms=settings.bounded_checkpoint_interval_ms,
                              rest_port=rest_port)
    statements = profile.build(env, t_env, settings, bounded=True)
    job_started = time.monotonic()
    result = statements.execute()
    follower.start()
    try:
        client = result.get_job_client()
        job_id = str(client.get_job_id())
        log.info("job submitted", job_id=job_id)
        try:
            first_read = _wait_with_progress(client, rest_port, job_id, events_read)
            result.wait()
        except Exception as exc:  # Py4JJavaError: say why in one line
            from personalize.flink import job_failure

            raise PersonalizeError(f"the Flink job failed: {job_failure(exc)}") from None
        job_seconds = time.monotonic() - job_started
    finally:
        load_started = time.monotonic()
        stop.set()
        follower.join()  # its drain ends on its own (or fails after its timeout)
    if failures:
        raise failures[0]
    stats = loader.stats
    loaded = time.monotonic()
    load_seconds = loaded - load_started

    reasons = _dead_letter_counts(settings, dlq_before)
    models = _models(loader)
    return RunSummary(
        events_read=events_read,
        dead_letters=sum(reasons.values()),
        late=reasons.get("late", 0),
        reasons=reasons,
        profiles_written=len(stats.users),
        profile_writes=stats.profile_writes,
        changelog_records=stats.records,
        triggers=_committed_since(settings, settings.topic_triggers, triggers_before),
        segment_changes=_committed_since(settings, settings.topic_segment_changes, changes_before),
        stream_added=stats.stream_added,
        models=models,
        job_seconds=job_seconds,
        load_seconds=load_seconds,
        total_seconds=time.monotonic() - started,
        startup_seconds=(first_read or job_started) - started,
        end_to_end_seconds=loaded - (first_read or job_started),
    )


def restore_point(settings: Settings) -> str | None:
    """The newest savepoint or retained checkpoint under the state folder, if any."""
    found = []
    for pattern in ("savepoints/*/_metadata", "checkpoints/*/chk-*/_metadata"):
        found.extend(settings.state_dir.glob(pattern))
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    return str(newest.parent)


@dataclass
class StopReport:
    job_id: str
    restored_from: str | None
    savepoint: str | None
    profile_writes: int
    profiles: int
    seconds: float
    stream_added: int = 0
    models: dict = field(default_factory=dict)

    def describe(self) -> str:
        return "\n".join([
            f"job                {self.job_id}",
            f"resumed from       {self.restored_from or 'nothing (fresh state, earliest offsets)'}",
            f"stopped with       {self.savepoint or 'no savepoint'}",
            f"profiles written   {self.profiles}  ({self.profile_writes} hash writes)",
            f"triggers           {self.stream_added} new in the Redis stream",
            f"propensity model   {_metrics(self.models)}",
            f"segments           {_segments(self.models)}",
            f"ran                {self.seconds:.1f}s",
        ])


def _stop_with_savepoint(client, directory: str, timeout_s: float = 120) -> str:
    """Stop the job with a canonical savepoint; return its path (waiting up to ``timeout_s``
    for tasks that are still starting).

    PyFlink 2.2.1's ``JobClient.stop_with_savepoint`` calls a Java signature that
    no longer exists (the format type became a third argument), so call Java directly.
    """
    from pyflink.java_gateway import get_gateway

    fmt = get_gateway().jvm.org.apache.flink.core.execution.SavepointFormatType.CANONICAL
    deadline, told = time.monotonic() + timeout_s, False
    while True:
        try:
            path = client._j_job_client.stopWithSavepoint(False, directory, fmt).get()
            return str(path).removeprefix("file:")
        except Exception as exc:
            # a stop right after the start: Flink refuses a savepoint while a task is still being
            # deployed or opening (the models step imports its libraries in open()); try again
            if not tasks_starting(exc) or time.monotonic() > deadline:
                raise
            if not told:
                told = True
                log.info("the job's tasks are still starting; the savepoint waits for them")
            time.sleep(0.5)


def run_unbounded(settings: Settings, from_savepoint: str | None = None, stop_after_s: float | None = None) -> StopReport:
    """Run until SIGINT/SIGTERM (or ``stop_after_s``), then stop with a savepoint.

    Starts from ``from_savepoint``, else from the newest retained savepoint or
    checkpoint in the state folder, else fresh from the earliest offsets.
    """
    import signal

    from jobs import profile
    from personalize.flink import environments, restore_refused
    from sinks.redis import Materializer

    started = time.monotonic()
    ensure_topics(settings)
    restore = from_savepoint or restore_point(settings)
    loader = Materializer(settings)
    start_loader_endpoint(settings)
    env, t_env = environments(settings, restore_from=restore)
    statements = profile.build(env, t_env, settings, bounded=False)
    try:
        result = statements.execute()
    except Exception as exc:
        reason = restore_refused(exc) if restore else None
        if reason is None:
            raise
        raise PersonalizeError(
            f"cannot resume from {restore}: {reason} It was taken by a release whose job's state this one "
            "cannot read: start without it (move PERSONALIZE_STATE_DIR aside, or leave out --from-savepoint); "
            "the job then reads the events topic from its earliest offset (README, \"Model state\")") from None
    client = result.get_job_client()
    job_id = str(client.get_job_id())
    log.info("job running", job_id=job_id, resumed_from=restore or "fresh")
    print(f"job {job_id} running{' from ' + restore if restore else ''}; Ctrl-C stops it with a savepoint",
          flush=True)

    stop = threading.Event()
    loader_stop = threading.Event()
    failures: list[BaseException] = []

    def follow() -> None:
        try:  # then what the savepoint's stop committed last
            loader.follow(loader_stop.is_set, drain_after=True)
        except BaseException as exc:
            failures.append(exc)
            stop.set()

    def on_signal(signum, frame) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    follower = threading.Thread(target=follow, name="redis-loader", daemon=True)
    follower.start()
    savepoint = None
    try:
        while not stop.wait(0.5):
            if stop_after_s is not None and time.monotonic() - started > stop_after_s:
                break
            status = str(client.get_job_status().result())
            if status in ("FAILED", "CANCELED", "FINISHED"):
                raise PersonalizeError(f"job {job_id} ended on its own: {status}; see the Flink log")
        log.info("stopping with a savepoint", job_id=job_id)
        savepoint = _stop_with_savepoint(client, (settings.state_dir / "savepoints").as_uri())
        print(f"savepoint {savepoint}", flush=True)
        try:
            result.wait()
        except Exception:  # the job ends as "stopped"; nothing left to wait for
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        loader_stop.set()
        follower.join()
    if failures:
        raise failures[0]
    stats = loader.stats
    models = _models(loader)
    return StopReport(job_id, restore, savepoint, stats.profile_writes, len(stats.users),
                      time.monotonic() - started, stats.stream_added, models)
