"""Prometheus metrics of the product's Python processes (prometheus-client).

``PERSONALIZE_METRICS_PORT`` (0: none) places them: the job's metrics come from Flink's own
Prometheus reporter on the first free port of ``port``..``port + 9`` (``personalize.flink``);
the Redis loader's (``sinks.redis``: records applied, lag, freshness, dead letters, triggers)
on the first free port of ``port + 10``..``port + 19`` of the process that runs it
(`personalize run`, `personalize load --follow`), on loopback. The API serves its own at
``/metrics`` (``personalize.serve``).
"""

from personalize import logs
from personalize.settings import Settings

log = logs.get(__name__)

SPAN = 10  # ports tried for each


def job_ports(settings: Settings) -> str:
    """The port range of Flink's reporter, as its ``port`` option takes it."""
    return f"{settings.metrics_port}-{settings.metrics_port + SPAN - 1}"


def start_loader_endpoint(settings: Settings) -> int | None:
    """Serve this process's metrics (the default registry) on the first free port of the
    loader's range; None when metrics are off or every port is taken (a warning: the loader
    runs on without them)."""
    from prometheus_client import start_http_server

    if not settings.metrics_port:
        return None
    first = settings.metrics_port + SPAN
    for port in range(first, first + SPAN):
        try:
            start_http_server(port, addr="127.0.0.1")
        except OSError:
            continue
        log.info("loader metrics", url=f"http://127.0.0.1:{port}/metrics")
        return port
    log.warning("no free port for the loader's metrics", ports=f"{first}-{first + SPAN - 1}")
    return None
