"""The one redaction step, and JSON lines that a CR/LF cannot split."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from broker.logging import configure_logging


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
