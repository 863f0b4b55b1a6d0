"""A standalone Flink cluster from the PyFlink distribution in the venv, and job
submission to a running cluster.

``personalize cluster up`` writes a ``config.yaml`` of its own under the stack folder
(``FLINK_CONF_DIR``; logs and pid files there too, never in site-packages) and starts
one JobManager and one TaskManager with ``pyflink/bin/start-cluster.sh``.
``personalize submit`` runs ``pyflink/bin/flink run -d -py jobs/profile.py`` against
``flink_address`` with the venv's Python for the job's Python functions; the job
file reads the same PERSONALIZE_* settings as the embedded run, so the code is the
same. ``personalize stop --savepoint`` stops a job through the REST API.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from personalize import logs
from personalize.flink import tasks_starting
from personalize.errors import PersonalizeError, ServiceUnavailable
from personalize.settings import Settings, project_root

log = logs.get(__name__)

JOB_NAME = "personalize"
PACKAGES = ("personalize", "jobs", "operators", "schemas", "sinks")


def flink_home() -> Path:
    import pyflink

    return Path(pyflink.__file__).resolve().parent


def cluster_dir(settings: Settings) -> Path:
    return settings.stack_dir / "flink-cluster"


def _set(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def configuration(settings: Settings, host: str = "127.0.0.1", bind: str = "127.0.0.1") -> dict:
    """The cluster's config.yaml: the distribution's defaults (JVM options) plus ours.

    ``host`` is where TaskManagers and clients reach the JobManager, ``bind`` the
    interface every process listens on (loopback here; 0.0.0.0 in containers)."""
    import yaml

    tree = yaml.safe_load((flink_home() / "conf" / "config.yaml").read_text()) or {}
    state = settings.state_dir / "cluster"
    local = {"taskmanager.host": host} if bind != "0.0.0.0" else {}
    if not local:  # in a container each TaskManager announces its own address, not the default localhost
        tree.get("taskmanager", {}).pop("host", None)
    for key, value in {
        **local,
        "jobmanager.bind-host": bind,
        "jobmanager.rpc.address": host,
        "jobmanager.rpc.port": settings.flink_rpc_port,
        "jobmanager.memory.process.size": "1024m",
        "taskmanager.bind-host": bind,
        "taskmanager.numberOfTaskSlots": settings.cluster_slots,
        "taskmanager.memory.process.size": "2048m",
        "rest.address": host,
        "rest.bind-address": bind,
        "rest.port": settings.flink_rest_port,
        "parallelism.default": settings.parallelism,
        "pipeline.max-parallelism": settings.max_parallelism,
        "execution.checkpointing.dir": (state / "checkpoints").as_uri(),
        "execution.checkpointing.savepoint-dir": (state / "savepoints").as_uri(),
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
    }.items():
        _set(tree, key, value)
    if settings.metrics_port:  # Flink's Prometheus reporter, from the distribution's plugins folder
        from personalize.metrics import job_ports

        _set(tree, "metrics.reporter.prom.factory.class", "org.apache.flink.metrics.prometheus.PrometheusReporterFactory")
        _set(tree, "metrics.reporter.prom.port", job_ports(settings))
    return tree


def _lib(settings: Settings) -> Path:
    """The cluster's lib folder: the distribution's jars plus flink-python from opt/
    (a JobManager without it cannot read a job with Python operators), as symlinks."""
    lib = cluster_dir(settings) / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    wanted = {j.name: j for j in (flink_home() / "lib").glob("*.jar")}
    wanted.update({j.name: j for j in (flink_home() / "opt").glob("flink-python-*.jar")})
    for link in lib.glob("*.jar"):
        if link.name not in wanted:
            link.unlink()
    for name, target in wanted.items():
        link = lib / name
        if not link.exists():
            link.symlink_to(target)
    return lib


def _env(settings: Settings) -> dict[str, str]:
    base = cluster_dir(settings)
    python_bin = os.path.dirname(sys.executable)
    return {
        **os.environ,
        "FLINK_HOME": str(flink_home()),
        "FLINK_LIB_DIR": str(base / "lib"),
        "FLINK_CONF_DIR": str(base / "conf"),
        "FLINK_LOG_DIR": str(base / "log"),
        "FLINK_PID_DIR": str(base / "run"),
        "PATH": python_bin + os.pathsep + os.environ.get("PATH", ""),
    }


def _write_conf(settings: Settings, conf: Path | None = None, host: str = "127.0.0.1",
                bind: str = "127.0.0.1") -> None:
    import yaml

    conf = conf or cluster_dir(settings) / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    for name in ("log4j.properties", "log4j-console.properties", "log4j-cli.properties",
                 "log4j-session.properties", "logback.xml", "logback-console.xml"):
        source = flink_home() / "conf" / name
        if source.exists():
            shutil.copyfile(source, conf / name)
    (conf / "config.yaml").write_text(yaml.safe_dump(configuration(settings, host, bind), sort_keys=True))
    (conf / "masters").write_text(f"localhost:{settings.flink_rest_port}\n")
    (conf / "workers").write_text("localhost\n")


def rest(settings: Settings, path: str, body: dict | None = None, timeout: float = 10, method: str | None = None):
    """One call to the cluster's REST API; ServiceUnavailable naming the address when nobody answers."""
    url = f"http://{settings.flink_address}{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise PersonalizeError(f"the Flink cluster at {settings.flink_address} refused {path}: "
                               f"HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}".rstrip(": ")
        raise ServiceUnavailable(
            f"no Flink cluster answers at http://{settings.flink_address} ({reason}): start one with "
            "`personalize cluster up` or set PERSONALIZE_FLINK_ADDRESS"
        ) from None


