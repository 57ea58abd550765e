"""Run ONE embeddings client against a (fake) Together server and print one JSON line.

    python benchmarks/clients.py --client togembed --base-url http://127.0.0.1:PORT/v1 --n 20000

Clients: togembed, openai, together, aiohttp, aiohttp-orjson. Each embeds the same deterministic
texts; the timed span covers client construction + the full embed of N texts (imports and text
generation excluded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_MODEL = "BAAI/bge-base-en-v1.5"
BATCH = 128
CONCURRENCY = 16
AIOHTTP_RETRIES = 5
CLIENTS = ("togembed", "openai", "together", "aiohttp", "aiohttp-orjson")

_VOCAB_TEXT = (
    "the a of and to in is for on with as by at from that this it be are was were model data "
    "system network query document search vector index retrieval embedding cluster latency "
    "throughput memory cache server client request response batch token sentence paragraph "
    "language semantic similarity distance cosine score ranking result user product customer "
    "order invoice report analysis market price growth revenue quarter annual policy contract "
    "agreement section clause party legal review support ticket issue error failure recovery "
    "backup storage database table column row schema field value record event log metric "
    "dashboard alert service deployment release version update patch feature design pattern "
    "method function class object module package library framework runtime thread process "
    "signal kernel device driver hardware software cloud region zone instance container image"
)
_VOCAB = _VOCAB_TEXT.split()


def make_texts(n: int) -> list[str]:
    """Deterministic, realistic texts: identical for every client and every run."""
    texts: list[str] = []
    for i in range(n):
        rng = random.Random(i)
        words = rng.choices(_VOCAB, k=rng.randint(40, 80))
        words[0] = words[0].capitalize()
        texts.append(f"Document {i}: " + " ".join(words) + ".")
    return texts


def _chunks(texts: Sequence[str], size: int = BATCH) -> list[list[str]]:
    return [list(texts[i : i + size]) for i in range(0, len(texts), size)]


async def _gather_limited(
    chunks: list[list[str]], fn: Callable[[list[str]], Awaitable[list[Any]]]
) -> list[Any]:
    """What a user writes: gather over all chunks, at most CONCURRENCY in flight."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(chunk: list[str]) -> list[Any]:
        async with sem:
            return await fn(chunk)

    parts = await asyncio.gather(*(one(c) for c in chunks))
    return [row for part in parts for row in part]


# ----------------------------------------------------------------------------- clients


async def run_togembed(texts: list[str], base_url: str, model: str) -> np.ndarray:
    import togembed

    async with togembed.AsyncClient(api_key="x", base_url=base_url) as client:
        return np.asarray(await client.embed(texts, model=model))


async def run_openai(texts: list[str], base_url: str, model: str) -> np.ndarray:
    import openai

    client = openai.AsyncOpenAI(api_key="x", base_url=base_url)
    try:

        async def one(chunk: list[str]) -> list[Any]:
            resp = await client.embeddings.create(model=model, input=chunk)
            return [d.embedding for d in resp.data]

        rows = await _gather_limited(_chunks(texts), one)
    finally:
        await client.close()
    return np.array(rows, dtype=np.float32)


async def run_together(texts: list[str], base_url: str, model: str) -> np.ndarray:
    import together

    # together v3 posts to "/v1/embeddings" relative to base_url, so base_url has no "/v1".
    root = base_url.rstrip("/")
    root = root.removesuffix("/v1")
    client = together.AsyncTogether(api_key="x", base_url=root)
    try:

        async def one(chunk: list[str]) -> list[Any]:
            resp = await client.embeddings.create(model=model, input=chunk)
            return [d.embedding for d in resp.data]

        rows = await _gather_limited(_chunks(texts), one)
    finally:
        await client.close()
    return np.array(rows, dtype=np.float32)


