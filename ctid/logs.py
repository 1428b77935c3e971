"""Logging setup: structlog, JSON lines when stdout is not a terminal, pretty on a TTY.

Configured once, in :func:`configure`, by the CLI. Context is carried with
``structlog.contextvars``: the AMI client binds ``call_id`` around the dispatch of one
event, the FastAGI server binds it for the task of one session, so every log line of a
call can be grepped. Nothing binds at module level.

Secrets never reach a log line: config values are ``SecretStr`` and the AMI client
masks ``Secret:`` headers.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

Format = Literal["auto", "json", "console"]


def configure(level: str = "info", fmt: Format = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard logging module (aiohttp, sqlalchemy,
    # alembic) go through the same renderer, so stdout stays one format.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
    # Alembic narrates every migration step at INFO; ctid logs the outcome itself.
    logging.getLogger("alembic").setLevel(max(threshold, logging.WARNING))