@dataclass
class ClusterStatus:
    address: str
    running: bool
    taskmanagers: int = 0
    slots_total: int = 0
    slots_available: int = 0
    jobs_running: int = 0
    reason: str = ""

    def describe(self) -> str:
        if not self.running:
            return f"flink  down     {self.address}  ({self.reason})"
        return (f"flink  running  web UI http://{self.address}  taskmanagers {self.taskmanagers}  "
                f"slots {self.slots_available}/{self.slots_total} free  jobs running {self.jobs_running}")


def status(settings: Settings) -> ClusterStatus:
    try:
        overview = rest(settings, "/overview", timeout=5)
    except ServiceUnavailable as exc:
        return ClusterStatus(settings.flink_address, False, reason=str(exc).split(" (", 1)[-1].split(")")[0])
    return ClusterStatus(settings.flink_address, True, overview["taskmanagers"], overview["slots-total"],
                         overview["slots-available"], overview["jobs-running"])


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def up(settings: Settings, timeout_s: float = 120) -> ClusterStatus:
    """Start the cluster (or find it running) and wait until its TaskManager's slots are registered."""
    current = status(settings)
    if current.running:
        if current.taskmanagers == 0:  # the JobManager lost its TaskManager (it died): start another
            start_taskmanager(settings)
            return _wait_for_slots(settings, timeout_s)
        return current
    for name, port in (("PERSONALIZE_FLINK_REST_PORT", settings.flink_rest_port),
                       ("PERSONALIZE_FLINK_RPC_PORT", settings.flink_rpc_port)):
        if _port_taken(port):
            raise PersonalizeError(f"port {port} on 127.0.0.1 is taken by another process: "
                                   f"free it or set {name}")
    _write_conf(settings)
    _lib(settings)
    for name in ("log", "run"):
        (cluster_dir(settings) / name).mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["bash", str(flink_home() / "bin" / "start-cluster.sh")], env=_env(settings),
                          capture_output=True, text=True, cwd=project_root())
    if done.returncode != 0:
        raise PersonalizeError(f"start-cluster.sh failed ({done.returncode}): {done.stderr.strip()[-300:]}; "
                               f"logs in {cluster_dir(settings) / 'log'}")
    return _wait_for_slots(settings, timeout_s)


def _wait_for_slots(settings: Settings, timeout_s: float) -> ClusterStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = status(settings)
        if current.running and current.slots_total >= settings.cluster_slots:
            return current
        time.sleep(1)
    raise ServiceUnavailable(f"the Flink cluster did not come up at {settings.flink_address} in {timeout_s:.0f}s; "
                             f"logs in {cluster_dir(settings) / 'log'}")


def start_taskmanager(settings: Settings) -> None:
    """One more TaskManager for the running cluster (after one died: the job restarts on
    its slots from its newest checkpoint)."""
    done = subprocess.run(["bash", str(flink_home() / "bin" / "taskmanager.sh"), "start"], env=_env(settings),
                          capture_output=True, text=True, cwd=project_root())
    if done.returncode != 0:
        raise PersonalizeError(f"taskmanager.sh failed ({done.returncode}): {done.stderr.strip()[-300:]}; "
                               f"logs in {cluster_dir(settings) / 'log'}")


def taskmanager_pids(settings: Settings) -> list[int]:
    """The TaskManagers the scripts started (their pid file; a dead one's pid may stay listed)."""
    return [int(p) for f in (cluster_dir(settings) / "run").glob("*taskexecutor*.pid")
            for p in f.read_text().split()]


