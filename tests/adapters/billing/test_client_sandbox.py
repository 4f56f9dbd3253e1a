"""StripeClient against StripeSandbox over real HTTP on 127.0.0.1.

Auth, idempotency as Stripe documents it, error translation (429, 5xx, 4xx,
network) and the sandbox's knobs.
"""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest
from aiohttp import web

from adapters.billing import StripeClient, StripeSandbox, StripeSettings
from adapters.billing.client import ReplayedServerError, idempotency_key
from adapters.billing.form import FormValue
from adapters.serving import serve
from broker.config import convert_table
from broker.errors import ConfigError, UpstreamRejected, UpstreamUnavailable
from tests.adapters.billing.conftest import API_KEY

pytestmark = pytest.mark.anyio

CUSTOMER: dict[str, FormValue] = {
    "name": "Acme GmbH",
    "metadata": {"q2c_account_id": "acct-1"},
}


async def raw(
    sandbox: StripeSandbox,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    data: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One plain HTTP request, for looking at the wire itself."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"{sandbox.url}{path}", headers=headers or {}, data=data
        ) as resp,
    ):
        return resp.status, dict(resp.headers), msgspec.json.decode(await resp.read())


def settings(sandbox: StripeSandbox, **overrides: Any) -> StripeSettings:
    assert sandbox.url is not None
    return StripeSettings(
        **{"api_key": API_KEY, "base_url": sandbox.url, "timeout_s": 5, **overrides}
    )


async def state(sandbox: StripeSandbox) -> dict[str, Any]:
    _, _, body = await raw(sandbox, "GET", "/_sandbox/state")
    assert isinstance(body, dict)
    return body


# --- auth and the wire ------------------------------------------------------------


async def test_missing_api_key_is_401_with_stripes_error_body(
    sandbox: StripeSandbox,
) -> None:
    """No Authorization header: 401, Stripe's error shape, a Basic challenge."""
    status, headers, body = await raw(sandbox, "GET", "/v1/customers/cus_x")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="Stripe"'
    assert body["error"]["type"] == "invalid_request_error"
    assert "did not provide an API key" in body["error"]["message"]


async def test_a_refused_api_key_is_unavailable_and_never_echoed(
    sandbox: StripeSandbox,
) -> None:
    """A wrong key (401) is the system unavailable, not a refused command.

    During a key rotation every command would fail the same way: as a
    transient failure the breaker counts it, opens, and the commands wait
    for the right key instead of going to the dead letters. The message
    names the system and the refused key, and holds no part of the key.
    """
    key = "sk_test_wrongwrongwrong1234"
    async with StripeClient(settings(sandbox, api_key=key)) as c:
        with pytest.raises(UpstreamUnavailable) as read:
            await c.retrieve_customer("cus_x")
        with pytest.raises(UpstreamUnavailable) as write:
            await c.create_customer(idempotency_key="k", params=CUSTOMER)
    for caught in (read, write):
        message = str(caught.value)
        assert caught.value.system == "billing"
        assert message.startswith("billing unavailable:")
        assert "HTTP 401" in message
        assert "API key was refused" in message
        assert "wrongwrong" not in message
        assert "1234" not in message
    assert sandbox.counts["auth_failures"] == 2


