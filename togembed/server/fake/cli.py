"""``python -m togembed.server.fake``: the fake server as a separate process (benchmarks, other
languages' tests). Prints ``READY <base_url>`` once listening; serves until SIGTERM/SIGINT.

Owns the command's flags (benchmarks and tests run it as a subprocess: keep them stable).

May import: ``backend``, the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

from .backend import FakeTogetherServer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m togembed.server.fake",
        description="Fake Together embeddings server; prints 'READY <base_url>' when listening.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--encoding", choices=("honour", "float", "reject"), default="honour")
    p.add_argument("--fault-rate-429", type=float, default=0.0)
    p.add_argument("--fault-rate-5xx", type=float, default=0.0)
    p.add_argument("--bare-429-rate", type=float, default=0.0, help="429s without any header")
    p.add_argument(
        "--sporadic-429-rate",
        type=float,
        default=0.0,
        help="429s with a wait while the rate-limit headers still show capacity",
    )
    p.add_argument("--sporadic-429-wait", type=float, default=1.0, help="their wait, seconds")
    p.add_argument("--sporadic-429-ms", action="store_true", help="send it as retry-after-ms")
    p.add_argument(
        "--storm",
        default=None,
        metavar="START:SECONDS",
        help="refuse every request with a 429 (empty bucket) from START s after the first "
        "request, for SECONDS",
    )
    p.add_argument("--rpm", type=float, default=None, help="token-bucket limit, requests/min")
    p.add_argument("--tpm", type=float, default=None, help="token-bucket limit, tokens/min")
    p.add_argument("--burst", type=float, default=1.0, help="seconds of burst in the buckets")
    p.add_argument("--no-limit-headers", action="store_true", help="send no x-ratelimit-*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-input-chars", type=int, default=None)
    p.add_argument(
        "--reject-substring", default=None, help="answer 400 to any input containing this"
    )
    p.add_argument("--models", default=None, help="comma-separated allow-list of model names")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="scripted fault, e.g. 429:retry-after=1 (repeatable, consumed in order)",
    )
    return p


async def _serve(args: argparse.Namespace) -> None:
    server = FakeTogetherServer(
        dim=args.dim,
        latency=args.latency,
        encoding=args.encoding,
        fault_rate_429=args.fault_rate_429,
        fault_rate_5xx=args.fault_rate_5xx,
        bare_429_rate=args.bare_429_rate,
        sporadic_429_rate=args.sporadic_429_rate,
        sporadic_429_wait=args.sporadic_429_wait,
        sporadic_429_ms=args.sporadic_429_ms,
        storm=tuple(float(x) for x in args.storm.split(":")) if args.storm else None,
        rpm=args.rpm,
        tpm=args.tpm,
        burst=args.burst,
        limit_headers=not args.no_limit_headers,
        seed=args.seed,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_input_chars=args.max_input_chars,
        reject_substring=args.reject_substring,
        models=None if args.models is None else [m for m in args.models.split(",") if m],
    )
    server.faults.extend(args.fault)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    url = await server.start(args.host, args.port)
    print(f"READY {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: serve until SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0
