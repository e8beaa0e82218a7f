"""OpenAPI for routes that parse their own bodies (form or JSON): request and response schemas
come from the same pydantic models that validate them, so schemathesis fuzzes what we enforce."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"
_registry: dict[str, Any] = {}


def _ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF, mode=mode)  # type: ignore[arg-type]
    for name, definition in schema.pop("$defs", {}).items():
        _registry[name] = definition
    _registry[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


class ErrorDetail(BaseModel):
    type: str
    message: str
    code: str | None = None
    param: str | None = None
    decline_code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorDetail


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    error = _ref(ErrorEnvelope, "serialization")
    return {
        200: _json(_ref(model, "serialization"), "OK"),
        400: _json(error, "Invalid request"),
        401: _json(error, "Missing or invalid API key"),
        402: _json(error, "Card declined"),
        403: _json(error, "Not permitted"),
        404: _json(error, "No such object"),
        409: _json(error, "Conflict with a concurrent request"),
        413: _json(error, "Body too large"),
        422: _json(error, "Unprocessable"),
        429: _json(error, "Too many requests"),
        502: _json(error, "Processor failure"),
        503: _json(error, "Overloaded: shed before any work, retry after Retry-After"),
    }


def body(model: type[BaseModel]) -> dict[str, Any]:
    ref = _ref(model, "validation")
    return {
        "requestBody": {
            # Optional only when every parameter is: an empty body cannot create a payment intent.
            "required": bool(_registry[model.__name__].get("required")),
            "content": {"application/json": {"schema": ref}},
        }
    }


def query(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF)
    params = []
    for name, prop in schema.get("properties", {}).items():
        if name in ("expand", "created") or "$ref" in prop:
            continue
        params.append({"name": name, "in": "query", "required": False, "schema": prop})
    return {"parameters": params}


def install(app: FastAPI) -> None:
    def custom() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
        spec.setdefault("components", {}).setdefault("schemas", {}).update(_registry)
        security = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["components"]["securitySchemes"] = security
        spec["security"] = [{"bearer": []}]
        app.openapi_schema = spec
        return spec

    app.openapi = custom  # type: ignore[method-assign]
