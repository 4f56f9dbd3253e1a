"""The TLS context the daemon builds from ``[amqp]`` (`broker.transport.tls`)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from broker.config import AmqpConfig
from broker.errors import ConfigError
from broker.transport.declare import _with_login
from broker.transport.tls import client_context

TLS_URL = "amqps://q2c:pw@broker.example:5671/prod"


def test_a_plain_url_has_no_context() -> None:
    assert client_context(AmqpConfig(url="amqp://guest:guest@127.0.0.1/")) is None


def test_an_amqps_url_verifies_the_broker_and_offers_tls_1_2_at_least() -> None:
    ctx = client_context(AmqpConfig(url=TLS_URL))
    assert ctx is not None
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2


def test_tls_files_with_a_plain_url_are_refused() -> None:
    cfg = AmqpConfig(url="amqp://127.0.0.1/", tls_ca_file="/etc/ssl/ca.pem")
    with pytest.raises(ConfigError, match=r"amqp\.tls-ca-file .* use an amqps://"):
        client_context(cfg)


def test_a_certificate_needs_its_key() -> None:
    cfg = AmqpConfig(url=TLS_URL, tls_cert_file="/etc/q2c/client.pem")
    with pytest.raises(ConfigError, match="go together"):
        client_context(cfg)


def test_a_missing_ca_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=f"tls-ca-file '{missing}': No such file"):
        client_context(AmqpConfig(url=TLS_URL, tls_ca_file=str(missing)))


def test_a_key_that_is_not_pem_is_named_without_its_contents(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    key = tmp_path / "client.key"
    cert.write_text("not a certificate\n")
    key.write_text("SECRET-KEY-MATERIAL\n")
    cfg = AmqpConfig(url=TLS_URL, tls_cert_file=str(cert), tls_key_file=str(key))
    with pytest.raises(ConfigError, match="not a usable PEM file") as caught:
        client_context(cfg)
    assert str(cert) in str(caught.value)
    assert "SECRET" not in str(caught.value)


@pytest.mark.parametrize(
    "cfg",
    [
        AmqpConfig(url="amqp://127.0.0.1/", auth_mechanism="external"),
        AmqpConfig(url=TLS_URL, auth_mechanism="external"),
    ],
    ids=["plain url", "no certificate"],
)
def test_the_external_login_needs_a_client_certificate_over_tls(
    cfg: AmqpConfig,
) -> None:
    with pytest.raises(ConfigError, match=r"auth-mechanism = \"external\".*amqps://"):
        client_context(cfg)


def test_the_declaring_client_is_asked_for_the_external_login() -> None:
    """aio-pika (aiormq) takes the mechanism from the URL's ``auth`` parameter."""
    url = "amqps://ops:pw@broker.example:5671/prod?heartbeat=10&auth=plain"
    assert _with_login(url, "plain") == url
    assert _with_login(url, "external") == (
        "amqps://ops:pw@broker.example:5671/prod?heartbeat=10&auth=external"
    )
