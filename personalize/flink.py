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

from personalize import jars
from personalize.settings import Settings


def log_dir(settings: Settings):
    return settings.stack_dir / "flink-logs"


def environments(settings: Settings, *, checkpoint_interval_ms: int | None = None, parallelism: int | None = None,
                 bounded: bool = False, restore_from: str | None = None):
    """A ``StreamExecutionEnvironment`` and its ``StreamTableEnvironment``, configured."""
    # imported here: starting PyFlink starts a JVM, which no import of ours may do
    from pyflink.common import Configuration
    from pyflink.datastream import CheckpointingMode, StreamExecutionEnvironment
    from pyflink.table import EnvironmentSettings, StreamTableEnvironment

    connector_jars = jars.jars(settings, "flink")
    python = sys.executable
    # the gateway JVM and thread mode find python through PATH as well
    os.environ["PATH"] = os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("PYFLINK_CLIENT_EXECUTABLE", python)
    # the embedded Flink's log goes to the stack folder, not into site-packages
    log_dir(settings).mkdir(parents=True, exist_ok=True)
    os.environ["FLINK_LOG_DIR"] = str(log_dir(settings))

    config = Configuration()
    config.set_string("pipeline.jars", ";".join(j.resolve().as_uri() for j in connector_jars))
    config.set_string("python.executable", python)
    config.set_string("python.client.executable", python)
    config.set_string("python.execution-mode", "thread")
    config.set_string("pipeline.name", "personalize")
    config.set_string("rest.bind-address", "127.0.0.1")
    config.set_string("pipeline.max-parallelism", str(settings.max_parallelism))
    # SQL operators hand rows on without copying them (Python operators serialize anyway)
    config.set_string("pipeline.object-reuse", "true")
    # checkpoints go to files, bounded runs too: the JobManager's in-memory storage
    # refuses task state above 5 MB, which 100k users' windows exceed
    config.set_string("execution.checkpointing.tolerable-failed-checkpoints", "3")
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
        config.set_string("restart-strategy.type", "fixed-delay")
        config.set_string("restart-strategy.fixed-delay.attempts", "3")
        config.set_string("restart-strategy.fixed-delay.delay", "2 s")
    if restore_from:
        config.set_string("execution.state-recovery.path", restore_from)

    env = StreamExecutionEnvironment.get_execution_environment(config)
    env.set_parallelism(parallelism or settings.parallelism)
    env.enable_checkpointing(checkpoint_interval_ms or settings.checkpoint_interval_ms, CheckpointingMode.EXACTLY_ONCE)
    t_env = StreamTableEnvironment.create(env, environment_settings=EnvironmentSettings.in_streaming_mode())
    return env, t_env


def job_failure(exc: BaseException) -> str:
    """The root cause of a failed Flink job, in one line (not the Java stack trace)."""
    text = str(exc)
    causes = [line.split("Caused by:", 1)[1].strip() for line in text.splitlines() if "Caused by:" in line]
    interesting = [c for c in causes if "JobExecutionException" not in c and "ExecutionException" not in c]
    root = (interesting or causes or [text.strip().splitlines()[0] if text.strip() else type(exc).__name__])[-1]
    return root[:400] + " (the Flink log is in PERSONALIZE_STACK_DIR/flink-logs)"
