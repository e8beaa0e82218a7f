"""PCI DSS 3.4.1 (SECURITY.md P2): a PAN is shown masked everywhere, at most BIN + last four.

Three layers: properties of `redact` itself (hypothesis), the logging configuration a real
process gets from `_configure_logging` (stdlib, uvicorn's loggers, structlog, tracebacks), and a
real `strongroom serve` at debug level fed card numbers in bad parameters, headers, the URL path
and the query string: neither its output nor its error bodies may hold a full PAN.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import string
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strongroom.redact import RedactingFilter, holds_pan, luhn_valid, redact, redact_value
from tests.e2e.conftest import _cli, _environment, _free_port, _stop, _wait_healthy

# Between digit groups: nothing, or a run of whitespace, dashes, dots or underscores.
SEPARATORS = ("", " ", "-", ".", "_", "\t", "  ", "--", " - ")
# Real issuer prefixes and lengths of the brands (ISO/IEC 7812 registry, brands' published ranges).
BRAND_PREFIXES = (
    ("4", 16), ("4", 19), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15), ("37", 15),
    ("6011", 16), ("6011", 19), ("644", 16), ("65", 16), ("622126", 16), ("3528", 16), ("3589", 19),
    ("300", 14), ("36", 14), ("38", 16), ("62", 19), ("50", 16), ("6759", 18), ("2200", 16),
)  # fmt: skip
# Stripe's test cards in the ways people write them (16-digit Visa, 15-digit Amex, 14-digit Diners).
VISA = "4242424242424242"
VISA_DEBIT_SPACED = "4000 0566 5566 5556"
AMEX_DASHED = "3782-822463-10005"
DINERS = "36227206271667"
PANS = (VISA, VISA_DEBIT_SPACED, AMEX_DASHED, DINERS)


def surviving(pan: str, text: str) -> bool:
    """Whether the PAN's digits occur in `text` in order, with at most a separator between them."""
    digits = re.sub(r"\D", "", pan)
    return re.search(r"[\s._\-]{0,3}".join(digits), text) is not None


def with_check_digit(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


@st.composite
def pans(draw: st.DrawFn) -> str:
    prefix, length = draw(st.sampled_from(BRAND_PREFIXES))
    body = draw(st.text("0123456789", min_size=length - 1 - len(prefix), max_size=length - 1 - len(prefix)))
    return with_check_digit(prefix + body)


@st.composite
def written(draw: st.DrawFn, digits: str) -> str:
    """`digits` as someone may write them: any separator (or none) between any two digits."""
    gaps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(digits) - 1, max_size=len(digits) - 1))
    return digits[0] + "".join(gap + digit for gap, digit in zip(gaps, digits[1:], strict=True))


# Arbitrary text around the number, except a digit touching it (that would make it another
# number) or a hex digit (that could make it part of a long hex string, a digest).
_HEX = frozenset(string.hexdigits)
prefixes = st.text().filter(lambda text: not text[-1:].isdecimal() and text[-1:] not in _HEX)
suffixes = st.text().filter(lambda text: not text[:1].isdecimal() and text[:1] not in _HEX)


@given(data=st.data(), prefix=prefixes, suffix=suffixes)
def test_p2_no_luhn_valid_pan_survives_redaction(data: st.DataObject, prefix: str, suffix: str) -> None:
    pan = data.draw(pans())
    text = prefix + data.draw(written(pan)) + suffix
    out = redact(text)
    assert not surviving(pan, out)
    # Masking replaces digits one for one and touches nothing else.
    assert len(out) == len(text)
    assert all(new == old or (new == "*" and old.isdecimal()) for old, new in zip(text, out, strict=True))


def test_p2_pan_next_to_other_numbers_is_still_masked() -> None:
    """A neighbouring number joined by a separator makes one run: a false match starting in the
    neighbour must not swallow the PAN's first group and leave the rest of the PAN readable."""
    for text in (f"order 12 {VISA} exp 12 28", "qty 1234567890 4242 4242 4242 4242", f"3-{AMEX_DASHED}-7"):
        out = redact(text)
        assert not surviving(VISA, out) and not surviving(AMEX_DASHED, out), out


@given(pan=pans())
def test_p2_masked_pan_keeps_at_most_bin_and_last_four(pan: str) -> None:
    masked = redact(pan)
    shown = [(i, c) for i, c in enumerate(masked) if c != "*"]
    assert masked[-4:] == pan[-4:]
    if len(pan) >= 15:
        assert masked == pan[:6] + "*" * (len(pan) - 10) + pan[-4:]
    else:  # too short to show the BIN too: 13-14 digits would leave fewer than 5 hidden
        assert masked == "*" * (len(pan) - 4) + pan[-4:]
    assert len(shown) <= 10


