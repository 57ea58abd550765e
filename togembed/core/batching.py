"""Pure batch planning: check inputs, estimate tokens, cut contiguous batches. No I/O."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import attrs

from .errors import InvalidInputError

__all__ = [
    "Batch",
    "estimate_tokens",
    "find_invalid_input",
    "is_sendable",
    "normalize_input",
    "plan_batches",
]


@attrs.frozen
class Batch:
    """Inputs ``[start, stop)`` of one call, sent as one request. Contiguous, so rows land at
    ``start + index`` with no lookup table."""

    start: int
    stop: int
    tokens: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def estimate_tokens(text: str) -> int:
    """A cheap, deliberately generous token estimate (no tokenizer: the model is the server's).

    ASCII text runs ~4 characters a token for BERT-style vocabularies; other scripts are counted
    by UTF-8 bytes / 3, which gives CJK about one token per character. ``str.isascii`` is O(1).
    """
    if text.isascii():
        return len(text) // 4 + 1
    return len(text.encode("utf-8", "surrogatepass")) // 3 + 1


def is_sendable(text: str) -> bool:
    """Whether a str can travel as JSON (UTF-8): not if it holds a lone surrogate such as
    ``"\\ud800"`` (what ``errors="surrogateescape"`` leaves of undecodable bytes). O(1) for the
    usual ASCII text; other text pays one encode."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def describe_invalid(value: object) -> str:
    kind = type(value).__name__
    if value is None:
        return "None is not a string"
    if isinstance(value, str):
        at = next(i for i, ch in enumerate(value) if 0xD800 <= ord(ch) <= 0xDFFF)
        return (
            f"a lone surrogate {value[at]!r} at character {at} cannot be sent as UTF-8 (read "
            "with errors='surrogateescape'? decode with errors='replace', or fix the text)"
        )
    return f"{kind} is not a string ({value!r:.60})"


def find_invalid_input(texts: Sequence[object], start: int, stop: int) -> int | None:
    """Index of the first item in ``texts[start:stop]`` that cannot be sent (not a ``str``, or
    a str with a lone surrogate), or None."""
    for i in range(start, stop):
        text = texts[i]
        if type(text) is str or isinstance(text, str):
            if not text.isascii() and not is_sendable(text):  # type: ignore[union-attr]
                return i
        else:
            return i
    return None


def normalize_input(input: str | Iterable[str]) -> Sequence[str]:
    """One string or any iterable of strings, as a sequence. Items are checked later, in chunks."""
    if isinstance(input, str):
        return [input]
    if isinstance(input, (bytes, bytearray)):
        raise InvalidInputError("input must be a str or a list of str, not bytes")
    if isinstance(input, Sequence):
        return input
    try:
        return list(input)
    except TypeError:
        raise InvalidInputError(
            f"input must be a str or a list of str, not {type(input).__name__}"
        ) from None


def invalid_input_error(texts: Sequence[object], index: int) -> InvalidInputError:
    return InvalidInputError(f"input {index}: {describe_invalid(texts[index])}", index=index)


def plan_batches(
    texts: Sequence[str],
    *,
    max_items: int,
    max_tokens: int,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Batch]:
    """Cut ``texts[start:stop]`` into batches of at most ``max_items`` inputs and ``max_tokens``
    estimated tokens. A single input over the token budget travels alone (the server decides).

    Lazy on purpose: a million inputs are planned a batch at a time, as the senders ask.
    """
    stop = len(texts) if stop is None else stop
    i = start
    while i < stop:
        first = i
        tokens = 0
        limit = min(stop, first + max_items)
        while i < limit:
            t = estimate_tokens(texts[i])
            if i > first and tokens + t > max_tokens:
                break
            tokens += t
            i += 1
        yield Batch(first, i, tokens)


def split_batch(texts: Sequence[str], batch: Batch) -> tuple[Batch, Batch]:
    """Two halves of a batch of two or more inputs."""
    mid = batch.start + batch.size // 2
    left = sum(estimate_tokens(texts[i]) for i in range(batch.start, mid))
    return Batch(batch.start, mid, left), Batch(mid, batch.stop, batch.tokens - left)
