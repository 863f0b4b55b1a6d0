"""The broker is configured for one node, and the stack knows its own processes from others'."""

from __future__ import annotations

import os
import socket

from personalize import stack
from personalize.settings import Settings


def test_single_node_broker_settings(tmp_path):
    settings = Settings.from_env({"PERSONALIZE_STACK_DIR": str(tmp_path), "PERSONALIZE_KAFKA_PORT": "19092",
                                  "PERSONALIZE_KAFKA_CONTROLLER_PORT": "19093"})
    props = dict(
        line.split("=", 1) for line in stack._kafka_config(settings).read_text().splitlines() if line
    )
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["log.retention.ms"] == "-1"
    assert props["log.dirs"].startswith(str(tmp_path.resolve()))


def test_port_check_sees_a_listening_socket():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not stack._port_free(sock.getsockname()[1])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert stack._port_free(port)


def test_a_process_outside_the_stack_folder_is_not_ours(tmp_path):
    settings = Settings.from_env({"PERSONALIZE_STACK_DIR": str(tmp_path)})
    assert not stack._is_ours(settings, "redis", os.getpid())
    assert not stack._is_ours(settings, "kafka", 2**22 + 12345)  # no such pid


def test_status_without_pid_files_says_stopped(tmp_path):
    settings = Settings.from_env({"PERSONALIZE_STACK_DIR": str(tmp_path)})
    assert [(s.name, s.state) for s in stack.status(settings)] == [("redis", "stopped"), ("kafka", "stopped")]
