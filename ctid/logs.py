"""Logging setup: structlog, JSON lines when stdout is not a terminal, pretty on a TTY.

Configured once, in :func:`configure`, by the CLI. Context is carried with context
variables: the AMI client sets the event being dispatched (:data:`CURRENT_EVENT`, read by
:func:`add_event_call_id` only when a line is logged), the FastAGI server binds
``call_id`` with ``structlog.contextvars`` for the task of one session, so every log line
of a call can be grepped. Nothing binds at module level.

Secrets never reach a log line: config values are ``SecretStr``, and the AMI client
never logs the headers of the actions it sends.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, Literal, TextIO

import structlog
from structlog.types import EventDict, WrappedLogger

Format = Literal["auto", "json", "console"]

#: The AMI event being dispatched by ``ctid.asterisk.ami`` (set per event, reset after).
CURRENT_EVENT: ContextVar[Any] = ContextVar("ctid_current_ami_event", default=None)


def add_event_call_id(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: a line logged while an AMI event is dispatched gets its ``call_id``.

    The id is read from the event only when a line is actually logged, so the hot path
    pays one ContextVar set per event. An explicitly bound ``call_id`` wins."""
    if "call_id" not in event_dict:
        event = CURRENT_EVENT.get()
        if event is not None:
            from ctid.asterisk.ami import call_id_of

            call_id = call_id_of(event)
            if call_id:
                event_dict["call_id"] = call_id
    return event_dict


def configure(level: str = "info", fmt: Format = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_event_call_id,
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
