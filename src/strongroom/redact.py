"""PAN detection and masking: the one detector for everything that leaves the process as text (log
lines, exceptions, error bodies) and for every free-text parameter a client sends.

PCI DSS 4.0.1 3.4.1: a PAN is displayed masked, at most the BIN (first six) and the last four
digits; 3.5.1: it is unreadable wherever it is stored. The vault never hands a PAN to the rest of
the code, but a client can put a card number anywhere (a description, a metadata value, a header,
a URL). So `holds_pan` refuses it in every parameter but the card fields (`strongroom.api.body`),
and every text on its way out passes through `redact`.

What counts as a PAN: 13 to 19 digits that pass the Luhn check (ISO/IEC 7812-1 Annex B) and start
with a card brand's issuer prefix at one of that brand's lengths (`_BRANDS`), written as one run
or as groups joined by up to three separators (whitespace, dashes, dots, underscores: "dddd dddd",
"dddd--dddd", "dddd.dddd", "dddd\tdddd"). A PAN is made of whole groups: a longer digit run (an
order id, a timestamp) is never searched for a PAN hidden in its middle, otherwise one in ten long
ids would match. Digits that belong to a UUID or to a hexadecimal word of 20 characters or more (a digest, a
random key) are never part of a PAN: such strings are random, and one in a few thousand would otherwise hold a
Luhn-valid run with a brand's prefix. Only runs of at least 13 digits reach any of this, so
ordinary text costs one scan of a precompiled regex.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

PAN_DIGITS_MIN = 13
PAN_DIGITS_MAX = 19
# Below this length, BIN + last four would leave too few hidden digits to guess (a 13-digit PAN
# would keep 10 of 13, and the Luhn digit narrows the rest to 100 candidates): keep last four only.
_BIN_SHOWN_FROM_DIGITS = 15
_BIN_DIGITS = 6
_LAST_DIGITS = 4
MASK = "*"

# Issuer identification numbers and PAN lengths, from ISO/IEC 7812-1 (the IIN registry) and the
# brands' published ranges (Visa, Mastercard and Discover/Diners issuer guides; JCB, UnionPay,
# Mir and RuPay BIN documentation). Prefixes compare as strings of equal length. Lengths below 16
# are kept only where the brand issues them and no phone number of that length shares the prefix:
# E.164 numbers have up to 15 digits, and a 13-digit German (+49 151…), Chinese (+86 138…) or
# Indonesian (+62 812…) mobile number would otherwise match Visa's legacy 13-digit numbers (no
# longer issued) or Maestro's short ones (56 to 69; issued at 16 to 19 today) one time in ten.
_16_TO_19 = range(16, 20)
_BRANDS: tuple[tuple[str, str, range], ...] = (
    ("4", "4", _16_TO_19),  # Visa (16; 19 for some debit)
    ("51", "55", range(16, 17)),  # Mastercard
    ("2221", "2720", range(16, 17)),  # Mastercard 2-series
    ("34", "34", range(15, 16)),  # American Express
    ("37", "37", range(15, 16)),  # American Express
    ("6011", "6011", _16_TO_19),  # Discover
    ("644", "649", _16_TO_19),  # Discover
    ("65", "65", _16_TO_19),  # Discover
    ("622126", "622925", _16_TO_19),  # Discover (UnionPay co-brand)
    ("3528", "3589", _16_TO_19),  # JCB
    ("300", "305", range(14, 20)),  # Diners Club
    ("36", "36", range(14, 20)),  # Diners Club International
    ("38", "39", _16_TO_19),  # Diners Club (Discover network)
    ("62", "62", _16_TO_19),  # UnionPay
    ("50", "50", _16_TO_19),  # Maestro
    ("56", "69", _16_TO_19),  # Maestro
    ("2200", "2204", _16_TO_19),  # Mir
    ("508", "508", range(16, 17)),  # RuPay
    ("81", "82", range(16, 17)),  # RuPay
)

# `\d` is every Unicode decimal digit: int() accepts fullwidth or Arabic-Indic digits, so a PAN
# written in them is still a PAN. Separators: any whitespace, ASCII and Unicode dashes, dot,
# underscore; up to three in a row ("  ", "--", " - "), beyond that two numbers are two numbers.
_SEPARATOR = r"[\s._\-\u2010-\u2015\u2212]"
_CANDIDATE = re.compile(rf"\d(?:{_SEPARATOR}{{0,3}}\d){{{PAN_DIGITS_MIN - 1},}}")
_GROUP = re.compile(r"\d+")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_UUID_CHARS = 36
_HEX = frozenset(string.hexdigits)
# Random hex strings are 16 characters (8 bytes) or more; below 20 a word is too short to hide a
# 16-digit PAN behind its letters, so "abc4242…" (a PAN with a word glued on) is still a PAN.
_HEX_WORD_MIN = 20


# A digit's Luhn contribution when doubled: 2d, less 9 when that has two digits.
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def luhn_valid(digits: str) -> bool:
    """ISO/IEC 7812-1 Annex B check digit over a string of decimal digits."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        total += _DOUBLED[int(char)] if position % 2 else int(char)
    return total % 10 == 0


