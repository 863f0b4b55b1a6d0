"""A stack of its own that requires credentials: a Kafka broker whose only client listener is
SASL_PLAINTEXT with PLAIN, and a Redis server with an ACL user and password (default user
off), both on loopback. The whole job runs against them, every output checked against an
independent computation; wrong credentials get one line naming the service; the passwords
appear in no output and in no log file of the stack or of Flink."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import Stack, start_stack
from tests.integration.test_profile_job import run_summary
from tests.integration.test_taobao_job import TAOBAO, check_taobao_profiles, taobao_events
from tests.integration.test_triggers_job import check_triggers, expected_triggers

pytestmark = pytest.mark.slow

KAFKA_PASSWORD = f"kafka-{uuid.uuid4().hex}"
REDIS_PASSWORD = f"redis-{uuid.uuid4().hex}"
CREDENTIALS = {
    "PERSONALIZE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "PERSONALIZE_KAFKA_SASL_MECHANISM": "PLAIN",
    "PERSONALIZE_KAFKA_SASL_USERNAME": "shop",
    "PERSONALIZE_KAFKA_SASL_PASSWORD": KAFKA_PASSWORD,
    "PERSONALIZE_REDIS_USERNAME": "personalize",
    "PERSONALIZE_REDIS_PASSWORD": REDIS_PASSWORD,
}
# where the local stack keeps what its servers need (mode 0600, asserted in the unit tests)
SERVER_CONFIGS = {"auth.conf", "server.properties"}


class Outputs(list):
    """Every stdout and stderr of the CLI calls made against the secured stack."""

    def cli(self, stack: Stack, *args: str, env: dict[str, str] | None = None, timeout: float = 600):
        done = stack.cli(*args, env=env, timeout=timeout)
        self.extend([done.stdout, done.stderr])
        return done


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    stack_dir = tmp_path_factory.mktemp("secured-stack")
    own = start_stack(stack_dir, **CREDENTIALS)
    outputs = Outputs()
    try:
        done = outputs.cli(own, "replay", str(TAOBAO))
        assert done.returncode == 0, done.stderr
        run = outputs.cli(own, "run", "--bounded")
        assert run.returncode == 0, run.stderr[-4000:]
        yield own, run, outputs
    finally:
        own.cli("stack", "down", "--purge")


def test_the_whole_job_runs_against_sasl_plain_kafka_and_a_redis_acl_user(secured):
    own, run, outputs = secured
    check_taobao_profiles(own, run_summary(run.stdout))
    check_triggers(own, expected_triggers(taobao_events()))
    status = outputs.cli(own, "stack", "status")
    assert status.returncode == 0 and status.stdout.count(" running ") == 2, status.stdout
    user = next(e["user_id"] for e in taobao_events())
    shown = outputs.cli(own, "profile", user)
    assert shown.returncode == 0 and f'"user_id":"{user}"' in shown.stdout.replace(" ", ""), shown
    assert outputs.cli(own, "triggers", "--limit", "1").returncode == 0


def test_wrong_or_missing_credentials_get_one_line_naming_the_service(secured):
    own, _, outputs = secured
    cases = [
        ({"PERSONALIZE_KAFKA_SASL_PASSWORD": "wrong"}, ("triggers", "--limit", "1"),
         "Kafka at 127.0.0.1:{kafka} refused the PLAIN login of user 'shop'"),
        ({"PERSONALIZE_REDIS_PASSWORD": "wrong"}, ("profile", "someone"),
         "Redis at redis://127.0.0.1:{redis}/0 refused the credentials"),
        ({"PERSONALIZE_REDIS_PASSWORD": "", "PERSONALIZE_REDIS_USERNAME": ""}, ("profile", "someone"),
         "Redis at redis://127.0.0.1:{redis}/0 requires a password"),
    ]
    for change, args, message in cases:
        done = outputs.cli(own, *args, env={**own.env, **change}, timeout=120)
        lines = done.stderr.strip().splitlines()
        want = message.format(kafka=own.settings.kafka_port, redis=own.settings.redis_port)
        assert done.returncode == 3 and len(lines) == 1 and want in lines[0], (args, done.stderr)


def test_no_password_in_any_output_or_log_line(secured):
    own, _, outputs = secured
    # the issue's own example: a password in the URL of a Redis that is not there
    url = f"redis://personalize:{REDIS_PASSWORD}@127.0.0.1:1/0"
    done = outputs.cli(own, "profile", "someone", env={**own.env, "PERSONALIZE_REDIS_URL": url}, timeout=60)
    assert done.returncode == 3 and "redis://personalize:***@127.0.0.1:1/0" in done.stderr, done.stderr
    outputs.cli(own, "stack", "status")
    logs = [p for p in Path(own.settings.stack_dir).rglob("*") if p.is_file() and p.name not in SERVER_CONFIGS
            and p.suffix in (".log", ".out", ".json", "") and "data" not in p.parts]
    assert any(p.parent.name == "flink-logs" for p in logs) and any(p.name == "server.log" for p in logs), logs
    for secret in (KAFKA_PASSWORD, REDIS_PASSWORD):
        assert not [text for text in outputs if secret in text]
        assert not [p for p in logs if secret in p.read_text(errors="replace")]
    assert sum(len(text) for text in outputs) > 2_000 and len(outputs) >= 8  # the run, replay, these calls
