"""docker/ without a Docker engine: the compose file parses and names the code's
topics and settings, every role of the image goes through the same entry points the
cluster tests run, and the Kubernetes deployment runs the same job file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from personalize import cluster
from personalize.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_kafka_redis_a_jobmanager_a_taskmanager_a_one_shot_submit_the_loader_and_the_api():
    services = compose()["services"]
    assert set(services) == {"kafka", "redis", "jobmanager", "taskmanager", "submit", "loader", "api"}
    assert services["api"]["command"] == ["serve", "--host", "0.0.0.0"]
    api_env = services["api"]["environment"]
    assert {k: v for k, v in api_env.items() if k != "PERSONALIZE_API_TOKENS"} == compose()["x-job-env"]
    assert api_env["PERSONALIZE_API_TOKENS"].startswith("${API_TOKENS:?")  # no default token
    assert services["submit"]["command"] == ["submit"] and services["submit"]["restart"] == "no"
    assert services["loader"]["command"] == ["load", "--follow"]
    assert services["jobmanager"]["command"] == ["jobmanager"]
    assert services["taskmanager"]["command"] == ["taskmanager"]
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert kafka["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == 1 and kafka["KAFKA_LOG_RETENTION_MS"] == "-1"


def test_compose_settings_are_settings_the_code_reads_and_its_topics_are_the_contract():
    env = compose()["x-job-env"]
    fields = {env_name(f.name) for f in dataclasses.fields(Settings)}
    assert set(env) <= fields, set(env) - fields
    settings = Settings.from_env({k: str(v) for k, v in env.items()})  # every value parses
    defaults = Settings()
    for name in ("topic_events", "topic_triggers", "topic_segment_changes", "topic_dlq", "topic_profile_updates",
                 "topic_trending", "topic_model_snapshots"):
        assert env_name(name) in env and getattr(settings, name) == getattr(defaults, name)
    assert settings.flink_address == "jobmanager:8081"
    assert settings.bootstrap_servers == "kafka:9092" and settings.redis_url.startswith("redis://redis:6379")
    for role in ("jobmanager", "taskmanager", "submit", "loader"):
        assert compose()["services"][role]["environment"] == env


def test_compose_publishes_ports_on_loopback_only_and_redis_requires_a_password():
    services = compose()["services"]
    published = [(name, port) for name, svc in services.items() for port in svc.get("ports", ())]
    assert {name for name, _ in published} == {"kafka", "redis", "jobmanager", "api"}
    for name, port in published:
        assert port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)
    redis = services["redis"]
    assert 'redis-server --requirepass "$$REDIS_PASSWORD"' in redis["command"][-1]
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")  # no default password
    assert compose()["x-job-env"]["PERSONALIZE_REDIS_PASSWORD"] == redis["environment"]["REDIS_PASSWORD"]
    assert "EXTERNAL://127.0.0.1:9094" in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]


def test_the_image_runs_flink_roles_and_otherwise_the_personalize_cli():
    entry = (DOCKER / "entrypoint.sh").read_text()
    assert 'exec personalize "$@"' in entry  # submit, load, stop: the CLI the cluster tests run
    assert "python -m personalize.cluster write-conf" in entry
    assert '"$FLINK_HOME/bin/$role.sh" start-foreground' in entry
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in dockerfile
    assert "FROM python:3.11" in dockerfile and "openjdk-17" in dockerfile
    assert "-P flink dependency:copy-dependencies" in dockerfile
    for package in ("personalize", "jobs", "operators", "schemas", "sinks"):
        assert f"COPY {package} {package}" in dockerfile


def test_the_container_config_listens_on_every_interface_and_names_the_jobmanager(tmp_path):
    settings = Settings(stack_dir=tmp_path)
    conf = cluster.configuration(settings, host="jobmanager", bind="0.0.0.0")
    assert conf["jobmanager"]["rpc"]["address"] == "jobmanager" and conf["rest"]["bind-address"] == "0.0.0.0"
    assert "host" not in conf["taskmanager"]  # each TaskManager announces its own container address
    assert conf["taskmanager"]["numberOfTaskSlots"] == 2 and conf["pipeline"]["max-parallelism"] == 128
    local = cluster.configuration(settings)
    assert local["rest"]["address"] == "127.0.0.1" and local["taskmanager"]["host"] == "127.0.0.1"
    assert "--add-opens" in local["env"]["java"]["opts"]["all"]  # the distribution's JVM options kept


def test_the_kubernetes_deployment_runs_the_same_job_file_with_the_pinned_flink():
    deployment = yaml.safe_load((DOCKER / "k8s" / "flinkdeployment.yaml").read_text())
    assert deployment["kind"] == "FlinkDeployment" and deployment["spec"]["flinkVersion"] == "v2_2"
    job = deployment["spec"]["job"]
    assert job["entryClass"] == "org.apache.flink.client.python.PythonDriver"
    script = job["args"][job["args"].index("-py") + 1]
    assert script == "/app/jobs/profile.py" and (ROOT / "jobs" / "profile.py").is_file()
    jar = re.search(r"flink-python-[\d.]+\.jar", job["jarURI"]).group(0)
    assert (cluster.flink_home() / "opt" / jar).is_file()
    assert job["upgradeMode"] == "savepoint"