def brand_prefix_valid(digits: str) -> bool:
    """Whether ASCII `digits` start with a card brand's issuer prefix at one of its lengths."""
    return any(low <= digits[: len(low)] <= high and len(digits) in lengths for low, high, lengths in _BRANDS)


def _luhn_prefix_sums(values: list[int]) -> tuple[list[int], list[int]]:
    """Prefix sums of Luhn contributions with odd (first list) or even (second) indices doubled, so
    that the Luhn sum of any slice is one subtraction: a run of tiny groups ("1-2-3-…") would
    otherwise cost a full Luhn pass for each of its up to 19 * n candidate slices."""
    odd_doubled = [0]
    even_doubled = [0]
    for index, value in enumerate(values):
        doubled = _DOUBLED[value]
        odd_doubled.append(odd_doubled[-1] + (doubled if index % 2 else value))
        even_doubled.append(even_doubled[-1] + (value if index % 2 else doubled))
    return odd_doubled, even_doubled


def _in_hex_string(text: str, begin: int, finish: int) -> bool:
    """Whether the digit group text[begin:finish] is glued to letters in a word of hex digits only."""
    before = text[begin - 1] if begin else ""
    after = text[finish : finish + 1]
    if not ((before.isascii() and before.isalpha()) or (after.isascii() and after.isalpha())):
        return False
    left, right = begin, finish
    while left and text[left - 1].isascii() and text[left - 1].isalnum():
        left -= 1
    while right < len(text) and text[right].isascii() and text[right].isalnum():
        right += 1
    return right - left >= _HEX_WORD_MIN and _HEX.issuperset(text[left:right])


def _random_groups(text: str, spans: list[tuple[int, int]]) -> list[bool]:
    """For each digit group (its span in `text`): whether it lies in a UUID or a hex string."""
    window = (max(0, spans[0][0] - _UUID_CHARS), spans[-1][1] + _UUID_CHARS)
    uuids = [uuid.span() for uuid in _UUID.finditer(text, *window)]
    marks: list[bool] = []
    current = 0
    for begin, finish in spans:  # both lists in text order: one walk
        while current < len(uuids) and uuids[current][1] < finish:
            current += 1
        in_uuid = current < len(uuids) and uuids[current][0] <= begin
        marks.append(in_uuid or _in_hex_string(text, begin, finish))
    return marks


def _pans_in(match: re.Match[str]) -> list[tuple[int, int]]:
    """The PANs of a candidate as digit-index ranges [first, last). Every one, overlapping ones too:
    a false match that starts in a neighbouring number must not swallow a real PAN's first group
    and leave the PAN itself unmasked."""
    candidate = match.group()
    spans = [group.span() for group in _GROUP.finditer(candidate)]
    if len(spans) == 1 and spans[0][1] > PAN_DIGITS_MAX:
        return []  # one long number, an id: the common case, decided without arithmetic
    bounds = [0, *itertools.accumulate(finish - begin for begin, finish in spans)]  # digits before group i
    offset = match.start()
    random = _random_groups(match.string, [(offset + begin, offset + finish) for begin, finish in spans])
    # stop[i]: the first group at or after i that is part of a random string; a PAN ends before it.
    stop = [len(spans)] * (len(spans) + 1)
    for index in reversed(range(len(spans))):
        stop[index] = index if random[index] else stop[index + 1]
    values = [int(char) for char in candidate if char.isdecimal()]
    plain = "".join(map(str, values))  # ASCII digits, for the prefix table
    odd_doubled, even_doubled = _luhn_prefix_sums(values)
    found: list[tuple[int, int]] = []
    for start in range(len(spans)):
        if random[start]:
            continue
        first = bounds[start]
        # Only the group ends 13 to 19 digits away: found by bisection, at most 7 of them.
        shortest = bisect.bisect_left(bounds, first + PAN_DIGITS_MIN, start + 1)
        longest = min(bisect.bisect_right(bounds, first + PAN_DIGITS_MAX, shortest), stop[start] + 1)
        for last in bounds[shortest:longest]:
            # The check digit (rightmost) is never doubled: the parity of the last index decides.
            sums = even_doubled if (last - 1) % 2 else odd_doubled
            if (sums[last] - sums[first]) % 10 == 0 and brand_prefix_valid(plain[first:last]):
                found.append((first, last))
    return found


