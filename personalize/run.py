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

from personalize import kafkaio, logs, topics
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
    job_seconds: float = 0.0
    load_seconds: float = 0.0
    total_seconds: float = 0.0

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
            f"job                {self.job_seconds:.1f}s, {self.events_per_s:,.0f} events/s (excluding start-up)",
            f"redis catch-up     {self.load_seconds:.1f}s after the job ended",
            f"total              {self.total_seconds:.1f}s",
        ])


def ensure_topics(settings: Settings) -> None:
    topics.ensure(settings, settings.topics, local_stack=True)
    topics.ensure(settings, [settings.topic_profile_updates], local_stack=True,
                  configs={"cleanup.policy": "compact"})
    topics.ensure(settings, [settings.topic_trending], local_stack=True)


def _dead_letter_counts(settings: Settings, since: dict[int, int]) -> Counter:
    import schemas

    codec = schemas.codec("dead_letter")
    reasons: Counter = Counter()
    for rec in kafkaio.read_to_end(settings, settings.topic_dlq, start_offsets=since):
        reason = codec.decode(rec.value)["reason"]
        reasons["late" if reason == "late" else reason.split(":")[0]] += 1
    return reasons


def run_bounded(settings: Settings) -> RunSummary:
    """Read ``events`` from the earliest offset to the end current now, fire every window,
    commit every output, bring Redis up to date, and report."""
    from jobs import profile
    from personalize.flink import environments
    from sinks.redis import Materializer

    started = time.monotonic()
    ensure_topics(settings)
    begin, end = kafkaio.offsets(settings, settings.topic_events)
    events_read = sum(end[p] - begin[p] for p in end)
    _, dlq_before = kafkaio.offsets(settings, settings.topic_dlq)
    loader = Materializer(settings)
    log.info("bounded run starting", topic=settings.topic_events, events=events_read)

    stop = threading.Event()
    failures: list[BaseException] = []

    def follow() -> None:
        try:
            loader.follow(stop.is_set)
        except BaseException as exc:  # surfaced after the job: the drain below would meet it again
            failures.append(exc)
            log.error("redis loader stopped", error=f"{type(exc).__name__}: {exc}")

    follower = threading.Thread(target=follow, name="redis-loader", daemon=True)
    follower.start()
    try:
        env, t_env = environments(settings, checkpoint_interval_ms=min(settings.checkpoint_interval_ms, 2000),
                                  bounded=True)
        statements = profile.build(env, t_env, settings, bounded=True)
        job_started = time.monotonic()
        result = statements.execute()
        log.info("job submitted", job_id=str(result.get_job_client().get_job_id()))
        result.wait()
        job_seconds = time.monotonic() - job_started
    finally:
        stop.set()
        follower.join(timeout=60)
    if failures:
        raise failures[0]
    load_started = time.monotonic()
    stats = loader.drain()
    load_seconds = time.monotonic() - load_started

    reasons = _dead_letter_counts(settings, dlq_before)
    return RunSummary(
        events_read=events_read,
        dead_letters=sum(reasons.values()),
        late=reasons.get("late", 0),
        reasons=reasons,
        profiles_written=len(stats.users),
        profile_writes=stats.profile_writes,
        changelog_records=stats.records,
        job_seconds=job_seconds,
        load_seconds=load_seconds,
        total_seconds=time.monotonic() - started,
    )
