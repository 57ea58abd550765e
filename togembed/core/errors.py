"""The exception tree. Names follow openai-python / together v2: users switch without relearning.

TogembedError
├── InvalidInputError            (also TypeError, ValueError) an input we refuse to send
├── InvalidModelError            (also ValueError) model missing, empty or not a str
├── InvalidBaseURLError          (also ValueError) base_url without http(s) scheme or host
├── MissingAPIKeyError           (also ValueError) no key configured for a remote base URL
└── APIError
    ├── APIConnectionError       the request did not get an HTTP answer
    │   └── APITimeoutError      (also TimeoutError)
    │       └── DeadlineExceededError  the call's timeout passes before it can be sent
    ├── APIResponseValidationError  a 200 whose body is not a valid answer
    └── APIStatusError           a non-2xx answer: status_code, body, request_id
        ├── BadRequestError            400
        │   └── DimensionsNotSupportedError  dimensions=N refused or ignored by the server
        ├── AuthenticationError        401
        ├── PermissionDeniedError      403
        ├── NotFoundError              404
        │   └── ModelNotAvailableError  the model cannot be used here (404, 400 or 503)
        ├── UnprocessableEntityError   422
        ├── RateLimitError             429
        ├── InternalServerError        >= 500
        └── TooManyRedirectsError      the URL redirects in a loop (3xx)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "DeadlineExceededError",
    "DimensionsNotSupportedError",
    "InternalServerError",
    "InvalidBaseURLError",
    "InvalidInputError",
    "InvalidModelError",
    "MissingAPIKeyError",
    "ModelNotAvailableError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "TogembedError",
    "TooManyRedirectsError",
    "UnprocessableEntityError",
]


class TogembedError(Exception):
    """Base of every error togembed raises on purpose."""


class InvalidInputError(TogembedError, TypeError, ValueError):
    """An input that cannot be sent (``None``, a number, ...); ``index`` says which one."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index

    @property
    def input_index(self) -> int | None:
        """The same as ``index``: the name ``APIError`` uses, so a stream's collected errors
        (``chunk.errors``) all say which input they are about in one way."""
        return self.index


class InvalidModelError(TogembedError, ValueError):
    """``model`` is missing, empty or not a string: raised before any request."""


class InvalidBaseURLError(TogembedError, ValueError):
    """``base_url`` is not an ``http(s)://host[:port]/...`` URL: raised at construction."""


class MissingAPIKeyError(TogembedError, ValueError):
    """No API key for a remote server: raised at the first call, before any request."""


