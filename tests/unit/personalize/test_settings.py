"""Settings come from PERSONALIZE_* variables, are frozen, and refuse bad values with the variable's name."""

from __future__ import annotations

import dataclasses

import pytest

from personalize.errors import ConfigError
from personalize.settings import Settings


def test_defaults_point_at_the_local_stack():
    s = Settings.from_env({})
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.topics == ("events", "triggers", "segment-changes", "events-dlq")
    assert s.log_format == "console"


def test_environment_overrides_fields_and_derived_addresses_follow_ports(tmp_path):
    s = Settings.from_env({
        "PERSONALIZE_KAFKA_PORT": "19092",
        "PERSONALIZE_REDIS_PORT": "16379",
        "PERSONALIZE_STACK_DIR": str(tmp_path),
        "PERSONALIZE_TOPIC_EVENTS": "clicks",
        "PERSONALIZE_PARTITIONS": "4",
    })
    assert s.bootstrap_servers == "127.0.0.1:19092"
    assert s.redis_url == "redis://127.0.0.1:16379/0"
    assert s.stack_dir == tmp_path.resolve()
    assert s.topic_events == "clicks" and s.partitions == 4


def test_explicit_service_addresses_win_over_ports():
    s = Settings.from_env({"PERSONALIZE_BOOTSTRAP_SERVERS": "kafka:9092", "PERSONALIZE_REDIS_URL": "redis://r:6379/2"})
    assert s.bootstrap_servers == "kafka:9092" and s.redis_url == "redis://r:6379/2"


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings.from_env({}).kafka_port = 1


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PERSONALIZE_KAFKA_PORT": "abc"}, "PERSONALIZE_KAFKA_PORT must be an integer, got 'abc'"),
        ({"PERSONALIZE_REDIS_PORT": "70000"}, "PERSONALIZE_REDIS_PORT must be a port between 1 and 65535"),
        ({"PERSONALIZE_REDIS_PORT": "9092"}, "must differ"),
        ({"PERSONALIZE_PARTITIONS": "0"}, "PERSONALIZE_PARTITIONS must be at least 1"),
        ({"PERSONALIZE_LOG_FORMAT": "xml"}, "PERSONALIZE_LOG_FORMAT must be 'console' or 'json'"),
        ({"PERSONALIZE_STATE_BACKEND": "memory"}, "PERSONALIZE_STATE_BACKEND must be 'hashmap' or 'rocksdb'"),
        ({"PERSONALIZE_KAFKA_HEAP": "lots"}, "PERSONALIZE_KAFKA_HEAP must look like 512m"),
        ({"PERSONALIZE_JVM_HEAP": "2 GB"}, "PERSONALIZE_JVM_HEAP must look like 512m"),
        ({"PERSONALIZE_JVM_OPTIONS": "-Xms8g MaxTenuringThreshold=2"},
         "PERSONALIZE_JVM_OPTIONS must be JVM options, each starting with '-', got 'MaxTenuringThreshold=2'"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert message in str(info.value)


def test_ci_switches_logs_to_json_unless_set():
    assert Settings.from_env({"CI": "true"}).log_format == "json"
    assert Settings.from_env({"CI": "true", "PERSONALIZE_LOG_FORMAT": "console"}).log_format == "console"


def test_the_default_restart_strategy_rides_out_a_minute_long_outage():
    from personalize.flink import restart_strategy

    s = Settings.from_env({})
    conf = restart_strategy(s)
    assert conf["restart-strategy.type"] == "exponential-delay"
    assert conf["restart-strategy.exponential-delay.max-backoff"] == "30000 ms"
    # the waits before each try: 1 s doubling, capped at the maximum, less 10 % jitter at worst
    waits = [min(2**i, s.restart_max_delay_ms / 1000) * 0.9 for i in range(s.restart_attempts)]
    assert sum(waits) > 10 * 60  # minutes of outage, not the 6 s of the 3 tries 2 s apart before
    assert int(conf["restart-strategy.exponential-delay.attempts-before-reset-backoff"]) == s.restart_attempts


def test_restart_and_transaction_settings_come_from_the_environment():
    s = Settings.from_env({"PERSONALIZE_RESTART_ATTEMPTS": "5", "PERSONALIZE_RESTART_MAX_DELAY_MS": "2000",
                           "PERSONALIZE_TRANSACTION_TIMEOUT_MS": "300000"})
    assert (s.restart_attempts, s.restart_max_delay_ms, s.transaction_timeout_ms) == (5, 2000, 300000)
    from sinks.kafka import trending_sink

    assert "'properties.transaction.timeout.ms' = '300000'" in trending_sink("t", s)


def test_jvm_options_come_after_the_project_s_and_the_heap_so_they_win():
    from personalize.flink import EMBEDDED_JVM_ARGS, jvm_args

    args = jvm_args(Settings.from_env({"PERSONALIZE_JVM_HEAP": "8g",
                                       "PERSONALIZE_JVM_OPTIONS": "-Xms8g -XX:MaxTenuringThreshold=2"}))
    assert args == f"{EMBEDDED_JVM_ARGS} -Xmx8g -Xms8g -XX:MaxTenuringThreshold=2"
    assert jvm_args(Settings.from_env({})) == f"{EMBEDDED_JVM_ARGS} -Xmx1g"
