"""The api's side of a vault that runs as its own process (`strongroom vault serve`).

`RemoteVault` and `RemoteRelay` offer what the in-process `Vault` and `Relay` offer the payments
domain and the connectors — tokenize, discard a CVC, relay a card-bearing request — over the
authenticated channel (`strongroom.vault.channel`). The card number crosses this channel once,
inbound, when it is tokenized; nothing card-bearing ever comes back.

A card stored by a tokenization whose api transaction then rolls back is an orphan in the vault's
database, unreachable without its token (never a card without protection).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.errors import InvalidRequest, ResourceMissing, StrongroomError
from strongroom.sensitive import Secret
from strongroom.vault import channel
from strongroom.vault.relay import CardFacts, RelayCall, RelayFailed, RelayRefused, RelayResponse, TemplateRefused
from strongroom.vault.service import StoredCard

CARDS_PATH = "/internal/v1/cards"
DISCARD_CVC_PATH = "/internal/v1/cards/discard_cvc"
RELAY_PATH = "/internal/v1/relay"


class VaultUnavailable(StrongroomError):
    """The vault service did not answer, or answered in a way the api cannot use (nothing the api
    stores refers to whatever the vault may have done)."""

    http_status = 503
    type = "api_error"
    default_code = "vault_unavailable"


class _Channel:
    def __init__(self, base_url: str, secret: Secret[bytes], *, timeout_s: float, verify: Any = True) -> None:
        self._secret = channel.check_secret(secret)
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s, verify=verify)
        self._timeout_s = timeout_s

    async def post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        body = orjson.dumps(payload)
        headers = {"content-type": "application/json", channel.HEADER: channel.sign(self._secret, "POST", path, body)}
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._client.post(path, content=body, headers=headers)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise VaultUnavailable(f"vault service: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


class RemoteVault:
    def __init__(
        self,
        base_url: str,
        secret: Secret[bytes],
        *,
        timeout_s: float = 10.0,
        verify: Any = True,
        allow_http: bool = False,
    ) -> None:
        """`allow_http`: development only. Card numbers cross this channel, so outside development
        it is TLS or nothing (PCI DSS 4.2.1)."""
        scheme = urlsplit(base_url).scheme.lower()
        if scheme != "https" and not (allow_http and scheme == "http"):
            raise ValueError(f"the vault service URL must use https, not {scheme or 'no scheme'}")
        self._channel = _Channel(base_url, secret, timeout_s=timeout_s, verify=verify)
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def channel(self) -> _Channel:
        return self._channel

    async def tokenize(
        self, conn: AsyncConnection, merchant_id: str, pan: Secret[str], cvc: Secret[str] | None
    ) -> StoredCard:
        """`conn` is the api's transaction; the card is stored in the vault's own database."""
        payload = {"merchant_id": merchant_id, "number": pan.reveal(), "cvc": cvc.reveal() if cvc else None}
        response = await self._channel.post(CARDS_PATH, payload)
        if response.status_code == 400:
            raise InvalidRequest(_message(response), param="card[number]", code="invalid_number")
        data = _json(response, 200)
        return StoredCard(token=str(data["token"]), fingerprint=str(data["fingerprint"]))

    def discard_cvc(self, merchant_id: str, token: str) -> None:
        """The vault destroys the CVC itself when it relays the authorization; this is for the
        attempts that never reached the relay. Sent in the background, like the in-process call
        it replaces it never fails the payment."""
        task = asyncio.get_running_loop().create_task(self._discard(merchant_id, token))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _discard(self, merchant_id: str, token: str) -> None:
        try:
            await self._channel.post(DISCARD_CVC_PATH, {"merchant_id": merchant_id, "token": token})
        except VaultUnavailable:
            return  # the vault's CVC TTL (at most 10 minutes) still bounds it

    def close(self) -> None:
        """Nothing held in memory here: keys and CVCs live in the vault process."""

    async def aclose(self) -> None:
        await asyncio.gather(*self._pending, return_exceptions=True)
        await self._channel.aclose()


class RemoteRelay:
    def __init__(self, remote: RemoteVault) -> None:
        self._channel = remote.channel

    async def send(
        self, *, actor: str, merchant_id: str, token: str, card: CardFacts, call: RelayCall
    ) -> RelayResponse:
        """The call as it is: the vault checks it against its own template, as in-process."""
        payload = {
            "actor": actor,
            "merchant_id": merchant_id,
            "token": token,
            "exp_month": card.exp_month,
            "exp_year": card.exp_year,
            "call": call.as_wire(),
        }
        try:
            response = await self._channel.post(RELAY_PATH, payload)
        except VaultUnavailable as exc:
            raise RelayFailed(str(exc), timed_out=False) from exc
        if response.status_code == 403:
            code = _error_field(response, "code")
            refused = TemplateRefused if code == TemplateRefused.default_code else RelayRefused
            raise refused(_message(response), param=_error_field(response, "param"))
        if response.status_code == 404:
            raise ResourceMissing("card", token, param=None)
        if response.status_code in (502, 504):
            raise RelayFailed(_message(response), timed_out=response.status_code == 504)
        data = _json(response, 200)
        return RelayResponse(int(data["status_code"]), str(data["body"]), dict(data["headers"]))

    async def aclose(self) -> None:
        """The channel is the RemoteVault's and closes with it."""


def _json(response: httpx.Response, expected: int) -> dict[str, Any]:
    if response.status_code != expected:
        raise VaultUnavailable(f"vault service answered {response.status_code}: {_message(response)}")
    data: dict[str, Any] = orjson.loads(response.content)
    return data


def _error_field(response: httpx.Response, name: str) -> str | None:
    try:
        value = orjson.loads(response.content)["error"].get(name)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return str(value)[:100] if value is not None else None


def _message(response: httpx.Response) -> str:
    try:
        return str(orjson.loads(response.content)["error"]["message"])[:200]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"HTTP {response.status_code}"
