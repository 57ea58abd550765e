"""A Together-compatible embeddings server with a local model (``togembed serve``).

    from togembed.server import EmbeddingServer, local_server, serve

See docs/serve.md. Needs ``pip install 'togembed[local]'`` for the default model.
"""

from __future__ import annotations

from ..local.model import DEFAULT_LOCAL_MODEL, LocalModel, load_model
from .embedding_server import (
    EmbeddingModel,
    EmbeddingServer,
    ListenError,
    ServeStats,
    local_server,
    ready_line,
    serve,
    stopped_line,
)

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "EmbeddingModel",
    "EmbeddingServer",
    "ListenError",
    "LocalModel",
    "ServeStats",
    "load_model",
    "local_server",
    "ready_line",
    "serve",
    "stopped_line",
]
