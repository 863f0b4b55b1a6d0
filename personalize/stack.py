"""The local stack: a single-node KRaft Kafka broker and a Redis server on loopback.

``up`` starts what is not running yet (checking every port first, so a taken
port starts nothing), waits until each service answers, and writes a pid file
per service under ``stack_dir``; ``down`` stops only processes whose pid file
it wrote and whose command line names this stack's folder; ``status`` reports
each service as running, down (pid file but no process, or no answer) or
stopped (never started / stopped cleanly).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from personalize import jars, logs, topics
from personalize.credentials import jaas
from personalize.errors import MissingArtifact, PortTakenError, StackError
from personalize.settings import Settings, env_name

log = logs.get(__name__)

KAFKA = "kafka"
REDIS = "redis"
SERVICES = (REDIS, KAFKA)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # "running" | "down" | "stopped"
    pid: int | None
    address: str
    detail: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"


# ---------------------------------------------------------------- paths


def _dir(settings: Settings, service: str) -> Path:
    return settings.stack_dir / service


def _pidfile(settings: Settings, service: str) -> Path:
    return settings.stack_dir / f"{service}.pid"


def _ports(settings: Settings, service: str) -> list[tuple[int, str]]:
    if service == KAFKA:
        return [(settings.kafka_port, "kafka_port"), (settings.kafka_controller_port, "kafka_controller_port")]
    return [(settings.redis_port, "redis_port")]


def _address(settings: Settings, service: str) -> str:
    if service == KAFKA:
        return f"127.0.0.1:{settings.kafka_port}"
    return f"redis://127.0.0.1:{settings.redis_port}/0"


# ---------------------------------------------------------------- processes


def _read_pid(settings: Settings, service: str) -> int | None:
    try:
        return int(_pidfile(settings, service).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_ours(settings: Settings, service: str, pid: int) -> bool:
    """The pid is alive and works in this stack's folder for that service.

    The working folder, not the command line: redis-server rewrites its process
    title. Both services are started with their own folder as working folder.
    """
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie is not running
        return False
    return cwd == _dir(settings, service)


def _running_pid(settings: Settings, service: str) -> int | None:
    pid = _read_pid(settings, service)
    if pid is not None and _is_ours(settings, service, pid):
        return pid
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _answers_tcp(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _spawn(cmd: list[str], logfile: Path, cwd: Path) -> subprocess.Popen:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI; not killed by the terminal's Ctrl-C
        )


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:])


def _wait(what: str, ready: Callable[[], bool], proc: subprocess.Popen, logfile: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} at start; its log {logfile} ends: {_tail(logfile)}")
        if ready():
            return
        time.sleep(0.25)
    raise StackError(f"{what} did not answer within {timeout_s:.0f}s; see {logfile}: {_tail(logfile)}")


# ---------------------------------------------------------------- redis


def _redis_local(settings: Settings, **options) -> redis.Redis:
    """A client of the stack's own redis-server, with the configured password."""
    return redis.Redis(host="127.0.0.1", port=settings.redis_port, username=settings.redis_username or None,
                       password=settings.redis_password or None, **options)


def _redis_auth(settings: Settings) -> Path:
    """The server's password settings, in a file only its owner reads (not on its command line)."""
    path = _dir(settings, REDIS) / "auth.conf"
    path.touch(mode=0o600)
    path.chmod(0o600)

    def quoted(text: str) -> str:  # a redis.conf string: double quotes, backslash escapes
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    if not settings.redis_password:
        path.write_text("")
    elif settings.redis_username and settings.redis_username != "default":
        path.write_text(f"user default off\nuser {quoted(settings.redis_username)} on "
                        f"{quoted('>' + settings.redis_password)} ~* &* +@all\n")
    else:
        path.write_text(f"requirepass {quoted(settings.redis_password)}\n")
    return path


