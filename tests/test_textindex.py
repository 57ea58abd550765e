"""The corpus job's in-memory dedup index: lookups agree with a dict, across merges."""

from __future__ import annotations

import numpy as np
import pytest

from togembed.jobs import textindex as _textindex
from togembed.jobs.textindex import TextIndex, text_hash


def test_lookup_agrees_with_a_dict_across_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_textindex, "_RECENT_MAX", 50)  # many runs and merges
    monkeypatch.setattr(_textindex, "_RUN_MAX", 220)
    rng = np.random.default_rng(7)
    index, model = TextIndex(), {}
    for step in range(40):
        texts = [f"text {k}" for k in rng.integers(0, 2000, 37)]
        hashes = [text_hash(t) for t in texts]
        positions = list(range(step * 37, step * 37 + 37))
        index.add(hashes, positions)
        for h, p in zip(hashes, positions, strict=True):
            model.setdefault(h, p)  # the first position added for a text wins
        probe = [text_hash(f"text {k}") for k in rng.integers(0, 2500, 100)]
        assert index.lookup(probe) == [model.get(h, -1) for h in probe]
    assert len(index) == len(model)
    assert len(index._recent) < 50  # moved into runs
    sizes = [len(run) for run in index._runs]
    assert len(sizes) >= 3 and max(sizes) <= 220  # merged, up to the largest size
    assert len(sizes) < len(model) / 50  # fewer runs than flushes


def test_empty_index_and_empty_lookup() -> None:
    index = TextIndex()
    assert index.lookup([]) == []
    assert index.lookup([text_hash("a")]) == [-1]
    index.add([], [])
    assert len(index) == 0


def test_both_halves_of_the_hash_must_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_textindex, "_RECENT_MAX", 1)  # straight into a sorted run
    index = TextIndex()
    index.add([b"A" * 8 + b"B" * 8], [3])
    assert index.lookup([b"A" * 8 + b"B" * 8, b"A" * 8 + b"C" * 8, b"Z" * 16]) == [3, -1, -1]


def test_bad_input_is_refused() -> None:
    index = TextIndex()
    with pytest.raises(ValueError, match="2 hashes, 1 positions"):
        index.add([text_hash("a"), text_hash("b")], [0])
    index.add([text_hash("a")], [0])
    index._flush()
    with pytest.raises(ValueError, match="16 bytes"):
        index.lookup([b"short"])
