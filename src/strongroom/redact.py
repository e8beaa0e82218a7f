"""PAN masking for everything that leaves the process as text: log lines, exceptions, error bodies.

PCI DSS 4.0.1 3.4.1: a PAN is displayed masked, at most the BIN (first six) and the last four
digits. The vault never hands a PAN to the rest of the code, but a client can put a card number
anywhere (a bad parameter, a header, a URL), and any message that echoes input would then carry
it into a log or a response. So every such text passes through `redact` on its way out.

What counts as a PAN: 13 to 19 digits that pass the Luhn check, written as one run or as groups
joined by single spaces or dashes ("dddd dddd dddd dddd", "dddd-dddddd-ddddd"). A PAN is made of
whole groups: a longer digit run (an order id, a timestamp) is never searched for a PAN hidden in
its middle, otherwise one in ten long ids would be masked. Only runs of at least 13 digits reach the
Luhn check, so ordinary text costs one scan of a precompiled regex.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
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

# `\d` is every Unicode decimal digit: int() accepts fullwidth or Arabic-Indic digits, so a PAN
# written in them is still a PAN. A candidate is a run of at least 13 digits, single separators allowed.
_CANDIDATE = re.compile(rf"\d(?:[ -]?\d){{{PAN_DIGITS_MIN - 1},}}")
_GROUP = re.compile(r"\d+")


# A digit's Luhn contribution when doubled: 2d, less 9 when that has two digits.
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def luhn_valid(digits: str) -> bool:
    """ISO/IEC 7812-1 Annex B check digit over a string of decimal digits."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        total += _DOUBLED[int(char)] if position % 2 else int(char)
    return total % 10 == 0


def _luhn_prefix_sums(plain: str) -> tuple[list[int], list[int]]:
    """Prefix sums of Luhn contributions with odd (first list) or even (second) indices doubled, so
    that the Luhn sum of any slice is one subtraction: a run of tiny groups ("1-2-3-…") would
    otherwise cost a full Luhn pass for each of its up to 19 * n candidate slices."""
    values = [int(char) for char in plain]
    odd_doubled = [0]
    even_doubled = [0]
    for index, value in enumerate(values):
        doubled = _DOUBLED[value]
        odd_doubled.append(odd_doubled[-1] + (doubled if index % 2 else value))
        even_doubled.append(even_doubled[-1] + (value if index % 2 else doubled))
    return odd_doubled, even_doubled


def _hidden_digits(bounds: list[int], odd_doubled: list[int], even_doubled: list[int]) -> list[tuple[int, int]]:
    """Digit-index ranges to hide: the middle of every Luhn-valid run of whole groups. Every such
    run is masked, overlapping ones too: a false match that starts in a neighbouring number must
    not swallow a real PAN's first group and leave the PAN itself unmasked."""
    hidden: list[tuple[int, int]] = []
    for start in range(len(bounds) - 1):
        first = bounds[start]
        # Only the group ends 13 to 19 digits away: found by bisection, at most 7 of them.
        shortest = bisect.bisect_left(bounds, first + PAN_DIGITS_MIN, start + 1)
        longest = bisect.bisect_right(bounds, first + PAN_DIGITS_MAX, shortest)
        for last in bounds[shortest:longest]:
            # The check digit (rightmost) is never doubled: the parity of the last index decides.
            sums = even_doubled if (last - 1) % 2 else odd_doubled
            if (sums[last] - sums[first]) % 10 == 0:
                head = _BIN_DIGITS if last - first >= _BIN_SHOWN_FROM_DIGITS else 0
                hidden.append((first + head, last - _LAST_DIGITS))
    return hidden


def _mask_candidate(match: re.Match[str]) -> str:
    candidate = match.group()
    groups = [group.end() - group.start() for group in _GROUP.finditer(candidate)]
    if len(groups) == 1 and groups[0] > PAN_DIGITS_MAX:
        return candidate  # one long number, an id: the common case, decided without arithmetic
    bounds = [0, *itertools.accumulate(groups)]  # bounds[i]: digits before group i
    hidden = _hidden_digits(bounds, *_luhn_prefix_sums(candidate.replace(" ", "").replace("-", "")))
    if not hidden:
        return candidate
    masked = [False] * bounds[-1]
    for begin, finish in hidden:
        masked[begin:finish] = [True] * (finish - begin)
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
