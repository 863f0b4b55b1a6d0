"""structlog, configured once: JSON lines in CI or with PERSONALIZE_LOG_FORMAT=json,
readable console lines otherwise. Logs go to stderr; command results to stdout."""

from __future__ import annotations

import logging
import sys

import structlog

_configured: tuple | None = None


def _scrubber(secrets: tuple[str, ...]):
    """A last processor: the rendered line with every secret replaced by ``***``."""

    def scrub(_logger, _name, line):
        for secret in secrets:
            line = line.replace(secret, "***")
        return line

    return scrub


def configure(log_format: str = "console", level: int = logging.INFO, secrets: tuple[str, ...] = ()) -> None:
    """Configure structlog (idempotent: a second call with the same arguments does nothing).
    No line carries one of ``secrets`` (the settings' passwords), whatever a caller logs."""
    global _configured
    if _configured == (log_format, secrets):
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
            _scrubber(tuple(secrets)),
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
    _configured = (log_format, secrets)


def get(name: str | None = None):
    return structlog.get_logger(name)
