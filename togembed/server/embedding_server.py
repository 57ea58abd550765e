"""Kept so that imports from before the server was split into layers keep working: the local
server is ``local_backend.EmbeddingServer`` and its entry points are in ``launch``; import
them from ``togembed.server``."""

from __future__ import annotations

from .batcher import EmbeddingModel, ServeStats
from .launch import local_server, ready_line, serve, stopped_line
from .listen import ListenError
from .local_backend import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INPUTS_PER_REQUEST,
    DEFAULT_MAX_WAIT,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    EmbeddingServer,
)

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_INPUTS_PER_REQUEST",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_PORT",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "EmbeddingModel",
    "EmbeddingServer",
    "ListenError",
    "ServeStats",
    "local_server",
    "ready_line",
    "serve",
    "stopped_line",
]