@given(
    body=st.text("0123456789", min_size=12, max_size=18),
    prefix=st.text(st.characters(blacklist_categories=["Nd"])),
    suffix=st.text(st.characters(blacklist_categories=["Nd"])),
)
def test_digit_runs_that_fail_luhn_are_left_alone(body: str, prefix: str, suffix: str) -> None:
    check = with_check_digit(body)[-1]
    number = body + str((int(check) + 1) % 10)  # any other last digit fails the check
    assert not luhn_valid(number)
    assert redact(prefix + number + suffix) == prefix + number + suffix


@given(number=st.text("0123456789", min_size=20, max_size=64))
def test_long_ids_are_never_searched_for_a_pan_inside(number: str) -> None:
    text = f"order ORD-{number} shipped"
    assert redact(text) == text


@given(text=st.text())
def test_redaction_is_idempotent_and_length_preserving(text: str) -> None:
    once = redact(text)
    assert redact(once) == once
    assert len(once) == len(text)


@pytest.mark.parametrize("separator", SEPARATORS)
def test_p2_pan_with_any_separator_is_masked(separator: str) -> None:
    """Dots, underscores, tabs and runs such as a double space or "--" were left readable."""
    written_ = separator.join(("4242", "4242", "4242", "4242"))
    out = redact(f"card {written_}.")
    assert out == f"card {separator.join(('4242', '42**', '****', '4242'))}.", out
    assert holds_pan(written_)


@given(text=st.text())
def test_p2_one_detector_for_masking_and_refusal(text: str) -> None:
    """What the parameter check refuses is exactly what redaction masks (strongroom.api.body)."""
    assert holds_pan(text) == (redact(text) != text)


def test_uuids_and_hex_strings_are_not_card_numbers_but_a_pan_glued_to_a_word_is() -> None:
    assert not holds_pan("42424242-4242-4242-8242-424242424242")  # a UUID
    assert not holds_pan("deadbeef4242424242424242")  # 24 hex characters: a digest
    assert holds_pan("abc4242424242424242")  # too short a word to be a random hex string
    assert holds_pan("order-4242424242424242") and holds_pan("card4242424242424242xyz")


@pytest.mark.parametrize("separator", [".", "_", "\t", "  ", "--", "-", " ", ""])
async def test_p2_pan_in_url_path_is_masked_in_the_404_whatever_its_separators(
    api: httpx.AsyncClient, separator: str
) -> None:
    """GET /v1/customers/4242.4242.4242.4242 echoed the number in its 404 message."""
    pan = separator.join(("4242", "4242", "4242", "4242"))
    response = await api.get(f"/v1/customers/{quote(pan)}")  # a tab as %09, spaces as %20
    assert response.status_code == 404, response.text
    masked = separator.join(("4242", "42**", "****", "4242"))
    assert response.json()["error"]["message"] == f"No such customer: '{masked}'"
    assert not surviving(pan, response.text)


def test_known_numbers_and_their_masks() -> None:
    assert redact(f"card {VISA} exp 12/28") == "card 424242******4242 exp 12/28"
    assert redact(VISA_DEBIT_SPACED) == "4000 05** **** 5556"
    assert redact(AMEX_DASHED) == "3782-82****-*0005"
    assert redact(DINERS) == "**********1667"
    assert redact("ids 2026-11-24 10:00 12345678901234 99") == "ids 2026-11-24 10:00 12345678901234 99"
    assert redact("5555555555554444") == "555555******4444"
    # Fullwidth digits are digits to int(), so a PAN written in them is masked too.
    fullwidth = VISA.translate(str.maketrans("0123456789", "".join(map(chr, range(0xFF10, 0xFF1A)))))
    assert redact(fullwidth) == fullwidth[:6] + "*" * 6 + fullwidth[-4:]


def test_redact_value_masks_nested_strings_and_pan_integers() -> None:
    value = {"card": {"number": int(VISA), "list": [AMEX_DASHED, 7], VISA: True}, "ok": 1.5, "none": None}
    assert redact_value(value) == {
        "card": {"number": "424242******4242", "list": ["3782-82****-*0005", 7], "424242******4242": True},
        "ok": 1.5,
        "none": None,
    }


def test_logging_filter_masks_message_args_and_exception_text() -> None:
    try:
        raise ValueError(f"bad card {VISA}")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "card %s / %d", (VISA, int(VISA)), sys.exc_info())
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "card 424242******4242 / 424242******4242"
    assert record.exc_text is not None
    assert "bad card 424242******4242" in record.exc_text
    assert not surviving(VISA, logging.Formatter().format(record))


LOGGING_SCRIPT = textwrap.dedent(
    """
    import logging, logging.config, sys
    import structlog, uvicorn.config
    from strongroom import redact
    from strongroom.cli import _configure_logging

    PAN = sys.argv[1]
    # The order of a uvicorn worker: uvicorn's dictConfig first, then the app factory's configuration.
    logging.config.dictConfig(redact.with_redaction(uvicorn.config.LOGGING_CONFIG))
    _configure_logging("debug")
    logging.getLogger("aiosqlite").debug("executing %r", ("SELECT ?", (PAN,)))
    logging.getLogger("uvicorn.error").info("client sent %s", PAN)
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "1.2.3.4", "GET", "/v1/x?c=" + PAN, "1.1", 404)
    try:
        raise KeyError(PAN)
    except KeyError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        structlog.get_logger().exception("request.failed", card=PAN, nested={"n": [int(PAN.replace("-", ""))]})
    """
)