async def run_aiohttp(
    texts: list[str], base_url: str, model: str, *, json_loads: Callable[[str], Any] = json.loads
) -> np.ndarray:
    import aiohttp

    url = base_url.rstrip("/") + "/embeddings"
    headers = {"Authorization": "Bearer x"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one(chunk: list[str]) -> list[Any]:
            body = {"model": model, "input": chunk}
            # Simple user retry: re-send immediately on any non-200, up to AIOHTTP_RETRIES times.
            for attempt in range(AIOHTTP_RETRIES + 1):
                async with session.post(url, json=body) as resp:
                    if resp.status == 200:
                        payload = await resp.json(loads=json_loads)
                        data = sorted(payload["data"], key=lambda d: d["index"])
                        return [d["embedding"] for d in data]
                    if attempt == AIOHTTP_RETRIES:
                        resp.raise_for_status()
            raise AssertionError("unreachable")

        rows = await _gather_limited(_chunks(texts), one)
    return np.array(rows, dtype=np.float32)


async def run_aiohttp_orjson(texts: list[str], base_url: str, model: str) -> np.ndarray:
    """The same loop with orjson parsing responses: shows how much of the gap is the parser."""
    import orjson

    return await run_aiohttp(texts, base_url, model, json_loads=orjson.loads)


RUNNERS: dict[str, Callable[[list[str], str, str], Awaitable[np.ndarray]]] = {
    "togembed": run_togembed,
    "openai": run_openai,
    "together": run_together,
    "aiohttp": run_aiohttp,
    "aiohttp-orjson": run_aiohttp_orjson,
}


# ----------------------------------------------------------------------------- measurement


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class LagMonitor:
    """Background task: sleep 5 ms in a loop and record the worst overshoot."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.max_lag = max(self.max_lag, time.perf_counter() - t0 - self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def count_wrong_rows(texts: list[str], arr: np.ndarray | None, dim: int) -> int | None:
    """Rows not bit-identical to what the fake server returns (None if not checkable)."""
    try:
        from togembed.server.fake import fake_embeddings
    except ImportError:
        return None
    if arr is None or arr.ndim != 2 or arr.shape[0] != len(texts):
        return len(texts)
    expected = fake_embeddings(texts, dim)
    if arr.shape != expected.shape:
        return len(texts)
    # Same as counting rows where not np.array_equal(row, expected_row) (NaN counts as wrong).
    return int((arr != expected).any(axis=1).sum())


async def measure(client: str, texts: list[str], base_url: str, model: str) -> dict[str, Any]:
    runner = RUNNERS[client]
    monitor = LagMonitor()
    rss_before_kb = _proc_status_kb("VmRSS")
    hwm_reset = _reset_hwm()
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monitor.start()
    await asyncio.sleep(0)  # let the monitor take its first timestamp
    arr: np.ndarray | None = None
    error: str | None = None
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    try:
        arr = await runner(texts, base_url, model)
    except Exception as exc:  # any failure is a reported result, not a crash
        error = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:500]
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    await monitor.stop()
    if hwm_reset:
        peak_kb = _proc_status_kb("VmHWM")
    else:  # ru_maxrss is the lifetime peak: only meaningful if the call set a new peak
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak_kb <= maxrss_before_kb:
            peak_kb = rss_before_kb
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_before_mb": (rss_before_kb or 0) / 1024,
        "rss_peak_mb": (peak_kb or 0) / 1024,
        "rss_delta_mb": ((peak_kb or 0) - (rss_before_kb or 0)) / 1024,
        "peak_method": "VmHWM" if hwm_reset else "ru_maxrss",
        "max_loop_lag_ms": monitor.max_lag * 1000,
        "array_mb": (arr.nbytes / 2**20) if arr is not None else None,
        "shape": list(arr.shape) if arr is not None else None,
        "dtype": str(arr.dtype) if arr is not None else None,
        "error": error,
        "_arr": arr,
    }


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("togembed", "openai", "together", "aiohttp", "httpx", "numpy", "orjson"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if out["togembed"] is None:  # run from a checkout without `pip install -e .`
        import togembed

        out["togembed"] = getattr(togembed, "__version__", None)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--client", required=True, choices=CLIENTS)
    p.add_argument("--base-url", required=True)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--model", default=DEFAULT_MODEL)
    args = p.parse_args(argv)

    texts = make_texts(args.n)
    # Import the client library before the timed span (imports are not measured).
    if args.client == "togembed":
        import togembed  # noqa: F401
    elif args.client == "aiohttp-orjson":
        import aiohttp  # noqa: F401
        import orjson  # noqa: F401
    else:
        __import__(args.client)

    result = asyncio.run(measure(args.client, texts, args.base_url, args.model))
    arr = result.pop("_arr")
    result["wrong_rows"] = count_wrong_rows(texts, arr, args.dim)
    if result["error"] is not None and result["wrong_rows"] is None:
        result["wrong_rows"] = args.n
    result.update(client=args.client, n=args.n, dim=args.dim, model=args.model)
    result["versions"] = _versions()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
