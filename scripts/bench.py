"""`make bench`: one run, one table (a benchmark, not a test).

1. Events, once per topic: USERS synthetic users with one session each, plus a second
   session for USERS * 0.13 of them a day later: ~1,000,000 events for 100,000 users
   by default (``--users`` scales), in topic ``bench-events-<USERS>``.
2. ``personalize run --bounded`` over them into fresh output topics and a Redis
   database of its own, sampled every second: peak memory of the JVM (the embedded
   Flink, with the Python functions it runs in thread mode), of the CLI's Python
   process (the Redis loader), of the two together (sampled at the same second) and Redis's
   ``used_memory`` (the whole server); CPU seconds by
   stage from the JVM's threads.
3. ``scripts/bench_windows.py``: the same window queries over as many rows from
   ``datagen``, JVM only: the ceiling. The ratio says how close the job comes.
4. The job's triggers against the generator's known abandoned sessions.

Prints a Markdown table (docs/benchmarks.md keeps one) and, when matplotlib is
installed (the ``bench`` extra), writes the chart by stage to docs/benchmarks.png.

Usage: python scripts/bench.py [--users N] [--chart PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECOND_SESSION_SHARE = 0.13  # 100,000 users x ~8.85 events + 13,000 second sessions: ~1,000,000 events
DAY_MS = 86_400_000
# JVM threads by stage (task threads are named after their first operator; Linux keeps 15 characters)
STAGES = (
    ("decode (Kafka source, Java function, barrier)", ("Source: events_",)),
    ("models, triggers, session fields (Python)", ("session fields",)),
    ("live state and windows (JVM)", ("live state", "ProcessTableFun", "WindowAggregate", "GroupAggregate",
                                      "WindowRank", "Calc", "Source: *anonym")),
    ("Kafka sinks", ("kafka-producer", "Sink", "profile_", "trending_sink", "triggers_sink", "segment_changes",
                     "model_snapshots", "dead_letter")),
    ("JIT compiler", ("C1 CompilerThre", "C2 CompilerThre")),
    ("garbage collector", ("GC Thread", "G1 ", "VM Thread", "ParGC", "Parallel")),
)


def specs(users: int):
    from personalize.produce import TrafficSpec

    first = TrafficSpec(users=users, sessions_per_user=1, seed=7)
    second = TrafficSpec(users=int(users * SECOND_SESSION_SHARE), sessions_per_user=1, seed=8,
                         start_ms=first.start_ms + DAY_MS)
    return first, second


def known_abandonments(users: int, gap_ms: int) -> int:
    """Abandoned sessions as the generator made them: a net cart, no purchase, marketing consent."""
    from personalize.produce import generate

    by_user: dict[str, list[dict]] = defaultdict(list)
    for spec in specs(users):
        for e in generate(spec):
            by_user[e["user_id"]].append(e)
    count = 0
    for events in by_user.values():
        events.sort(key=lambda e: e["event_time"])
        sessions, current = [], [events[0]]
        for prev, e in zip(events, events[1:]):
            if e["event_time"] - prev["event_time"] >= gap_ms:
                sessions.append(current)
                current = []
            current.append(e)
        sessions.append(current)
        for s in sessions:
            net: dict[str, int] = defaultdict(int)
            for e in s:
                if e["event_type"] == "add_to_cart":
                    net[e["product_id"]] += e["quantity"]
                elif e["event_type"] == "remove_from_cart":
                    net[e["product_id"]] -= e["quantity"]
            if any(q > 0 for q in net.values()) and not any(e["event_type"] == "purchase" for e in s) \
                    and s[-1]["consent_marketing"]:
                count += 1
    return count


def bench_env(base, topic: str, redis_db: int = 9) -> dict:
    """The job's environment for a benchmark run over ``topic``: output topics of its own
    (uuid-named, deleted after the run) and Redis database ``redis_db``."""
    env = dict(os.environ)
    tag = uuid.uuid4().hex[:8]
    env.update(PERSONALIZE_TOPIC_EVENTS=topic, PERSONALIZE_TOPIC_DLQ=f"bench-{tag}-dlq",
               PERSONALIZE_TOPIC_PROFILE_UPDATES=f"bench-{tag}-profiles",
               PERSONALIZE_TOPIC_TRENDING=f"bench-{tag}-trending", PERSONALIZE_TOPIC_TRIGGERS=f"bench-{tag}-triggers",
               PERSONALIZE_TOPIC_SEGMENT_CHANGES=f"bench-{tag}-segments",
               PERSONALIZE_TOPIC_MODEL_SNAPSHOTS=f"bench-{tag}-models",
               PERSONALIZE_TOPIC_ERASURES=f"bench-{tag}-erasures",
               PERSONALIZE_REDIS_URL=f"redis://127.0.0.1:{base.redis_port}/{redis_db}")
    return env


def ensure_events(env: dict, settings, topic: str, users: int, extra=None) -> bool:
    """The benchmark's events in ``topic``, produced once per size and reused by later runs;
    the (key, value, timestamp) records ``extra()`` returns are appended after them."""
    from personalize import kafkaio, topics

    topics.ensure(settings, [topic], local_stack=True)
    begin, end = kafkaio.offsets(settings, topic)
    if sum(end[p] - begin[p] for p in end) == 0:
        for spec in specs(users):
            done = cli("produce", "--users", str(spec.users), "--sessions", "1", "--seed", str(spec.seed),
                       "--start-ms", str(spec.start_ms), "--topic", topic, env=env, capture=False)
            if done.returncode != 0:
                return False
        if extra is not None:
            kafkaio.produce(settings, topic, extra())
    return True


def cli(*args: str, env: dict, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personalize.cli", *args], env=env, cwd=ROOT, text=True,
                          capture_output=capture, check=False)


class Sampler(threading.Thread):
    """Peak RSS of the run's processes, Redis's peak, and the JVM's CPU seconds by thread."""

    def __init__(self, root_pid: int, redis_client, heap_every_s: float | None = None):
        super().__init__(daemon=True)
        self.root_pid, self.redis, self.heap_every_s = root_pid, redis_client, heap_every_s
        # heap_*: the JVM's heap by `jstat -gc` every heap_every_s (used = survivors + eden + old)
        self.peak = {"jvm": 0, "python": 0, "total": 0, "redis": 0, "heap_used": 0, "heap_old": 0, "heap_capacity": 0}
        self.heap_samples, self.heap_error = 0, ""
        self.cpu: dict[int, float] = {}  # pid -> its user + system CPU seconds at the last sample
        self.threads: dict[str, float] = {}
        self.done = threading.Event()

    def _children(self, pid: int) -> list[int]:
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    out.append(int(entry))
        return out

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def _stat_cpu(stat: str) -> float:
        """User + system CPU seconds from a /proc .../stat line."""
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _thread_cpu(self, pid: int) -> dict[str, float]:
        cpu: dict[str, float] = {}
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                cpu[f"{tid}:{stat[stat.index('(') + 1:stat.rindex(')')]}"] = self._stat_cpu(stat)
        except OSError:
            pass
        return cpu

    def _heap(self, pid: int) -> None:
        """One `jstat -gc` sample of the JVM's heap (KiB columns S0U S1U EU OU and capacities)."""
        try:
            run = subprocess.run(["nice", "jstat", "-gc", str(pid)], capture_output=True, text=True, timeout=20)
            names, values = run.stdout.split("\n")[:2]
            # a collector without concurrent cycles prints "-" for CGC and CGCT
            gc = dict(zip(names.split(), (float(v) if v != "-" else 0.0 for v in values.split())))
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            # the JVM ended, or jstat is missing or cannot attach: a missed sample only
            self.heap_error = f"{e}: {run.stdout.strip()} {run.stderr.strip()}" if isinstance(e, ValueError) else str(e)
            return
        used = (gc["S0U"] + gc["S1U"] + gc["EU"] + gc["OU"]) * 1024
        self.peak["heap_used"] = max(self.peak["heap_used"], int(used))
        self.peak["heap_old"] = max(self.peak["heap_old"], int(gc["OU"] * 1024))
        self.peak["heap_capacity"] = max(self.peak["heap_capacity"],
                                         int((gc["S0C"] + gc["S1C"] + gc["EC"] + gc["OC"]) * 1024))
        self.heap_samples += 1

    def _cpu(self, pid: int) -> None:
        try:
            self.cpu[pid] = self._stat_cpu(Path(f"/proc/{pid}/stat").read_text())
        except OSError:
            pass

    def cpu_s(self) -> float:
        """CPU seconds of the root process and its children, as last sampled (each
        process's last second before it ended is missed)."""
        return sum(self.cpu.values())

    def run(self) -> None:
        last_heap = 0.0
        while not self.done.wait(1.0):
            python_rss = self._rss(self.root_pid)
            total = python_rss
            self.peak["python"] = max(self.peak["python"], python_rss)
            self._cpu(self.root_pid)
            try:  # the server's own used_memory_peak is since its start (CONFIG RESETSTAT keeps it)
                self.peak["redis"] = max(self.peak["redis"], int(self.redis.info("memory")["used_memory"]))
            except Exception:  # noqa: BLE001 - a missed sample only
                pass
            for child in self._children(self.root_pid):
                self._cpu(child)
                comm = Path(f"/proc/{child}/comm")
                kind = comm.read_text().strip() if comm.exists() else ""
                rss = self._rss(child)
                total += rss
                if kind == "java":
                    self.peak["jvm"] = max(self.peak["jvm"], rss)
                    sample = self._thread_cpu(child)
                    if sample:
                        self.threads.update(sample)  # threads that ended keep their last figure
                    if self.heap_every_s and time.monotonic() - last_heap >= self.heap_every_s:
                        last_heap = time.monotonic()
                        self._heap(child)
            self.peak["total"] = max(self.peak["total"], total)

    def stages(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for key, seconds in self.threads.items():
            name = key.split(":", 1)[1]
            stage = next((s for s, prefixes in STAGES if name.startswith(prefixes)), "other JVM threads")
            out[stage] += seconds
        return dict(out)


def summary_value(text: str, label: str, pattern: str = r"([\d.,]+)") -> float:
    m = re.search(rf"^{re.escape(label)}\s+{pattern}", text, re.M)
    return float(m.group(1).replace(",", "")) if m else float("nan")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--chart", default=str(ROOT / "docs" / "benchmarks.png"))
    parser.add_argument("--no-ceiling", action="store_true",
                        help="the job only: no JVM-only ceiling run, no chart (for trying one change)")
    parser.add_argument("--heap-every", type=float, metavar="S",
                        help="also sample the JVM's heap with jstat every S seconds (each sample starts a JVM)")
    args = parser.parse_args(argv)

    import redis

    from personalize.settings import Settings

    base = Settings.from_env()
    topic = f"bench-events-{args.users}"
    env = bench_env(base, topic)
    if cli("stack", "up", env=env).returncode != 0:
        print("bench: `personalize stack up` failed", file=sys.stderr)
        return 2
    settings = Settings.from_env(env)
    if not ensure_events(env, settings, topic, args.users):
        return 1
    client = redis.Redis.from_url(env["PERSONALIZE_REDIS_URL"])
    run = run_job(env, settings, client, topic, heap_every_s=args.heap_every)
    if run is None:
        return 1
    events, e2e_s, startup_s, job_s, catchup_s = (run[k] for k in ("events", "e2e_s", "startup_s", "job_s",
                                                                   "catchup_s"))
    triggers, stream, sampler, redis_peak = run["triggers"], run["stream"], run["sampler"], run["redis_peak"]
    known = known_abandonments(args.users, base.session_gap_ms)

    if os.environ.get("BENCH_THREADS"):  # the JVM's busiest threads by name, for finding where "other" goes
        for key, seconds in sorted(sampler.threads.items(), key=lambda kv: -kv[1])[:25]:
            print(f"bench: thread {key.split(':', 1)[1]!r} {seconds:.1f} core-s", file=sys.stderr)
    if args.no_ceiling:
        print(f"bench: end to end {e2e_s:.1f} s, {events / e2e_s:,.0f} events/s; start-up {startup_s:.1f} s, "
              f"job {job_s:.1f} s, Redis catch-up {catchup_s:.1f} s; triggers {triggers:,} / {stream:,} / {known:,}; "
              "JVM CPU " + ", ".join(f"{stage} {sec:.1f}" for stage, sec in sorted(sampler.stages().items(),
                                                                           key=lambda kv: -kv[1]))
              + f"; peak memory MiB: JVM {sampler.peak['jvm'] / 2**20:,.0f} RSS, loader {sampler.peak['python'] / 2**20:,.0f}"
              f" RSS, together {sampler.peak['total'] / 2**20:,.0f} RSS, Redis {redis_peak / 2**20:,.0f} used"
              + (heap_figures(sampler) if args.heap_every else ""))
        return 0 if triggers == stream == known else 1
    print(f"bench: JVM-only ceiling over {events:,} rows (scripts/bench_windows.py)", file=sys.stderr, flush=True)
    ceiling = subprocess.run([sys.executable, "scripts/bench_windows.py", str(events), str(args.users)],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    m = re.search(r"windows ([\d.]+)s", ceiling.stdout)
    if m is None:
        tail = (ceiling.stdout + ceiling.stderr).strip().splitlines()[-3:]
        print("bench: error: the JVM-only ceiling run failed: " + " | ".join(tail), file=sys.stderr)
        return 1
    ceiling_s = float(m.group(1))

    stages = sampler.stages()
    cpu_total = sum(stages.values())
    e2e_rate = events / e2e_s
    ceiling_rate = events / ceiling_s
    rows = [
        ("events (users)", f"{events:,} ({args.users:,})"),
        ("**end to end** (first record read to last Redis write)", f"**{e2e_s:.1f} s, {e2e_rate:,.0f} events/s**"),
        ("start-up (JVM, planning, submission to first record read)", f"{startup_s:.1f} s"),
        ("job (submission to end)", f"{job_s:.1f} s"),
        ("Redis catch-up after the job", f"{catchup_s:.1f} s"),
        ("JVM-only ceiling, same windows over datagen rows (start-up included)",
         f"{ceiling_s:.1f} s, {ceiling_rate:,.0f} events/s"),
        ("ratio end to end / ceiling", f"{e2e_rate / ceiling_rate:.2f}"),
        ("peak memory: JVM (embedded Flink + thread-mode Python)", f"{sampler.peak['jvm'] / 2**20:,.0f} MiB RSS"),
        *([("peak memory: JVM heap (jstat -gc)", heap_figures(sampler)[2:])] if args.heap_every else []),
        ("peak memory: CLI Python (the Redis loader)", f"{sampler.peak['python'] / 2**20:,.0f} MiB RSS"),
        ("peak memory: the product's processes together (JVM + CLI, same second)",
         f"{sampler.peak['total'] / 2**20:,.0f} MiB RSS"),
        ("peak memory: Redis used_memory, sampled every second (the whole server)",
         f"{redis_peak / 2**20:,.0f} MiB"),
        ("triggers in Kafka / new in the Redis stream / generator's abandoned sessions",
         f"{triggers:,} / {stream:,} / {known:,}" + (" (equal)" if triggers == stream == known else " (DIFFER)")),
    ]
    rows += [(f"JVM CPU: {stage}", f"{sec:.1f} core-s ({100 * sec / cpu_total:.0f} %)")
             for stage, sec in sorted(stages.items(), key=lambda kv: -kv[1])]
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    _chart(args.chart, stages, e2e_s, startup_s, catchup_s, ceiling_s)
    return 0 if triggers == stream == known else 1


def stop(proc: subprocess.Popen, timeout_s: float = 60, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; with ``group``, to the process group of a
    run started with ``start_new_session=True`` (a peer's replicas or cluster processes)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


def heap_figures(sampler: Sampler) -> str:
    p = sampler.peak
    return (f"; JVM heap MiB: used peak {p['heap_used'] / 2**20:,.0f}, old generation peak {p['heap_old'] / 2**20:,.0f}, "
            f"capacity {p['heap_capacity'] / 2**20:,.0f} ({sampler.heap_samples} jstat samples"
            + (f"; the last failed: {sampler.heap_error[:300]})" if sampler.heap_error else ")"))


def run_job(env: dict, settings, client, topic: str, heap_every_s: float | None = None) -> dict | None:
    """``personalize run --bounded`` over ``topic`` from a fresh start (its Redis database
    flushed), sampled: the run summary's figures, the sampler (peaks, CPU by stage), the
    Redis peak. None (the run's last lines printed) when the run failed. Its output topics
    are deleted afterwards; Redis keeps what it wrote."""
    client.flushdb()
    client.config_resetstat()
    print(f"bench: bounded run over {topic}", file=sys.stderr, flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "personalize.cli", "run", "--bounded"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid, client, heap_every_s)
    sampler.start()
    err_lines = []
    for line in proc.stderr:  # progress lines as they come
        err_lines.append(line)
        if line.startswith("progress:"):
            print(line, end="", file=sys.stderr, flush=True)
    out = proc.stdout.read()
    proc.wait()
    sampler.done.set()
    sampler.join()
    _drop_outputs(settings)  # the run's summary has counted them; the events topic is kept for the next run
    if proc.returncode != 0:
        print("".join(err_lines[-20:]), file=sys.stderr)
        return None
    return {"events": int(summary_value(out, "events read")), "e2e_s": summary_value(out, "end to end"),
            "startup_s": summary_value(out, "start-up"), "job_s": summary_value(out, "job"),
            "catchup_s": summary_value(out, "redis catch-up"), "triggers": int(summary_value(out, "triggers")),
            "stream": int(summary_value(out, "triggers", r"\d+\s+\((\d+) new")), "sampler": sampler,
            "redis_peak": sampler.peak["redis"], "cpu_s": sampler.cpu_s()}


def _drop_outputs(settings) -> None:
    """Delete this run's output topics (about 0.5 GB a run otherwise stays in the local Kafka)."""
    from personalize import topics

    mine = [settings.topic_dlq, settings.topic_profile_updates, settings.topic_profile_live, settings.topic_trending,
            settings.topic_triggers,
            settings.topic_segment_changes, settings.topic_model_snapshots, settings.topic_erasures]
    topics.delete(settings, mine)


def _chart(path: str, stages: dict[str, float], e2e_s: float, startup_s: float, catchup_s: float,
           ceiling_s: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [n for n, _ in sorted(stages.items(), key=lambda kv: kv[1])]
    left.barh(names, [stages[n] for n in names], color="#4c72b0")
    left.set_xlabel("JVM CPU seconds (2 cores)")
    left.set_title("Where the job's CPU goes, by stage")
    phases = ["start-up", "end to end", "of which Redis catch-up", "JVM-only ceiling"]
    right.bar(phases, [startup_s, e2e_s, catchup_s, ceiling_s], color=["#999999", "#4c72b0", "#dd8452", "#55a868"])
    right.set_ylabel("seconds")
    right.set_title("Bounded backfill, wall clock")
    right.tick_params(axis="x", labelrotation=15)
    save_chart(fig, path, "bench")


def save_chart(fig, path: str, prog: str) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"{prog}: chart written to {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
