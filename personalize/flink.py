"""The Flink execution environment every job starts from.

Embedded local Flink (MiniCluster) by default. Wires in the connector jars from
``lib/flink``, runs Python functions in thread mode with this interpreter (thread
mode runs the ``python`` on PATH otherwise and fails with ``No module named
'find_libpython'``, DESIGN.md), and turns checkpointing on: exactly-once Kafka
sinks commit at checkpoints, bounded runs included.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from personalize import jars
from personalize.settings import Settings


def log_dir(settings: Settings):
    return settings.stack_dir / "flink-logs"


# JVM options of the embedded Flink (the PyFlink gateway JVM), measured on the benchmark
# (885,427 events, p1): G1 (the default) 62 s, Parallel GC 56 s, plus fewer C2
# compilations (the planner's generated code kept two cores' worth of C2 threads busy
# for ~20 s) 54 s; C1 only 69 s. Smaller C2 inlining limits (2026-12-07, make bench,
# 1,001,020 events, alternating): 41.9/41.7/38.7 s -> 34.7/36.3/36.1/36.0 s, the JIT's
# CPU 17 -> 10-11 core-s (C2 compiled thousands of methods, none of them dominant; its
# cost grows with what it inlines). The heap's maximum is PERSONALIZE_JVM_HEAP.
# JVM_ARGS, when set, replaces them all.
EMBEDDED_JVM_ARGS = ("-XX:+UseParallelGC -XX:CICompilerCount=2 "
                     "-XX:Tier4InvocationThreshold=50000 -XX:Tier4CompileThreshold=60000 "
                     "-XX:InlineSmallCode=1000 -XX:MaxInlineSize=20 -XX:FreqInlineSize=150")


def jvm_args(settings: Settings) -> str:
    """The embedded JVM's options: the project's, the heap, then PERSONALIZE_JVM_OPTIONS (the
    JVM takes the last of two values of one option, so the setting's win)."""
    return f"{EMBEDDED_JVM_ARGS} -Xmx{settings.jvm_heap} {settings.jvm_options}".strip()


REST_PORT_SPAN = 20


def java_static(class_name: str, method: str, *args: tuple):
    """Call a static method of a class of the udf jar (operators/jvm) through the gateway;
    ``args`` are (value, the Java class name of the parameter) pairs. The class is found by
    the user class loader (pipeline.jars, or `flink run --jarfile`), as the job's functions are."""
    from pyflink.java_gateway import get_gateway

    gateway = get_gateway()
    cls = gateway.jvm.Thread.currentThread().getContextClassLoader().loadClass(class_name)
    types = gateway.new_array(gateway.jvm.Class, len(args))
    values = gateway.new_array(gateway.jvm.Object, len(args))
    for i, (value, java_class) in enumerate(args):
        types[i], values[i] = gateway.jvm.Class.forName(java_class), value
    return cls.getMethod(method, types).invoke(None, values)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# numpy's and SciPy's OpenBLAS start a thread per core when loaded, and each spins for a
# while after every call it shares out. The models' matrices are a mini-batch by 19: nothing
# to share, but the spinning thread took ~7 of make bench's ~80 core-s (44.0 -> 36.9 s
# end to end with it off; it carries the name of the Flink task thread that imported numpy
# first). The job's Python runs inside this JVM (thread mode), which inherits the variable.
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded_blas() -> None:
    """One BLAS thread for whatever loads numpy after this (a value already set wins)."""
    for name in BLAS_THREADS:
        os.environ.setdefault(name, "1")


def environments(settings: Settings, *, checkpoint_interval_ms: int | None = None, parallelism: int | None = None,
                 bounded: bool = False, restore_from: str | None = None, rest_port: int | None = None):
    """A ``StreamExecutionEnvironment`` and its ``StreamTableEnvironment``, configured.

    ``rest_port``: where the embedded Flink's REST API listens (for progress from its
    metrics); by default a port Flink picks."""
    # imported here: starting PyFlink starts a JVM, which no import of ours may do
    from pyflink.common import Configuration
    from pyflink.datastream import CheckpointingMode, StreamExecutionEnvironment
    from pyflink.table import EnvironmentSettings, StreamTableEnvironment

    connector_jars = jars.job_jars(settings)
    python = sys.executable
    # the gateway JVM and thread mode find python through PATH as well
    os.environ["PATH"] = os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("PYFLINK_CLIENT_EXECUTABLE", python)
    # the embedded Flink's log goes to the stack folder, not into site-packages
    log_dir(settings).mkdir(parents=True, exist_ok=True)
    os.environ["FLINK_LOG_DIR"] = str(log_dir(settings))
    os.environ.setdefault("JVM_ARGS", jvm_args(settings))
    single_threaded_blas()
    if settings.metrics_port:
        # the embedded MiniCluster finds metric reporters on the gateway's classpath only (it loads
        # no plugins folder: "could not be found ... Available factories: []"); PyFlink's gateway
        # appends HADOOP_CLASSPATH to its classpath
        import pyflink

        reporter = next((Path(pyflink.__file__).parent / "plugins" / "metrics-prometheus").glob("*.jar"))
        os.environ["HADOOP_CLASSPATH"] = os.pathsep.join(
            p for p in (os.environ.get("HADOOP_CLASSPATH", ""), str(reporter)) if p)

    config = Configuration()
    config.set_string("pipeline.jars", ";".join(j.resolve().as_uri() for j in connector_jars))
    config.set_string("python.executable", python)
    config.set_string("python.client.executable", python)
    config.set_string("python.execution-mode", "thread")
    config.set_string("pipeline.name", "personalize")
    config.set_string("rest.bind-address", "127.0.0.1")
    if rest_port:
        # a range: the port was free when picked, but any socket may take it before the JVM
        # binds (seen once: "Could not start rest endpoint"); find_rest_port finds the one bound
        config.set_string("rest.bind-port", f"{rest_port}-{rest_port + REST_PORT_SPAN - 1}")
        config.set_string("metrics.fetcher.update-interval", "1 s")  # fresh progress figures
    if settings.metrics_port:  # Flink's own Prometheus reporter (pyflink/plugins/metrics-prometheus)
        from personalize.metrics import job_ports

        config.set_string("metrics.reporter.prom.factory.class",
                          "org.apache.flink.metrics.prometheus.PrometheusReporterFactory")
        config.set_string("metrics.reporter.prom.port", job_ports(settings))
    config.set_string("pipeline.max-parallelism", str(settings.max_parallelism))
    # SQL operators hand rows on without copying them (Python operators serialize anyway)
    config.set_string("pipeline.object-reuse", "true")
    # checkpoints go to files, bounded runs too: the JobManager's in-memory storage
    # refuses task state above 5 MB, which 100k users' windows exceed
    config.set_string("execution.checkpointing.tolerable-failed-checkpoints", "3")
    config.set_string("state.backend.type", settings.state_backend)
    if settings.state_backend == "rocksdb":
        config.set_string("execution.checkpointing.incremental", "true")
    if bounded:
        # a bounded run either ends or fails with its reason: no silent restart loop
        config.set_string("restart-strategy.type", "none")
        config.set_string("execution.checkpointing.dir", (settings.state_dir / "bounded-checkpoints").as_uri())
        config.set_string("execution.checkpointing.externalized-checkpoint-retention", "DELETE_ON_CANCELLATION")
    else:
        # unbounded: checkpoints kept on cancel, so the next run resumes from the newest
        config.set_string("execution.checkpointing.dir", (settings.state_dir / "checkpoints").as_uri())
        config.set_string("execution.checkpointing.savepoint-dir", (settings.state_dir / "savepoints").as_uri())
        config.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
        config.set_string("execution.checkpointing.num-retained", "3")
        for key, value in restart_strategy(settings).items():
            config.set_string(key, value)
    if restore_from:
        config.set_string("execution.state-recovery.path", restore_from)

    env = StreamExecutionEnvironment.get_execution_environment(config)
    env.set_parallelism(parallelism or settings.parallelism)
    env.enable_checkpointing(checkpoint_interval_ms or settings.checkpoint_interval_ms, CheckpointingMode.EXACTLY_ONCE)
    t_env = StreamTableEnvironment.create(env, environment_settings=EnvironmentSettings.in_streaming_mode())
    return env, t_env


def restart_strategy(settings: Settings) -> dict[str, str]:
    """Flink's restart strategy of an unbounded run (settings.restart_*): exponential delay
    from 1 s to the maximum, so failures that repeat for minutes (a TaskManager lost, an
    outage long enough to fail a task) are ridden out, not three tries 2 s apart. (A broker
    stopped for one to three minutes failed no task here: the clients wait; tested.)"""
    return {
        "restart-strategy.type": "exponential-delay",
        "restart-strategy.exponential-delay.initial-backoff": "1 s",
        "restart-strategy.exponential-delay.backoff-multiplier": "2.0",
        "restart-strategy.exponential-delay.max-backoff": f"{settings.restart_max_delay_ms} ms",
        "restart-strategy.exponential-delay.jitter-factor": "0.1",
        "restart-strategy.exponential-delay.attempts-before-reset-backoff": str(settings.restart_attempts),
        "restart-strategy.exponential-delay.reset-backoff-threshold": "1 h",
    }


def _causes(text: str) -> list[str]:
    """The "Caused by:" lines of a Java stack trace, outermost first."""
    return [line.split("Caused by:", 1)[1].strip() for line in text.splitlines() if "Caused by:" in line]


def job_failure(exc: BaseException) -> str:
    """The root cause of a failed Flink job, in one line (not the Java stack trace)."""
    text = str(exc)
    causes = _causes(text)
    interesting = [c for c in causes if "JobExecutionException" not in c and "ExecutionException" not in c]
    root = (interesting or causes or [text.strip().splitlines()[0] if text.strip() else type(exc).__name__])[-1]
    return root[:400] + " (the Flink log is in PERSONALIZE_STACK_DIR/flink-logs)"


def restore_refused(exc: BaseException) -> str | None:
    """Why Flink refused to start the job from a savepoint or checkpoint, in one line;
    None when the failure is something else."""
    refused = [c for c in _causes(str(exc)) if "checkpoint/savepoint" in c]
    if not refused:
        return None
    reason = refused[-1].split(": ", 1)[-1]  # without the Java exception's class
    # Flink's hint names its own CLI's flag: not ours, and skipping state is no upgrade
    return reason.split(" If you want to allow to skip this")[0][:400]


def find_rest_port(first: int, job_id: str) -> int | None:
    """The port in ``first``'s range (see ``environments``) where the embedded Flink's REST
    API knows the job; None when none does (yet)."""
    import http.client
    import urllib.request

    for port in range(first, first + REST_PORT_SPAN):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/jobs/{job_id}", timeout=0.5):
                return port
        # (a port nobody listens on can connect to itself, TCP's simultaneous open, and read
        # back the request as a status line: http.client.BadStatusLine)
        except (OSError, ValueError, http.client.HTTPException):
            continue
    return None


def records_read(rest_port: int, job_id: str, timeout_s: float = 2.0) -> int | None:
    """Records the job's Kafka source has emitted so far (its operator's ``numRecordsOut``
    summed over subtasks, from the embedded Flink's REST API); None when not known yet."""
    import http.client
    import json
    import urllib.request

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}{path}", timeout=timeout_s) as reply:
            return json.load(reply)

    try:
        for vertex in get(f"/jobs/{job_id}")["vertices"]:
            if not vertex["name"].startswith("Source: "):
                continue
            base = f"/jobs/{job_id}/vertices/{vertex['id']}"
            names = {m["id"].split(".", 1)[1] for m in get(f"{base}/metrics")
                     if m["id"].endswith(".numRecordsOut") and ".Source__" in m["id"]}
            if names:
                name = sorted(names)[0]
                values = get(f"{base}/subtasks/metrics?get={name}&agg=sum")
                return int(float(values[0]["sum"])) if values else None
    except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException):
        return None  # not known now (a progress line fewer), never a job failure
    return None


def tasks_starting(exc: BaseException | str) -> bool:
    """Whether Flink refused a checkpoint or savepoint only because some task is not running yet."""
    return any(reason in str(exc) for reason in _TASKS_STARTING)


# what Flink 2.2 says when a savepoint is triggered before every task runs
# (CheckpointFailureReason.NOT_ALL_REQUIRED_TASKS_RUNNING and DefaultCheckpointPlanCalculator)
_TASKS_STARTING = ("is not being executed at the moment", "Not all required tasks are currently running")