def test_p2_pan_masked_in_every_logger_of_a_configured_process(tmp_path: Path) -> None:
    """A real process configured as `strongroom serve` configures its workers: stdlib and
    uvicorn loggers (uvicorn's do not propagate to the root), structlog, and tracebacks."""
    pan = VISA_DEBIT_SPACED.replace(" ", "-")
    done = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT, pan], capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for expected in ("executing", "client sent", "GET /v1/x?c=", "Exception in ASGI application", "request.failed"):
        assert expected in output
    assert "KeyError" in output and "Traceback" in output
    assert "4000-05**-****-5556" in output
    assert not surviving(pan, output), output


# --- a real server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggingServer:
    url: str
    secret_key: str
    log_path: Path


@pytest.fixture(scope="module")
def debug_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggingServer]:
    """`strongroom serve` on the embedded default at log level debug, output captured to a file.
    SQLite only: the store plays no part in masking, and aiosqlite's debug log echoes every SQL
    parameter, which is exactly the kind of output that must not carry a PAN."""
    root = tmp_path_factory.mktemp("redaction")
    log_path = root / "server.log"
    env = _environment(None) | {"STRONGROOM_LOG_LEVEL": "debug"}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            _cli("serve", "--port", str(port), "--data-dir", str(root / "data")),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(proc, url, log_path)
        # On an empty data dir, serve creates a test merchant and prints its key once.
        key = re.search(r"sk_test_\w+", log_path.read_text())
        assert key is not None
        yield LoggingServer(url, key.group(), log_path)
    finally:
        _stop(proc)


def _raw_request(url: str, request: bytes) -> bytes:
    host, port = httpx.URL(url).host, httpx.URL(url).port
    assert port is not None
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(request)
        return sock.recv(65536)


@pytest.mark.e2e
def test_p2_pan_masked_in_logs_and_error_responses(debug_server: LoggingServer) -> None:
    auth = {"Authorization": f"Bearer {debug_server.secret_key}"}
    bodies: list[str] = []
    with httpx.Client(base_url=debug_server.url, headers=auth, timeout=10) as api:
        bad_parameter = api.post("/v1/payment_intents", data={"amount": VISA, "currency": "usd"})
        unknown_name = api.post(
            "/v1/payment_intents", data={"amount": "100", "currency": "usd", f"n{AMEX_DASHED}": "1"}
        )
        query = api.get("/v1/payment_intents", params={"limit": VISA_DEBIT_SPACED.replace(" ", "")})
        path_id = api.get(f"/v1/payment_intents/pi_{VISA}")
        unknown_url = api.get(f"/v1/{DINERS}")
        in_headers = api.post(
            "/v1/payment_intents",
            data={"amount": "x", "currency": "usd"},
            headers={"Authorization": f"Bearer {VISA}", "Stripe-Account": VISA, "X-Card": AMEX_DASHED},
        )
        bad_key = api.get("/v1/payment_intents", headers={"Authorization": f"Bearer sk_test_{VISA}"})
        for response in (bad_parameter, unknown_name, query, path_id, unknown_url, in_headers, bad_key):
            assert 400 <= response.status_code < 500, response.text
            error = response.json()["error"]
            assert error["message"]
            bodies.append(response.text + json.dumps(dict(response.headers)))
    # An unparsable header line, for uvicorn's own parser and logger.
    raw = _raw_request(debug_server.url, f"GET /v1/x HTTP/1.1\r\nHost: a\r\nX-Card {VISA}\r\n\r\n".encode())
    assert raw.startswith(b"HTTP/1.1 400")
    bodies.append(raw.decode(errors="replace"))

    # The echoes are there, masked: the error responses really did quote the input.
    # A card number in a parameter is refused by name before any parsing (PCI DSS 3.4.1, 3.5.1).
    assert bad_parameter.json()["error"]["param"] == "amount"
    assert unknown_name.json()["error"]["param"] == "n3782-82****-*0005"
    assert query.json()["error"]["param"] == "limit"
    assert path_id.json()["error"]["message"] == "No such payment_intent: 'pi_424242******4242'"
    assert "**********1667" in unknown_url.json()["error"]["message"]
    for pan in PANS:
        for body in bodies:
            assert not surviving(pan, body), body

    log = debug_server.log_path.read_text(errors="replace")
    # The server logged at debug, including the lookup that carried a card number (as an SQL parameter).
    assert "'pi_424242******4242'" in log
    assert "Invalid HTTP request received" in log
    for pan in PANS:
        assert not surviving(pan, log)
