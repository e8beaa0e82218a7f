"""Request parameters: Stripe's bracket-notation form encoding, JSON bodies, and a bounded body read.

The official `stripe` SDKs send ``application/x-www-form-urlencoded`` bodies (and GET/DELETE query
strings) whose keys use bracket notation: ``metadata[order_id]=6735``, ``expand[0]=customer``,
``items[0][price]=price_1``. `parse_form` turns them into the nested dicts and lists a JSON body
would have carried, so per-endpoint validation sees one shape whatever the encoding. Values stay
strings: only the endpoint knows its schema, so only it can say whether ``"12"`` is an int.

Lists come in two spellings: indexed (``a[0]=x&a[1]=y``, what stripe-python always emits) and
appended (``a[]=x&a[]=y``, what Stripe itself writes in ``url`` fields and some clients send). An
all-numeric set of keys is read as a list, so a dict whose keys are all numerals cannot be told
apart from a list on the wire; per-endpoint validation must settle that where it matters.
"""

from __future__ import annotations

import re
from contextlib import aclosing
from typing import Any
from urllib.parse import unquote_plus, unquote_to_bytes

import orjson
from starlette.requests import Request

from strongroom.errors import InvalidRequest, PayloadTooLarge
from strongroom.redact import PAN_DIGITS_MAX, holds_pan

MAX_BODY_BYTES = 256 * 1024
# Generous for Stripe's widest requests (Checkout Sessions with many line items) while bounding the
# work one request can cause.
MAX_PARAMS = 1000
MAX_KEY_CHARS = 256
# Bracket groups after the name: line_items[0][price_data][product_data][metadata][k] is Stripe's
# deepest real shape at five.
MAX_DEPTH = 5

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
JSON_CONTENT_TYPE = "application/json"
# Stripe only uses POST for bodies; PUT/PATCH are listed so a body is never silently ignored.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

_KEY_RE = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SEGMENT_RE = re.compile(r"\[([^\[\]]*)\]")
# Canonical indices only: "01" is a dict key, not index 1, so two spellings never collide.
_INDEX_RE = re.compile(r"0|[1-9][0-9]*")
_BAD_PERCENT_RE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_DIGITS_RE = re.compile(r"[0-9]+")


