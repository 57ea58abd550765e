"""The client core: everything one embeddings call needs, below the user API.

The modules, from the bottom up:

Values and rules (pure)
    ``config``         defaults, ``RetryPolicy``, base URL and key resolution
    ``errors``         the exception tree
    ``types``          response values (``EmbeddingResponse``, ``Embedding``, ``Usage``)
    ``batching``       input checks, token estimates, contiguous batches
The wire protocol (pure: bytes in, values or exceptions out)
    ``protocol``       request bodies, request ids, redaction of secrets
    ``answers``        embeddings answers decoded and checked (``DecodedBatch``)
    ``status_errors``  non-2xx answers as typed exceptions, retry hints
    ``stated_limits``  size limits read from servers' refusals
    ``refusals``       what a refusal means for the batch (split, bisect, give up)
    ``limit_headers``  rate-limit headers read
Pacing (pure arithmetic, then its asyncio face)
    ``limiter``        the ``Limiter`` interface and the values that cross it
    ``pacer``          ``Pacer``: token buckets, learning, slowing down, on an explicit clock
    ``ratelimit``      ``RateLimiter``: one event loop's limiter
I/O and scheduling
    ``transport``      HTTP: the only module that imports aiohttp's client
    ``retry``          retries with backoff (tenacity, kept private)
    ``turn_gate``      a budget of CPU work per event-loop turn
    ``settings``       what calls share: ``CallSettings``, ``CallOptions``, ``ClientStats``
    ``request``        one admitted request: POST, decode, feed the limiter back
    ``coalesce``       concurrent small calls merged into shared requests
    ``sinks``          where rows go: one array, or the peers' response shape
    ``call_errors``    the errors a call raises in its own words (deadlines, dimensions)
    ``batch_sender``   one batch sent: alone or with other calls' texts, retried
    ``call``           one call: its batches planned, split, bisected, written
    ``stream``         ``embed_stream``: ordered chunks with bounded memory

May import: the standard library, aiohttp, tenacity, attrs, numpy, orjson, pysimdjson. Nothing
else of togembed: every other subpackage builds on this one.
"""
