"""Rate-limit benchmark: how close to the account's limit does each client run, and how many 429s
does it collect on the way?

Every case starts a fresh fake Together server process that enforces a token bucket (1 s of
burst) and answers 429 with Retry-After and Together's x-ratelimit-*/x-tokenlimit-* headers; the
client runs in its own process. "Ideal" is the time for the requests (or tokens) beyond the burst
at exactly the server's rate.

    python benchmarks/ratelimit.py                 # all cases, N=5000, 300 requests/min
    python benchmarks/ratelimit.py --cases rpm,learned --n 5000 --rpm 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

MODEL = "BAAI/bge-base-en-v1.5"
DIM = 64  # small vectors: this benchmark is about pacing, not decoding
BATCH = 128


def make_texts(n: int, chars: int) -> list[str]:
    filler = "lorem ipsum dolor sit amet consectetur adipiscing elit "
    body = (filler * (chars // len(filler) + 1))[:chars]
    return [f"{i} {body}"[:chars] for i in range(n)]


def est_tokens(text: str) -> int:
    return len(text) // 4 + 1  # the fake server's count


# Each case: server flags, text length, target (429 share, wall/ideal).
CASES: dict[str, dict[str, Any]] = {
    "rpm": {
        "limit": "rpm",
        "chars": 40,
        "target": (0.02, 1.10),
        "label": "togembed, rpm= configured",
    },
    "learned": {
        "limit": "rpm",
        "chars": 40,
        "target": (0.10, 1.30),
        "label": "togembed, nothing configured",
    },
    "tokens": {
        "limit": "tpm",
        "chars": 600,
        "target": (0.10, 1.30),
        "label": "togembed, token-limited server (long texts), tpm not configured",
    },
    "tight": {
        "limit": "tpm",
        "chars": 2000,
        "n": 500,
        "target": (0.10, 1.30),
        "label": "togembed, token bucket smaller than one default batch, tpm not configured",
    },
    "shared": {
        "limit": "rpm",
        "chars": 40,
        "target": (0.02, 1.10),
        "label": "togembed, 2 clients sharing one RateLimiter(rpm=)",
    },
    "bare429": {
        "limit": "rpm",
        "chars": 40,
        "bare": 0.1,
        "target": None,
        "label": "togembed, nothing configured, +10% 429s without headers",
    },
    "sporadic": {
        "limit": "rpm",
        "chars": 40,
        "sporadic": ["--sporadic-429-rate", "0.1", "--sporadic-429-wait", "1"],
        "target": None,
        "label": "togembed, nothing configured, +10% 429s with Retry-After: 1 below the limit",
    },
    "sporadic_ms": {
        "limit": "rpm",
        "chars": 40,
        "sporadic": [
            *("--sporadic-429-rate", "0.1", "--sporadic-429-wait", "0.2", "--sporadic-429-ms")
        ],
        "target": None,
        "label": "togembed, nothing configured, +10% 429s with retry-after-ms: 200 below limit",
    },
    "sporadic_rpm": {
        "limit": "rpm",
        "chars": 40,
        "sporadic": ["--sporadic-429-rate", "0.1", "--sporadic-429-wait", "1"],
        "target": None,
        "label": "togembed, rpm= configured, +10% 429s with Retry-After: 1 below the limit",
    },
    "storm": {
        "limit": "rpm",
        "chars": 40,
        "n": 10000,
        "storm": (3.0, 3.0),
        "target": None,
        "label": "togembed, nothing configured, every request refused for 3 s (a storm)",
    },
    "openai": {
        "limit": "rpm",
        "chars": 40,
        "target": None,
        "label": "openai-python AsyncOpenAI + gather (16 at a time, max_retries=100)",
    },
    "aiohttp": {
        "limit": "rpm",
        "chars": 40,
        "target": None,
        "label": "plain aiohttp loop (16 at a time, honours Retry-After)",
    },
}


# -- client side (runs in its own process) ----------------------------------------------------


async def run_togembed(case: str, base_url: str, texts: list[str], rpm: float) -> dict[str, Any]:
    import togembed

    if case == "shared":
        limiter = togembed.RateLimiter(rpm=rpm)
        half = len(texts) // 2
        async with (
            togembed.AsyncClient(base_url=base_url, model=MODEL, limiter=limiter) as a,
            togembed.AsyncClient(base_url=base_url, model=MODEL, limiter=limiter) as b,
        ):
            await asyncio.gather(a.embed(texts[:half]), b.embed(texts[half:]))
        return {"client_requests": a.stats.requests + b.stats.requests}
    kwargs = {"rpm": rpm} if case in ("rpm", "sporadic_rpm") else {}
    async with togembed.AsyncClient(base_url=base_url, model=MODEL, **kwargs) as client:
        vectors = await client.embed(texts)
    assert vectors.shape == (len(texts), DIM)
    return {"client_requests": client.stats.requests, "limiter": str(client.limiter.stats)}


async def run_openai(base_url: str, texts: list[str]) -> dict[str, Any]:
    import openai

    # 16 at a time, like the aiohttp loop: an unbounded gather of all 40 chunks fails even with
    # 20 retries (all retries wake at the same Retry-After and collide again).
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=100)
    sem = asyncio.Semaphore(16)

    async def one(chunk: list[str]) -> None:
        async with sem:
            await client.embeddings.create(model=MODEL, input=chunk)

    chunks = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    await asyncio.gather(*(one(c) for c in chunks))
    await client.close()
    return {}


async def run_aiohttp(base_url: str, texts: list[str]) -> dict[str, Any]:
    import aiohttp

    sem = asyncio.Semaphore(16)

    async def one(session: aiohttp.ClientSession, chunk: list[str]) -> None:
        async with sem:
            for _ in range(20):
                async with session.post(
                    f"{base_url}/embeddings", json={"model": MODEL, "input": chunk}
                ) as resp:
                    if resp.status == 200:
                        await resp.json()
                        return
                    await resp.read()
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
            raise RuntimeError("gave up")

    chunks = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, c) for c in chunks))
    return {}


def client_main(args: argparse.Namespace) -> None:
    texts = make_texts(args.n, CASES[args.case]["chars"])
    # imports are not part of the measurement
    __import__({"openai": "openai", "aiohttp": "aiohttp"}.get(args.case, "togembed"))
    start = time.perf_counter()
    if args.case == "openai":
        extra = asyncio.run(run_openai(args.base_url, texts))
    elif args.case == "aiohttp":
        extra = asyncio.run(run_aiohttp(args.base_url, texts))
    else:
        extra = asyncio.run(run_togembed(args.case, args.base_url, texts, args.rpm))
    print(json.dumps({"wall": time.perf_counter() - start, **extra}))


# -- orchestration ----------------------------------------------------------------------------


def start_server(flags: list[str]) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "togembed.server.fake", "--dim", str(DIM), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def server_stats(base_url: str, *, log: bool = False) -> dict[str, Any]:
    root = base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/stats{'?log=1' if log else ''}") as resp:
        return json.loads(resp.read())


def recovery_time(log: list[dict[str, Any]], storm_end: float, rate: float) -> float | None:
    """Seconds after the storm until a 1 s window of successful requests reaches 90% of the
    server's rate (None: never, before the job ended)."""
    ok = sorted(r["at"] for r in log if r["status"] == 200 and r["at"] >= storm_end)
    t = storm_end
    while ok and t + 1.0 <= ok[-1] + 1e-9:
        if sum(1 for a in ok if t <= a < t + 1.0) >= 0.9 * rate:
            return t - storm_end
        t += 0.1
    return None


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = CASES[case]
    n = spec.get("n", args.n)
    texts = make_texts(n, spec["chars"])
    if spec["limit"] == "rpm":
        rate = args.rpm / 60.0
        flags = ["--rpm", str(args.rpm)]
        batches = math.ceil(n / BATCH)
        ideal = max(0.0, batches - rate * 1.0) / rate
    else:  # tokens: rate chosen so the ideal is comparable to the request cases
        total = sum(est_tokens(t) for t in texts)
        # "tight": the bucket holds half a default batch, so batches must be cut to fit it
        seconds = 7.0 if case == "tight" else math.ceil(n / BATCH) / (args.rpm / 60.0) - 1.0
        rate = total / (seconds + 1.0)
        flags = ["--tpm", str(rate * 60.0)]
        ideal = max(0.0, total - rate * 1.0) / rate
    if spec.get("bare"):
        flags += ["--bare-429-rate", str(spec["bare"])]
    flags += spec.get("sporadic", [])
    if spec.get("storm"):
        start, duration = spec["storm"]
        flags += ["--storm", f"{start}:{duration}", "--sporadic-429-wait", "1"]
        # the storm's requests are extra: the ideal is the fault-free time plus the storm
        ideal += duration
    flags += ["--latency", str(args.latency), "--seed", str(args.seed)]
    proc, base_url = start_server(flags)
    try:
        cmd = [sys.executable, __file__, "--client", "--case", case, "--base-url", base_url]
        cmd += ["--n", str(n), "--rpm", str(args.rpm)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if out.returncode != 0:
            return {"case": case, "error": out.stderr.strip().splitlines()[-1:]}
        result = json.loads(out.stdout.strip().splitlines()[-1])
        stats = server_stats(base_url, log=bool(spec.get("storm")))
    finally:
        proc.terminate()
        proc.wait()
    counts = {int(k): v for k, v in stats["status_counts"].items()}
    requests = stats["requests"]
    limited = counts.get(429, 0)
    extra = {}
    if spec.get("storm"):
        start, duration = spec["storm"]
        extra["recovery_s"] = recovery_time(stats["log"], start + duration, rate)
    return {
        **extra,
        "case": case,
        "label": spec["label"],
        "requests": requests,
        "429s": limited,
        "share_429": limited / requests if requests else 0.0,
        "wall": result["wall"],
        "ideal": ideal,
        "wall_over_ideal": result["wall"] / ideal if ideal else math.nan,
        "target": spec["target"],
        **{k: v for k, v in result.items() if k != "wall"},
    }


def verdict(row: dict[str, Any]) -> str:
    if row.get("target") is None:
        return "measured"
    share, ratio = row["target"]
    ok = row["share_429"] <= share and row["wall_over_ideal"] <= ratio
    return f"{'PASS' if ok else 'FAIL'} (<= {share:.0%}, <= {ratio:.2f})"


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| case | requests | 429s | 429s / requests | wall s | ideal s | wall / ideal | target |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | error: {r['error']} |||||||")
            continue
        print(
            f"| {r['label']} | {r['requests']} | {r['429s']} | {r['share_429']:.1%} | "
            f"{r['wall']:.2f} | {r['ideal']:.2f} | {r['wall_over_ideal']:.2f} | {verdict(r)} |"
        )
    by_case = {r["case"]: r for r in rows if "error" not in r}
    if "bare429" in by_case and "learned" in by_case:
        ratio = by_case["bare429"]["wall"] / by_case["learned"]["wall"]
        mark = "PASS" if ratio <= 1.5 else "FAIL"
        print(f"\n10% 429s without headers: wall {ratio:.2f}x the fault-free run ({mark}, <= 1.5x)")
    for case in ("sporadic", "sporadic_ms", "sporadic_rpm"):
        clean = "rpm" if case == "sporadic_rpm" else "learned"
        if case in by_case and clean in by_case:
            row = by_case[case]
            ratio = row["wall"] / by_case[clean]["wall"]
            ok = ratio <= 1.5 and row["share_429"] <= 0.15
            print(
                f"{case}: wall {ratio:.2f}x the clean run, {row['share_429']:.0%} 429s "
                f"({'PASS' if ok else 'FAIL'}, <= 1.5x and <= 15%)"
            )
    if "storm" in by_case:
        rec = by_case["storm"].get("recovery_s")
        shown = "never" if rec is None else f"{rec:.1f} s"
        mark = "PASS" if rec is not None and rec <= 3.0 else "FAIL"
        print(f"storm: pace back at 90% of the limit {shown} after it ended ({mark}, <= 3 s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--rpm", type=float, default=300.0, help="the server's request limit")
    p.add_argument("--latency", type=float, default=0.02)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0, help="the fake server's random faults")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base-url", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        client_main(args)
        return
    rows = []
    for case in args.cases.split(","):
        print(f"running {case} ...", file=sys.stderr, flush=True)
        rows.append(run_case(case, args))
    print(
        f"N={args.n} texts, server limit {args.rpm:g} requests/min (1 s burst), "
        f"latency {args.latency * 1000:g} ms, batch {BATCH}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores\n"
    )
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
