"""The errors a call raises in its own words: a deadline the queue at the rate limit cannot
meet, and vectors of another size than ``dimensions`` asked for."""

from __future__ import annotations

from .errors import DeadlineExceededError, DimensionsNotSupportedError
from .settings import CallSettings

__all__ = ["deadline_error", "dimensions_error"]


def deadline_error(
    timeout: float | None, wait: float | None, waiting: int
) -> DeadlineExceededError:
    """Nothing was sent for the call: its timeout passed (``wait`` None) or would pass in the
    queue at the rate limit."""
    if wait is None:
        return DeadlineExceededError(
            f"the call's timeout of {timeout:g} s passed while it waited for the rate "
            "limit; nothing was sent"
        )
    return DeadlineExceededError(
        f"the call cannot be sent within its timeout of {timeout:g} s: the expected wait "
        f"at the rate limit is {wait:.3g} s ({waiting} calls waiting); "
        "nothing was sent",
        expected_wait=wait,
    )


def dimensions_error(
    s: CallSettings, model: str, asked: int, got: int
) -> DimensionsNotSupportedError:
    refusal = s.no_dimensions.get(model)
    if refusal is not None:
        message = (
            f"this server does not support dimensions={asked} for model {model!r}; "
            f"the model returns {got} (the server said: {refusal})"
        )
    else:
        message = (
            f"dimensions={asked} was asked, but the server answered vectors of {got} "
            f"dimensions for model {model!r}: it ignores the argument"
        )
    return DimensionsNotSupportedError(message, dimensions=asked, model_dimensions=got)