async def _stub(status: int, error: dict[str, str]) -> tuple[web.AppRunner, str]:
    """A server that answers every request with *status* and Stripe's error body."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"error": error}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return await serve(app, "127.0.0.1", 0)


async def test_a_key_without_permission_is_unavailable_too() -> None:
    """403 (a restricted key lacking a permission) is a key problem, not a refusal."""
    message = "The provided key 'rk_test_***5678' does not have the required perms."
    runner, url = await _stub(
        403, {"type": "invalid_request_error", "message": message}
    )
    try:
        async with StripeClient(
            StripeSettings(api_key="rk_test_5678", base_url=url)
        ) as c:
            with pytest.raises(UpstreamUnavailable, match="API key was refused"):
                await c.retrieve_customer("cus_x")
    finally:
        await runner.cleanup()


async def test_a_card_error_stays_a_refusal() -> None:
    """402 is a business refusal: UpstreamRejected with Stripe's code."""
    error = {"type": "card_error", "code": "card_declined", "message": "Declined."}
    runner, url = await _stub(402, error)
    try:
        async with StripeClient(StripeSettings(api_key=API_KEY, base_url=url)) as c:
            with pytest.raises(UpstreamRejected) as caught:
                await c.pay_invoice("in_x", idempotency_key="pay")
    finally:
        await runner.cleanup()
    assert caught.value.code == "card_declined"


