"""TLS and mutual TLS to RabbitMQ (§7: 25, the TLS half).

Permissions, the other half, are in ``test_least_privilege.py``.

The test makes a CA, a server certificate for 127.0.0.1, a client
certificate, and a second, unrelated CA with a client certificate of its own
(``openssl``, in a scratch directory the broker can read). It opens a TLS
listener on the running broker (``rabbit_networking:start_ssl_listener``)
that requires a client certificate (``verify_peer`` and
``fail_if_no_peer_cert``), and closes it in a ``finally``. The plain listener
stays, because other tests use it, except in the one test that closes it.

* The daemon, given the CA and its certificate, declares its topology and
  consumes and publishes over TLS only, and the checker finds nothing lost or
  duplicated. With the broker's plain listener closed too
  (``listeners.tcp = none``, done on the running broker and undone after),
  it starts, declares and drains a backlog all the same.
* Every wrong handshake ends in a one-line error that says what is wrong:
  no client certificate, a certificate from another CA, a broker certificate
  the daemon's CA did not sign, and plain AMQP on the TLS port.
* A daemon started without its certificate says why, retries with back-off,
  and still stops at once on SIGTERM while it waits.
* A daemon set to log in by certificate (SASL EXTERNAL) does so: the broker
  names it by its certificate's subject, whatever the URL's user. Where the
  broker does not offer EXTERNAL, the connection fails saying what to turn on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from broker.config import AmqpConfig
from broker.errors import TransportUnavailable
from broker.transport.tls import client_context
from broker.transport.wire import WireConnection
from tests import services
from tests.reliability.checker import drain_state, wait_applied
from tests.reliability.faults import rabbit_env, rabbitmqctl
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@dataclass(frozen=True)
class Pki:
    """Where the test's certificates are, and the TLS listener's port."""

    root: Path
    port: int

    def path(self, name: str) -> str:
        """The file *name* in the scratch directory."""
        return str(self.root / name)


async def _openssl(*args: str, cwd: Path) -> None:
    await anyio.run_process(["openssl", *args], cwd=cwd, check=True)


async def _certificate(cwd: Path, name: str, subject: str, ca: str, ext: str) -> None:
    """A key and a certificate for *subject*, signed by *ca*."""
    await _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={subject}", cwd=cwd,
    )  # fmt: skip
    await anyio.Path(cwd / f"{name}.ext").write_text(ext)
    await _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
        "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "2",
        "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd,
    )  # fmt: skip


async def _authority(cwd: Path, name: str) -> None:
    await _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN={name}", cwd=cwd,
    )  # fmt: skip


def _readable_by_broker(root: Path) -> None:
    """The broker runs as its own user: it must read the server's files."""
    os.chmod(root, 0o755)
    for f in root.iterdir():
        os.chmod(f, 0o644)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def pki() -> AsyncIterator[Pki]:
    """The certificates, and a TLS listener requiring client certificates."""
    root = Path(tempfile.mkdtemp(prefix="q2ctls", dir="/tmp"))
    try:
        await _authority(root, "ca")
        await _authority(root, "rogue-ca")
        server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        await _certificate(root, "server", "localhost", "ca", server_ext)
        client_ext = "extendedKeyUsage=clientAuth\n"
        await _certificate(root, "client", "q2c-daemon", "ca", client_ext)
        await _certificate(root, "rogue", "q2c-daemon", "rogue-ca", client_ext)
        await anyio.to_thread.run_sync(_readable_by_broker, root)
        port = _free_port()
        options = (
            f'[{{cacertfile,"{root}/ca.pem"}},{{certfile,"{root}/server.pem"}},'
            f'{{keyfile,"{root}/server.key"}},{{verify,verify_peer}},'
            "{fail_if_no_peer_cert,true},{versions,['tlsv1.3','tlsv1.2']}]"
        )
        await rabbitmqctl(
            "eval", f"rabbit_networking:start_ssl_listener({port}, {options}, 1)."
        )
        try:
            yield Pki(root, port)
        finally:
            with anyio.CancelScope(shield=True):
                await rabbitmqctl(
                    "eval", f"rabbit_networking:stop_tcp_listener({port})."
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def amqps_url(scenario: Scenario, pki: Pki) -> str:
    """The scenario's URL (user, vhost) on the TLS listener."""
    plain = scenario.amqp_url
    assert plain.startswith("amqp://"), plain
    assert ":5672/" in plain, plain
    return plain.replace("amqp://", "amqps://", 1).replace(":5672/", f":{pki.port}/", 1)


def tls_amqp(scenario: Scenario, pki: Pki, cert: str = "client") -> dict[str, str]:
    """The daemon's ``[amqp]`` for the TLS listener, presenting *cert*."""
    return {
        "url": amqps_url(scenario, pki),
        "tls-ca-file": pki.path("ca.pem"),
        "tls-cert-file": pki.path(f"{cert}.pem"),
        "tls-key-file": pki.path(f"{cert}.key"),
    }


async def test_the_daemon_runs_over_mutual_tls(scenario: Scenario, pki: Pki) -> None:
    daemon = scenario.daemon
    name = daemon.spec.config["daemon"]["name"]
    workload = Workload.build(500)
    await daemon.start({"amqp": tls_amqp(scenario, pki)})  # declares over TLS too
    await daemon.wait_ready()
    # The producer uses the plain listener; the daemon only the TLS one.
    assert (await scenario.publish(workload.stream)).confirmed == len(workload.stream)
    columns = ("client_properties", "ssl", "port")
    listed = json.loads(
        await rabbitmqctl("list_connections", "-q", *columns, "--formatter", "json")
    )
    # client_properties come as AMQP table entries: [key, type, value].
    named = [({k: v for k, _, v in c["client_properties"]}, c) for c in listed]
    mine = {
        props["connection_name"]: (c["ssl"], c["port"])
        for props, c in named
        if name in str(props.get("connection_name"))
    }
    assert mine == {
        f"{name} publish": (True, pki.port),
        f"{name} consume": (True, pki.port),
    }, listed
    await scenario.finish(workload)


async def _handshake_error(url: str, cfg: AmqpConfig) -> str:
    tls = client_context(cfg)
    with pytest.raises(TransportUnavailable) as caught:
        await WireConnection.open(
            url, name="tls probe", heartbeat_s=10, connect_timeout_s=10, tls=tls
        )
    return str(caught.value)


async def test_wrong_handshakes_fail_with_the_reason(
    scenario: Scenario, pki: Pki
) -> None:
    url = amqps_url(scenario, pki)
    ca = pki.path("ca.pem")

    no_cert = AmqpConfig(url=url, tls_ca_file=ca)
    assert "certificate required" in await _handshake_error(url, no_cert)

    rogue = AmqpConfig(
        url=url,
        tls_ca_file=ca,
        tls_cert_file=pki.path("rogue.pem"),
        tls_key_file=pki.path("rogue.key"),
    )
    assert "unknown ca" in await _handshake_error(url, rogue)

    # The daemon trusts only the other CA: the broker is not who it says.
    wrong_ca = AmqpConfig(
        url=url,
        tls_ca_file=pki.path("rogue-ca.pem"),
        tls_cert_file=pki.path("client.pem"),
        tls_key_file=pki.path("client.key"),
    )
    assert "certificate verify failed" in await _handshake_error(url, wrong_ca)

    plain = url.replace("amqps://", "amqp://", 1)
    error = await _handshake_error(plain, AmqpConfig(url=plain))
    assert f":{pki.port}" in error

    # And the right one works, so the failures above are the handshakes'.
    good = AmqpConfig(
        url=url,
        tls_ca_file=ca,
        tls_cert_file=pki.path("client.pem"),
        tls_key_file=pki.path("client.key"),
    )
    conn = await WireConnection.open(
        url, name="tls probe", heartbeat_s=10, connect_timeout_s=10,
        tls=client_context(good),
    )  # fmt: skip
    assert conn._transport is not None
    assert isinstance(conn._transport.get_extra_info("ssl_object"), ssl.SSLObject)
    await conn.close()


async def test_a_daemon_without_its_certificate_says_why_and_backs_off(
    scenario: Scenario, pki: Pki
) -> None:
    daemon = scenario.daemon
    amqp = {"url": amqps_url(scenario, pki), "tls-ca-file": pki.path("ca.pem")}
    await daemon.start({"amqp": amqp})

    def refused(e: dict[str, object]) -> bool:
        return e["event"] == "amqp_connect_failed"

    first = await daemon.wait_log(refused, timeout_s=30)
    assert "certificate required" in str(first["error"])
    # Back-off from 0.2 s doubling to 2 s (the harness's config), for each
    # of the two connections: a handful of attempts in 4 s, not hundreds.
    before = len([e for e in await daemon.log_events() if refused(e)])
    await anyio.sleep(4.0)  # the observation window itself, not a wait
    after = len([e for e in await daemon.log_events() if refused(e)])
    assert 0 < after - before <= 12, after - before
    assert await daemon.stop() == 0, await daemon.log_tail()


@pytest.fixture
async def external_login() -> AsyncIterator[None]:
    """The broker offers SASL EXTERNAL (rabbitmq_auth_mechanism_ssl) meanwhile.

    ``auth_mechanisms`` is read for each new connection, so it is set on the
    running broker and put back afterwards; the plugin is enabled by
    ``.ci/test``. The plugin also refuses every login unless the broker's
    own ``ssl_options`` verify peers (it does not look at the listener's),
    so those are set too, and put back.
    """
    async with rabbit_env(
        {
            "auth_mechanisms": "['PLAIN', 'AMQPLAIN', 'EXTERNAL']",
            "ssl_options": "[{verify, verify_peer}, {fail_if_no_peer_cert, true}]",
        }
    ):
        yield


@pytest.mark.chaos  # changes the broker's login mechanisms for every client
async def test_the_daemon_logs_in_by_its_certificate(
    scenario: Scenario, pki: Pki, external_login: None
) -> None:
    daemon = scenario.daemon
    name = daemon.spec.config["daemon"]["name"]
    subject = services.unique_name("q2c-cert")
    client_ext = "extendedKeyUsage=clientAuth\n"
    await _certificate(pki.root, "external", subject, "ca", client_ext)
    # RabbitMQ names a certificate's user by its subject, "CN=..." here; the
    # user has no password at all, so only the certificate can log in.
    user = f"CN={subject}"
    await rabbitmqctl("add_user", user, services.unique_name("unused"))
    try:
        await rabbitmqctl("clear_password", user)
        await rabbitmqctl(
            "set_permissions", "-p", scenario.vhost, user, ".*", ".*", ".*"
        )
        workload = Workload.build(300)
        # The URL's user and password still serve the management API.
        amqp = {**tls_amqp(scenario, pki, "external"), "auth-mechanism": "external"}
        await daemon.start({"amqp": amqp})
        await daemon.wait_ready()
        assert (await scenario.publish(workload.stream)).confirmed == len(
            workload.stream
        )
        columns = ("client_properties", "user", "auth_mechanism")
        listed = json.loads(
            await rabbitmqctl("list_connections", "-q", *columns, "--formatter", "json")
        )
        mine = {
            props["connection_name"]: (c["user"], c["auth_mechanism"])
            for c in listed
            for props in [{k: v for k, _, v in c["client_properties"]}]
            if name in str(props.get("connection_name"))
        }
        assert mine == {
            f"{name} publish": (user, "EXTERNAL"),
            f"{name} consume": (user, "EXTERNAL"),
        }, listed
        await scenario.finish(workload)
    finally:
        with anyio.CancelScope(shield=True):
            await rabbitmqctl("delete_user", user)


async def test_a_broker_without_the_external_login_says_what_to_enable(
    scenario: Scenario, pki: Pki
) -> None:
    cfg = AmqpConfig(
        url=amqps_url(scenario, pki),
        tls_ca_file=pki.path("ca.pem"),
        tls_cert_file=pki.path("client.pem"),
        tls_key_file=pki.path("client.key"),
        auth_mechanism="external",
    )
    with pytest.raises(TransportUnavailable) as caught:
        await WireConnection.open(
            cfg.url, name="tls probe", heartbeat_s=10, connect_timeout_s=10,
            tls=client_context(cfg), mechanism="external",
        )  # fmt: skip
    error = str(caught.value)
    assert "by client certificate" in error
    assert "no EXTERNAL login" in error
    assert "rabbitmq_auth_mechanism_ssl" in error


@asynccontextmanager
async def plain_listeners_off() -> AsyncIterator[None]:
    """The broker's plain AMQP listeners are closed meanwhile, then reopened.

    Closing a listener leaves the connections it accepted alone; new ones
    are refused. Should a run be killed before the reopening, ``.ci/test``
    restarts the broker's app, which opens the configured listeners again.
    """
    stop = (
        "Ls = [{inet:ntoa(IP), Port} || {listener, N, amqp, _, IP, Port, _}"
        " <- rabbit_networking:active_listeners(), N =:= node()],"
        " [rabbit_networking:stop_tcp_listener(L) || L <- Ls], Ls."
    )
    closed = (await rabbitmqctl("eval", stop)).strip()
    try:
        assert closed.startswith("[{"), closed  # at least one was open
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await rabbitmqctl(
                "eval",
                f"[rabbit_networking:start_tcp_listener(L, 10) || L <- {closed}].",
            )


@pytest.mark.chaos  # closes the broker's plain listener for every client
async def test_the_daemon_needs_no_plain_listener(scenario: Scenario, pki: Pki) -> None:
    """The rest of scenario 25: plain AMQP off, TLS the only way in."""
    daemon = scenario.daemon
    workload = Workload.build(300)
    await daemon.declare()  # the test's own set-up, while the plain port is open
    assert (await scenario.publish(workload.stream)).confirmed == len(workload.stream)
    async with plain_listeners_off():
        with pytest.raises(TransportUnavailable, match="refused"):
            await WireConnection.open(
                scenario.amqp_url, name="plain probe", heartbeat_s=10,
                connect_timeout_s=5,
            )  # fmt: skip
        await daemon.start({"amqp": tls_amqp(scenario, pki)})  # TLS only
        await daemon.wait_ready()
        await wait_applied(scenario.pg_dsn, len(workload.entries), timeout_s=60)
        with anyio.fail_after(30):  # every output published, over TLS too
            while (await drain_state(scenario.pg_dsn))[1]:  # noqa: ASYNC110
                await anyio.sleep(0.1)  # bounded poll: the outbox has no event
    await scenario.finish(workload)
