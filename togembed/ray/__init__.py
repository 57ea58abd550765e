"""togembed on Ray Data: embed a Dataset across a cluster with every worker sharing one key's
rate limit (docs/ray.md).

    import togembed.ray
    out = togembed.ray.embed_dataset(ds, model="BAAI/bge-base-en-v1.5", concurrency=4)

or, in a pipeline of your own, ``ds.map_batches(togembed.ray.Embedder, fn_constructor_kwargs=
{"model": ...}, concurrency=4, batch_format="pyarrow", num_cpus=0)``.

Ray is an optional extra (``pip install 'togembed[ray]'``): this package imports it only when
one of its names is used, and then says which extra is missing. Its modules: ``settings``
(what a worker is told), ``embedder`` (the callable class), ``dataset`` (``embed_dataset``),
``grants`` (the shared limiter's books, no Ray), ``limiter_actor`` (the named actor),
``limiter`` (a worker's end of it), ``capped`` (requests in flight per actor), ``transport``
(HTTP sent by a pool of actors: ``togembed embed --ray``). They may import core, api and
jobs; core imports none of them.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Embedder",
    "RayLimiter",
    "RayTransport",
    "RowError",
    "embed_dataset",
    "shared_limiter",
]

_WHERE = {
    "Embedder": ".embedder",
    "RowError": ".embedder",
    "RayLimiter": ".limiter",
    "RayTransport": ".transport",
    "embed_dataset": ".dataset",
    "shared_limiter": ".shared",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'togembed.ray' has no attribute {name!r}")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"togembed.ray.{name} needs Ray Data: pip install 'togembed[ray]' ({exc})"
        ) from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
