"""structlog set-up for collector processes: JSON lines in production, console in a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(json: bool | None = None, level: int = logging.INFO) -> None:
    """Configure structlog (and stdlib logging for aiocoap/paho) once per process.

    `json` None means: JSON unless stderr is a terminal.
    """
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
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
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiocoap logs every duplicate CON at INFO; keep libraries to warnings and above
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
