"""Request parameter parsing: Stripe bracket notation, JSON bodies, and the bounded body read."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from stripe._encode import _api_encode

from strongroom.api.body import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    MAX_KEY_CHARS,
    MAX_PARAMS,
    parse_form,
    parse_json,
    read_params,
)
from strongroom.errors import InvalidRequest, StrongroomError


def stripe_encode(params: dict[str, Any], *, as_sent: bool = True) -> bytes:
    """What stripe-python puts on the wire (`_api_requestor._args_for_request_with_retries`).

    It un-escapes %5B/%5D after urlencode for readability; as_sent=False keeps strict encoding,
    which other form encoders produce.
    """
    encoded = urlencode(list(_api_encode(params)))
    if as_sent:
        encoded = encoded.replace("%5B", "[").replace("%5D", "]")
    return encoded.encode()


# --- parse_form: the shapes Stripe clients send -------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"a=1", {"a": "1"}),
        (b"metadata[order_id]=6735", {"metadata": {"order_id": "6735"}}),
        (
            b"card[number]=4242424242424242&card[exp_month]=12",
            {"card": {"number": "4242424242424242", "exp_month": "12"}},
        ),
        (b"expand[]=customer&expand[]=latest_charge", {"expand": ["customer", "latest_charge"]}),
        (
            b"payment_method_types[0]=card&payment_method_types[1]=x",
            {"payment_method_types": ["card", "x"]},
        ),
        (b"a[b][c]=1", {"a": {"b": {"c": "1"}}}),
        (
            b"items[0][price]=x&items[0][quantity]=2&items[1][price]=y",
            {"items": [{"price": "x", "quantity": "2"}, {"price": "y"}]},
        ),
        (b"t[1]=b&t[0]=a", {"t": ["a", "b"]}),
        (b"metadata[key]=", {"metadata": {"key": ""}}),
        (b"flag", {"flag": ""}),
        (b"", {}),
        (b"&a=1&&b=2&", {"a": "1", "b": "2"}),
        (b"q=a+b%2Bc%26d%3De", {"q": "a b+c&d=e"}),
        (b"metadata%5Bk%5D=v", {"metadata": {"k": "v"}}),
        (b"city=Z%C3%BCrich&raw=Z\xc3\xbcrich", {"city": "Zürich", "raw": "Zürich"}),
        (b"a[01]=x", {"a": {"01": "x"}}),
        (b"0=a&1=b", {"0": "a", "1": "b"}),
    ],
)
def test_parse_form_builds_nested_dicts_and_lists(raw: bytes, expected: dict[str, Any]) -> None:
    assert parse_form(raw) == expected


def test_parse_form_keeps_values_as_strings_in_send_order() -> None:
    parsed = parse_form(b"amount=2000&confirm=true&capture_method=manual")
    assert parsed == {"amount": "2000", "confirm": "true", "capture_method": "manual"}
    assert list(parsed) == ["amount", "confirm", "capture_method"]


def test_parse_form_accepts_the_limits_exactly() -> None:
    deepest = "a" + "".join(f"[k{i}]" for i in range(MAX_DEPTH))
    assert parse_form(f"{deepest}=v".encode())["a"]["k0"]["k1"]["k2"]["k3"]["k4"] == "v"
    assert len(parse_form(b"&".join(b"p%d=1" % i for i in range(MAX_PARAMS)))) == MAX_PARAMS
    assert parse_form(b"k" * MAX_KEY_CHARS + b"=1") == {"k" * MAX_KEY_CHARS: "1"}


@pytest.mark.parametrize(
    ("raw", "param", "fragment"),
    [
        (b"a=1&a=2", "a", "more than once"),
        (b"a[b]=1&a[b]=2", "a[b]", "more than once"),
        (b"a[0]=1&a[0]=2", "a[0]", "more than once"),
        (b"a=1&a[b]=2", "a", "both as a single value and as a nested"),
        (b"a[b]=2&a=1", "a", "both as a single value and as a nested"),
        (b"a[b]=1&a[b][c]=2", "a[b]", "both as a single value and as a nested"),
        (b"a[]=1&a=2", "a", "both as a single value and as a nested"),
        (b"a[0]=x&a[b]=y", "a", "mixes list and object"),
        (b"a[]=x&a[0]=y", "a", "mixes list and object"),
        (b"a[0]=y&a[]=x", "a", "mixes list and object"),
        (b"a[b]=y&a[]=x", "a", "mixes list and object"),
        (b"a[]=x&a[b][c]=y", "a", "mixes list and object"),
        (b"a[b=1", "a[b", "Invalid parameter name"),
        (b"a]=1", "a]", "Invalid parameter name"),
        (b"[a]=1", "[a]", "Invalid parameter name"),
        (b"a[b]c=1", "a[b]c", "Invalid parameter name"),
        (b"a[[b]]=1", "a[[b]]", "Invalid parameter name"),
        (b"=1", "", "Invalid parameter name"),
        (b"a[][b]=1", "a[][b]", "empty brackets"),
        (b"a[b][c][d][e][f][g]=1", "a[b][c][d][e][f][g]", "nested too deeply"),
        (b"t[0]=a&t[2]=b", "t[2]", "without gaps"),
        (b"t[1]=a", "t[1]", "without gaps"),
        (b"items[0][price]=x&items[2][price]=y", "items[2]", "without gaps"),
        (b"a=%zz", "a", "URL encoding"),
        (b"a=100%", "a", "URL encoding"),
        (b"a=%ff", "a", "UTF-8"),
        (b"a=\xff", "a", "UTF-8"),
        (b"%zz=1", None, "URL encoding"),
        (b"%c3%28=1", None, "UTF-8"),
    ],
)
def test_parse_form_rejects_ambiguous_or_malformed_input_naming_the_param(
    raw: bytes, param: str | None, fragment: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_form(raw)
    assert caught.value.param == param
    assert fragment in caught.value.message
    assert caught.value.code == "parameter_invalid"


def test_parse_form_rejects_more_than_the_parameter_limit() -> None:
    with pytest.raises(InvalidRequest, match="Too many parameters") as caught:
        parse_form(b"&".join(b"p%d=1" % i for i in range(MAX_PARAMS + 1)))
    assert caught.value.param == f"p{MAX_PARAMS}"


def test_parse_form_rejects_an_overlong_parameter_name() -> None:
    with pytest.raises(InvalidRequest, match="too long") as caught:
        parse_form(b"k" * (MAX_KEY_CHARS + 1) + b"=1")
    assert caught.value.param == "k" * MAX_KEY_CHARS


# --- parse_form against stripe-python's own encoder ---------------------------------------------


@pytest.mark.parametrize("as_sent", [True, False])
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"amount": 2000, "currency": "usd", "confirm": True, "off_session": False, "description": None},
            {"amount": "2000", "currency": "usd", "confirm": "true", "off_session": "false"},
        ),
        (
            {"metadata": {"order_id": "6735", "unset_me": ""}},
            {"metadata": {"order_id": "6735", "unset_me": ""}},
        ),
        (
            {"expand": ["customer", "latest_charge"], "payment_method_types": ["card"]},
            {"expand": ["customer", "latest_charge"], "payment_method_types": ["card"]},
        ),
        (
            {"card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": None}},
            {"card": {"number": "4242424242424242", "exp_month": "12", "exp_year": "2030"}},
        ),
        (
            {
                "mode": "payment",
                "line_items": [
                    {"price": "price_1", "quantity": 2},
                    {
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": 500,
                            "product_data": {"name": "T-shirt", "metadata": {"sku": "a b&c=d/ü"}},
                        },
                        "quantity": 1,
                    },
                ],
            },
            {
                "mode": "payment",
                "line_items": [
                    {"price": "price_1", "quantity": "2"},
                    {
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": "500",
                            "product_data": {"name": "T-shirt", "metadata": {"sku": "a b&c=d/ü"}},
                        },
                        "quantity": "1",
                    },
                ],
            },
        ),
        ({"a": [["x", "y"], ["z"]], "b": ("p", "q")}, {"a": [["x", "y"], ["z"]], "b": ["p", "q"]}),
        # Empty lists and dicts vanish entirely: stripe-python emits nothing for them.
        ({"keep": "1", "empty_list": [], "empty_dict": {}}, {"keep": "1"}),
    ],
)
def test_parse_form_round_trips_stripe_python_encoding(
    params: dict[str, Any], expected: dict[str, Any], as_sent: bool
) -> None:
    assert parse_form(stripe_encode(params, as_sent=as_sent)) == expected


def test_stripe_python_skips_bool_and_none_conversion_inside_lists() -> None:
    # A quirk of `_api_encode`: scalars inside a list go through str(), so True -> "True" and
    # None -> "None" rather than "true" / being dropped. We parse what was sent.
    assert parse_form(stripe_encode({"a": [True, None, 1]})) == {"a": ["True", "None", "1"]}


def test_stripe_python_empty_dict_inside_a_list_leaves_a_gap_that_is_rejected() -> None:
    # `[{}, {"x": 1}]` encodes as just `g[1][x]=1`; no index 0 reaches us, so the list is ambiguous.
    with pytest.raises(InvalidRequest) as caught:
        parse_form(stripe_encode({"g": [{}, {"x": "1"}]}))
    assert caught.value.param == "g[1]"


def test_numeric_dict_keys_are_indistinguishable_from_a_list_on_the_wire() -> None:
    assert parse_form(stripe_encode({"metadata": {"0": "a", "1": "b"}})) == {"metadata": ["a", "b"]}


_KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=8).filter(
    # All-digit keys read back as list indices; see the test above.
    lambda key: not key.isdigit()
)
_VALUES = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


@functools.cache
def _nested(levels: int) -> st.SearchStrategy[Any]:
    """A value using at most `levels` bracket groups; containers are non-empty so none vanish."""
    options: list[st.SearchStrategy[Any]] = [_VALUES]
    if levels >= 1:
        options.append(st.lists(_VALUES, min_size=1, max_size=4))
        options.append(st.dictionaries(_KEYS, _nested(levels - 1), min_size=1, max_size=3))
    if levels >= 2:
        options.append(
            st.lists(st.dictionaries(_KEYS, _nested(levels - 2), min_size=1, max_size=3), min_size=1, max_size=3)
        )
    return st.one_of(options)


@settings(max_examples=300, deadline=None)
@given(params=st.dictionaries(_KEYS, _nested(MAX_DEPTH), max_size=5), as_sent=st.booleans())
def test_parse_form_inverts_stripe_python_encoding(params: dict[str, Any], as_sent: bool) -> None:
    raw = stripe_encode(params, as_sent=as_sent)
    assume(raw.count(b"&") < MAX_PARAMS)
    assert parse_form(raw) == params


# --- parse_json ---------------------------------------------------------------------------------


def test_parse_json_returns_the_object() -> None:
    assert parse_json(b'{"amount": 2000, "metadata": {"k": "v"}}') == {"amount": 2000, "metadata": {"k": "v"}}


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "Invalid JSON"),
        (b"", "Invalid JSON"),
        (b'{"a": "\xff"}', "Invalid JSON"),
        (b"[1, 2]", "JSON request body must be an object"),
        (b'"text"', "JSON request body must be an object"),
    ],
)
def test_parse_json_rejects_invalid_json_and_non_objects(raw: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_json(raw)
    assert fragment in caught.value.message
    assert caught.value.code == "parameter_invalid"
    assert caught.value.param is None


# --- read_params through a real ASGI app --------------------------------------------------------


async def _echo(request: Request) -> JSONResponse:
    params = await read_params(request)
    # A fresh Request over the same scope, as a middleware would build, must get the cached result
    # rather than try to read a body that has already been consumed.
    again = await read_params(Request(request.scope, request.receive))
    return JSONResponse({"params": params, "cached": again is params})


async def _render_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StrongroomError)
    return JSONResponse({"error": exc.as_dict()}, status_code=exc.http_status)


_APP = Starlette(
    routes=[Route("/v1/echo", _echo, methods=["GET", "POST", "DELETE"])],
    exception_handlers={StrongroomError: _render_error},
)


async def _call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=_APP)
    # A second read of a consumed body waits forever on ASGITransport; fail instead of hanging.
    async with (
        asyncio.timeout(10),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        return await client.request(method, url, **kwargs)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_read_params_parses_the_query_string_for_get_and_delete(method: str) -> None:
    response = await _call(method, "/v1/echo?limit=3&expand[]=data.customer&expand[]=data.latest_charge")
    assert response.status_code == 200
    assert response.json() == {
        "params": {"limit": "3", "expand": ["data.customer", "data.latest_charge"]},
        "cached": True,
    }


async def test_read_params_parses_a_form_body_as_stripe_python_sends_it() -> None:
    body = stripe_encode({"amount": 2000, "currency": "usd", "metadata": {"order_id": "6735"}})
    response = await _call(
        "POST", "/v1/echo", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200
    assert response.json() == {
        "params": {"amount": "2000", "currency": "usd", "metadata": {"order_id": "6735"}},
        "cached": True,
    }


async def test_read_params_parses_a_json_body_with_charset() -> None:
    response = await _call(
        "POST",
        "/v1/echo",
        content=b'{"amount": 2000, "expand": ["customer"]}',
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert response.status_code == 200
    assert response.json()["params"] == {"amount": 2000, "expand": ["customer"]}


async def test_read_params_treats_a_body_without_content_type_as_form() -> None:
    response = await _call("POST", "/v1/echo", content=b"a=1&b[c]=2")
    assert "content-type" not in response.request.headers
    assert response.json()["params"] == {"a": "1", "b": {"c": "2"}}


async def test_read_params_accepts_an_empty_body_whatever_its_content_type() -> None:
    response = await _call("POST", "/v1/echo", content=b"", headers={"content-type": "multipart/form-data"})
    assert response.status_code == 200
    assert response.json()["params"] == {}


async def test_read_params_rejects_unsupported_content_types() -> None:
    response = await _call(
        "POST",
        "/v1/echo",
        content=b"--x\r\n\r\n--x--",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "parameter_invalid"
    assert "application/x-www-form-urlencoded" in error["message"]
    assert "application/json" in error["message"]


async def test_read_params_rejects_invalid_json_with_400() -> None:
    response = await _call("POST", "/v1/echo", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


async def test_read_params_rejects_query_parameters_on_post() -> None:
    response = await _call("POST", "/v1/echo?expand[]=customer&limit=3", content=b"amount=1")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "expand[]"
    assert error["message"] == "Query parameters are not accepted on POST; send them in the body."


async def test_read_params_accepts_a_body_of_exactly_the_limit() -> None:
    response = await _call("POST", "/v1/echo", content=b"a=" + b"x" * (MAX_BODY_BYTES - 2))
    assert response.status_code == 200
    assert len(response.json()["params"]["a"]) == MAX_BODY_BYTES - 2


def _assert_payload_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "code": "payload_too_large",
        "message": "Request body exceeds 262144 bytes.",
    }


async def test_read_params_rejects_an_oversized_body_with_a_truthful_content_length() -> None:
    response = await _call("POST", "/v1/echo", content=b"a=" + b"x" * (MAX_BODY_BYTES - 1))
    assert response.request.headers["content-length"] == str(MAX_BODY_BYTES + 1)
    _assert_payload_too_large(response)


async def test_read_params_rejects_a_declared_oversize_before_reading_the_body() -> None:
    response = await _call("POST", "/v1/echo", content=b"a=1", headers={"content-length": str(10 * MAX_BODY_BYTES)})
    _assert_payload_too_large(response)


async def test_read_params_stops_reading_a_chunked_body_once_it_passes_the_limit() -> None:
    chunk_bytes = 64 * 1024
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(64):  # 4 MiB offered; the reader must give up after ~256 KiB
            pulled += 1
            yield b"x" * chunk_bytes

    response = await _call("POST", "/v1/echo", content=chunks())
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    _assert_payload_too_large(response)
    assert pulled <= MAX_BODY_BYTES // chunk_bytes + 2


async def test_read_params_does_not_trust_an_understated_content_length() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * (64 * 1024)

    response = await _call("POST", "/v1/echo", content=chunks(), headers={"content-length": "10"})
    _assert_payload_too_large(response)
