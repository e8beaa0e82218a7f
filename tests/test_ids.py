"""Identifiers: prefixed, base62, and every character uniform over the alphabet."""

from __future__ import annotations

import os
import string
import threading
from collections.abc import Iterator

import pytest

from strongroom import ids

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase


def test_base62_maps_each_accepted_byte_to_one_uniform_character_and_drops_the_rest() -> None:
    """Bytes 0 to 247 are 4 x 62: byte b is character b % 62, so each character comes from
    exactly four byte values (uniform); bytes 248 to 255 are dropped, never folded onto the
    first characters (which would make them likelier)."""
    given = [bytes(range(256))]
    part = ids._base62(lambda n: given.pop(0)[:n], 248)
    assert part == "".join(ALPHABET[b % 62] for b in range(248))


def test_base62_draws_again_when_too_many_bytes_were_dropped() -> None:
    draws = [bytes([255] * 32), bytes([61, 0, 9] * 11)]
    assert ids._base62(lambda n: draws.pop(0)[:n], 24) == ("z09" * 8)
    assert draws == []


@pytest.fixture
def numbered_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """os.urandom replaced by blocks of distinct 4-byte numbers; yields the sizes asked for. The
    chunks cut from them are dropped afterwards: no later id comes from them."""
    asked: list[int] = []
    counter = iter(range(1 << 30))

    def urandom(n: int) -> bytes:
        asked.append(n)
        return b"".join(next(counter).to_bytes(4, "big") for _ in range(n // 4))

    monkeypatch.setattr(ids.os, "urandom", urandom)
    ids._chunks.clear()
    yield asked
    ids._chunks.clear()


def test_id_bytes_come_from_os_blocks_and_no_chunk_is_handed_out_twice(numbered_blocks: list[int]) -> None:
    asked = numbered_blocks
    drawn = [ids._draw(32) for _ in range(300)]
    assert len(set(drawn)) == 300
    # 128 chunks a block: 300 draws took three blocks from the OS, no more.
    assert asked == [ids._BLOCK_BYTES] * 3
    # A shorter draw takes a whole chunk (its prefix); a longer one goes to the OS on its own.
    ids._chunks.clear()
    short = ids._draw(16)
    assert len(short) == 16 and len(ids._chunks) == 127
    assert len(ids._draw(64)) == 64 and asked[-1] == 64


def test_secrets_never_come_from_the_id_blocks(numbered_blocks: list[int]) -> None:
    asked = numbered_blocks
    ids._draw(32)
    left = list(ids._chunks)
    secret = ids.secret_part(32)
    assert list(ids._chunks) == left
    assert asked == [ids._BLOCK_BYTES, 40] and len(secret) == 32


def test_threads_drawing_at_once_never_get_the_same_bytes() -> None:
    ids._chunks.clear()
    results: list[list[bytes]] = [[] for _ in range(8)]

    def draw(out: list[bytes]) -> None:
        for _ in range(3000):
            out.append(ids._draw(32))

    threads = [threading.Thread(target=draw, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [chunk for out in results for chunk in out]
    assert len(every) == 24_000 and len(set(every)) == 24_000


def test_a_forked_child_drops_the_chunks_it_inherited() -> None:
    ids._chunks.clear()
    ids._draw(32)  # the parent now holds 127 chunks it will hand out next
    upcoming = set(ids._chunks)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it holds and what it draws, then leave at once
        try:
            os.write(write_end, len(ids._chunks).to_bytes(2, "big") + ids._draw(32))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        report = reader.read()
    os.waitpid(pid, 0)
    assert int.from_bytes(report[:2], "big") == 0
    assert report[2:] not in upcoming
    assert len(ids._chunks) == 127


def test_ids_are_prefixed_base62_and_distinct() -> None:
    made = {ids.new_id("payment_intent") for _ in range(2000)}
    assert len(made) == 2000
    for made_id in made:
        assert made_id.startswith("pi_") and len(made_id) == 3 + 24
        assert set(made_id[3:]) <= set(ALPHABET)


def _decoded(part: str) -> int:
    value = 0
    for char in part:
        value = value * 62 + ALPHABET.index(char)
    return value


def test_object_ids_begin_with_their_creation_time_and_sort_as_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first 8 characters are the millisecond the id was made (base62, most significant first),
    so later ids sort after earlier ones, bytewise, as PostgreSQL's B-trees and SQLite compare them;
    the other 16 are random."""
    made: list[tuple[int, str]] = []
    # Carries across digits (61 -> 62, 3843 -> 3844) and today's clock.
    for ms in (0, 61, 62, 3843, 3844, 1_796_140_000_000, 1_796_140_000_001, 1_796_226_400_000):
        monkeypatch.setattr(ids.time, "time_ns", lambda ms=ms: ms * 1_000_000 + 999_999)
        made.append((ms, ids.new_id("event")))
    for ms, made_id in made:
        assert made_id.startswith("evt_") and len(made_id) == 4 + 24
        assert _decoded(made_id[4:12]) == ms
    assert [made_id for _, made_id in made] == sorted(made_id for _, made_id in made)


def test_ids_of_one_millisecond_share_the_time_and_differ_in_the_random_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_796_140_000_000_123_456)
    made = [ids.new_id("payment_intent") for _ in range(2000)]
    assert {made_id[3:11] for made_id in made} == {made[0][3:11]}
    assert len({made_id[11:] for made_id in made}) == 2000
    assert all(len(made_id[11:]) == 16 and set(made_id[11:]) <= set(ALPHABET) for made_id in made)


def test_random_parts_carry_no_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Vault tokens and card form sessions are references to cardholder data and capabilities:
    they use random_part, all 24 characters random, never a shared time prefix."""
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_796_140_000_000_123_456)
    parts = [ids.random_part() for _ in range(200)]
    assert len({part[:8] for part in parts}) == 200