def down(settings: Settings) -> None:
    """Stop what ``up`` started (the scripts' pid files under the stack folder)."""
    if not (cluster_dir(settings) / "conf" / "config.yaml").exists():
        return
    env = _env(settings)
    bin_dir = flink_home() / "bin"
    for script, args in (("taskmanager.sh", ["stop-all"]), ("jobmanager.sh", ["stop-all"])):
        subprocess.run(["bash", str(bin_dir / script), *args], env=env, capture_output=True, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and status(settings).running:
        time.sleep(0.5)


def jobs(settings: Settings) -> list[dict]:
    return rest(settings, "/jobs/overview")["jobs"]


def running_job(settings: Settings) -> str:
    """The id of the one running job named ``personalize``."""
    running = [j for j in jobs(settings) if j["state"] in ("RUNNING", "CREATED", "INITIALIZING")
               and j["name"] == JOB_NAME]
    if not running:
        raise PersonalizeError(f"no running {JOB_NAME!r} job on the cluster at {settings.flink_address}")
    if len(running) > 1:
        ids = ", ".join(j["jid"] for j in running)
        raise PersonalizeError(f"several {JOB_NAME!r} jobs run at {settings.flink_address} ({ids}): name one")
    return running[0]["jid"]


def _last_cause(text: str) -> str:
    causes = [line.split("Caused by:", 1)[1].strip() for line in text.splitlines() if "Caused by:" in line]
    if causes:
        return causes[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def submit(settings: Settings, from_savepoint: str | None = None, parallelism: int | None = None,
           timeout_s: float = 300) -> str:
    """Submit the unbounded job with ``flink run -py``; return the job id once it runs."""
    from personalize import jars

    rest(settings, "/overview", timeout=5)  # a wrong address or a stopped cluster: one line naming it
    from personalize.run import ensure_topics

    ensure_topics(settings)
    root = project_root()
    command = [
        "bash", str(flink_home() / "bin" / "flink"), "run", "--detached",
        "--jobmanager", settings.flink_address,
        "--python", str(root / "jobs" / "profile.py"),
        "--pyExecutable", sys.executable,
        "--pyClientExecutable", sys.executable,
        # the project's packages go with the job (a TaskManager elsewhere has only the pinned libraries)
        "--pyFiles", ",".join(str(root / p) for p in PACKAGES),
    ]
    for jar in jars.job_jars(settings):
        command += ["--jarfile", str(jar)]
    if parallelism:
        command += ["--parallelism", str(parallelism)]
    if from_savepoint:
        command += ["--fromSavepoint", from_savepoint]
    command += ["--no-wait"]  # the job file's own flag: return once submitted
    env = _env(settings)
    # the job file reads these like any PERSONALIZE_* setting
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    if parallelism:
        env["PERSONALIZE_PARALLELISM"] = str(parallelism)
    if not (cluster_dir(settings) / "conf" / "config.yaml").exists():
        env.pop("FLINK_CONF_DIR")  # a cluster started elsewhere: the distribution's client defaults
    log.info("submitting", address=settings.flink_address, parallelism=parallelism or settings.parallelism,
             from_savepoint=from_savepoint)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=root)
    except subprocess.TimeoutExpired:
        raise PersonalizeError(f"flink run did not return in {timeout_s:.0f}s (cluster at {settings.flink_address})") \
            from None
    found = re.search(r"JobID ([0-9a-f]{32})", done.stdout + done.stderr)
    if done.returncode != 0 or not found:
        raise PersonalizeError(f"flink run against {settings.flink_address} failed: "
                               f"{_last_cause(done.stdout + done.stderr)}")
    job_id = found.group(1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = rest(settings, f"/jobs/{job_id}")["state"]
        if state == "RUNNING":
            return job_id
        if state in ("FAILED", "CANCELED", "FINISHED"):
            raise PersonalizeError(f"job {job_id} ended at once: {state}; see http://{settings.flink_address}")
        time.sleep(1)
    return job_id


def stop_with_savepoint(settings: Settings, job_id: str | None = None, timeout_s: float = 300) -> str:
    """Stop a job with a canonical savepoint through the REST API; return the savepoint path."""
    job_id = job_id or running_job(settings)
    target = (settings.state_dir / "cluster" / "savepoints").as_uri()
    body = {"targetDirectory": target, "drain": False, "formatType": "CANONICAL"}
    trigger = rest(settings, f"/jobs/{job_id}/stop", body)["request-id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = rest(settings, f"/jobs/{job_id}/savepoints/{trigger}")
        if answer["status"]["id"] == "COMPLETED":
            operation = answer.get("operation") or {}
            if "failure-cause" in operation:
                cause = operation["failure-cause"].get("stack-trace", "")
                if tasks_starting(cause):  # a stop right after the submission: again, once they run
                    trigger = rest(settings, f"/jobs/{job_id}/stop", body)["request-id"]
                    time.sleep(1)
                    continue
                raise PersonalizeError(f"the savepoint of job {job_id} failed: {_last_cause(cause)}")
            return operation["location"].removeprefix("file:")
        time.sleep(1)
    raise PersonalizeError(f"the savepoint of job {job_id} did not complete in {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    """``python -m personalize.cluster write-conf DIR --host H --bind B``: the container entry point's config."""
    import argparse

    parser = argparse.ArgumentParser(prog="personalize.cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("write-conf", help="write config.yaml (and log4j files) for a JobManager/TaskManager")
    p.add_argument("conf_dir", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="the JobManager's address as others reach it")
    p.add_argument("--bind", default="127.0.0.1", help="the interface to listen on (0.0.0.0 in a container)")
    args = parser.parse_args(argv)
    _write_conf(Settings.from_env(), args.conf_dir, args.host, args.bind)
    print(f"wrote {args.conf_dir / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
