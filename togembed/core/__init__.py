"""The client core: everything one embeddings call needs, below the user API.

Owns: configuration values (``config``), the exception tree (``errors``), response values
(``types``), pure batch planning (``batching``), the wire protocol without I/O (``protocol``,
``stated_limits``), HTTP (``transport``, the only module that imports aiohttp's client),
retries (``retry``), rate pacing (``ratelimit``), one call's scheduling (``call``) and
streaming (``stream``).

May import: the standard library, aiohttp, tenacity, attrs, numpy, orjson. Nothing else of
togembed: every other subpackage builds on this one.
"""
