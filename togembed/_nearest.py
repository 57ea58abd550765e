"""Nearest neighbours in a finished output file: the last step of the offline demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from ._corpus import MissingDependencyError, npy_ids_path

__all__ = ["load_output", "nearest"]


def load_output(path: Path) -> tuple[list[str], np.ndarray]:
    """Ids and the (N, D) float32 matrix of a ``togembed embed`` output file."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        ids = npy_ids_path(path).read_text(encoding="utf-8").splitlines()
        return ids, np.load(path, mmap_mode="r")
    if suffix == ".jsonl":
        rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
        return [r["id"] for r in rows], np.array([r["embedding"] for r in rows], np.float32)
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError(
            "reading .parquet needs pip install 'togembed[parquet]'"
        ) from exc
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    matrix = column.flatten().to_numpy().reshape(len(table), -1).astype(np.float32, copy=False)
    return table.column("id").to_pylist(), matrix


def nearest(matrix: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Row numbers and cosine similarities of the ``k`` rows closest to ``query``."""
    norms = np.linalg.norm(matrix, axis=1) * float(np.linalg.norm(query))
    scores = (matrix @ query) / np.where(norms == 0, 1, norms)
    top = np.argsort(-scores)[:k]
    return [(int(i), float(scores[i])) for i in top]
