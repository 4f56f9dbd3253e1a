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

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import msgspec
import structlog

__all__ = ["configure_logging", "SECRET_PARAM", "SENSITIVE_KEYS", "redact"]

#: Words whose values never reach a log line: a key is masked when it is one
#: of these or ends in one (``webhook_secret``, ``Authorization``,
#: ``order_amount``), wherever it sits in the line, nested mappings included.
#: The plural counts too (``api_tokens``, ``secrets``), and camelCase keys
#: are split into words (``clientSecret``, ``accessToken``).
SENSITIVE_KEYS = frozenset(
    {
        "password",
        "passwd",
        "secret",
        "token",
        "authorization",
        "cookie",
        "credentials",
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
#: Two-word names whose last word alone says nothing (``key``, ``id``).
_SENSITIVE_PAIRS = frozenset({"api_key", "apikey", "private_key", "secret_key"})
#: Keys the later processors read as they are (an exception's triple).
_UNTOUCHED = frozenset({"exc_info", "exception", "_record", "_from_structlog"})
#: How deep nested mappings and sequences are searched for sensitive keys.
_MAX_DEPTH = 6
#: Characters that never occur unencoded in a URL (RFC 3986), besides space.
_NOT_URL = r"\s\"<>\\^`{|}"
#: A URL's scheme and authority (user information, host, port), in any
#: string value; the authority ends at the first ``/``, ``?`` or ``#``. The
#: tail is the rest of the URL up to an ``@`` (and no ``:``), for a password
#: that holds one of those three unencoded. Linear: a scheme starts no later
#: than at a word's start, and nothing is taken back (possessive).
_URL = re.compile(
    rf"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*+://)"
    rf"(?P<authority>[^/?#{_NOT_URL}]*+)(?P<tail>[/?#][^@:{_NOT_URL}]*+@)?"
)
#: A parameter whose name ends in a word that says secret, in a URL's query
#: or a key=value DSN (``?access_token=…``, ``host=db password='…'``): its
#: value goes; ``tokenizer=`` and ``password_changed_at=`` stay. The same
#: rule as ``brokerd check-config``'s masking (`broker.cli`). Linear: nothing
#: follows the name's free part but the word, so it is taken back only once.
SECRET_PARAM = re.compile(
    r"(?i)((?:^|[?&;\s])[\w.-]*(?:password|passwd|secret|token"
    r"|(?:api|secret|private|access)[_-]?key)s?\s*+=\s*+)"
    r"('(?:[^'\\]|\\.)*+'|[^&;\s]*+)"
)
#: Where a camelCase key splits into words (``clientSecret``).
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
#: structlog's ``dict_tracebacks`` without the locals it renders by default.
_tracebacks = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)
_json = msgspec.json.Encoder(enc_hook=repr)


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask sensitive values (the one redaction choke point).

    A value goes when its key is sensitive (`SENSITIVE_KEYS`), at any depth of
    nested mappings, lists and tuples (copied, never changed in place: they
    belong to the caller). Inside any string, a URL's user information goes
    (a password, or a token in the user's place), and so does the value of
    a query or DSN parameter named like a secret (``?token=``,
    ``password=``).
    """
    for key, value in event_dict.items():
        if key in _UNTOUCHED:
            continue
        if _sensitive(key):
            event_dict[key] = "***"
        elif not isinstance(value, (int, float, bool)) and value is not None:
            event_dict[key] = _scrub(value, 1)
    return event_dict


def _sensitive(key: object) -> bool:
    return isinstance(key, str) and _sensitive_name(key)


# Bounded: nested mappings can carry keys from outside (a payload's).
@functools.lru_cache(maxsize=4096)
def _sensitive_name(key: str) -> bool:
    """Whether *key*'s last word, or its last two, name something sensitive."""
    name = _CAMEL.sub("_", key).lower().replace("-", "_")
    head, _, last = name.rpartition("_")
    previous = head.rpartition("_")[2]
    for word in (last, last[:-1]) if last.endswith("s") else (last,):
        if word in SENSITIVE_KEYS:
            return True
        if (f"{previous}_{word}" if head else word) in _SENSITIVE_PAIRS:
            return True
    return False


def _scrub(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        if "=" in value:
            value = SECRET_PARAM.sub(r"\1***", value)
        if "://" in value and "@" in value:
            return _URL.sub(_mask_user_info, value)
        return value
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {
            k: "***" if _sensitive(k) else _scrub(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrub(v, depth + 1) for v in value]
    if type(value) is tuple:
        return tuple(_scrub(v, depth + 1) for v in value)
    return value


def _mask_user_info(url: re.Match[str]) -> str:
    """A URL with its user information masked, keeping the user of ``user:pass``.

    The user information is in the authority only (before the first ``/``,
    ``?`` or ``#``), and ends at its *last* ``@``: a password may hold one
    (``amqp://q2c:p@ss@rabbit``), while an ``@`` further on is in the path
    or the query (``http://crm:8080/users/a@b.com``). An authority with no
    ``@`` but a ``:`` that starts no port (``amqp://q2c:pa/ss@rabbit``) has
    a password holding ``/``, ``?`` or ``#``: it runs to the next ``@``.
    """
    scheme, authority, tail = url["scheme"], url["authority"], url["tail"] or ""
    user_info, at, host = authority.rpartition("@")
    if not at:
        _, colon, port = authority.partition(":")
        if not tail or not colon or port.isdigit() or authority.startswith("["):
            return url[0]
        user_info, host, tail = authority + tail[:-1], "", ""
    user, colon, _ = user_info.partition(":")
    if colon:
        return f"{scheme}{user}:***@{host}{tail}"
    return f"{scheme}***@{host}{tail}"  # a token in the user's place


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
