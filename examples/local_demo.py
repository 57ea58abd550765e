"""The main job, offline: embed a corpus through togembed against a local fake Together server
that misbehaves on purpose (429s with Retry-After, 5xx with HTML bodies), then check every row.

    python examples/local_demo.py            # 20,000 texts, 768 dims
    python examples/local_demo.py --n 100000 --fault-rate 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

import togembed
from togembed.testing import FakeTogetherServer, fake_embeddings

MODEL = "BAAI/bge-base-en-v1.5"


async def main(n: int, dim: int, fault_rate: float) -> None:
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog" for i in range(n)]
    server = FakeTogetherServer(
        dim=dim, latency=0.02, fault_rate_429=fault_rate, fault_rate_5xx=fault_rate
    )
    async with server, togembed.AsyncClient(base_url=server.base_url, model=MODEL) as client:
        start = time.perf_counter()
        vectors = await client.embed(texts)
        wall = time.perf_counter() - start

        # Together's documented call, answered in input order however many inputs are given.
        resp = await client.embeddings.create(input="Our solar system orbits the Milky Way.")

    expected = fake_embeddings(texts, dim)
    wrong = int(np.count_nonzero(~np.all(vectors == expected, axis=1)))
    s = client.stats
    print(f"embedded {n} texts -> array {vectors.shape} {vectors.dtype} in {wall:.2f} s")
    print(
        f"requests {s.requests}, retries {s.retries} "
        f"(429s {s.rate_limited}, 5xx {s.server_errors}), wrong rows {wrong}"
    )
    print(f"embeddings.create: {len(resp.data)} vector of {len(resp.data[0].embedding)} floats")
    if wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="number of texts")
    parser.add_argument("--dim", type=int, default=768, help="vector dimension")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of 429s and of 5xx")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.dim, args.fault_rate))
