"""Turning a parsed parameter dict into a typed parameter model, with Stripe's error shape."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from strongroom.errors import InvalidRequest, MissingParameter, UnknownParameter

M = TypeVar("M", bound=BaseModel)


def bracket(loc: tuple[int | str, ...]) -> str:
    """('card', 'number') → 'card[number]': the way Stripe names a nested parameter."""
    names = [str(part) for part in loc]
    return names[0] + "".join(f"[{n}]" for n in names[1:]) if names else ""


def parse(model: type[M], params: dict[str, Any]) -> M:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise _first_error(exc) from None


def _first_error(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False, include_input=False)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    first = unknown[0] if unknown else errors[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
    if loc[-1:] == ("[key]",):
        # pydantic marks an invalid dict key (not its value) with a trailing "[key]".
        loc = loc[:-1]
    param = bracket(loc)
    if first["type"] == "extra_forbidden":
        return UnknownParameter(param)
    if first["type"] == "missing":
        return MissingParameter(param)
    message = first["msg"].removeprefix("Value error, ")
    if message.startswith("Invalid integer"):
        return InvalidRequest(f"Invalid {param}: {message}", param=param, code="parameter_invalid_integer")
    return InvalidRequest(f"Invalid {param}: {message}", param=param)
