"""Credentials reach every client in the form it takes, the local stack requires them, and
no secret is printed: settings, messages and log lines carry ``***`` instead."""

from __future__ import annotations

import io
import re
import stat
import sys

import pytest
import structlog

from personalize import credentials, logs, stack
from personalize.errors import ConfigError, StackError
from personalize.settings import Settings, redact_url
from sinks import kafka as kafka_sinks

SASL = {"PERSONALIZE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "PERSONALIZE_KAFKA_SASL_USERNAME": "shop",
        "PERSONALIZE_KAFKA_SASL_PASSWORD": "k-pass'word", "PERSONALIZE_REDIS_PASSWORD": "r-pass word"}


def test_sasl_settings_become_the_connectors_shaded_jaas_and_kafka_pythons_arguments():
    s = Settings.from_env(SASL)
    java = credentials.kafka_java(s)
    assert java["security.protocol"] == "SASL_PLAINTEXT" and java["sasl.mechanism"] == "PLAIN"
    assert java["sasl.jaas.config"] == (
        "org.apache.flink.kafka.shaded.org.apache.kafka.common.security.plain.PlainLoginModule required "
        'username="shop" password="k-pass\'word";')
    assert credentials.kafka_java(s, shaded=False)["sasl.jaas.config"].startswith(
        "org.apache.kafka.common.security.plain.PlainLoginModule required")
    assert credentials.kafka_python(s) == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                                           "sasl_plain_username": "shop", "sasl_plain_password": "k-pass'word"}


def test_tls_files_are_pem_stores_for_java_and_files_for_kafka_python(tmp_path):
    ca, mine = tmp_path / "ca.pem", tmp_path / "client.pem"
    ca.write_text("ca"), mine.write_text("key and chain")
    s = Settings.from_env({**SASL, "PERSONALIZE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                           "PERSONALIZE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                           "PERSONALIZE_KAFKA_SSL_CAFILE": str(ca), "PERSONALIZE_KAFKA_SSL_CERTFILE": str(mine)})
    java = credentials.kafka_java(s)
    assert java["ssl.truststore.type"] == "PEM" and java["ssl.truststore.location"] == str(ca)
    assert java["ssl.keystore.type"] == "PEM" and java["ssl.keystore.location"] == str(mine)
    assert ".scram.ScramLoginModule required" in java["sasl.jaas.config"]
    py = credentials.kafka_python(s)
    assert py["ssl_cafile"] == str(ca) and py["ssl_certfile"] == str(mine) and py["sasl_mechanism"] == "SCRAM-SHA-512"


def test_every_kafka_table_of_the_job_carries_the_credentials_sql_quoted():
    s = Settings.from_env(SASL)
    ddl = [kafka_sinks.events_source("t", s, bounded=True, group_id="g"),
           kafka_sinks.keyed_bytes_sink("t", s, "topic"), kafka_sinks.dead_letter_sink("t", s),
           kafka_sinks.profile_live_sink("t", s, (("n", "BIGINT"),)), kafka_sinks.trending_sink("t", s)]
    for text in ddl:
        assert "'properties.security.protocol' = 'SASL_PLAINTEXT'" in text
        assert "'properties.sasl.mechanism' = 'PLAIN'" in text
        assert "password=\"k-pass''word\";'" in text  # the quote doubled inside the SQL string


@pytest.mark.parametrize("env, message", [
    ({"PERSONALIZE_KAFKA_SECURITY_PROTOCOL": "SASL"}, "PERSONALIZE_KAFKA_SECURITY_PROTOCOL must be one of"),
    ({"PERSONALIZE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs PERSONALIZE_KAFKA_SASL_USERNAME and"),
    ({**SASL, "PERSONALIZE_KAFKA_SASL_MECHANISM": "GSSAPI"}, "PERSONALIZE_KAFKA_SASL_MECHANISM must be one of"),
    ({"PERSONALIZE_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "PERSONALIZE_KAFKA_SSL_CAFILE names no file"),
    ({**SASL, "PERSONALIZE_KAFKA_SASL_PASSWORD": 'a"b'}, "may not hold a double quote"),
    ({"PERSONALIZE_REDIS_SSL_CAFILE": __file__}, "set PERSONALIZE_REDIS_URL to a rediss:// URL"),
])
def test_unusable_credentials_settings_are_refused_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_secrets_are_left_out_of_the_settings_repr_and_redacted_from_messages():
    s = Settings.from_env({**SASL, "PERSONALIZE_REDIS_URL": "redis://app:url-secret@cache:6380/2"})
    assert set(s.secrets) == {"k-pass'word", "r-pass word", "url-secret"}
    assert not any(secret in repr(s) for secret in s.secrets)
    assert s.redis_address == "redis://app:***@cache:6380/2"
    assert s.redact("login k-pass'word then url-secret") == "login *** then ***"
    assert redact_url("redis://:only-password@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_no_log_line_carries_a_secret_whatever_is_logged(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("json", secrets=("hunter2",))
    try:
        logs.get("t").warning("connecting with hunter2", url="redis://:hunter2@h:1/0")
    finally:
        logs._configured = None
        structlog.reset_defaults()
    assert "hunter2" not in out.getvalue() and out.getvalue().count("***") == 2


def test_the_local_stack_requires_the_configured_credentials(tmp_path):
    s = Settings.from_env({**SASL, "PERSONALIZE_STACK_DIR": str(tmp_path), "PERSONALIZE_REDIS_USERNAME": "app"})
    props = dict(line.split("=", 1) for line in stack._kafka_config(s).read_text().splitlines() if line)
    assert props["listeners"].startswith("SASL_PLAINTEXT://127.0.0.1:9092,")
    assert props["inter.broker.listener.name"] == "SASL_PLAINTEXT" and props["sasl.enabled.mechanisms"] == "PLAIN"
    assert props["listener.name.sasl_plaintext.plain.sasl.jaas.config"] == (
        'org.apache.kafka.common.security.plain.PlainLoginModule required username="shop" '
        'password="k-pass\'word" user_shop="k-pass\'word";')
    (tmp_path / "redis").mkdir()
    auth = stack._redis_auth(s)
    assert auth.read_text() == 'user default off\nuser "app" on ">r-pass word" ~* &* +@all\n'
    for path in (auth, tmp_path / "kafka" / "server.properties"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    plain = Settings.from_env({**SASL, "PERSONALIZE_STACK_DIR": str(tmp_path)})
    assert stack._redis_auth(plain).read_text() == 'requirepass "r-pass word"\n'


def test_the_local_stack_refuses_a_protocol_its_broker_does_not_serve(tmp_path):
    s = Settings.from_env({**SASL, "PERSONALIZE_STACK_DIR": str(tmp_path),
                           "PERSONALIZE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"})
    with pytest.raises(StackError, match="serves PLAINTEXT or SASL_PLAINTEXT with PLAIN"):
        stack._kafka_config(s)
