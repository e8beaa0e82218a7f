"""The relay (issue 4 item 5; SECURITY.md T2, T3, P18/P19): card data leaves the vault only
through it, only to allowlisted TLS destinations (or explicitly configured local test processors),
the answer comes back without card data, and every use is audited without card data."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from tests.factories import card_payment_method, create_intent

from strongroom.errors import ResourceMissing
from strongroom.payments.tables import payment_methods
from strongroom.sensitive import Secret
from strongroom.vault.relay import Allowlist, CardFacts, Relay, RelayCall, RelayFailed, RelayRefused
from strongroom.vault.relay_tables import vault_relay_audit
from strongroom.vault.templates import CardValue, Encoding, RequestTemplate, TemplateRegistry

AMEX = "378282246310005"
AMEX_CVC = "4242"
PROCESSOR = "https://processor.example:443"

Scope = MutableMapping[str, Any]


class EchoProcessor:
    """A processor stand-in that records what it received and echoes it back (as a careless
    processor might), reached through an in-process transport."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.received: list[dict[str, Any]] = []
        self.delay_s = delay_s

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        message = await receive()
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.received.append({"path": scope["path"], "body": message.get("body", b"").decode(), "headers": headers})
        await asyncio.sleep(self.delay_s)
        received = orjson.loads(message.get("body", b"{}"))
        body = orjson.dumps({"echo": message.get("body", b"").decode(), "status": "approved", "amount": 4242})
        echo = [(b"x-card", str(received.get("pan", "")).encode())]  # a processor echoing the PAN in a header
        await send({"type": "http.response.start", "status": 201, "headers": echo})
        await send({"type": "http.response.body", "body": body})


async def _token(api: httpx.AsyncClient, services: Any, merchant_id: str, **card: Any) -> str:
    pm = await card_payment_method(api, number=AMEX, cvc=AMEX_CVC, **card)
    async with services.db.read() as conn:
        query = sa.select(payment_methods.c.vault_token).where(
            payment_methods.c.merchant_id == merchant_id, payment_methods.c.id == pm["id"]
        )
        token: str = (await conn.execute(query)).scalar_one()
    return token


# A processor's card-bearing call as the vault owns it.
_CHARGE = RequestTemplate(
    id="test.charge",
    connector="test",
    method="POST",
    path="/v1/charges",
    encoding=Encoding.JSON,
    card_fields={
        "pan": CardValue.NUMBER,
        "cvc": CardValue.CVC,
        "exp.month": CardValue.EXP_MONTH,
        "exp.year": CardValue.EXP_YEAR,
    },
    value_fields=frozenset({"amount"}),
    endpoints=(PROCESSOR,),
)
_TEMPLATE = RelayCall(_CHARGE.id, {"amount": 1000})


def _relay(services: Any, processor: EchoProcessor, *, timeout_s: float = 5.0, endpoints: Any = None) -> Relay:
    return Relay(
        services.payments.vault,
        services.db,
        Allowlist([PROCESSOR]),
        timeout_s=timeout_s,
        local_apps={PROCESSOR: processor},
        templates=TemplateRegistry([_CHARGE], endpoints),
    )


async def _audit(services: Any, merchant_id: str) -> list[dict[str, Any]]:
    async with services.db.read() as conn:
        query = sa.select(vault_relay_audit).where(vault_relay_audit.c.merchant_id == merchant_id)
        return [dict(r) for r in (await conn.execute(query.order_by(vault_relay_audit.c.created))).mappings()]


async def test_t2_relay_fills_placeholders_sends_card_data_and_returns_it_redacted(api, services, merchant):
    token = await _token(api, services, merchant.id)
    processor = EchoProcessor()
    relay = _relay(services, processor)
    try:
        response = await relay.send(
            actor="test", merchant_id=merchant.id, token=token, card=CardFacts(12, 2034), call=_TEMPLATE
        )
    finally:
        await relay.aclose()
    (received,) = processor.received
    # The processor got the real card data, each value in the field the template gives it.
    assert orjson.loads(received["body"]) == {
        "amount": 1000,
        "pan": AMEX,
        "cvc": AMEX_CVC,
        "exp": {"month": "12", "year": "2034"},
    }
    assert received["headers"]["content-type"] == "application/json"
    # The caller got the answer back without it.
    assert response.status_code == 201
    assert AMEX not in response.body and AMEX not in str(response.headers)
    assert f'"{AMEX_CVC}"' not in orjson.loads(response.body)["echo"]
    assert orjson.loads(response.body)["amount"] == 4242  # not mistaken for card data
    assert response.headers["x-card"].startswith("378282") and response.headers["x-card"].endswith("0005")

    (row,) = await _audit(services, merchant.id)
    assert (row["actor"], row["token"], row["destination"], row["outcome"], row["status_code"]) == (
        "test",
        token,
        PROCESSOR,
        "sent",
        201,
    )
    assert (row["method"], row["path"]) == ("POST", "/v1/charges")
    assert AMEX not in str(row) and AMEX_CVC not in str(row["destination"])


