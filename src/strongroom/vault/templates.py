"""The request templates the vault owns, one per card-bearing processor call (SECURITY.md T2).

The relay releases card data only into a request the vault builds itself. The api (or a connector
on its behalf) names a template and supplies non-card values; the template fixes everything that
decides where card data ends up:

- the HTTP method and the path, and the base URLs it may be sent to (the api picks one of them;
  the relay's allowlist still has the last word on the origin),
- the encoding (form, with Stripe's bracket notation, or JSON, with dotted paths for nesting),
- the exact field each card value fills (`payment_method_data[card][number]` ← the PAN),
- the fields the api may fill (exact names, plus open families such as `metadata[`), and the
  values the vault fixes itself (`payment_method_data[type]=card`, a GraphQL document),
- the headers the api may set (credentials, idempotency, API version) and those the vault sets.

Anything else is refused before the card is opened: a field outside the template, a card field
or fixed value the api tried to fill, a `{{…}}` placeholder in any value (the shape of a
request that tries to steer card data), a nested value, a header outside the list. The relay
audits the refusal (outcome `template_refused`). A compromised api can therefore choose among
the processors' own endpoints and fill their non-card fields, but never put the PAN or the CVC
into a field of its choosing.

Templates are built once, at start-up; per request the relay only checks names against sets and
fills in values.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from strongroom.errors import StrongroomError

MAX_VALUES = 200  # Stripe's metadata holds 50 keys; nothing on a card-bearing call needs more
MAX_VALUE_CHARS = 5000
MAX_HEADER_CHARS = 1000

# The built-in sandbox processor: reached in-process under this origin, or, when the vault runs as
# its own process, at the api's mount point on an origin listed in `vault.relay_local_test_origins`.
SANDBOX_ORIGIN = "http://sandbox.internal"
SANDBOX_MOUNT = "/sandbox"


class RelayRefused(StrongroomError):
    """The relay will not send this request (destination, template or values): nothing was sent."""

    http_status = 403
    type = "invalid_request_error"
    default_code = "relay_destination_refused"


class TemplateRefused(RelayRefused):
    """The api asked for something its template does not allow (`param` names what)."""

    default_code = "relay_template_refused"


class Encoding(StrEnum):
    FORM = "form"  # application/x-www-form-urlencoded, bracket notation in the field names
    JSON = "json"  # application/json, a dotted field name is a path into nested objects


class CardValue(StrEnum):
    """What the vault may put into a card field; `cvc` is left out when the vault holds none."""

    NUMBER = "number"
    CVC = "cvc"
    EXP_MONTH = "exp_month"  # "3"
    EXP_MONTH_MM = "exp_month_mm"  # "03"
    EXP_YEAR = "exp_year"  # "2034"


_CONTENT_TYPE = {Encoding.FORM: "application/x-www-form-urlencoded", Encoding.JSON: "application/json"}


def card_values(number: str, cvc: str | None, exp_month: int, exp_year: int) -> dict[str, str]:
    """The values a template's card fields draw on, keyed by `CardValue`'s plain string values
    (an enum member hashes by its name, not as the string: plain keys keep lookups cheap)."""
    values = {"number": number, "exp_month": str(exp_month), "exp_month_mm": f"{exp_month:02d}"}
    values["exp_year"] = str(exp_year)
    if cvc:
        values["cvc"] = cvc
    return values


@dataclass(frozen=True)
class RequestTemplate:
    id: str
    connector: str
    method: str
    path: str
    encoding: Encoding
    card_fields: Mapping[str, CardValue]
    value_fields: frozenset[str]
    value_prefixes: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    api_headers: frozenset[str] = frozenset()  # lower-case names
    endpoints: tuple[str, ...] = ()  # base URLs; the path is appended
    # Worked out once from the fields above: per request, only lookups and copies.
    _card_plan: tuple[tuple[str, tuple[str, ...], str], ...] = field(init=False, repr=False, compare=False)
    _paths: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Invariants of the template itself, checked once at start-up: no card field can also be
        # reached as an api field, a prefix family or a fixed value.
        for name in self.card_fields:
            if name in self.value_fields or name in self.fixed or name.startswith(self.value_prefixes):
                raise ValueError(f"template {self.id}: card field {name} is also open to other values")
        if not self.card_fields or not self.path.startswith("/") or self.method != self.method.upper():
            raise ValueError(f"template {self.id}: needs card fields, an absolute path and an upper-case method")
        if any(h != h.lower() or h == "content-type" for h in self.api_headers):
            raise ValueError(f"template {self.id}: api headers are lower-case, and content-type is the vault's")
        if self.encoding is Encoding.JSON:
            _check_json_paths(self)
        plan = tuple((name, tuple(name.split(".")), str(kind.value)) for name, kind in self.card_fields.items())
        object.__setattr__(self, "_card_plan", plan)
        paths = {name: tuple(name.split(".")) for name in (*self.value_fields, *self.fixed)}
        object.__setattr__(self, "_paths", paths)

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPE[self.encoding]

    def prepare(self, values: object, headers: object) -> Prepared:
        """Check the api's values and headers; the non-card part of the request, ready for the
        card values. Raises `TemplateRefused` (before any card data is touched)."""
        checked = self._values(values)
        out_headers = {"content-type": _CONTENT_TYPE[self.encoding]}
        for name, value in _items(headers, "headers"):
            lowered = name.lower()
            if lowered not in self.api_headers:
                raise TemplateRefused(f"Template {self.id} does not let the caller set the {name} header.", param=name)
            if (
                not isinstance(value, str)
                or len(value) > MAX_HEADER_CHARS
                or "{{" in value
                or "\n" in value
                or "\r" in value
            ):
                raise TemplateRefused(f"The {name} header's value is not allowed.", param=name)
            out_headers[lowered] = value
        if self.encoding is Encoding.FORM:
            pairs = [(k, _form_value(v)) for k, v in (*self.fixed.items(), *checked) if v is not None]
            return Prepared(self, out_headers, pairs, None)
        document: dict[str, Any] = {}
        paths = self._paths
        for name, value in (*self.fixed.items(), *checked):
            path = paths.get(name)
            if path is None:  # an open family's field: may collide with another, so checked
                _put(document, name, tuple(name.split(".")), value, self.id)
                continue
            node = document  # a declared field: __post_init__ proved it collides with none
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return Prepared(self, out_headers, [], document)

    def _values(self, values: object) -> list[tuple[str, Any]]:
        items = _items(values, "values")
        if len(items) > MAX_VALUES:
            raise TemplateRefused(f"Template {self.id} takes at most {MAX_VALUES} values.", param="values")
        for name, value in items:
            if name not in self.value_fields:
                if name in self.card_fields or name in self.fixed:
                    raise TemplateRefused(f"{name} is filled by the vault, not by the caller.", param=name)
                if not name.startswith(self.value_prefixes):
                    raise TemplateRefused(f"{name} is not a field of template {self.id}.", param=name)
            kind = type(value)
            if kind is str:
                if "{{" in value or len(value) > MAX_VALUE_CHARS:
                    raise TemplateRefused(f"The value of {name} is not allowed (placeholder or too long).", param=name)
            elif value is not None and kind is not bool and kind is not int:
                raise TemplateRefused(f"The value of {name} must be a string, a number or a boolean.", param=name)
        return items


class Prepared:
    """A checked request without its card values."""

    __slots__ = ("document", "headers", "pairs", "template")

    def __init__(
        self,
        template: RequestTemplate,
        headers: dict[str, str],
        pairs: list[tuple[str, str]],
        document: dict[str, Any] | None,
    ) -> None:
        self.template = template
        self.headers = headers
        self.pairs = pairs
        self.document = document

    def render(self, card: Mapping[str, str]) -> bytes:
        """The body, with each card value (from `card_values`) in the one field its template names."""
        plan = self.template._card_plan
        if self.document is None:
            pairs = self.pairs + [(name, card[kind]) for name, _, kind in plan if kind in card]
            return urllib.parse.urlencode(pairs).encode()
        for name, path, kind in plan:
            if kind in card:
                _put(self.document, name, path, card[kind], self.template.id)
        return orjson.dumps(self.document)


class TemplateRegistry:
    """The templates this vault serves, and the base URLs each connector's calls may go to: the
    templates' own, plus those configured for this deployment (a test processor, the api's
    sandbox mount)."""

    def __init__(
        self, templates: Iterable[RequestTemplate], extra_endpoints: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        self._templates = {t.id: t for t in templates}
        extra = extra_endpoints or {}
        # Each accepted spelling of a base URL → the full URL, for an exact lookup per request.
        self._urls: dict[str, dict[str, str]] = {}
        for template in self._templates.values():
            urls: dict[str, str] = {}
            for base in (*template.endpoints, *extra.get(template.connector, ())):
                full = base.rstrip("/") + template.path
                for spelling in (base, base.rstrip("/"), _normalised_base(base)):
                    urls[spelling] = full
            self._urls[template.id] = urls

    def get(self, template_id: str) -> RequestTemplate | None:
        return self._templates.get(template_id)

    def url(self, template: RequestTemplate, base_url: str | None) -> str:
        urls = self._urls[template.id]
        if base_url is None:
            if not template.endpoints:
                raise RelayRefused(f"Template {template.id} has no default endpoint: name one.")
            return urls[template.endpoints[0]]
        full = urls.get(base_url) or urls.get(base_url.rstrip("/"))
        if full is None:
            raise RelayRefused(f"Template {template.id} is not sent to {base_url[:100]}: not one of its endpoints.")
        return full


def _items(mapping: object, what: str) -> list[tuple[str, Any]]:
    if type(mapping) is not dict and not isinstance(mapping, Mapping):
        raise TemplateRefused(f"The relay's {what} must be an object of named values.", param=what)
    items = list(mapping.items())
    for name, _ in items:
        if type(name) is not str:
            raise TemplateRefused(f"The relay's {what} must be an object of named values.", param=what)
    return items


def _check_json_paths(template: RequestTemplate) -> None:
    """No declared JSON field is the parent of another or of an open family, and no open family
    can name a declared field's parent object: then declared fields are written without collision
    checks, and no caller's field can sit where card data goes."""
    declared = [*template.card_fields, *template.value_fields, *template.fixed]
    prefixes = template.value_prefixes
    for name in declared:
        inside = name + "."
        if any(other.startswith(inside) for other in declared) or any(p.startswith(inside) for p in prefixes):
            raise ValueError(f"template {template.id}: {name} is both a value and an object")
        parts = name.split(".")
        if any(".".join(parts[:i]).startswith(prefixes) for i in range(1, len(parts))):
            raise ValueError(f"template {template.id}: an open family can name {name}'s parent object")


