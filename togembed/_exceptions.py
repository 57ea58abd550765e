"""The exception tree. Names follow openai-python / together v2: users switch without relearning.

TogembedError
├── InvalidInputError            (also TypeError, ValueError) an input we refuse to send
├── MissingAPIKeyError           (also ValueError) no key configured for a remote base URL
└── APIError
    ├── APIConnectionError       the request did not get an HTTP answer
    │   └── APITimeoutError      (also TimeoutError)
    ├── APIResponseValidationError  a 200 whose body is not a valid embeddings answer
    └── APIStatusError           a non-2xx answer: status_code, body, request_id
        ├── BadRequestError            400
        ├── AuthenticationError        401
        ├── PermissionDeniedError      403
        ├── NotFoundError              404
        ├── UnprocessableEntityError   422
        ├── RateLimitError             429
        └── InternalServerError        >= 500
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
    "InternalServerError",
    "InvalidInputError",
    "MissingAPIKeyError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "TogembedError",
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
    """No HTTP answer: refused, reset, dropped, DNS, TLS, or a truncated body."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """The request took longer than the configured ``timeout``."""


class APIResponseValidationError(APIError):
    """A 200 answer that is not a well-formed embeddings response (bad JSON, missing rows, ...)."""

    def __init__(
        self, message: str, *, body: bytes | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.body = body


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


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class PermissionDeniedError(APIStatusError):
    """403: not allowed (Together also uses 403 for inputs that are too long)."""


class NotFoundError(APIStatusError):
    """404: usually an unknown model."""


class UnprocessableEntityError(APIStatusError):
    """422: the request was understood but cannot be processed."""


class RateLimitError(APIStatusError):
    """429: too many requests or tokens, or out of credits (``error_type == 'credit_limit'``)."""


class InternalServerError(APIStatusError):
    """>= 500: the server or a proxy in front of it failed."""


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