async def test_p1_cvc_is_relayed_once_then_gone(api, services, merchant):
    token = await _token(api, services, merchant.id)
    processor = EchoProcessor()
    relay = _relay(services, processor)
    try:
        for _ in range(2):
            await relay.send(
                actor="test", merchant_id=merchant.id, token=token, card=CardFacts(12, 2034), call=_TEMPLATE
            )
    finally:
        await relay.aclose()
    first, second = (orjson.loads(r["body"]) for r in processor.received)
    assert (first["cvc"], "cvc" in second) == (AMEX_CVC, False)


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/v1/charges",
        "https://processor.example:8443/v1/charges",  # another port
        "http://processor.example/v1/charges",  # no TLS
        "https://user:pw@processor.example/v1/charges",
        "https://processor.example.evil.example/v1/charges",
    ],
)
async def test_t2_relay_refuses_destinations_off_the_allowlist_and_audits_it(api, services, merchant, url):
    token = await _token(api, services, merchant.id)
    processor = EchoProcessor()
    # The api names the endpoint; the vault sends only to its template's own.
    relay = _relay(services, processor)
    call = RelayCall(_CHARGE.id, {"amount": 1000}, base_url=url.removesuffix("/v1/charges"))
    try:
        with pytest.raises(RelayRefused):
            await relay.send(actor="test", merchant_id=merchant.id, token=token, card=CardFacts(1, 2030), call=call)
    finally:
        await relay.aclose()
    assert processor.received == []
    (row,) = await _audit(services, merchant.id)
    assert (row["outcome"], row["status_code"]) == ("refused", None)
    # The CVC was not consumed by a refused relay.
    assert services.payments.vault.cvcs.take(merchant.id, token) == Secret(AMEX_CVC)


async def test_t2_a_template_endpoint_off_the_allowlist_is_refused_too(api, services, merchant):
    token = await _token(api, services, merchant.id)
    processor = EchoProcessor()
    relay = _relay(services, processor, endpoints={"test": ["https://processor.example:8443"]})
    call = RelayCall(_CHARGE.id, {"amount": 1000}, base_url="https://processor.example:8443")
    try:
        with pytest.raises(RelayRefused):
            await relay.send(actor="test", merchant_id=merchant.id, token=token, card=CardFacts(1, 2030), call=call)
    finally:
        await relay.aclose()
    assert processor.received == []
    (row,) = await _audit(services, merchant.id)
    assert (row["destination"], row["outcome"]) == ("https://processor.example:8443/v1/charges", "refused")


def test_t2_allowlist_takes_tls_origins_only():
    with pytest.raises(ValueError, match="https"):
        Allowlist(["http://processor.example"])
    allow = Allowlist(["https://Processor.Example"], local_test_origins=["http://sandbox.internal"])
    assert allow.check("https://processor.example/x") == "https://processor.example:443"
    assert allow.check("http://sandbox.internal/v1/authorizations") == "http://sandbox.internal:80"


async def test_t3_another_merchants_token_is_not_found_and_audited(api, services, merchant):
    token = await _token(api, services, merchant.id)
    processor = EchoProcessor()
    relay = _relay(services, processor)
    try:
        with pytest.raises(ResourceMissing):
            await relay.send(
                actor="test", merchant_id="acct_other", token=token, card=CardFacts(1, 2030), call=_TEMPLATE
            )
    finally:
        await relay.aclose()
    assert processor.received == []
    (row,) = await _audit(services, "acct_other")
    assert row["outcome"] == "not_found"


async def test_a_processor_that_does_not_answer_in_time_is_a_timeout_and_audited(api, services, merchant):
    token = await _token(api, services, merchant.id)
    relay = _relay(services, EchoProcessor(delay_s=2.0), timeout_s=0.2)
    try:
        with pytest.raises(RelayFailed) as failure:
            await relay.send(
                actor="test", merchant_id=merchant.id, token=token, card=CardFacts(1, 2030), call=_TEMPLATE
            )
    finally:
        await relay.aclose()
    assert failure.value.timed_out
    assert [r["outcome"] for r in await _audit(services, merchant.id)] == ["timeout"]


async def test_t2_every_payment_reaches_the_sandbox_through_the_relay(api, services, merchant):
    # A declined test card declines only if the relay delivered its number to the sandbox.
    declined = await card_payment_method(api, number="4000000000000002")
    error = await create_intent(api, expect=402, amount=1000, payment_method=declined["id"], confirm=True)
    assert error["error"]["decline_code"] == "generic_decline"
    ok = await card_payment_method(api, number=AMEX, cvc=AMEX_CVC)
    intent = await create_intent(api, amount=1000, payment_method=ok["id"], confirm=True)
    assert intent["status"] == "succeeded"
    rows = await _audit(services, merchant.id)
    assert [(r["actor"], r["destination"], r["outcome"], r["status_code"]) for r in rows] == [
        ("connector:sandbox", "http://sandbox.internal:80", "sent", 402),
        ("connector:sandbox", "http://sandbox.internal:80", "sent", 200),
    ]
    # The CVC did not outlive the authorization.
    token = rows[1]["token"]
    assert services.payments.vault.cvcs.take(merchant.id, token) is None


async def test_t1_tokens_are_random_and_carry_nothing_of_the_pan(api, services, merchant):
    first = await card_payment_method(api, number=AMEX, cvc=AMEX_CVC)
    second = await card_payment_method(api, number=AMEX, cvc=AMEX_CVC)
    async with services.db.read() as conn:
        query = sa.select(payment_methods.c.vault_token).where(
            payment_methods.c.merchant_id == merchant.id, payment_methods.c.id.in_([first["id"], second["id"]])
        )
        vault_tokens = [row[0] for row in await conn.execute(query)]
    ids = [first["id"], second["id"], *vault_tokens]
    assert len(set(ids)) == 4  # the same card twice: unrelated tokens, no format-preserving link
    assert first["card"]["fingerprint"] == second["card"]["fingerprint"]  # the keyed fingerprint links them
    for token in ids:
        digits = "".join(re.findall(r"[0-9]+", token))
        # Nothing beyond BIN and last 4 (which the API shows anyway) can be read out of a token.
        assert AMEX[6:11] not in digits and AMEX not in digits
        assert len(token) >= 24