def _form_value(value: str | int | bool) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def _put(document: dict[str, Any], name: str, path: tuple[str, ...], value: Any, template_id: str) -> None:
    node = document
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if type(child) is not dict:
            raise TemplateRefused(f"{name} collides with another field of template {template_id}.", param=name)
        node = child
    if type(node.get(path[-1])) is dict:
        raise TemplateRefused(f"{name} collides with another field of template {template_id}.", param=name)
    node[path[-1]] = value


def _normalised_base(url: str) -> str:
    """`HTTPS://Api.Example.com/` → `https://api.example.com:443` (path kept, no trailing slash)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"a template endpoint must be an absolute http(s) base URL: {url}")
    if parts.username or parts.password:
        raise ValueError("a template endpoint cannot carry credentials")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}{parts.path.rstrip('/')}"


# Built-in templates. Field names follow each processor's API reference; the connectors fill the
# non-card fields.

SANDBOX_AUTHORIZE = RequestTemplate(
    id="sandbox.authorize",
    connector="sandbox",
    method="POST",
    path="/v1/authorizations",
    encoding=Encoding.JSON,
    card_fields={
        "card.number": CardValue.NUMBER,
        "card.cvc": CardValue.CVC,
        "card.exp_month": CardValue.EXP_MONTH,
        "card.exp_year": CardValue.EXP_YEAR,
    },
    value_fields=frozenset(
        {"idempotency_key", "merchant_id", "amount_minor", "currency", "capture", "livemode", "authentication"}
        | {"card.token"}
    ),
    endpoints=(SANDBOX_ORIGIN,),
)

# Stripe: create (and with confirm=true, authorize) a PaymentIntent from raw card data
# (`payment_method_data[card][…]`, form-encoded). No `Stripe-Account` header: the card goes to
# the account whose key authorizes the call, not to a connected account the caller names.
STRIPE_PAYMENT_INTENTS_CREATE = RequestTemplate(
    id="stripe.payment_intents.create",
    connector="stripe",
    method="POST",
    path="/v1/payment_intents",
    encoding=Encoding.FORM,
    card_fields={
        "payment_method_data[card][number]": CardValue.NUMBER,
        "payment_method_data[card][exp_month]": CardValue.EXP_MONTH,
        "payment_method_data[card][exp_year]": CardValue.EXP_YEAR,
        "payment_method_data[card][cvc]": CardValue.CVC,
    },
    fixed={"payment_method_data[type]": "card"},
    value_fields=frozenset(
        {"amount", "currency", "capture_method", "confirm", "customer", "description", "off_session"}
        | {"receipt_email", "return_url", "setup_future_usage", "statement_descriptor", "statement_descriptor_suffix"}
        | {"error_on_requires_action", "payment_method_types[]", "payment_method_types[0]"}
    ),
    value_prefixes=(
        "metadata[",
        "expand[",
        "payment_method_options[card][",
        "payment_method_data[billing_details][",
        "payment_method_data[metadata][",
    ),
    api_headers=frozenset({"authorization", "idempotency-key", "stripe-version"}),
    endpoints=("https://api.stripe.com",),
)

_BRAINTREE_TOKENIZE = (
    "mutation TokenizeCreditCard($input: TokenizeCreditCardInput!) { tokenizeCreditCard(input: $input) {"
    " clientMutationId paymentMethod { id usage details { ... on CreditCardDetails {"
    " bin brandCode last4 expirationMonth expirationYear } } } } }"
)

# Braintree's GraphQL API: tokenize the card (a single-use payment method id the connector then
# authorizes without card data). The GraphQL document is the vault's: a caller-supplied query
# could use the card variables elsewhere.
BRAINTREE_TOKENIZE_CREDIT_CARD = RequestTemplate(
    id="braintree.tokenize_credit_card",
    connector="braintree",
    method="POST",
    path="/graphql",
    encoding=Encoding.JSON,
    card_fields={
        "variables.input.creditCard.number": CardValue.NUMBER,
        "variables.input.creditCard.expirationMonth": CardValue.EXP_MONTH_MM,
        "variables.input.creditCard.expirationYear": CardValue.EXP_YEAR,
        "variables.input.creditCard.cvv": CardValue.CVC,
    },
    fixed={"query": _BRAINTREE_TOKENIZE},
    value_fields=frozenset(
        {"variables.input.clientMutationId", "variables.input.creditCard.cardholderName"}
        | {"variables.input.options.validate"}
    ),
    value_prefixes=("variables.input.creditCard.billingAddress.",),
    api_headers=frozenset({"authorization", "braintree-version"}),
    # The first is the default: a production connector names production explicitly.
    endpoints=("https://payments.sandbox.braintree-api.com", "https://payments.braintree-api.com"),
)

BUILT_IN = (SANDBOX_AUTHORIZE, STRIPE_PAYMENT_INTENTS_CREATE, BRAINTREE_TOKENIZE_CREDIT_CARD)


def default_registry(extra_endpoints: Mapping[str, Sequence[str]] | None = None) -> TemplateRegistry:
    return TemplateRegistry(BUILT_IN, extra_endpoints)
