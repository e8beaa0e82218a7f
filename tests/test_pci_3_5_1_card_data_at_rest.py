"""PCI DSS 3.5.1 (SECURITY.md P3): no PAN at rest outside the vault, whatever parameter carried it.

A PAN made fresh for this run (a real brand prefix, random digits, a valid Luhn digit: no older
data on the machine can match it) is sent through every string-typed body and query parameter
of the app's OpenAPI schema but the card field, in every separator form; each is refused with a
400 naming its parameter. Then the storage is searched for it: SQLite's files (database, -wal,
-shm), or `pg_dump` of the database and PostgreSQL's WAL segments, and the captured logs. A
marker stored through a legitimate request is found by the same search (it can see the data),
and the Idempotency-Key that request carried is not (I1/I2: keys are stored only as HMAC).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from strongroom.api.body import CARD_FIELDS
from strongroom.api.http import Services
from strongroom.redact import luhn_valid, redact

SEPARATORS = ("", " ", "-", ".", "_", "\t", "  ", "--")
BRANDS = (("4", 16), ("51", 16), ("2221", 16), ("6011", 16), ("3528", 16), ("62", 19), ("37", 15))


def fresh_pan() -> str:
    prefix, length = BRANDS[secrets.randbelow(len(BRANDS))]
    body = prefix + "".join(str(secrets.randbelow(10)) for _ in range(length - 1 - len(prefix)))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def written(pan: str, separator: str) -> str:
    return separator.join(pan[i : i + 4] for i in range(0, len(pan), 4))


def pan_pattern(pan: str) -> re.Pattern[bytes]:
    """The PAN's digits with up to three separators between any two, raw, JSON-escaped (a tab as
    \\t) or as bytea's hex text in pg_dump."""
    raw = rb"(?:[\s._\-]|\\t){0,3}".join(d.encode() for d in pan)
    hexed = b"(?:20|09|2d|2e|5f|5c74){0,3}".join(f"3{d}".encode() for d in pan)
    return re.compile(raw + b"|" + hexed, re.IGNORECASE)


# --- the schema's parameters ---------------------------------------------------------------------


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _strings(spec: dict[str, Any], schema: dict[str, Any], name: str, out: set[str], depth: int = 0) -> None:
    """Every string-typed parameter under `schema`, by Stripe's bracketed name."""
    if depth > 8:
        return
    schema = _resolve(spec, schema)
    for option in schema.get("anyOf", []) + schema.get("oneOf", []) + schema.get("allOf", []):
        _strings(spec, option, name, out, depth + 1)
    if schema.get("type") == "string":
        out.add(name)
    for prop, sub in schema.get("properties", {}).items():
        _strings(spec, sub, f"{name}[{prop}]" if name else prop, out, depth + 1)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):  # metadata: a value, and a key (`metadata[pan …]`)
        _strings(spec, extra, f"{name}[note]", out, depth + 1)
        out.add(f"{name}[pan {{pan}}]")
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        _strings(spec, schema["items"], f"{name}[0]", out, depth + 1)


def free_text_parameters(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(method, path, parameter) for every string-typed body or query parameter but card fields."""
    found = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            names: set[str] = set()
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "query":
                    _strings(spec, parameter.get("schema", {}), parameter["name"], names)
            for content in operation.get("requestBody", {}).get("content", {}).values():
                _strings(spec, content.get("schema", {}), "", names)
            concrete = re.sub(r"\{[^}]+\}", "x_1", path)
            found += [(method.upper(), concrete, name) for name in sorted(names - CARD_FIELDS)]
    return found


# --- what is on disk -----------------------------------------------------------------------------


def _sqlite_files(database_url: str) -> list[Path]:
    path = Path(make_url(database_url).database or "")
    return [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


async def _data_directory(database_url: str) -> Path:
    engine = sa.ext.asyncio.create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return Path(str((await conn.execute(sa.text("SHOW data_directory"))).scalar_one()))
    finally:
        await engine.dispose()


async def stored_bytes(database_url: str, since: float) -> dict[str, bytes]:
    """Every place the database keeps data, by name."""
    if database_url.startswith("sqlite"):
        return {p.name: p.read_bytes() for p in _sqlite_files(database_url)}
    url = make_url(database_url)
    dump = await asyncio.to_thread(
        subprocess.run,
        ["pg_dump", "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432), "-U", url.username or "postgres",
         "-d", url.database or ""],
        capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    stores = {"pg_dump": dump.stdout}
    wal = (await _data_directory(database_url)) / "pg_wal"
    # Segments written during the test (older ones cannot hold this run's PAN or marker).
    for segment in sorted(wal.iterdir()):
        if segment.is_file() and len(segment.name) == 24 and segment.stat().st_mtime >= since - 2:
            stores[f"pg_wal/{segment.name}"] = segment.read_bytes()
    return stores


async def test_pci_3_5_1_pan_in_any_free_text_parameter_is_refused_and_never_at_rest(
    api: httpx.AsyncClient,
    services: Services,
    database_url: str,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    since = time.time()
    pan = fresh_pan()
    spec = (await api.get("/openapi.json")).json()
    parameters = free_text_parameters(spec)
    assert ("POST", "/v1/customers", "metadata[note]") in parameters
    assert ("POST", "/v1/payment_methods", "billing_details[address][line1]") in parameters
    assert len(parameters) > 40  # the walk found the schema's parameters, not a handful

    for n, (method, path, name) in enumerate(parameters):
        value = written(pan, SEPARATORS[n % len(SEPARATORS)])
        param = name.replace("{pan}", value)
        data = {param: "x" if "{pan}" in name else value}
        if method == "GET":
            response = await api.get(path, params=data)
        else:
            response = await api.request(method, path, data=data)
        assert response.status_code == 400, (method, path, name, response.text)
        error = response.json()["error"]
        # Stripe's shape: the bracketed name (a name holding the PAN is shown masked).
        assert (error["type"], error.get("param")) == ("invalid_request_error", redact(param)), (method, path, error)
        assert pan_pattern(pan).search(response.content) is None

    # A control: a marker in a legitimate request is found where its data is; its key is not.
    marker = "marker-" + secrets.token_hex(8)
    key = "order-" + secrets.token_hex(8)
    created = await api.post("/v1/customers", data={"description": marker}, headers={"Idempotency-Key": key})
    assert created.status_code == 200, created.text
    replay = await api.post("/v1/customers", data={"description": marker}, headers={"Idempotency-Key": key})
    assert replay.headers["Idempotent-Replayed"] == "true"
    await asyncio.sleep(0)

    stores = await stored_bytes(database_url, since)
    logs = (capfd.readouterr().out + capfd.readouterr().err + caplog.text).encode()
    assert any(marker.encode() in data for data in stores.values()), sorted(stores)
    pattern = pan_pattern(pan)
    for where, data in [*stores.items(), ("logs", logs)]:
        assert pattern.search(data) is None, f"the PAN is in {where}"
        assert key.encode() not in data, f"the Idempotency-Key is in {where}"
