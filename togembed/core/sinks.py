"""Where the rows of validated answers go: one preallocated float32 array (``embed``), or the
peers' response shape (``embeddings.create``)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .answers import DecodedBatch
from .batching import Batch
from .types import Embedding, EmbeddingResponse, Usage

__all__ = ["ArraySink", "ListSink", "Sink"]


class Sink(Protocol):
    """Where the rows of a validated batch go."""

    def write(self, batch: Batch, decoded: DecodedBatch) -> None: ...


class ArraySink:
    """Rows straight into one preallocated float32 array; allocated when the first answer tells
    the dimension, so nothing is held per vector."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.array: np.ndarray | None = None

    def write(self, batch: Batch, decoded: DecodedBatch) -> None:
        if self.array is None:
            self.array = np.empty((self.n, decoded.dim), dtype=np.float32)
        decoded.write_into(self.array[batch.start : batch.stop])

    def result(self) -> np.ndarray:
        return self.array if self.array is not None else np.empty((0, 0), dtype=np.float32)


class ListSink:
    """``Embedding`` objects for ``embeddings.create``, the peers' response shape."""

    def __init__(self, n: int, *, keep_base64: bool) -> None:
        self.data: list[Embedding | None] = [None] * n
        self.keep_base64 = keep_base64
        self.model: str | None = None
        self.usage: list[Usage | None] = []

    def write(self, batch: Batch, decoded: DecodedBatch) -> None:
        self.data[batch.start : batch.stop] = decoded.to_embeddings(
            batch.start, keep_base64=self.keep_base64
        )
        self.model = self.model or decoded.model
        self.usage.append(decoded.usage)

    def result(self, model: str) -> EmbeddingResponse:
        usage = None
        if self.usage and all(u is not None for u in self.usage):
            prompt = sum(u.prompt_tokens for u in self.usage if u)
            total = sum(u.total_tokens for u in self.usage if u)
            usage = Usage(prompt_tokens=prompt, total_tokens=total)
        data: list[Embedding] = self.data  # type: ignore[assignment]  # every slot is written
        return EmbeddingResponse(data=data, model=self.model or model, usage=usage)
