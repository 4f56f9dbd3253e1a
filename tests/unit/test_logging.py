"""The one redaction step, and JSON lines that a CR/LF cannot split."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
import structlog

from broker.logging import configure_logging, redact


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


def test_sensitive_keys_are_found_by_their_last_word_and_at_any_depth(
    log_buffer: io.BytesIO,
) -> None:
    """``webhook_secret``, header names and nested mappings are masked too."""
    headers = {"Authorization": "Bearer abc.def", "X-Api-Key": "k-123", "Accept": "*/*"}
    structlog.get_logger("probe").warning(
        "probe",
        webhook_secret="whsec_1",
        order_amount="12.50",
        request={"headers": headers, "lines": [{"unit_price": "9.99", "sku": "A-1"}]},
        body_size=512,
        key="idem-1",
    )
    record = json.loads(log_buffer.getvalue())
    assert record["webhook_secret"] == record["order_amount"] == "***"
    assert record["request"] == {
        "headers": {"Authorization": "***", "X-Api-Key": "***", "Accept": "*/*"},
        "lines": [{"unit_price": "***", "sku": "A-1"}],
    }
    assert (record["body_size"], record["key"]) == (512, "idem-1")
    assert headers["Authorization"] == "Bearer abc.def"  # the caller's own, untouched


def test_a_password_inside_a_url_in_any_string_is_masked(
    log_buffer: io.BytesIO,
) -> None:
    structlog.get_logger("probe").error(
        "connect_failed",
        error="cannot reach amqp://q2c:hunter2@rabbit:5672/ (refused)",
        hosts=["postgresql://broker:pw@db/q2c", "db2"],
    )
    out = log_buffer.getvalue()
    record = json.loads(out)
    assert record["error"] == "cannot reach amqp://q2c:***@rabbit:5672/ (refused)"
    assert record["hosts"] == ["postgresql://broker:***@db/q2c", "db2"]
    assert b"hunter2" not in out
    assert b":pw@" not in out


def test_an_exception_is_still_rendered_after_redaction(log_buffer: io.BytesIO) -> None:
    try:
        _verify("t=2,v1=ab", _SECRET)
    except ValueError:
        structlog.get_logger("probe").error("failed", exc_info=True)
    record = json.loads(log_buffer.getvalue())
    assert record["exception"][0]["exc_value"] == "cannot parse 't=2,v1=a'"


def test_plural_and_camel_case_secret_keys_are_masked(log_buffer: io.BytesIO) -> None:
    """``webhook_secrets``, ``api_tokens``, ``accessToken``, ``clientSecret`` go."""
    structlog.get_logger("probe").warning(
        "probe",
        webhook_secrets=["whsec_a", "whsec_b"],
        api_tokens=("tok-a",),
        secrets={"crm": "s-1"},
        tokens=["t-1"],
        passwords=["pw-1"],
        api_keys=["k-1"],
        session={"accessToken": "at-1", "clientSecret": "cs-1", "clientId": "c-7"},
        status="ok",
        address="Main St 1",
    )
    out = log_buffer.getvalue()
    record = json.loads(out)
    for key in ("webhook_secrets", "api_tokens", "secrets", "tokens", "passwords"):
        assert record[key] == "***", key
    assert record["api_keys"] == "***"
    assert record["session"] == {
        "accessToken": "***",
        "clientSecret": "***",
        "clientId": "c-7",
    }
    assert (record["status"], record["address"]) == ("ok", "Main St 1")
    for secret in (b"whsec_", b"tok-a", b"s-1", b"t-1", b"pw-1", b"k-1", b"at-1"):
        assert secret not in out


def test_passwords_with_an_at_sign_and_secret_parameters_are_masked(
    log_buffer: io.BytesIO,
) -> None:
    """The last ``@`` ends a URL's user information; ``?token=`` and DSN values go."""
    structlog.get_logger("probe").error(
        "connect_failed",
        error="cannot reach amqp://q2c:p@ss@rabbit:5672/q2c (refused)",
        callback="POST https://hooks.example/cb?id=7&token=tk-99&access_token=at-9",
        conn="host=db port=5432 user=broker password='pw with space' sslmode=require",
        plain="host=db password=hunter2",
        github="https://ghp_t0k3n@github.com/acme/repo.git",
        path="https://crm.example/contacts/alice@example.com",
        note="a=b and c=d",
    )
    out = log_buffer.getvalue()
    record = json.loads(out)
    assert record["error"] == "cannot reach amqp://q2c:***@rabbit:5672/q2c (refused)"
    assert record["callback"] == (
        "POST https://hooks.example/cb?id=7&token=***&access_token=***"
    )
    assert record["conn"] == (
        "host=db port=5432 user=broker password=*** sslmode=require"
    )
    assert record["plain"] == "host=db password=***"
    assert record["github"] == "https://***@github.com/acme/repo.git"
    assert record["path"] == "https://crm.example/contacts/alice@example.com"
    assert record["note"] == "a=b and c=d"
    for secret in (b"p@ss", b"ss@rabbit", b"tk-99", b"at-9", b"pw with", b"hunter2"):
        assert secret not in out
    assert b"t0k3n" not in out


