"""Response values: the shape of Together's (and OpenAI's) embeddings answer."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Embedding", "EmbeddingResponse", "Usage"]


@attrs.frozen
class Usage:
    """Token counts. Together's spec does not promise them, so a response may carry none."""

    prompt_tokens: int
    total_tokens: int


@attrs.frozen
class Embedding:
    """One vector: a list of floats, or base64 if ``encoding_format="base64"`` was asked."""

    embedding: list[float] | str
    index: int
    object: str = "embedding"


@attrs.frozen
class EmbeddingResponse:
    """All vectors of one ``embeddings.create`` call; ``data[i].index == i``, any batch count."""

    data: list[Embedding]
    model: str
    usage: Usage | None = None
    object: str = "list"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-shaped dict Together would have sent."""
        out: dict[str, Any] = {
            "object": self.object,
            "model": self.model,
            "data": [
                {"object": d.object, "embedding": d.embedding, "index": d.index} for d in self.data
            ],
        }
        if self.usage is not None:
            out["usage"] = attrs.asdict(self.usage)
        return out