def _redis_answers(settings: Settings) -> bool:
    client = _redis_local(settings, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _start_redis(settings: Settings) -> int:
    binary = shutil.which("redis-server")
    if binary is None:
        raise MissingArtifact("redis-server is not installed: run `make setup` (installs Debian's redis-server)")
    data = _dir(settings, REDIS)
    data.mkdir(parents=True, exist_ok=True)
    logfile = data / "redis.log"
    cmd = [
        binary,
        str(_redis_auth(settings)),
        "--bind", "127.0.0.1",
        "--port", str(settings.redis_port),
        "--dir", str(data),
        "--dbfilename", "dump.rdb",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--save", "60 1",  # keep profiles across down/up; `down --purge` deletes them
        # the append-only file (fsync every second) keeps the loader's writes and its
        # offsets across a crash of Redis, not only those of the last snapshot. Redis 7
        # started with it on over a folder that has only a snapshot would start empty,
        # so such a folder starts without it and turns it on once loaded (below).
        "--appendfsync", "everysec",
        "--appendonly", "yes" if (data / "appendonlydir").is_dir() else "no",
    ]
    proc = _spawn(cmd, logfile, data)
    _wait(f"redis-server on port {settings.redis_port}", lambda: _redis_answers(settings), proc, logfile, 20)
    client = _redis_local(settings, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.config_set("appendonly", "yes")  # writes the AOF from the loaded data when it was off
    finally:
        client.close()
    return proc.pid


# ---------------------------------------------------------------- kafka


def _kafka_config(settings: Settings) -> Path:
    home = _dir(settings, KAFKA)
    home.mkdir(parents=True, exist_ok=True)
    data = home / "data"
    # the client listener: PLAINTEXT, or SASL_PLAINTEXT with the configured PLAIN user
    # (the broker's own connections use it too); the controller's stays plain on loopback
    protocol = settings.kafka_security_protocol
    if protocol not in ("PLAINTEXT", "SASL_PLAINTEXT") or (settings.kafka_sasl and settings.kafka_sasl_mechanism != "PLAIN"):
        raise StackError(
            f"the local stack's broker serves PLAINTEXT or SASL_PLAINTEXT with PLAIN, not "
            f"{protocol}{'/' + settings.kafka_sasl_mechanism if settings.kafka_sasl else ''}: point "
            "PERSONALIZE_BOOTSTRAP_SERVERS at your own broker for TLS or SCRAM")
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{settings.kafka_controller_port}",
        "listeners": f"{protocol}://127.0.0.1:{settings.kafka_port},CONTROLLER://127.0.0.1:{settings.kafka_controller_port}",
        "advertised.listeners": f"{protocol}://127.0.0.1:{settings.kafka_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": protocol,
        "listener.security.protocol.map": f"{protocol}:{protocol},CONTROLLER:PLAINTEXT",
        "log.dirs": str(data),
        "num.partitions": str(settings.partitions),
        # one node: internal topics cannot have more replicas than brokers, or
        # consumer groups and transactions hang (DESIGN.md, Kafka pitfalls)
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "min.insync.replicas": "1",
        "group.initial.rebalance.delay.ms": "0",
        # replayed logs carry 2017-2019 record timestamps: no time-based retention here
        "log.retention.ms": "-1",
        # topics are created on purpose (stack up, tests), never by a typo
        "auto.create.topics.enable": "false",
    }
    if settings.kafka_sasl:
        user, password = settings.kafka_sasl_username, settings.kafka_sasl_password
        props.update({
            "sasl.enabled.mechanisms": "PLAIN",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config":
                f'{jaas(settings, shaded=False)[:-1]} user_{user}="{password}";',
        })
    path = home / "server.properties"
    path.touch(mode=0o600)  # it may hold the password: its owner only
    path.chmod(0o600)
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (home / "log4j2.properties").write_text(
        "status = warn\n"
        "appender.file.type = File\n"
        "appender.file.name = file\n"
        f"appender.file.fileName = {home / 'server.log'}\n"
        "appender.file.layout.type = PatternLayout\n"
        "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.file.ref = file\n"
        "logger.kafka.name = kafka\n"
        "logger.kafka.level = INFO\n"
        "logger.apache.name = org.apache\n"
        "logger.apache.level = WARN\n"
    )
    return path


def _java(settings: Settings, main_class: str, *args: str, heap: str | None = None) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise MissingArtifact("java is not on PATH: Kafka and Flink need Java 17")
    classpath = ":".join(str(j) for j in jars.jars(settings, "kafka"))
    home = _dir(settings, KAFKA)
    cmd = [java]
    if heap:
        cmd += [f"-Xms{heap}", f"-Xmx{heap}"]
    cmd += [
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={home}",
        "-cp", classpath,
        main_class, *args,
    ]
    return cmd


def _cluster_id() -> str:
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _kafka_answers(settings: Settings) -> bool:
    if not _answers_tcp(settings.kafka_port):
        return False
    try:
        topics.list_topics(settings, timeout_ms=2000)
    except Exception:  # not ready yet: any client error means "ask again"
        return False
    return True


def _start_kafka(settings: Settings) -> int:
    config = _kafka_config(settings)
    home = config.parent
    if not (home / "data" / "meta.properties").is_file():
        fmt = _java(settings, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config))
        done = subprocess.run(fmt, capture_output=True, text=True, cwd=home)
        if done.returncode != 0:
            raise StackError(f"formatting Kafka storage in {home / 'data'} failed: {(done.stdout + done.stderr).strip()[-300:]}")
        log.info("kafka storage formatted", dir=str(home / "data"))
    logfile = home / "stdout.log"
    proc = _spawn(_java(settings, "kafka.Kafka", str(config), heap=settings.kafka_heap), logfile, home)
    _wait(f"Kafka broker on 127.0.0.1:{settings.kafka_port}", lambda: _kafka_answers(settings), proc, home / "server.log", 90)
    return proc.pid


