"""Batch planning: counts, token budgets, laziness, input checks."""

from __future__ import annotations

import itertools

import pytest

from togembed import InvalidInputError
from togembed.core.batching import (
    Batch,
    estimate_tokens,
    find_invalid_input,
    invalid_input_error,
    normalize_input,
    plan_batches,
    split_batch,
)


def test_batches_respect_item_limit_and_cover_every_input_once() -> None:
    texts = ["x"] * 1000
    batches = list(plan_batches(texts, max_items=128, max_tokens=10**9))
    assert [b.size for b in batches] == [128] * 7 + [104]
    assert batches[0].start == 0 and batches[-1].stop == 1000
    assert all(a.stop == b.start for a, b in itertools.pairwise(batches))


def test_batches_respect_token_budget() -> None:
    texts = ["a" * 400] * 10  # 101 estimated tokens each
    batches = list(plan_batches(texts, max_items=128, max_tokens=250))
    assert [b.size for b in batches] == [2, 2, 2, 2, 2]
    assert all(b.tokens <= 250 for b in batches)


def test_input_over_token_budget_travels_alone() -> None:
    texts = ["short", "a" * 4_000_000, "short"]
    batches = list(plan_batches(texts, max_items=128, max_tokens=1000))
    assert [(b.start, b.stop) for b in batches] == [(0, 1), (1, 2), (2, 3)]


def test_plan_is_lazy() -> None:
    class Exploding(list):
        def __getitem__(self, i):  # type: ignore[override]
            if i >= 256:
                raise AssertionError("planned too far ahead")
            return super().__getitem__(i)

    it = plan_batches(Exploding(["x"] * 1000), max_items=128, max_tokens=10**9)
    assert next(it) == Batch(0, 128, 128)


def test_plan_of_a_range() -> None:
    batches = list(plan_batches(["x"] * 100, max_items=16, max_tokens=10**9, start=40, stop=72))
    assert [(b.start, b.stop) for b in batches] == [(40, 56), (56, 72)]


def test_split_batch_halves_and_keeps_tokens() -> None:
    texts = ["a" * 40] * 5
    left, right = split_batch(texts, Batch(0, 5, 55))
    assert (left.start, left.stop, right.start, right.stop) == (0, 2, 2, 5)
    assert left.tokens + right.tokens == 55


def test_token_estimate_is_generous_for_cjk() -> None:
    assert estimate_tokens("") == 1
    assert estimate_tokens("abcd" * 100) == 101
    assert estimate_tokens("漢" * 100) >= 100  # ~1 token per CJK character


def test_normalize_input_accepts_str_sequences_and_iterables() -> None:
    assert normalize_input("one") == ["one"]
    assert normalize_input(("a", "b")) == ("a", "b")
    assert normalize_input(t for t in ["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize("bad", [b"bytes", 42, None])
def test_normalize_input_rejects_non_text(bad: object) -> None:
    with pytest.raises(InvalidInputError):
        normalize_input(bad)  # type: ignore[arg-type]


def test_find_invalid_input_names_the_first_bad_index() -> None:
    texts = ["a", "b", None, 3]
    assert find_invalid_input(texts, 0, 4) == 2
    assert find_invalid_input(texts, 0, 2) is None
    err = invalid_input_error(texts, 3)
    assert err.index == 3 and "input 3" in str(err) and "int" in str(err)
    assert isinstance(err, TypeError) and isinstance(err, ValueError)
