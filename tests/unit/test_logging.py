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
