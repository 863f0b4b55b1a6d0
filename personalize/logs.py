"""structlog, configured once: JSON lines in CI or with PERSONALIZE_LOG_FORMAT=json,
readable console lines otherwise. Logs go to stderr; command results to stdout."""

from __future__ import annotations

import logging
import sys

import structlog

_configured: str | None = None


def configure(log_format: str = "console", level: int = logging.INFO) -> None:
    """Configure structlog (idempotent: a second call with the same format does nothing)."""
    global _configured
    if _configured == log_format:
        return
    renderer = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # py4j and kafka-python log through the standard library. kafka-python logs
    # every refused connection as an ERROR; our own errors name the address and
    # the fix instead, so its records stay below CRITICAL.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("py4j").setLevel(logging.ERROR)
    _configured = log_format


def get(name: str | None = None):
    return structlog.get_logger(name)
