"""structlog set-up: JSON lines when not on a TTY, a console renderer when on one.

Configured once, at start-up. The runtime binds ``correlation_id``,
``message_id`` and ``actor`` through contextvars; every line carries them.
A single redaction step masks known sensitive fields (secrets, personal
data, commercial amounts) whatever logged them, and CR/LF in strings cannot
split a JSON line. Tracebacks carry frames and messages, never the frames'
local variables: a secret held in a local (a webhook secret, a password
being parsed) would otherwise reach the log whenever its frame raised.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import msgspec
import structlog

__all__ = ["configure_logging", "SENSITIVE_KEYS", "redact"]

#: Keys whose values never reach a log line.
SENSITIVE_KEYS = frozenset(
    {
        "password",
        "secret",
        "token",
        "authorization",
        "signature",
        "dsn",
        "url",
        "amount",
        "price",
        "balance",
        "discount",
        "email",
        "phone",
        "iban",
        "body",
    }
)

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
#: structlog's ``dict_tracebacks`` without the locals it renders by default.
_tracebacks = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)
_json = msgspec.json.Encoder(enc_hook=repr)


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask the values of `SENSITIVE_KEYS` (the one redaction choke point)."""
    for key in event_dict.keys() & SENSITIVE_KEYS:
        event_dict[key] = "***"
    return event_dict


def configure_logging(
    level: Literal["debug", "info", "warning", "error"] = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
) -> None:
    """Configure structlog (and the stdlib root logger for libraries) once."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    if as_json:
        processors = [
            *shared,
            _tracebacks,
            structlog.processors.JSONRenderer(
                serializer=lambda obj, **_: _json.encode(obj)
            ),
        ]
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        # Plain tracebacks: with rich installed, the default shows locals.
        processors = [
            *shared,
            structlog.dev.ConsoleRenderer(
                exception_formatter=structlog.dev.plain_traceback
            ),
        ]
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _route_libraries(shared[1:], processors[-1], as_json, level)


def _route_libraries(
    pre_chain: list[Any], renderer: Any, as_json: bool, level: str
) -> None:
    """Libraries' stdlib log records: the same lines, redaction and all.

    A library's own line is one JSON object like the daemon's (or a console
    line), through the same redaction step. aiohttp's server logs a request
    it could not parse with the parser's error, which quotes the offending
    header (an Authorization value, say): its message keeps the error's type
    only.
    """
    global _library_handler
    render = renderer
    if as_json:
        render = structlog.processors.JSONRenderer(
            serializer=lambda obj, **_: _json.encode(obj).decode()
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([_tracebacks] if as_json else []),
            render,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _library_handler is not None:
        root.removeHandler(_library_handler)
    root.addHandler(handler)
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    _library_handler = handler
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _RequestDetailFilter) for f in server.filters):
        server.addFilter(_RequestDetailFilter())


_library_handler: logging.Handler | None = None


class _RequestDetailFilter(logging.Filter):
    """Keep only the error's type of what aiohttp's server says of a bad request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = type(record.exc_info[1]).__name__
            record.msg = f"{record.getMessage()} ({error})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True
