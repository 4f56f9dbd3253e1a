"""The TLS context for ``amqps://``: the broker verified, and our certificate for mTLS.

RELIABILITY.md §6.1: the broker's certificate is checked against the
configured CA bundle (or the system's trust store) and its name against the
URL's host; TLS 1.2 is the oldest version offered. When the broker requires
client certificates (``ssl_options.fail_if_no_peer_cert = true``), the daemon
presents ``tls-cert-file`` and ``tls-key-file``.

One context serves every connection the daemon makes to RabbitMQ: the two
wire connections, the topology declaration (aio-pika) and, when its URL is
``https://``, the management API. Building it reads files, so callers on the
event loop build it in a worker thread (`load_tls`).
"""

from __future__ import annotations

import ssl

import anyio

from broker.config import AmqpConfig
from broker.errors import ConfigError
from broker.transport.frames import parse_url

__all__ = ["client_context", "load_tls"]


def client_context(cfg: AmqpConfig) -> ssl.SSLContext | None:
    """The context for ``cfg.url``, or ``None`` for a plain ``amqp://`` URL.

    Blocking: reads the CA bundle and the certificate files.

    Raises:
        ConfigError: TLS files given for a plain URL, a certificate without its
            key (or the reverse), a file that cannot be read or parsed (the
            message names the key and the path, never the key's contents), or
            the "external" login without a client certificate to log in with.
    """
    try:
        tls = parse_url(cfg.url).tls
    except ValueError as exc:
        raise ConfigError(f"amqp.url: {exc}") from exc
    files = {
        "tls-ca-file": cfg.tls_ca_file,
        "tls-cert-file": cfg.tls_cert_file,
        "tls-key-file": cfg.tls_key_file,
    }
    if cfg.auth_mechanism == "external" and not (tls and cfg.tls_cert_file):
        raise ConfigError(
            'amqp.auth-mechanism = "external" logs in with the client '
            "certificate: it needs an amqps:// URL and amqp.tls-cert-file"
        )
    if not tls:
        given = [key for key, path in files.items() if path]
        if given:
            raise ConfigError(
                f"amqp.{given[0]} is set but amqp.url is amqp://: "
                "use an amqps:// URL to connect with TLS"
            )
        return None
    if bool(cfg.tls_cert_file) != bool(cfg.tls_key_file):
        raise ConfigError(
            "amqp.tls-cert-file and amqp.tls-key-file go together: "
            "a client certificate needs its private key"
        )
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"amqp.tls-ca-file {cfg.tls_ca_file!r}: {_reason(exc)}"
        ) from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.tls_cert_file:
        try:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"amqp.tls-cert-file {cfg.tls_cert_file!r} with amqp.tls-key-file "
                f"{cfg.tls_key_file!r}: {_reason(exc)}"
            ) from exc
    return ctx


async def load_tls(cfg: AmqpConfig) -> ssl.SSLContext | None:
    """`client_context`, built in a worker thread (it reads files)."""
    return await anyio.to_thread.run_sync(client_context, cfg)


def _reason(exc: OSError | ssl.SSLError) -> str:
    # ssl errors carry a library code ("[SSL] PEM lib (_ssl.c:3874)"); the
    # strerror of an OSError is the useful part ("No such file or directory").
    if isinstance(exc, ssl.SSLError):
        return f"not a usable PEM file ({exc.reason or exc})"
    return exc.strerror or str(exc)