class _Branch:
    """A container under construction: keyed entries (a dict, or a list by index) or ``[]`` appends."""

    __slots__ = ("appended", "entries", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: dict[str, _Branch | str] = {}
        self.appended: list[str] = []


def _join(path: str, segment: str) -> str:
    return f"{path}[{segment}]" if path else segment


def _decode(raw: bytes, *, param: str | None) -> str:
    # urllib's unquote silently keeps a stray "%" and replaces bad UTF-8; we refuse both so that
    # two different byte strings never parse to the same parameters.
    if _BAD_PERCENT_RE.search(raw):
        raise InvalidRequest(
            "Request parameters are not valid URL encoding: '%' must be followed by two hex digits.",
            param=param,
        )
    try:
        return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("Request parameters must be UTF-8 encoded.", param=param) from None


def _split_key(key: str) -> list[str]:
    """``a[b][]`` -> ``["a", "b", ""]``; raises on anything that is not ``name`` + ``[segment]``*."""
    match = _KEY_RE.fullmatch(key)
    if match is None:
        raise InvalidRequest(
            f"Invalid parameter name {key!r}: expected a name followed by zero or more "
            "[key] groups, like metadata[order_id] or items[0][price].",
            param=key,
        )
    segments = [match.group(1), *_SEGMENT_RE.findall(match.group(2))]
    if len(segments) - 1 > MAX_DEPTH:
        raise InvalidRequest(
            f"Parameter {key!r} is nested too deeply: at most {MAX_DEPTH} levels of brackets are allowed.",
            param=key,
        )
    if "" in segments[:-1]:
        raise InvalidRequest(
            f"Invalid parameter name {key!r}: empty brackets [] may only appear at the end.", param=key
        )
    return segments


def _mixed_forms(path: str) -> InvalidRequest:
    return InvalidRequest(
        f"Parameter {path} mixes list and object forms: send either {path}[]=…, {path}[0]=…, "
        f"or {path}[key]=…, not a combination.",
        param=path,
    )


def _scalar_and_nested(path: str) -> InvalidRequest:
    return InvalidRequest(
        f"Parameter {path} was sent both as a single value and as a nested object or list.", param=path
    )


def _insert(root: _Branch, segments: list[str], value: str) -> None:
    branch = root
    for segment in segments[:-1]:
        if branch.appended:
            raise _mixed_forms(branch.path)
        path = _join(branch.path, segment)
        child = branch.entries.get(segment)
        if isinstance(child, str):
            raise _scalar_and_nested(path)
        if child is None:
            child = branch.entries[segment] = _Branch(path)
        branch = child
    last = segments[-1]
    if last == "":
        if branch.entries:
            raise _mixed_forms(branch.path)
        branch.appended.append(value)
        return
    if branch.appended:
        raise _mixed_forms(branch.path)
    path = _join(branch.path, last)
    existing = branch.entries.get(last)
    if isinstance(existing, str):
        raise InvalidRequest(f"Parameter {path} was sent more than once.", param=path)
    if existing is not None:
        raise _scalar_and_nested(path)
    branch.entries[last] = value


def _finish(node: _Branch | str) -> Any:
    if isinstance(node, str):
        return node
    if node.appended:
        return list(node.appended)
    indices = [key for key in node.entries if _INDEX_RE.fullmatch(key)]
    if not indices:
        return {key: _finish(child) for key, child in node.entries.items()}
    if len(indices) != len(node.entries):
        raise _mixed_forms(node.path)
    ordered = sorted(indices, key=int)
    for position, index in enumerate(ordered):
        if int(index) != position:
            path = _join(node.path, index)
            raise InvalidRequest(
                f"Invalid array {node.path}: indices must run 0, 1, 2, … without gaps, "
                f"but {path} has no {node.path}[{position}] before it.",
                param=path,
            )
    return [_finish(node.entries[index]) for index in ordered]


def parse_form(raw: bytes) -> dict[str, Any]:
    """Decode a urlencoded body or query string in Stripe's bracket notation into dicts and lists.

    ``metadata[k]=`` keeps ``""`` (Stripe's way to unset a key); empty ``&&`` separators are skipped.
    """
    pairs = [pair for pair in raw.split(b"&") if pair]
    if len(pairs) > MAX_PARAMS:
        first_extra = unquote_plus(pairs[MAX_PARAMS].partition(b"=")[0].decode("utf-8", "replace"))
        raise InvalidRequest(
            f"Too many parameters: at most {MAX_PARAMS} are accepted per request.",
            param=first_extra[:MAX_KEY_CHARS],
        )
    root = _Branch("")
    for pair in pairs:
        raw_key, _, raw_value = pair.partition(b"=")
        key = _decode(raw_key, param=None)
        if len(key) > MAX_KEY_CHARS:
            raise InvalidRequest(
                f"Parameter name is too long: at most {MAX_KEY_CHARS} characters are allowed.",
                param=key[:MAX_KEY_CHARS],
            )
        value = _decode(raw_value, param=key)
        _insert(root, _split_key(key), value)
    # The top level is always an object, even when every name is a numeral.
    return {name: _finish(child) for name, child in root.entries.items()}


def parse_json(raw: bytes) -> dict[str, Any]:
    """Decode a JSON body whose top level must be an object."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Invalid JSON in request body: {exc}", code="parameter_invalid") from exc
    if not isinstance(parsed, dict):
        raise InvalidRequest(
            "The JSON request body must be an object ({...}) at the top level.", code="parameter_invalid"
        )
    return parsed


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body exceeds {MAX_BODY_BYTES} bytes.")


def _reject_query(method: str, query: bytes) -> None:
    pairs = [pair for pair in query.split(b"&") if pair]
    if pairs:
        name = unquote_plus(pairs[0].partition(b"=")[0].decode("utf-8", "replace"))
        raise InvalidRequest(
            f"Query parameters are not accepted on {method}; send them in the body.",
            param=name[:MAX_KEY_CHARS],
        )


def _check_declared_length(header: str | None) -> None:
    if header is None:
        return
    if not _DIGITS_RE.fullmatch(header):
        raise InvalidRequest("Invalid Content-Length header.")
    # Compare lengths first: int() on a 5,000-digit header would raise rather than answer.
    digits = header.lstrip("0")
    if len(digits) > len(str(MAX_BODY_BYTES)) or int(digits or "0") > MAX_BODY_BYTES:
        raise _too_large()


async def _read_bounded(request: Request) -> bytes:
    # Content-Length may be absent (chunked) or false, so the running total is the real guard.
    chunks: list[bytes] = []
    size_bytes = 0
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            size_bytes += len(chunk)
            if size_bytes > MAX_BODY_BYTES:
                raise _too_large()
            chunks.append(chunk)
    return b"".join(chunks)


async def _read_body_params(request: Request) -> dict[str, Any]:
    _reject_query(request.method, request.scope.get("query_string", b""))
    _check_declared_length(request.headers.get("content-length"))
    raw = await _read_bounded(request)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not raw or media_type in ("", FORM_CONTENT_TYPE):
        return parse_form(raw)
    if media_type == JSON_CONTENT_TYPE:
        return parse_json(raw)
    raise InvalidRequest(
        f"Unsupported Content-Type {media_type!r}: send {FORM_CONTENT_TYPE} or {JSON_CONTENT_TYPE}.",
        code="parameter_invalid",
    )


async def read_params(request: Request) -> dict[str, Any]:
    """The request's parameters: the query string for GET/DELETE, the body for POST.

    Parsed once and kept on ``request.state.params``; the state lives in the ASGI scope, so the
    idempotency middleware and the route share one result even through different Request objects.
    Callers must treat the returned dict as read-only for that reason.
    """
    cached = getattr(request.state, "params", None)
    if isinstance(cached, dict):
        return cached
    if "\x00" in request.scope.get("path", ""):
        raise InvalidRequest(_NUL_MESSAGE.format(where="The URL path"))
    if request.method in _BODY_METHODS:
        params = await _read_body_params(request)
    else:
        params = parse_form(request.scope.get("query_string", b""))
    _screen(params, "")
    request.state.params = params
    return params


_NUL_MESSAGE = "{where} must not contain NUL characters (\\u0000)."
# PCI DSS 3.4.1 / 3.5.1: card numbers reach the vault through these parameters only (payment
# methods, tokens and the hosted card form take `card[number]`); anywhere else one would be
# stored in clear, logged or echoed. On a route without such a field `card[number]` is an
# unknown parameter, refused by its model before anything is written.
CARD_FIELDS = frozenset({"card[number]"})


def _pan_refused(path: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid {path}: it holds what looks like a card number. Card numbers are accepted only in "
        "card[number]; send other card data through the vault, never in free-text fields.",
        param=path,
    )


def _screen(value: Any, path: str) -> None:
    """Refuse what no parameter may hold, before anything is stored: U+0000 (PostgreSQL text and
    JSON cannot hold it: refused the same on every database) and, outside `CARD_FIELDS`, a PAN in
    a value or in a name (a metadata key). One walk over the parameters; a string without a run of
    13 digits costs one precompiled-regex scan (`strongroom.redact`)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidRequest(_NUL_MESSAGE.format(where=f"Parameter {path}"), param=path)
        if holds_pan(value) and path not in CARD_FIELDS:
            raise _pan_refused(path)
    elif isinstance(value, dict):
        for key, item in value.items():
            child = _join(path, key)
            if "\x00" in key:
                raise InvalidRequest(_NUL_MESSAGE.format(where="Parameter names"), param=path or None)
            if holds_pan(key):
                raise _pan_refused(child)
            _screen(item, child)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _screen(item, _join(path, str(index)))
    elif (
        # A JSON number: the digits are the same card number whatever the quoting.
        isinstance(value, int)
        and not isinstance(value, bool)
        and abs(value) < 10**PAN_DIGITS_MAX
        and holds_pan(str(value))
        and path not in CARD_FIELDS
    ):
        raise _pan_refused(path)