async def test_basic_auth_with_the_key_as_user_name_is_accepted(
    sandbox: StripeSandbox,
) -> None:
    """``-u sk_test_…:`` works as well as Bearer."""
    token = base64.b64encode(f"{API_KEY}:".encode()).decode()
    status, _, body = await raw(
        sandbox,
        "POST",
        "/v1/customers",
        headers={
            "Authorization": f"Basic {token}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        data="name=Acme",
    )
    assert status == 200
    assert body["object"] == "customer"


def test_the_sandbox_takes_test_mode_keys_only() -> None:
    """A live key cannot be configured on the sandbox."""
    with pytest.raises(ValueError, match="sk_test_"):
        StripeSandbox(api_keys=("sk_live_123",))


async def test_stripe_version_is_echoed_or_defaulted(sandbox: StripeSandbox) -> None:
    """The requested version is echoed; a malformed one is refused."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    _, headers, _ = await raw(
        sandbox,
        "GET",
        "/v1/customers/cus_x",
        headers={**auth, "Stripe-Version": "2024-06-20"},
    )
    assert headers["Stripe-Version"] == "2024-06-20"
    assert headers["Request-Id"].startswith("req_")
    status, _, body = await raw(
        sandbox, "GET", "/v1/customers/cus_x", headers={**auth, "Stripe-Version": "v2"}
    )
    assert status == 400
    assert "Invalid Stripe API version" in body["error"]["message"]


async def test_the_client_pins_its_version(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Responses come back under the version the client pinned."""
    customer = await client.create_customer(idempotency_key="v-1", params=CUSTOMER)
    status, headers, _ = await raw(
        sandbox,
        "GET",
        f"/v1/customers/{customer.id}",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert status == 200
    assert headers["Stripe-Version"] == client.settings.api_version


async def test_bodies_must_be_form_encoded(sandbox: StripeSandbox) -> None:
    """A JSON body is refused like Stripe would not read it."""
    status, _, body = await raw(
        sandbox,
        "POST",
        "/v1/customers",
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "Content-Type": "application/json",
        },
        data='{"name": "x"}',
    )
    assert status == 400
    assert "x-www-form-urlencoded" in body["error"]["message"]


async def test_unknown_urls_are_404(sandbox: StripeSandbox) -> None:
    """Stripe's 'Unrecognized request URL'."""
    status, _, body = await raw(
        sandbox, "GET", "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert status == 404
    assert "Unrecognized request URL (GET: /v1/nothing)" in body["error"]["message"]


# --- idempotency --------------------------------------------------------------------


async def test_same_key_twice_creates_one_customer(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """The second call is Stripe's stored answer, not a second customer."""
    first = await client.create_customer(idempotency_key="cus-key", params=CUSTOMER)
    second = await client.create_customer(idempotency_key="cus-key", params=CUSTOMER)
    assert first == second
    assert len(sandbox.account.customers) == 1
    assert sandbox.counts["idempotent_replays"] == 1


async def test_replays_are_marked_on_the_wire(sandbox: StripeSandbox) -> None:
    """A replay says so and names the original request."""
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Idempotency-Key": "wire-1",
    }
    _, first_headers, first = await raw(
        sandbox, "POST", "/v1/customers", headers=headers, data="name=A"
    )
    _, replay_headers, replay = await raw(
        sandbox, "POST", "/v1/customers", headers=headers, data="name=A"
    )
    assert replay == first
    assert replay_headers["Idempotent-Replayed"] == "true"
    assert replay_headers["Original-Request"] == first_headers["Request-Id"]
    assert "Idempotent-Replayed" not in first_headers


async def test_parameter_order_does_not_make_a_request_different(
    sandbox: StripeSandbox,
) -> None:
    """Same parameters in another order are the same request."""
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Idempotency-Key": "order-1",
    }
    await raw(
        sandbox, "POST", "/v1/customers", headers=headers, data="name=A&email=a@x"
    )
    status, _, _ = await raw(
        sandbox, "POST", "/v1/customers", headers=headers, data="email=a@x&name=A"
    )
    assert status == 200
    assert len(sandbox.account.customers) == 1


async def test_same_key_with_other_parameters_is_an_idempotency_error(
    client: StripeClient,
) -> None:
    """Reusing a key for a different request is refused, not executed."""
    await client.create_customer(idempotency_key="k", params=CUSTOMER)
    with pytest.raises(UpstreamRejected, match="same parameters") as caught:
        await client.create_customer(idempotency_key="k", params={"name": "Other"})
    assert caught.value.code == "idempotency_error"


async def test_keys_are_scoped_to_the_endpoint_too(client: StripeClient) -> None:
    """One key on two endpoints is two different requests: an error."""
    await client.create_customer(idempotency_key="shared", params={"name": "A"})
    with pytest.raises(UpstreamRejected) as caught:
        await client.create_product(idempotency_key="shared", params={"name": "A"})
    assert caught.value.code == "idempotency_error"


async def test_validation_failures_are_not_stored(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """A request refused before executing can be fixed and retried on its key."""
    with pytest.raises(UpstreamRejected) as caught:
        await client.create_product(idempotency_key="p-1", params={})
    assert caught.value.code == "parameter_missing"
    product = await client.create_product(idempotency_key="p-1", params={"name": "A"})
    assert sandbox.account.products == {product.id: product}


async def test_an_execution_error_is_stored_and_replayed(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """A 500 raised while executing is replayed on that key, even once healthy.

    The replay is a `ReplayedServerError` (still transient), so a caller can
    tell that retrying this key cannot cure it; the first 500 is not.
    """
    sandbox.knobs.execution_error_rate = 1.0
    with pytest.raises(UpstreamUnavailable, match="HTTP 500") as first:
        await client.create_customer(idempotency_key="doomed", params=CUSTOMER)
    assert not isinstance(first.value, ReplayedServerError)
    sandbox.knobs.execution_error_rate = 0.0
    with pytest.raises(ReplayedServerError, match="replayed") as caught:
        await client.create_customer(idempotency_key="doomed", params=CUSTOMER)
    assert isinstance(caught.value, UpstreamUnavailable)
    assert caught.value.retry_after_s is None
    assert sandbox.account.customers == {}
    fresh = await client.create_customer(idempotency_key="fresh", params=CUSTOMER)
    assert list(sandbox.account.customers) == [fresh.id]


async def test_a_key_still_executing_is_409_and_transient(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """A concurrent retry of a running request waits its turn (retry later)."""
    sandbox.knobs.latency_s = 0.5
    outcomes: list[object] = []

    async def attempt() -> None:
        try:
            outcomes.append(
                await client.create_customer(idempotency_key="busy", params=CUSTOMER)
            )
        except UpstreamUnavailable as exc:
            outcomes.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            # Check-and-claim of a key has no await in between, so whichever
            # request claims it first makes the other one meet a 409.
            tg.start_soon(attempt)
            tg.start_soon(attempt)
    failures = [o for o in outcomes if isinstance(o, UpstreamUnavailable)]
    assert len(failures) == 1
    assert "idempotency_key_in_use" in str(failures[0])
    assert len(sandbox.account.customers) == 1


async def test_keys_longer_than_255_characters_are_hashed_by_the_client(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """The client keeps keys within Stripe's limit, deterministically."""
    long_key = "deal-1:" + "x" * 400
    first = await client.create_customer(idempotency_key=long_key, params=CUSTOMER)
    again = await client.create_customer(idempotency_key=long_key, params=CUSTOMER)
    assert first == again
    assert len(idempotency_key(long_key)) == 255
    assert idempotency_key(long_key) != idempotency_key(long_key + "y")


async def test_the_sandbox_refuses_keys_over_255_characters(
    sandbox: StripeSandbox,
) -> None:
    """Stripe's limit is enforced on the wire."""
    status, _, body = await raw(
        sandbox,
        "POST",
        "/v1/customers",
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Idempotency-Key": "k" * 256,
        },
        data="name=A",
    )
    assert status == 400
    assert "at most 255" in body["error"]["message"]


async def test_every_post_needs_a_key(client: StripeClient) -> None:
    """The client refuses to POST without an idempotency key."""
    with pytest.raises(ValueError, match="idempotency key"):
        await client.create_customer(idempotency_key="", params=CUSTOMER)


# --- errors and knobs ---------------------------------------------------------------


async def test_rate_limit_is_429_with_retry_after(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Beyond the rate knob: UpstreamUnavailable carrying Retry-After."""
    sandbox.knobs.rate_limit_per_s = 1
    await client.create_customer(idempotency_key="r-1", params=CUSTOMER)
    with pytest.raises(UpstreamUnavailable, match="HTTP 429 rate_limit") as caught:
        await client.create_customer(idempotency_key="r-2", params=CUSTOMER)
    assert caught.value.retry_after_s == 1.0
    assert sandbox.counts["rate_limited"] == 1


async def test_injected_5xx_is_unavailable_and_not_stored(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Faults before execution: retry on the same key succeeds, once."""
    sandbox.knobs.error_rate = 1.0
    with pytest.raises(UpstreamUnavailable, match=r"HTTP 50[03] api_error"):
        await client.create_customer(idempotency_key="e-1", params=CUSTOMER)
    sandbox.knobs.error_rate = 0.0
    await client.create_customer(idempotency_key="e-1", params=CUSTOMER)
    await client.create_customer(idempotency_key="e-1", params=CUSTOMER)
    assert len(sandbox.account.customers) == 1


async def test_error_rate_is_a_seeded_fraction(sandbox: StripeSandbox) -> None:
    """About the configured fraction of writes fail, reproducibly per seed."""

    async def failures(seed: int) -> int:
        sb = StripeSandbox(api_keys=(API_KEY,), seed=seed)
        sb.knobs.error_rate = 0.3
        await sb.start()
        try:
            async with StripeClient(settings(sb)) as c:
                failed = 0
                for i in range(60):
                    try:
                        await c.create_customer(idempotency_key=f"f{i}", params={})
                    except UpstreamUnavailable:
                        failed += 1
                return failed
        finally:
            await sb.aclose()

    first, again = await failures(7), await failures(7)
    assert first == again
    assert 5 <= first <= 35


async def test_business_refusals_carry_stripes_code(client: StripeClient) -> None:
    """A 4xx is UpstreamRejected with ``error.code`` and the param named."""
    with pytest.raises(UpstreamRejected, match=r"param customer") as caught:
        await client.create_subscription(
            idempotency_key="s-1",
            params={"customer": "cus_missing", "items": [{"price": "price_x"}]},
        )
    assert caught.value.code == "resource_missing"


async def test_unknown_parameters_are_refused(client: StripeClient) -> None:
    """``parameter_unknown``, as Stripe answers."""
    with pytest.raises(UpstreamRejected) as caught:
        await client.create_customer(idempotency_key="u", params={"nmae": "typo"})
    assert caught.value.code == "parameter_unknown"


async def test_outage_knob_over_http(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """``POST /_sandbox/knobs`` turns the outage on and off."""
    status, _, knobs = await raw(
        sandbox, "POST", "/_sandbox/knobs", data='{"outage": true}'
    )
    assert status == 200
    assert knobs["outage"] is True
    with pytest.raises(UpstreamUnavailable, match="HTTP 503"):
        await client.retrieve_customer("cus_x")
    await raw(sandbox, "POST", "/_sandbox/knobs", data='{"outage": false}')
    with pytest.raises(UpstreamRejected, match="resource_missing"):
        await client.retrieve_customer("cus_x")
    assert (await state(sandbox))["counts"]["outage_refusals"] == 1


async def test_knobs_refuse_unknown_and_out_of_range_values(
    sandbox: StripeSandbox,
) -> None:
    """A typo or an impossible rate changes nothing."""
    for body in ('{"outgae": true}', '{"error_rate": 2}', "not json"):
        status, _, answer = await raw(sandbox, "POST", "/_sandbox/knobs", data=body)
        assert status == 400, body
        assert "error" in answer
    assert sandbox.knobs.error_rate == 0.0


async def test_connection_refused_is_unavailable(sandbox: StripeSandbox) -> None:
    """A closed port is a transient failure, not an aiohttp exception."""
    url = sandbox.url
    await sandbox.aclose()
    assert url is not None
    async with StripeClient(StripeSettings(api_key=API_KEY, base_url=url)) as c:
        with pytest.raises(UpstreamUnavailable, match="ClientConnectorError"):
            await c.retrieve_customer("cus_x")


async def test_a_slow_answer_times_out_as_unavailable(sandbox: StripeSandbox) -> None:
    """The per-request timeout turns a hang into UpstreamUnavailable."""
    sandbox.knobs.latency_s = 5
    async with StripeClient(settings(sandbox, timeout_s=0.2)) as c:
        with pytest.raises(UpstreamUnavailable, match="TimeoutError"):
            await c.retrieve_customer("cus_x")


async def test_state_reports_objects_and_counts(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """``GET /_sandbox/state`` is the demo's scoreboard."""
    await client.create_customer(idempotency_key="s", params=CUSTOMER)
    await client.create_customer(idempotency_key="s", params=CUSTOMER)
    report = await state(sandbox)
    assert report["objects"]["customers"] == 1
    assert report["objects"]["idempotency_keys"] == 1
    assert report["counts"]["idempotent_replays"] == 1
    assert report["counts"]["writes_executed"] == 1


def test_settings_come_from_the_systems_table() -> None:
    """Kebab-case keys, strings from the environment; unknown keys refused."""
    table = {
        "api-key": "sk_test_abc",
        "base-url": "http://127.0.0.1:1",
        "timeout-s": "2.5",
        "webhook-secrets": ["whsec_new", "whsec_old"],
        "rate-per-s": 5,
    }
    where = "[systems.billing]"
    mine = {k: v for k, v in table.items() if k != "rate-per-s"}
    s = convert_table(StripeSettings, mine, where=where)
    assert (s.timeout_s, s.webhook_secrets) == (2.5, ("whsec_new", "whsec_old"))
    with pytest.raises(ConfigError, match=r"systems\.billing.*rate-per-s"):
        convert_table(StripeSettings, table, where=where)
    with pytest.raises(ConfigError, match="api-key"):
        convert_table(StripeSettings, {}, where=where)


def test_settings_never_show_their_secrets() -> None:
    """The API key and webhook secrets stay out of reprs (and so of logs)."""
    s = StripeSettings(api_key="sk_test_topsecret", webhook_secrets=("whsec_hidden",))
    assert "topsecret" not in repr(s)
    assert "hidden" not in repr(s)
