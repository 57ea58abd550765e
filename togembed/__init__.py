"""togembed: an async-first client for Together AI's embeddings API.

Batches any number of inputs, sends them concurrently with retries and backoff, and returns the
vectors in input order, as Together's response shape or as one float32 numpy array.
"""

import logging

from ._version import __version__
from .api.async_client import AsyncClient, AsyncEmbeddings
from .api.models import AsyncModels, Model, ModelList
from .api.sync_client import Client, Embeddings, Models
from .core.config import (
    DEFAULT_BASE_URL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_ENCODING_FORMAT,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    RetryPolicy,
)
from .core.errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    DeadlineExceededError,
    DimensionsNotSupportedError,
    InternalServerError,
    InvalidBaseURLError,
    InvalidInputError,
    InvalidModelError,
    MissingAPIKeyError,
    ModelNotAvailableError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    TogembedError,
    TooManyRedirectsError,
    UnprocessableEntityError,
)
from .core.limiter import Feedback, Limiter, RateLimiterStats, Ticket
from .core.ratelimit import RateLimiter
from .core.settings import ClientStats
from .core.stream import EmbeddingChunk
from .core.transport import Response, Transport
from .core.types import Embedding, EmbeddingResponse, Usage

# A library never configures logging; applications decide where "togembed" records go.
logging.getLogger("togembed").addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_ENCODING_FORMAT",
    "DEFAULT_MAX_BATCH_TOKENS",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncEmbeddings",
    "AsyncModels",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ClientStats",
    "DeadlineExceededError",
    "DimensionsNotSupportedError",
    "Embedding",
    "EmbeddingChunk",
    "EmbeddingResponse",
    "Embeddings",
    "Feedback",
    "InternalServerError",
    "InvalidBaseURLError",
    "InvalidInputError",
    "InvalidModelError",
    "Limiter",
    "MissingAPIKeyError",
    "Model",
    "ModelList",
    "ModelNotAvailableError",
    "Models",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RateLimiter",
    "RateLimiterStats",
    "Response",
    "RetryPolicy",
    "Ticket",
    "TogembedError",
    "TooManyRedirectsError",
    "Transport",
    "UnprocessableEntityError",
    "Usage",
    "__version__",
]
