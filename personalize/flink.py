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


def environments(settings: Settings, *, checkpoint_interval_ms: int | None = None, parallelism: int | None = None,
                 bounded: bool = False):
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

    config = Configuration()
    config.set_string("pipeline.jars", ";".join(j.resolve().as_uri() for j in connector_jars))
    config.set_string("python.executable", python)
    config.set_string("python.client.executable", python)
    config.set_string("python.execution-mode", "thread")
    config.set_string("pipeline.name", "personalize")
    # quieter, smaller local runs on a 2-core machine
    config.set_string("taskmanager.memory.process.size", "1600m")
    config.set_string("rest.bind-address", "127.0.0.1")
    if bounded:
        # a bounded run either ends or fails with its reason: no silent restart loop
        config.set_string("restart-strategy.type", "none")

    env = StreamExecutionEnvironment.get_execution_environment(config)
    env.set_parallelism(parallelism or settings.parallelism)
    env.enable_checkpointing(checkpoint_interval_ms or settings.checkpoint_interval_ms, CheckpointingMode.EXACTLY_ONCE)
    t_env = StreamTableEnvironment.create(env, environment_settings=EnvironmentSettings.in_streaming_mode())
    return env, t_env