# ---------------------------------------------------------------- commands


def up(settings: Settings) -> list[ServiceStatus]:
    """Start every service that is not running; return what runs where."""
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    to_start = [s for s in SERVICES if _running_pid(settings, s) is None]
    # check every port before starting anything, so a taken port starts nothing
    for service in to_start:
        for port, field in _ports(settings, service):
            if not _port_free(port):
                raise PortTakenError(
                    f"port {port} (for {service}) is already in use on 127.0.0.1: "
                    f"set {env_name(field)} to a free port"
                )
    for service in SERVICES:
        if service not in to_start:
            log.info("already running", service=service, pid=_read_pid(settings, service))
            continue
        started = time.monotonic()
        pid = _start_redis(settings) if service == REDIS else _start_kafka(settings)
        _pidfile(settings, service).write_text(f"{pid}\n")
        log.info("started", service=service, pid=pid, address=_address(settings, service),
                 seconds=round(time.monotonic() - started, 1))
    created = topics.ensure(settings, settings.topics, local_stack=True)
    if created:
        log.info("topics created", topics=created, partitions=settings.partitions)
    _write_state(settings)
    return status(settings)


def down(settings: Settings, purge: bool = False) -> list[str]:
    """Stop the services this stack started; with ``purge`` also delete their data."""
    stopped = []
    for service in reversed(SERVICES):  # kafka first: its clients may be writing to redis
        pid = _running_pid(settings, service)
        if pid is not None:
            _terminate(pid, service)
            stopped.append(service)
            log.info("stopped", service=service, pid=pid)
        _pidfile(settings, service).unlink(missing_ok=True)
    if purge:
        for service in SERVICES:
            shutil.rmtree(_dir(settings, service), ignore_errors=True)
        (settings.stack_dir / "stack.json").unlink(missing_ok=True)
        log.info("purged", dir=str(settings.stack_dir))
    return stopped


def _terminate(pid: int, service: str, timeout_s: float = 30) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    log.warning("did not stop in time, killing", service=service, pid=pid, seconds=timeout_s)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while _alive(pid):
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        # reap it if it is our child (tests start the stack in-process)
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def status(settings: Settings) -> list[ServiceStatus]:
    """What runs where: one entry per service."""
    result = []
    for service in SERVICES:
        address = _address(settings, service)
        recorded = _read_pid(settings, service)
        pid = _running_pid(settings, service)
        if recorded is None:
            result.append(ServiceStatus(service, "stopped", None, address, "not started by this stack"))
        elif pid is None:
            result.append(ServiceStatus(service, "down", recorded, address, f"process {recorded} is gone"))
        else:
            answers = _redis_answers(settings) if service == REDIS else _answers_tcp(settings.kafka_port)
            if answers:
                result.append(ServiceStatus(service, "running", pid, address))
            else:
                result.append(ServiceStatus(service, "down", pid, address, f"process {pid} runs but {address} does not answer"))
    return result


def _write_state(settings: Settings) -> None:
    state = {
        "bootstrap_servers": f"127.0.0.1:{settings.kafka_port}",
        "redis_url": _address(settings, REDIS),
        "kafka_controller": f"127.0.0.1:{settings.kafka_controller_port}",
        "pids": {s: _read_pid(settings, s) for s in SERVICES},
    }
    (settings.stack_dir / "stack.json").write_text(json.dumps(state, indent=2) + "\n")
