"""`Secret`: a value that must not leak through repr, str, logs or tracebacks.

Card numbers, CVCs, API keys and tokens travel wrapped; reading the value is an explicit
`.reveal()`, so every place that handles the raw value is greppable.
"""

from __future__ import annotations

import hmac
from typing import Generic, TypeVar

T = TypeVar("T", str, bytes)


class Secret(Generic[T]):
    __slots__ = ("_value",)
    _value: T

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        return self._value

    def equals(self, other: T) -> bool:
        """Constant-time comparison (PCI DSS 8.3.2 / CWE-208: no timing oracle on secrets)."""
        return hmac.compare_digest(self._value, other)

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")
