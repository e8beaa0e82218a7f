"""Identifiers: prefixed, base62, and every character uniform over the alphabet."""

from __future__ import annotations

import string

import pytest

from strongroom import ids

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase


def test_random_part_maps_each_accepted_byte_to_one_uniform_character_and_drops_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes 0 to 247 are 4 x 62: byte b is character b % 62, so each character comes from
    exactly four byte values (uniform); bytes 248 to 255 are dropped, never folded onto the
    first characters (which would make them likelier)."""
    given = [bytes(range(256))]
    monkeypatch.setattr(ids.os, "urandom", lambda n: given.pop(0)[:n] if given else bytes(n))
    part = ids.random_part(248)
    assert part == "".join(ALPHABET[b % 62] for b in range(248))


def test_random_part_draws_again_when_too_many_bytes_were_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = [bytes([255] * 32), bytes([61, 0, 9] * 11)]
    monkeypatch.setattr(ids.os, "urandom", lambda n: draws.pop(0)[:n])
    assert ids.random_part() == ("z09" * 8)
    assert draws == []


def test_ids_are_prefixed_base62_and_distinct() -> None:
    made = {ids.new_id("payment_intent") for _ in range(2000)}
    assert len(made) == 2000
    for made_id in made:
        assert made_id.startswith("pi_") and len(made_id) == 3 + 24
        assert set(made_id[3:]) <= set(ALPHABET)
