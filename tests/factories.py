"""Small helpers that build objects through the public API, as a merchant would."""

from __future__ import annotations

from typing import Any

import httpx


async def create_intent(api: httpx.AsyncClient, *, expect: int = 200, **params: Any) -> dict[str, Any]:
    data = {"amount": 2000, "currency": "usd", **params}
    response = await api.post("/v1/payment_intents", data=_form(data))
    assert response.status_code == expect, response.text
    body: dict[str, Any] = response.json()
    return body


async def paid_intent(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    return await create_intent(api, payment_method="pm_card_visa", confirm="true", **params)


async def card_payment_method(api: httpx.AsyncClient, number: str = "4242424242424242", **card: Any) -> dict[str, Any]:
    data = {"type": "card", "card[number]": number, "card[exp_month]": "12", "card[exp_year]": "2034"}
    data.update({f"card[{k}]": str(v) for k, v in card.items()})
    response = await api.post("/v1/payment_methods", data=data)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _form(params: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update({f"{key}[{k}]": str(v) for k, v in value.items()})
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        else:
            out[key] = str(value)
    return out
