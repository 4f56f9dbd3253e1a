"""The one redaction step, and JSON lines that a CR/LF cannot split."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from broker.logging import configure_logging


@pytest.fixture(autouse=True)
def stdlib_logging_restored() -> Iterator[None]:
    """configure_logging adds a handler to the root logger: taken off after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def log_buffer() -> Iterator[io.BytesIO]:
    """The daemon's JSON pipeline, writing into a buffer instead of stderr."""
    buffer = io.BytesIO()
    configure_logging("debug", "json")
    structlog.configure(logger_factory=structlog.BytesLoggerFactory(buffer))
    try:
        yield buffer
    finally:
        structlog.reset_defaults()


def test_sensitive_values_are_masked_and_a_line_stays_one_line(
    log_buffer: io.BytesIO,
) -> None:
    structlog.get_logger("probe").warning(
        "probe",
        dsn="postgresql://broker:s3cret@db/q2c",
        amount="987654.32",
        email="someone@example.com",
        memo='a\r\n{"event": "forged"}',
    )
    out = log_buffer.getvalue()
    (line,) = out.splitlines()
    record = json.loads(line)
    assert (record["dsn"], record["amount"], record["email"]) == ("***",) * 3
    assert record["memo"] == 'a\r\n{"event": "forged"}'  # escaped inside the line
    for secret in (b"s3cret", b"987654.32", b"someone@example.com"):
        assert secret not in out


#: Built at run time, so that no source line a traceback quotes contains it.
_SECRET = "-".join(("whsec", "do", "not", "log", "me"))


def _verify(header: str, secret: str) -> None:
    """Stands for any code that holds a secret in a local and then fails."""
    raise ValueError(f"cannot parse {header[:8]!r}")


def test_a_traceback_carries_no_local_variables(log_buffer: io.BytesIO) -> None:
    """A failing frame's locals (here a secret) stay out of the JSON line."""
    try:
        _verify("t=2,v1=ab", _SECRET)
    except ValueError:
        structlog.get_logger("probe").exception("handler_failed")
    out = log_buffer.getvalue()
    record = json.loads(out)
    frames = record["exception"][0]["frames"]
    assert [f["name"] for f in frames][-1] == "_verify"
    assert record["exception"][0]["exc_value"] == "cannot parse 't=2,v1=a'"
    assert _SECRET.encode() not in out


def test_console_tracebacks_carry_no_local_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("debug", "console")
    try:
        try:
            _verify("t=2,v1=ab", _SECRET)
        except ValueError:
            structlog.get_logger("probe").exception("handler_failed")
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert "cannot parse" in err
    assert _SECRET not in err


def test_a_librarys_records_are_json_lines_through_the_redaction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Libraries' records (aiohttp, asyncpg) come out as the daemon's own lines do."""
    configure_logging("info", "json")
    try:
        logging.getLogger("some.library").warning("pool %s", "resized")
        bad = ValueError("Invalid header value: 'Bearer tok_SECRET_12345\\x7f'")
        logging.getLogger("aiohttp.server").error(
            "Error handling request", exc_info=(ValueError, bad, None)
        )
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["event"], r["level"]) for r in lines] == [
        ("pool resized", "warning"),
        ("Error handling request (ValueError)", "error"),
    ]
    assert "tok_SECRET" not in repr(lines)
