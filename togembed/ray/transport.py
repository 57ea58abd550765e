"""``RayTransport``: a client's HTTP requests sent by a pool of Ray actors, so that the corpus
job of ``togembed embed --ray`` runs unchanged on the driver (batching, pacing, retries, the
durable job store, progress) while the requests leave from the cluster's workers.

The API key never travels: the driver drops the ``Authorization`` header and each worker adds
its own from its environment (``$TOGETHER_API_KEY``). Answers come back whole and are decoded
on the driver.

May import ray, core, and this subpackage.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Mapping
from typing import Any

import ray
from multidict import CIMultiDict

from ..core.config import API_KEY_ENV
from ..core.errors import APIConnectionError, TogembedError
from ..core.transport import AiohttpTransport, Response

__all__ = ["HttpActor", "RayTransport"]

_SECRET = "authorization"


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1000)
class HttpActor:
    """One worker's HTTP: an aiohttp session on the actor's event loop."""

    def __init__(self, api_key_env: str = API_KEY_ENV) -> None:
        self._api_key_env = api_key_env
        self._transport = AiohttpTransport()

    def _headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        out = dict(headers)
        key = os.environ.get(self._api_key_env)
        if key:
            out["Authorization"] = f"Bearer {key}"
        return out

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        resp = await self._transport.post(url, body, self._headers(headers), timeout)
        return resp.status, list(resp.headers.items()), resp.body

    async def get(
        self, url: str, headers: dict[str, str], timeout: float
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        resp = await self._transport.get(url, self._headers(headers), timeout)
        return resp.status, list(resp.headers.items()), resp.body

    async def close(self) -> None:
        await self._transport.aclose()


class RayTransport:
    """Sends each request through one of ``workers`` ``HttpActor``s, in turn."""

    def __init__(self, workers: int, *, api_key_env: str = API_KEY_ENV) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self.actors = [HttpActor.remote(api_key_env) for _ in range(workers)]
        self._next = itertools.cycle(self.actors)

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Response:
        return await self._call("post", url, body, _public(headers), timeout)

    async def get(self, url: str, headers: Mapping[str, str], timeout: float) -> Response:
        return await self._call("get", url, _public(headers), timeout)

    async def aclose(self) -> None:
        """Close the workers' sessions and end the workers. Safe to call twice."""
        actors, self.actors = self.actors, []
        for actor in actors:
            with contextlib.suppress(Exception):  # an actor already gone has nothing to close
                await actor.close.remote()
            ray.kill(actor)

    async def _call(self, method: str, *args: Any) -> Response:
        actor = next(self._next)
        try:
            status, headers, body = await getattr(actor, method).remote(*args)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, TogembedError):  # a timeout, a refused connection: retried
                raise cause from None
            raise
        except ray.exceptions.RayActorError as exc:  # the worker died: Ray restarts it
            raise APIConnectionError(f"a Ray worker died with the request: {exc}") from None
        return Response(status=status, headers=CIMultiDict(headers), body=body)


def _public(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers without the key (each worker adds its own)."""
    return {k: v for k, v in headers.items() if k.lower() != _SECRET}
