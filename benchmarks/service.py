"""A service's view: many small concurrent calls (Poisson arrivals, 1-4 query-sized texts each)
against a fake Together server, with and without a request limit. Each client runs in its own
process against the same kind of fresh server subprocess.

    python benchmarks/service.py                         # every case, every client
    python benchmarks/service.py --cases limited-50 --clients togembed,openai --duration 5
    python benchmarks/service.py --baseline e976d00       # adds togembed at that commit

Cases: ``limited-50``/``limited-200`` (server at 600 requests/min, 50 or 200 calls/s;
``limited-200-tpm``: also 6M tokens/min, so that it sends token headers as Together does),
``free-10``/``free-200``/``free-1000`` (no limit), ``cold`` (the first call on a new client,
then a burst of 16 calls at once on another new client). Every server answers after
``--latency`` (20 ms). Per client: calls completed within the run (arrivals for ``--duration``
seconds, then ``--grace`` seconds for the last answers), p50/p99 latency of the completed
calls, requests and 429s as the server counted them, CPU per call, event-loop lag (p99 and
max of a 5 ms sleep loop), garbage collections and the longest gen-2 pause, wrong rows.
Markdown tables go to stdout, raw results to ``--out`` (benchmarks/results/service.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(REPO_ROOT))  # last: a --baseline checkout on PYTHONPATH wins

from run import FakeServer, _env, machine_info  # noqa: E402

MODEL = "BAAI/bge-base-en-v1.5"
DIM = 768
CLIENTS = ("togembed", "togembed-nomerge", "openai", "together", "aiohttp")
CASES: dict[str, dict[str, Any]] = {
    "limited-50": {"rate": 50, "server": ["--rpm", "600"]},
    "limited-200": {"rate": 200, "server": ["--rpm", "600"]},
    # As Together answers: a token limit too (x-tokenlimit-* headers), far above what is sent.
    "limited-200-tpm": {"rate": 200, "server": ["--rpm", "600", "--tpm", "6000000"]},
    "free-10": {"rate": 10, "server": []},
    "free-200": {"rate": 200, "server": []},
    "free-1000": {"rate": 1000, "server": []},
    "cold": {"rate": 0, "server": []},
}
BURST = 16
COLD_ROUNDS = 7
_WORDS = " ".join(
    (
        "how do i reset my password cheap flights to lisbon best pizza near me python asyncio",
        "timeout error return policy for shoes weather tomorrow in berlin convert pdf to text",
        "what is a vector database symptoms of flu order status refund shipping time",
    )
).split()


def make_calls(n: int, seed: int) -> list[list[str]]:
    """``n`` calls of 1-4 query-sized texts, the same for every client."""
    rng = random.Random(seed)
    return [
        [f"{' '.join(rng.choices(_WORDS, k=rng.randint(4, 12)))} #{i}.{j}" for j in range(k)]
        for i, k in enumerate(rng.choices((1, 2, 3, 4), k=n))
    ]


def arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Poisson arrival times (seconds from the start) over ``duration``."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return times
        times.append(t)


# ----------------------------------------------------------------------------- clients


Call = Callable[[list[str]], Awaitable[Any]]


async def open_client(name: str, base_url: str) -> tuple[Call, Any]:
    """(one call, close) for a client, as a service would hold it."""
    if name.startswith("togembed"):
        import togembed

        kwargs: dict[str, Any] = {"coalesce": False} if name == "togembed-nomerge" else {}
        tg = togembed.AsyncClient(api_key="x", base_url=base_url, model=MODEL, **kwargs)
        return tg.embed, tg.close
    if name == "openai":
        import openai

        oa = openai.AsyncOpenAI(api_key="x", base_url=base_url)

        async def call_openai(texts: list[str]) -> Any:
            resp = await oa.embeddings.create(model=MODEL, input=texts)
            return np.array([d.embedding for d in resp.data], dtype=np.float32)

        return call_openai, oa.close
    if name == "together":
        import together

        to = together.AsyncTogether(api_key="x", base_url=base_url.removesuffix("/v1"))

        async def call_together(texts: list[str]) -> Any:
            resp = await to.embeddings.create(model=MODEL, input=texts)
            return np.array([d.embedding for d in resp.data], dtype=np.float32)

        return call_together, to.close
    if name == "aiohttp":
        import aiohttp
        import orjson

        session = aiohttp.ClientSession(headers={"Authorization": "Bearer x"})
        url = base_url + "/embeddings"

        async def call_aiohttp(texts: list[str]) -> Any:
            async with session.post(url, json={"model": MODEL, "input": texts}) as resp:
                resp.raise_for_status()
                data = (await resp.json(loads=orjson.loads))["data"]
            data.sort(key=lambda d: d["index"])
            return np.array([d["embedding"] for d in data], dtype=np.float32)

        return call_aiohttp, session.close
    raise ValueError(name)


# ----------------------------------------------------------------------------- measuring


class LoopProbe:
    """Sleeps 5 ms in a loop and records every overshoot: how long the loop was blocked."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lags.append(time.perf_counter() - t0 - 0.005)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class GCWatch:
    """Counts collections per generation and times the longest gen-2 pause."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.max_gen2 = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            gen = info["generation"]
            self.counts[gen] += 1
            if gen == 2:
                self.max_gen2 = max(self.max_gen2, time.perf_counter() - self._started)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    from togembed.testing import fake_embeddings

    times = arrivals(args.rate, args.duration, args.seed)
    calls = make_calls(len(times), args.seed)
    call, close = await open_client(args.client, args.base_url)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    wrong = 0

    async def one(i: int, texts: list[str]) -> None:
        nonlocal wrong
        t0 = time.perf_counter()
        try:
            rows = await call(texts)
        except Exception as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            return
        if time.perf_counter() > end:  # answered after the run: not completed in time
            return
        latencies.append(time.perf_counter() - t0)
        expected = fake_embeddings(texts, DIM)
        if rows.shape != expected.shape or not np.array_equal(rows, expected):
            wrong += 1

    probe, watch = LoopProbe(), GCWatch()
    gc.callbacks.append(watch)
    probe.start()
    tasks: list[asyncio.Task[None]] = []
    cpu0, start = _cpu(), time.perf_counter()
    end = start + args.duration + args.grace
    for i, at in enumerate(times):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.perf_counter() > end:  # a client that blocks its loop falls behind its arrivals
            break
        tasks.append(asyncio.ensure_future(one(i, calls[i])))
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=max(0.0, end - time.perf_counter()))
    cpu = _cpu() - cpu0
    late = [t for t in tasks if not t.done()]
    for t in late:
        t.cancel()
    if late:  # a client that does not stop when cancelled is not waited for long
        await asyncio.wait(late, timeout=10)
    await probe.stop()
    gc.callbacks.remove(watch)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(close(), 10)
    return {
        "calls": len(calls),
        "completed": len(latencies),
        "unfinished": len(late) + len(calls) - len(tasks),
        "errors": errors,
        "wrong": wrong,
        "p50_ms": _ms(_pct(latencies, 50)),
        "p99_ms": _ms(_pct(latencies, 99)),
        "cpu_per_call_us": cpu / max(1, len(calls)) * 1e6,
        "lag_p99_ms": _ms(_pct(probe.lags, 99)),
        "lag_max_ms": _ms(max(probe.lags, default=None)),
        "gc_collections": watch.counts,
        "gc_gen2_max_ms": watch.max_gen2 * 1000,
    }


async def run_cold(args: argparse.Namespace) -> dict[str, Any]:
    """The first call on a new client, then BURST calls at once on another new client; each
    ``COLD_ROUNDS`` times with fresh clients (medians; the libraries are imported already)."""
    calls = make_calls(BURST + 1, args.seed)
    firsts, bursts = [], []

    async def timed(call: Call, texts: list[str]) -> float:
        t = time.perf_counter()
        await call(texts)
        return time.perf_counter() - t

    for _ in range(COLD_ROUNDS):
        call, close = await open_client(args.client, args.base_url)
        firsts.append(await timed(call, calls[0]))
        await close()
        call, close = await open_client(args.client, args.base_url)
        burst = await asyncio.gather(*(timed(call, texts) for texts in calls[1:]))
        bursts.append(float(np.median(burst)))
        await close()
    return {
        "first_ms": _ms(_pct(firsts, 50)),
        "burst_p50_ms": _ms(_pct(bursts, 50)),
        "rounds": COLD_ROUNDS,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def worker(args: argparse.Namespace) -> None:
    for module in ("togembed", "openai", "together", "aiohttp"):  # imports are not measured
        if args.client.startswith(module):
            __import__(module)
    run = run_cold if args.rate == 0 else run_load
    result = asyncio.new_event_loop().run_until_complete(run(args))
    print(json.dumps(result), flush=True)
    os._exit(0)  # no waiting for a client's stray tasks: what was measured is printed


# ----------------------------------------------------------------------------- orchestration


def run_case(
    case: str, client: str, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    spec = CASES[case]
    server = FakeServer(
        ["--dim", str(DIM), "--latency", str(args.latency), "--seed", "1", *spec["server"]]
    )
    try:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--client",
            client.split("@")[0],
            "--base-url",
            server.base_url,
            "--rate",
            str(spec["rate"]),
            "--duration",
            str(args.duration),
            "--grace",
            str(args.grace),
            "--seed",
            str(args.seed),
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=args.duration + 120
            )
            result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            result = {"failed": f"did not finish within {args.duration + 120:g} s"}
        except (IndexError, json.JSONDecodeError):
            result = {"failed": proc.stderr[-800:]}
        stats = server.stats()
    finally:
        server.stop()
    counts = stats.get("status_counts", {})
    result.update(
        case=case,
        client=client,
        requests=stats.get("requests"),
        rate_limited=counts.get("429", 0),
    )
    return result


def baseline_env(rev: str) -> tuple[dict[str, str], str]:
    """An environment that imports togembed as it was at ``rev`` (a git worktree)."""
    path = tempfile.mkdtemp(prefix="togembed-baseline-")
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", path, rev],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([path, str(REPO_ROOT)])
    return env, path


def table(rows: list[dict[str, Any]]) -> str:
    load = [r for r in rows if r["case"] != "cold"]
    cold = [r for r in rows if r["case"] == "cold"]
    out = []
    if load:
        out += [
            "| case | client | completed | p50 ms | p99 ms | requests | 429s | CPU/call µs "
            "| lag p99/max ms | GCs (gen0/1/2) | gen-2 max ms | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in load:
            if "failed" in r:
                out.append(f"| {r['case']} | {r['client']} | failed: {r['failed'][-120:]!r} |")
                continue
            done = (
                f"{r['completed']}/{r['calls']} ({100 * r['completed'] / max(1, r['calls']):.1f}%)"
            )
            share = 100 * r["rate_limited"] / max(1, r["requests"] or 0)
            errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "-"
            if r["wrong"]:
                errors += f"; {r['wrong']} WRONG"
            out.append(
                f"| {r['case']} | {r['client']} | {done} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} "
                f"| {r['requests']:.0f} | {r['rate_limited']:.0f} ({share:.1f}%) "
                f"| {r['cpu_per_call_us']:.0f} | {_f(r['lag_p99_ms'])}/{_f(r['lag_max_ms'])} "
                f"| {'/'.join(map(str, r['gc_collections']))} | {r['gc_gen2_max_ms']:.1f} "
                f"| {errors} |"
            )
    if cold:
        out += [
            "",
            "| client | first call ms | burst of 16: p50 ms | requests (all rounds) |",
            "|---|---|---|---|",
        ]
        for r in cold:
            if "failed" in r:
                out.append(f"| {r['client']} | failed |")
                continue
            out.append(
                f"| {r['client']} | {_f(r['first_ms'])} | {_f(r['burst_p50_ms'])} "
                f"| {r['requests']:.0f} |"
            )
    return "\n".join(out)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", default=None)
    p.add_argument("--base-url", default=None)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--baseline", default=None, help="also run togembed at this git revision")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--grace", type=float, default=2.0)
    p.add_argument("--latency", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--rounds", type=int, default=1, help="runs per case and client (medians reported)"
    )
    p.add_argument("--out", default=str(HERE / "results" / "service.json"))
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    clients = args.clients.split(",")
    envs = {c: _env() for c in clients}
    worktree = None
    if args.baseline:
        base_env, worktree = baseline_env(args.baseline)
        name = f"togembed@{args.baseline}"
        clients.insert(1, name)
        envs[name] = base_env
    runs: list[dict[str, Any]] = []
    try:
        for case in args.cases.split(","):
            for r in range(args.rounds):
                order = clients if r % 2 == 0 else clients[::-1]  # alternate, to spread noise
                for client in order:
                    if case == "cold" and client == "togembed-nomerge":
                        continue
                    print(f"{case} {client} round {r + 1} ...", file=sys.stderr, flush=True)
                    runs.append(run_case(case, client, args, envs[client]))
    finally:
        if worktree is not None:
            subprocess.run(
                ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", worktree],
                capture_output=True,
            )
    rows = [
        medians([r for r in runs if (r["case"], r["client"]) == key])
        for key in dict.fromkeys((r["case"], r["client"]) for r in runs)
    ]
    print(table(rows))
    if args.rounds > 1:
        print(f"\nmedians of {args.rounds} rounds; completed: the worst round; errors: all rounds")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"machine": machine_info(), "args": vars(args), "rows": rows, "runs": runs}, indent=1
        )
    )
    return 0


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a case and client: the median of each figure over its rounds, the worst
    round's completed calls, the errors of all rounds; a failed round fails the row."""
    failed = [r for r in runs if "failed" in r]
    if failed:
        return failed[0]
    row = dict(runs[0])
    for key, value in runs[0].items():
        values = [r[key] for r in runs]
        if key in ("completed", "calls", "unfinished"):
            worst = min(range(len(runs)), key=lambda i: runs[i]["completed"] - runs[i]["calls"])
            row[key] = runs[worst][key]
        elif key == "errors":
            row[key] = {k: sum(r["errors"].get(k, 0) for r in runs) for k in set().union(*values)}
        elif key == "gc_collections":
            row[key] = [int(np.median([v[g] for v in values])) for g in range(3)]
        elif key == "wrong":
            row[key] = max(values)
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            known = [v for v in values if v is not None]
            row[key] = float(np.median(known)) if known else None
    return row


if __name__ == "__main__":
    sys.exit(main())