def test_an_at_sign_past_a_urls_authority_leaves_the_url_alone(
    log_buffer: io.BytesIO,
) -> None:
    """Only the authority holds user information: paths, queries and JSON stay."""
    lines = {
        "path": "GET http://crm:8080/api/users/jane@x.com failed",
        "query": "https://api.example.com:443/search?q=a@b.com",
        "json": '{"url":"http://crm","email":"a@b.com"}',
        "json_port": '{"url":"http://127.0.0.1:8731/erp","email":"a@b.com"}',
        "ipv6": "http://[::1]:8080/users/a@b.com",
    }
    structlog.get_logger("probe").error("call_failed", **lines)
    record = json.loads(log_buffer.getvalue())
    assert {key: record[key] for key in lines} == lines


def test_a_password_holding_a_slash_is_masked_to_its_at_sign(
    log_buffer: io.BytesIO,
) -> None:
    """An unencoded ``/`` in a password (no port after the ``:``) is masked too."""
    structlog.get_logger("probe").error(
        "connect_failed", error="amqp://q2c:pa/ss@rabbit/q2c refused"
    )
    out = log_buffer.getvalue()
    assert json.loads(out)["error"] == "amqp://q2c:***@rabbit/q2c refused"
    assert b"pa/ss" not in out


def test_a_parameter_is_masked_only_when_its_name_ends_in_a_secret_word(
    log_buffer: io.BytesIO,
) -> None:
    """``tokenizer=``, ``token_count=`` stay; ``aws_secret_access_key=`` goes."""
    structlog.get_logger("probe").info(
        "probe",
        note=(
            "tokenizer=fast token_count=5 password_changed_at=2024-01-01 "
            "secret_santa=on"
        ),
        cmd="--aws_secret_access_key=ak-1 --clientSecret=cs-1 api-keys=k-1",
    )
    out = log_buffer.getvalue()
    record = json.loads(out)
    assert record["note"] == (
        "tokenizer=fast token_count=5 password_changed_at=2024-01-01 secret_santa=on"
    )
    assert record["cmd"] == (
        "--aws_secret_access_key=*** --clientSecret=*** api-keys=***"
    )


@pytest.mark.parametrize(
    "line",
    [
        "x=1 " + "token" * 8000,
        "x://@ " + "a" * 40000,
        "http://u:p/" + "a" * 40000 + " @",
    ],
    ids=["secret-words", "scheme-letters", "url-tail"],
)
def test_redaction_of_a_long_word_takes_linear_time(line: str) -> None:
    """40 KB words that made the patterns backtrack (seconds) take milliseconds."""
    started = time.perf_counter()
    redact(None, "info", {"line": line})
    assert time.perf_counter() - started < 0.5
