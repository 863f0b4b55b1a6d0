"""Shared fixtures.

Integration tests share one stack per test session: a Kafka broker and a Redis
server started by the project's own ``personalize stack up`` on free loopback
ports, in a temporary folder, and stopped (and purged) at the end. A test run
never touches a stack a user left running on the default ports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from personalize.flink import free_port
from personalize.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "personalize.cli"]


def stack_env(kafka_port: int, controller_port: int, redis_port: int, stack_dir: Path) -> dict[str, str]:
    """The environment of a CLI subprocess pointed at one stack (and nothing of the user's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALIZE_")}
    env.update(
        PERSONALIZE_KAFKA_PORT=str(kafka_port),
        PERSONALIZE_KAFKA_CONTROLLER_PORT=str(controller_port),
        PERSONALIZE_REDIS_PORT=str(redis_port),
        PERSONALIZE_STACK_DIR=str(stack_dir),
        PERSONALIZE_KAFKA_HEAP="384m",
    )
    return env


@dataclass(frozen=True)
class Stack:
    settings: Settings
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``personalize ARGS`` against this stack; output captured as text."""
        return subprocess.run(
            [*CLI, *args], env=env or self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )


def start_stack(stack_dir: Path, **extra: str) -> Stack:
    """A stack of its own on free ports; ``extra`` PERSONALIZE_* variables (credentials) added."""
    kafka, controller, redis_port = free_port(), free_port(), free_port()
    env = {**stack_env(kafka, controller, redis_port, stack_dir), **extra}
    settings = Settings.from_env(env)
    stack = Stack(settings, env)
    done = stack.cli("stack", "up", timeout=180)
    if done.returncode != 0:
        stack.cli("stack", "down", "--purge")
        raise RuntimeError(f"personalize stack up failed ({done.returncode}): {done.stderr[-2000:]}")
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """One Kafka + Redis for the whole test session, on free ports."""
    started = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield started
    finally:
        started.cli("stack", "down", "--purge")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/integration" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)
