"""The settings' credentials as each client takes them: kafka-python (CLI, tests),
confluent-kafka (the Redis loader), the Java Kafka client inside Flink's connector (the job's source and sinks)
and the broker of the local stack, and redis-py.

Flink's SQL Kafka connector shades the Kafka client: its JAAS login modules live under
``org.apache.flink.kafka.shaded.``, and a JAAS line naming the plain class fails the
job with "No LoginModule found".
"""

from __future__ import annotations

import functools
import logging
import socket
import time

import redis

from personalize.errors import ServiceUnavailable
from personalize.settings import Settings

_LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}
FLINK_SHADED = "org.apache.flink.kafka.shaded."


def kafka_python(settings: Settings) -> dict[str, object]:
    """kafka-python keyword arguments for the configured security protocol."""
    config: dict[str, object] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl:
        config.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                      sasl_plain_username=settings.kafka_sasl_username,
                      sasl_plain_password=settings.kafka_sasl_password)
    if settings.kafka_tls:
        if settings.kafka_ssl_cafile:
            config["ssl_cafile"] = str(settings.kafka_ssl_cafile)
        if settings.kafka_ssl_certfile:
            config["ssl_certfile"] = str(settings.kafka_ssl_certfile)
    return config


def librdkafka(settings: Settings) -> dict[str, object]:
    """confluent-kafka (librdkafka) properties for the configured security protocol (the
    Redis loader's consumer). The client certificate file holds its key too, as for kafka-python."""
    config: dict[str, object] = {"security.protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl:
        config.update({"sasl.mechanism": settings.kafka_sasl_mechanism,
                       "sasl.username": settings.kafka_sasl_username,
                       "sasl.password": settings.kafka_sasl_password})
    if settings.kafka_tls:
        if settings.kafka_ssl_cafile:
            config["ssl.ca.location"] = str(settings.kafka_ssl_cafile)
        if settings.kafka_ssl_certfile:
            config["ssl.certificate.location"] = str(settings.kafka_ssl_certfile)
            config["ssl.key.location"] = str(settings.kafka_ssl_certfile)
    return config


def check_kafka(settings: Settings) -> None:
    """Fail with a message naming the user when the broker refuses the credentials.

    kafka-python retries a refused SASL login for ever (each try logged, none raised):
    one connection to the first bootstrap server, before any client, tells. A broker
    that does not answer at all is left to the client's own error."""
    if settings.kafka_sasl:
        _check_login(settings.bootstrap_servers, tuple(sorted(kafka_python(settings).items())))


@functools.cache
def _check_login(servers: str, items: tuple) -> None:
    """Once per process for the same servers and client settings (hashable ``items``)."""
    from kafka.conn import BrokerConnection

    config = dict(items)

    host, _, port = servers.split(",")[0].strip().rpartition(":")
    refusals: list[str] = []

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Authentication" in record.getMessage():
                refusals.append(record.getMessage())

    heard = Heard(logging.ERROR)
    conn_log = logging.getLogger("kafka.conn")
    level, propagate = conn_log.level, conn_log.propagate
    conn_log.setLevel(logging.ERROR)  # heard here only, not printed
    conn_log.propagate = False
    conn_log.addHandler(heard)
    conn = BrokerConnection(host.strip("[]"), int(port), socket.AF_UNSPEC, **config)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not refusals and not conn.connected():
            conn.connect()
            time.sleep(0.02)
    finally:
        conn.close()
        conn_log.removeHandler(heard)
        conn_log.setLevel(level)
        conn_log.propagate = propagate
    if refusals:
        raise ServiceUnavailable(
            f"Kafka at {servers} refused the {config['sasl_mechanism']} login of user "
            f"{config['sasl_plain_username']!r} ({config['security_protocol']}): check "
            "PERSONALIZE_KAFKA_SASL_USERNAME and PERSONALIZE_KAFKA_SASL_PASSWORD")


def jaas(settings: Settings, *, shaded: bool) -> str:
    """The ``sasl.jaas.config`` line of the configured user (its password in clear)."""
    module = (FLINK_SHADED if shaded else "") + _LOGIN_MODULES[settings.kafka_sasl_mechanism]
    return (f'{module} required username="{settings.kafka_sasl_username}" '
            f'password="{settings.kafka_sasl_password}";')


def kafka_java(settings: Settings, *, shaded: bool = True) -> dict[str, str]:
    """Java Kafka client properties (without ``bootstrap.servers``); ``shaded`` for Flink's connector."""
    props = {"security.protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl:
        props["sasl.mechanism"] = settings.kafka_sasl_mechanism
        props["sasl.jaas.config"] = jaas(settings, shaded=shaded)
    if settings.kafka_tls:
        # Kafka's clients read PEM stores themselves (KIP-651): the same files kafka-python takes
        if settings.kafka_ssl_cafile:
            props.update({"ssl.truststore.type": "PEM", "ssl.truststore.location": str(settings.kafka_ssl_cafile)})
        if settings.kafka_ssl_certfile:
            props.update({"ssl.keystore.type": "PEM", "ssl.keystore.location": str(settings.kafka_ssl_certfile)})
    return props


def redis_options(settings: Settings, **options) -> dict:
    """redis-py's options for ``settings.redis_url``: ``options`` with the AUTH and TLS settings."""
    if settings.redis_username:
        options.setdefault("username", settings.redis_username)
    if settings.redis_password:
        options.setdefault("password", settings.redis_password)
    if settings.redis_ssl_cafile:  # a rediss:// URL (Settings checks)
        options.setdefault("ssl_ca_certs", str(settings.redis_ssl_cafile))
    return options


def redis_client(settings: Settings, **options) -> redis.Redis:
    """A redis-py client for ``settings.redis_url`` with the AUTH and TLS settings (not connected yet)."""
    return redis.Redis.from_url(settings.redis_url, **redis_options(settings, **options))
