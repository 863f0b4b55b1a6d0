"""A command whose service is missing says which one and where, in one line."""

from __future__ import annotations

from tests.conftest import Stack, free_port, stack_env


def test_smoke_without_kafka_names_the_bootstrap_address(tmp_path):
    port = free_port()
    env = stack_env(port, free_port(), free_port(), tmp_path)
    done = Stack(None, env).cli("smoke", "--messages", "10", timeout=120)
    assert done.returncode == 3
    assert done.stderr.strip().startswith(f"personalize: error: Kafka does not answer at 127.0.0.1:{port}")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
