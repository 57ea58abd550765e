"""Together-compatible embeddings servers: ``togembed serve`` (a local model) and the
fault-injecting fake behind ``togembed.testing``.

    from togembed.server import EmbeddingServer, local_server, serve

See docs/serve.md. Needs ``pip install 'togembed[local]'`` for the default model.

Layers, each importing only those below it:

* ``protocol``: Together's protocol as pure functions: request parsing and validation with
  Together's wording, error bodies, float/base64 response rendering, ``/v1/models`` entries,
  the API-key check. No I/O, no aiohttp.
* ``listen``: start an aiohttp app on host:port; per-connection limits (``ConnectionGuard``).
* ``app``: ``TogetherServer``, the one aiohttp app both servers are: routes, auth, request ids,
  JSON errors, start/stop/``base_url``. A backend subclasses it and answers the embeddings.
* Backends: ``local_backend.EmbeddingServer`` (a model behind ``batcher``'s dynamic batcher)
  and ``fake.FakeTogetherServer`` (deterministic vectors, scripted and random faults,
  token-bucket limits; a package of its own: ``fake/``).
* ``launch``: ``serve()`` and ``local_server()``, the entry points of the local server.
"""

from __future__ import annotations

from ..local.model import DEFAULT_LOCAL_MODEL, LocalModel, load_model
from .batcher import EmbeddingModel, ServeStats
from .launch import local_server, ready_line, serve, stopped_line
from .listen import ListenError
from .local_backend import EmbeddingServer

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