def holds_pan(text: str) -> bool:
    """Whether `text` holds a PAN anywhere (see the module's docstring for what counts)."""
    if len(text) < PAN_DIGITS_MIN:
        return False
    first = _CANDIDATE.search(text)  # the common case: none, one scan and no generator
    if first is None:
        return False
    return any(_pans_in(match) for match in _CANDIDATE.finditer(text, first.start()))


def _mask_candidate(match: re.Match[str]) -> str:
    candidate = match.group()
    pans = _pans_in(match)
    if not pans:
        return candidate
    masked = [False] * sum(char.isdecimal() for char in candidate)
    for first, last in pans:
        head = _BIN_DIGITS if last - first >= _BIN_SHOWN_FROM_DIGITS else 0
        masked[first + head : last - _LAST_DIGITS] = [True] * (last - _LAST_DIGITS - first - head)
    out: list[str] = []
    index = 0
    for char in candidate:
        if char.isdecimal():
            out.append(MASK if masked[index] else char)
            index += 1
        else:
            out.append(char)
    return "".join(out)


def redact(text: str) -> str:
    """`text` with every PAN masked."""
    if len(text) < PAN_DIGITS_MIN:
        return text
    return _CANDIDATE.sub(_mask_candidate, text)


def redact_value(value: Any) -> Any:
    """A copy of a JSON-like value with every string redacted. An int that is a PAN becomes its
    masked string; another object is replaced by its masked repr only if that repr holds a PAN."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | float | None):
        return value
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**PAN_DIGITS_MAX else ""
        masked = redact(text)
        return value if masked == text else masked
    if isinstance(value, Mapping):
        return {redact_value(key): redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(item) for item in value]
    text = repr(value)
    masked = redact(text)
    return value if masked == text else masked


def redact_event(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: every value of every event dict, before it is rendered."""
    return {key: redact_value(value) for key, value in event_dict.items()}


class RedactingFilter(logging.Filter):
    """A stdlib logging filter (for handlers) that masks PANs in the message, its arguments, the
    exception text and the stack text of every record the handler emits. It always lets the record
    through: it changes what is written, never whether."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {key: _redact_arg(arg) for key, arg in record.args.items()}
        elif record.args:
            record.args = tuple(_redact_arg(arg) for arg in record.args)
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            # A PAN in a non-string argument, or split across arguments: keep the masked text only.
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            # Formatters reuse a cached exc_text: filling it here is what makes the traceback masked.
            record.exc_text = _formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_formatter = logging.Formatter()


def _redact_arg(arg: object) -> object:
    # Non-strings keep their type (a %d format needs an int); the whole-message check catches them.
    return redact(arg) if isinstance(arg, str) else arg


def install_logging_filter() -> None:
    """Put a `RedactingFilter` on every handler that exists now: the root's, every named logger's
    (uvicorn's included, which do not propagate) and the last-resort handler. A handler filter,
    unlike a logger filter, also sees records propagated from child loggers."""
    handlers: list[logging.Handler] = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers.extend(logger.handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())


def with_redaction(log_config: Mapping[str, Any]) -> dict[str, Any]:
    """A `logging.config.dictConfig` dictionary with a `RedactingFilter` on each of its handlers,
    for servers (uvicorn) that build their handlers from such a dictionary after we configured ours."""
    config = dict(log_config)
    config["filters"] = {**config.get("filters", {}), "redact_pan": {"()": f"{__name__}.RedactingFilter"}}
    config["handlers"] = {
        name: {**handler, "filters": [*handler.get("filters", []), "redact_pan"]}
        for name, handler in config.get("handlers", {}).items()
    }
    return config