class APIError(TogembedError):
    """Something went wrong talking to the API."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        # Set by the batch runner when the failure is pinned to one input of the call.
        self.input_index: int | None = None

    def __str__(self) -> str:
        parts = [self.message]
        if self.input_index is not None:
            parts.insert(0, f"input {self.input_index}:")
        if self.request_id:
            parts.append(f"(request id {self.request_id})")
        return " ".join(parts)


class APIConnectionError(APIError):
    """No HTTP answer: refused, reset, dropped, DNS, TLS, or a truncated body.

    ``connect_failed`` is True when no connection could be opened at all (refused, DNS,
    unreachable): nothing was sent. ``RetryPolicy(connect_retries=0)`` fails on those at once.
    """

    def __init__(
        self, message: str, *, request_id: str | None = None, connect_failed: bool = False
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.connect_failed = connect_failed


class APITimeoutError(APIConnectionError, TimeoutError):
    """The request took longer than the configured ``timeout``."""


class DeadlineExceededError(APITimeoutError):
    """The call's ``timeout`` would pass (or passed) before its request could be sent: too many
    calls wait at the rate limit. Nothing was sent for it, so nothing was paid; not retried.
    ``expected_wait``: the wait the queue would have cost, in seconds (None if not estimated).
    ``client.stats.waiting`` / ``expected_wait`` show the queue."""

    def __init__(self, message: str, *, expected_wait: float | None = None) -> None:
        super().__init__(message)
        self.expected_wait = expected_wait


class APIResponseValidationError(APIError):
    """A 200 answer that is not a well-formed response (bad JSON, missing rows, ...). A 200
    whose JSON is ``{"error": ...}`` is one too, with the server's ``error_type`` and ``code``."""

    def __init__(
        self,
        message: str,
        *,
        body: bytes | None = None,
        request_id: str | None = None,
        error_type: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.body = body
        self.error_type = error_type
        self.code = code


class APIStatusError(APIError):
    """The server answered with a non-2xx status."""

    status_code: int

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: Any = None,
        request_id: str | None = None,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.status_code = status_code
        self.body = body
        self.error_type = error_type
        self.param = param
        self.code = code
        # Seconds the server asked us to wait (Retry-After & co), if it said.
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    """400: the request (or one input in it) was rejected."""


class DimensionsNotSupportedError(BadRequestError):
    """``dimensions=N`` was asked, and the server refused the argument or answered vectors of
    another size: togembed never returns vectors of a size other than the one asked for.
    ``dimensions`` is what was asked, ``model_dimensions`` what the model returns (if known)."""

    def __init__(
        self,
        message: str,
        *,
        dimensions: int,
        model_dimensions: int | None,
        status_code: int = 400,
        body: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, body=body, request_id=request_id)
        self.dimensions = dimensions
        self.model_dimensions = model_dimensions


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class PermissionDeniedError(APIStatusError):
    """403: not allowed (Together also uses 403 for inputs that are too long)."""


class NotFoundError(APIStatusError):
    """404: usually an unknown model."""


class ModelNotAvailableError(NotFoundError):
    """The model cannot be used with this server and key: an unknown model (404), Together's
    400/503 ``model_not_available`` or "Unable to access non-serverless model". Never retried,
    and it stops the whole call. ``status_code`` is what the server sent (404, 400 or 503);
    ``message`` is the server's, ``str()`` adds what to do: ``ADVICE``, or only
    ``NOT_RETRIED`` where the server's message already says what to do (``togembed serve``
    names the model it serves and its ``--alias`` flag)."""

    NOT_RETRIED = (
        "The model is not available at this base URL with this key; retrying will not help."
    )
    ADVICE = (
        f"{NOT_RETRIED} "
        "`togembed models` (or `client.models.list()`) lists the embedding models you can use. "
        "Together withdrew its serverless embedding models in 2026: use a dedicated endpoint "
        "(base_url https://api-inference.together.ai/v1, the model being the endpoint's name), "
        "another OpenAI-compatible provider, or a local model (`togembed embed --local`, "
        "`togembed serve`)."
    )
    # Words of a server message that already says what to do: togembed serve's 404.
    SERVER_SAYS_WHAT_TO_DO = ("togembed serve --alias",)

    def __str__(self) -> str:
        says = any(words in self.message for words in self.SERVER_SAYS_WHAT_TO_DO)
        return f"{super().__str__()} -- {self.NOT_RETRIED if says else self.ADVICE}"


class UnprocessableEntityError(APIStatusError):
    """422: the request was understood but cannot be processed."""


class RateLimitError(APIStatusError):
    """429: too many requests or tokens, or out of credits (``error_type == 'credit_limit'``)."""


class InternalServerError(APIStatusError):
    """>= 500: the server or a proxy in front of it failed."""


class TooManyRedirectsError(APIStatusError):
    """The URL keeps redirecting (a loop, or too many hops): a wrong ``base_url``. Not retried;
    ``location`` is where the last redirect pointed."""

    def __init__(
        self, message: str, *, status_code: int, location: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, status_code=status_code, **kwargs)
        self.location = location


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_class(status: int) -> type[APIStatusError]:
    """The exception class for an HTTP status."""
    if status >= 500:
        return InternalServerError
    return _STATUS_ERRORS.get(status, APIStatusError)
