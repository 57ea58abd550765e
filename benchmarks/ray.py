"""Ray benchmark: a dataset embedded by N actors (or N plain processes) against ONE account
limit. How close to the limit does the whole cluster run, and how many 429s does it collect?

Every case starts a fresh fake Together server process (a token bucket with 1 s of burst,
Together's rate-limit headers, 429 with Retry-After); each client runs in its own process (Ray
actors, or subprocesses for Redis). "Ideal" is the time for the requests beyond one second of
burst at exactly the server's rate; wall includes actor (or process) start-up.

    python benchmarks/ray.py                         # every case, 50,000 texts, 600 requests/min
    python benchmarks/ray.py --cases shared,learned --n 5000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from typing import Any

# This file is named ray.py: its folder must not shadow the ray package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

MODEL = "BAAI/bge-base-en-v1.5"
DIM = 64
BATCH = 128
LIMITED = ["shared", "learned", "redis", "redis-learned", "per-actor", "plain"]
ALL = [*LIMITED, "throughput", "cost", "kill"]


def text(i: int) -> str:
    return f"benchmark text number {i} about nothing in particular"


# -- servers ----------------------------------------------------------------------------------


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


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


# -- one worker process (Redis cases, single-process baseline) -------------------------------


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    import togembed

    texts = [text(i) for i in range(args.start, args.start + args.count)]
    limiter = None
    if args.redis:
        limiter = togembed.RedisLimiter(args.redis, rpm=args.rpm, name=args.name)
    client = togembed.AsyncClient(
        base_url=args.base_url,
        model=MODEL,
        limiter=limiter,
        batch_size=args.batch,
        concurrency=args.concurrency,
    )
    start = time.perf_counter()
    try:
        arr = await client.embed(texts)
    finally:
        await client.close()
        if limiter is not None:
            await limiter.aclose()
    return {"wall": time.perf_counter() - start, "rows": len(arr)}


def run_processes(url: str, n: int, workers: int, argv: list[str]) -> tuple[float, int]:
    """``workers`` processes embedding n texts between them; wall from launch to last exit."""
    share = -(-n // workers)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--base-url",
                url,
                "--start",
                str(i * share),
                "--count",
                str(min(share, n - i * share)),
                *argv,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    rows = sum(json.loads(p.communicate()[0])["rows"] for p in procs)
    return time.perf_counter() - start, rows


# -- Ray cases --------------------------------------------------------------------------------


def embedder_classes() -> tuple[type, type]:
    import togembed
    from togembed.ray.embedder import Embedder

    class Unlimited:
        """The plain loop: no pacing at all (togembed's retries still answer the 429s)."""

        async def acquire(self, tokens: int) -> togembed.Ticket:
            return togembed.Ticket(seq=0, tokens=tokens, sent_at=0.0)

        def release(self, ticket: togembed.Ticket, feedback: togembed.Feedback) -> None:
            pass

        def max_batch_tokens(self) -> int | None:
            return None

    class PlainEmbedder(Embedder):
        async def _make_limiter(self) -> Any:
            return Unlimited()

    class PidEmbedder(Embedder):
        """Writes its process id where the benchmark can find it (to kill it)."""

        def __init__(self, *, pid_dir: str, **settings: Any) -> None:
            super().__init__(**settings)
            self.busy = os.path.join(pid_dir, str(os.getpid()))

        async def __call__(self, batch: Any) -> Any:
            """While a batch is being embedded, its file says so (the one to kill)."""
            with open(self.busy, "w"):
                pass
            try:
                return await super().__call__(batch)
            finally:
                if os.path.exists(self.busy):
                    os.remove(self.busy)

    return PlainEmbedder, PidEmbedder


def ray_dataset(n: int) -> Any:
    import ray.data

    return ray.data.from_items([{"id": i, "text": text(i)} for i in range(n)])


def check_rows(out: Any, n: int, *, exact: bool = False) -> int:
    """Every id once (and, with ``exact``, every vector as the server computes it)."""
    import numpy as np
    import ray

    from togembed.testing import fake_embeddings

    tables = ray.get(out.to_arrow_refs())
    ids = np.concatenate([t.column("id").to_numpy() for t in tables])
    assert len(ids) == n and len(np.unique(ids)) == n, f"{len(ids)} rows, {len(np.unique(ids))} ids"
    if exact:
        order = np.argsort(ids)
        vecs = np.concatenate(
            [
                np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(-1, DIM)
                for t in tables
            ]
        )[order]
        np.testing.assert_array_equal(vecs, fake_embeddings([text(i) for i in range(n)], DIM))
    return n


def run_ray(
    url: str, n: int, workers: int, cls: type | None = None, **kwargs: Any
) -> tuple[float, Any]:
    import ray.data

    import togembed.ray

    ds = ray_dataset(n)  # the input, made before the clock starts
    start = time.perf_counter()
    if cls is None:
        out = togembed.ray.embed_dataset(
            ds, model=MODEL, base_url=url, concurrency=workers, **kwargs
        )
    else:
        extra = kwargs.pop("constructor", {})
        rows = kwargs.pop("rows_per_batch", 512)
        out = ds.repartition(target_num_rows_per_block=rows, strict=True).map_batches(
            cls,
            fn_constructor_kwargs={"model": MODEL, "base_url": url, **kwargs, **extra},
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_size=rows,
            batch_format="pyarrow",
            num_cpus=0,
        )
    out = out.materialize()
    return time.perf_counter() - start, out


def _root_cause(exc: BaseException) -> str:
    """The togembed error inside Ray's wrappers, on one line."""
    import re

    found = re.findall(r"togembed\.core\.errors\.(\w+): ([^\n]*)", str(exc))
    name, message = found[-1] if found else (type(exc).__name__, str(exc).splitlines()[-1])
    return f"{name}: {message}"[:100]


class FirstRequest:
    """Seconds from now until the server saw its first request (start-up, for the table)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._seen = server_stats(url)["requests"]  # before this run
        self.start = time.perf_counter()
        self.after: float | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self.after is None and time.perf_counter() - self.start < 600:
            try:
                if server_stats(self._url)["requests"] > self._seen:
                    self.after = time.perf_counter() - self.start
            except OSError:
                return
            time.sleep(0.05)


def limited_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    proc, url = start_server(["--rpm", str(args.rpm), "--latency", "0.02"])
    try:
        return _limited(case, args, url)
    finally:
        proc.terminate()
        proc.wait()


def _limited(case: str, args: argparse.Namespace, url: str) -> dict[str, Any]:
    n, rpm, k = args.n, args.rpm, args.workers
    first = FirstRequest(url)
    try:
        if case == "shared":
            wall, out = run_ray(url, n, k, rpm=rpm, batch_size=BATCH)
        elif case == "learned":
            wall, out = run_ray(url, n, k, batch_size=BATCH)
        elif case == "per-actor":
            wall, out = run_ray(url, n, k, rpm=rpm, batch_size=BATCH, pacing="per-worker")
        elif case == "plain":
            wall, out = run_ray(url, n, k, embedder_classes()[0], batch_size=BATCH)
        else:  # redis, redis-learned: plain processes sharing a RedisLimiter
            rproc, rurl = start_redis()
            try:
                argv = ["--redis", rurl, "--name", uuid.uuid4().hex, "--batch", str(BATCH)]
                if case == "redis":
                    argv += ["--rpm", str(rpm)]
                wall, _rows = run_processes(url, n, k, argv)
                out = None
            finally:
                rproc.terminate()
                rproc.wait()
        if out is not None:
            check_rows(out, n)
        failed = None
    except Exception as exc:  # the unpaced loops may fail the job: that is a result too
        if case not in ("plain", "per-actor"):
            raise
        wall, failed = time.perf_counter() - first.start, _root_cause(exc)
    stats = server_stats(url, log=True)
    span = max(r["at"] for r in stats["log"])  # first request to last
    requests = stats["requests"]
    ok = stats["status_counts"].get("200", 0)
    r429 = stats["status_counts"].get("429", 0)
    ideal = max(0.0, ok - rpm / 60) / (rpm / 60)
    return {
        "case": case,
        "workers": k,
        "requests": requests,
        "429": r429,
        "share_429": r429 / requests,
        "wall": wall,
        "ideal": ideal,
        "ratio": wall / ideal,
        "first_request_after": first.after,
        "failed": failed,
        "span": span,
    }


def throughput_case(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Unlimited server, 20 ms latency: one process vs 1, 2, 4 actors at 16 requests in flight
    in total (Ray Data runs 4 batches of an actor at once)."""
    n, rows = args.n_fast, []
    proc, url = start_server(["--latency", "0.02"])
    try:
        first = FirstRequest(url)
        wall, _got = run_processes(url, n, 1, ["--batch", "32", "--concurrency", "16"])
        label = "AsyncClient.embed, 1 process"
        rows.append({"case": label, "workers": 1, "wall": wall, "startup": first.after})
        for k, pacing in ((1, "shared"), (2, "shared"), (4, "shared"), (4, "per-worker")):
            first = FirstRequest(url)
            wall, out = run_ray(
                url,
                n,
                k,
                batch_size=32,
                max_in_flight=16 // k,
                rows_per_batch=args.rows,
                pacing=pacing,
            )
            check_rows(out, n)
            label = f"embed_dataset, {k} actors" + (
                ", no shared limiter" if pacing != "shared" else ""
            )
            rows.append({"case": label, "workers": k, "wall": wall, "startup": first.after})
        base, base_work = rows[0]["wall"], rows[0]["wall"] - (rows[0]["startup"] or 0.0)
        for r in rows:
            work = r["wall"] - (r["startup"] or 0.0)  # from the first request to the end
            r.update(texts_per_s=n / r["wall"], vs_single=r["wall"] / base, work=work)
            r.update(work_vs_single=work / base_work)
    finally:
        proc.terminate()
        proc.wait()
    return rows


def cost_case(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The shared limiter's cost per request: 4 Ray tasks, each 16 concurrent acquire/release
    loops against one limiter actor (no limit known: permits leased ahead), vs one actor call
    per acquire."""
    import ray

    from togembed.ray.limiter_actor import get_or_create

    @ray.remote(num_cpus=0)
    def hammer(name: str, per_task: int, naive: bool) -> dict[str, float]:
        from togembed import Feedback
        from togembed.ray.grants import Answer
        from togembed.ray.limiter import RayLimiter

        async def main() -> dict[str, float]:
            limiter = RayLimiter.connect(name)
            actor = limiter._actor
            probe = await limiter.acquire(1)
            limiter.release(probe, Feedback(status=200))
            await limiter.flush()

            async def one() -> None:
                if naive:
                    grant = await actor.grant.remote(limiter.holder, [1])
                    await actor.report.remote(limiter.holder, [Answer(grant.tickets[0].seq, 200)])
                else:
                    ticket = await limiter.acquire(1)
                    limiter.release(ticket, Feedback(status=200))

            async def loop(count: int) -> None:
                for _ in range(count):
                    await one()

            start = time.perf_counter()
            await asyncio.gather(*(loop(per_task // 16) for _ in range(16)))
            wall = time.perf_counter() - start
            calls = per_task if naive else limiter.grant_calls
            await limiter.aclose()
            return {"wall": wall, "grant_calls": calls}

        return asyncio.run(main())

    out = []
    for naive in (False, True):
        name = f"bench-cost-{uuid.uuid4().hex}"
        get_or_create(name)
        per_task = 1600 if naive else 16000
        results = ray.get([hammer.remote(name, per_task, naive) for _ in range(4)])
        wall = max(r["wall"] for r in results)
        total = 4 * per_task
        out.append(
            {
                "case": "one call per acquire" if naive else "RayLimiter (grants, permits ahead)",
                "requests": total,
                "wall": wall,
                "per_s": total / wall,
                "us_per_request": 1e6 * wall / total,
                "grant_calls_per_request": sum(r["grant_calls"] for r in results) / total,
            }
        )
    return out


def kill_case(args: argparse.Namespace) -> dict[str, Any]:
    """4 actors; one is SIGKILLed once a quarter of the inputs are in."""
    n = args.n
    proc, url = start_server(["--latency", "0.02"])
    pid_dir = tempfile.mkdtemp()
    killed: list[int] = []

    def killer() -> None:
        while server_stats(url)["inputs"] < n // 4:
            time.sleep(0.01)
        while not killed:  # an actor in the middle of a batch
            for name in os.listdir(pid_dir):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(name), signal.SIGKILL)
                    killed.append(int(name))
                    return
            time.sleep(0.001)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        wall, out = run_ray(
            url,
            n,
            args.workers,
            embedder_classes()[1],
            batch_size=BATCH,
            constructor={"pid_dir": pid_dir},
        )
        check_rows(out, n, exact=True)
        stats = server_stats(url)
    finally:
        proc.terminate()
        proc.wait()
    return {
        "case": "one actor SIGKILLed",
        "killed": bool(killed),
        "wall": wall,
        "inputs_sent": stats["inputs"],
        "repaid": stats["inputs"] - n,
        "rows": n,
    }


LABELS = {
    "shared": "embed_dataset, shared limiter, rpm= configured",
    "learned": "embed_dataset, shared limiter, nothing configured (learned from headers)",
    "redis": "4 plain processes, RedisLimiter(rpm=)",
    "redis-learned": "4 plain processes, RedisLimiter() learned from headers",
    "per-actor": "each actor paces alone: RateLimiter(rpm=) per actor",
    "plain": "no limiter: plain client loop in each actor",
}
TARGETS = {
    "shared": (0.01, 1.15),
    "learned": (0.05, 1.30),
    "redis": (0.01, 1.15),
    "redis-learned": (0.05, 1.30),
}


def print_tables(results: dict[str, Any]) -> None:
    """The results as markdown, as docs/benchmarks.md shows them."""
    print(
        f"\nN={results['n']} texts, server limit {results['rpm']:g} requests/min (1 s burst), "
        f"latency 20 ms, batch {BATCH}, {results['workers']} workers, 2 cores\n"
    )
    print(
        "| case | requests | 429s | 429s / requests | start-up s | wall s | ideal s "
        "| wall / ideal | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in LIMITED:
        r = results.get(case)
        if r is None:
            continue
        target = TARGETS.get(case)
        verdict = "measured"
        if target is not None:
            ok = r["share_429"] <= target[0] and r["ratio"] <= target[1]
            verdict = f"{'PASS' if ok else 'MISS'} (<= {target[0]:.0%}, <= {target[1]:.2f})"
        if r.get("failed"):
            verdict = f"job failed: {r['failed'][:80]}"
        startup = r.get("first_request_after")
        print(
            f"| {LABELS[case]} | {r['requests']} | {r['429']} | {r['share_429']:.1%} | "
            f"{startup if startup is None else round(startup, 1)} | {r['wall']:.1f} | "
            f"{r['ideal']:.1f} | {r['ratio']:.2f} | {verdict} |"
        )
    if "throughput" in results:
        print(
            f"\nUnlimited server, 20 ms latency, {results['n_fast']} texts, batch 32, "
            "16 requests in flight in total\n"
        )
        print(
            "| client | wall s | texts/s | wall / one process | start-up s "
            "| after start-up s | after start-up / one process |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in results["throughput"]:
            print(
                f"| {r['case']} | {r['wall']:.2f} | {r['texts_per_s']:.0f} | {r['vs_single']:.2f} "
                f"| {r['startup'] or 0:.2f} | {r['work']:.2f} | {r['work_vs_single']:.2f} |"
            )
    if "cost" in results:
        print("\nThe shared limiter's cost: 4 Ray tasks x 16 concurrent acquire/release loops\n")
        print("| limiter | requests | wall s | requests/s | grant calls / request |")
        print("|---|---|---|---|---|")
        for r in results["cost"]:
            print(
                f"| {r['case']} | {r['requests']} | {r['wall']:.2f} | {r['per_s']:.0f} | "
                f"{r['grant_calls_per_request']:.3f} |"
            )
    if "kill" in results:
        r = results["kill"]
        print(
            f"\nOne of {results['workers']} actors SIGKILLed in the middle of a batch, once "
            "25 % of the inputs were sent: "
            f"{'killed' if r['killed'] else 'NOT killed'}, {r['rows']} rows, every id once, "
            f"vectors exact; {r['inputs_sent']} inputs sent, {r['repaid']} re-paid; "
            f"wall {r['wall']:.1f} s"
        )


def warm_up() -> None:
    """One small job, not measured: the first job after ``ray.init`` pays Ray's own one-time
    costs (its executor, worker pool, file caches). Every case still starts its own actors."""
    proc, url = start_server([])
    try:
        run_ray(url, 100, 1)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=",".join(ALL))
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--n-fast", type=int, default=100_000, help="texts for the unlimited cases")
    p.add_argument("--rpm", type=float, default=600)
    p.add_argument("--rows", type=int, default=2048, help="rows per batch (unlimited cases)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--json", default=None, help="write the results here too")
    # one worker process (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base-url", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--redis", default=None, help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(worker(args))))
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results: dict[str, Any] = {
        "n": args.n,
        "n_fast": args.n_fast,
        "rpm": args.rpm,
        "workers": args.workers,
    }
    warm_up()
    for case in args.cases.split(","):
        t = time.perf_counter()
        if case in LIMITED:
            res: Any = limited_case(case, args)
        elif case == "throughput":
            res = throughput_case(args)
        elif case == "cost":
            res = cost_case(args)
        elif case == "kill":
            res = kill_case(args)
        else:
            raise SystemExit(f"unknown case {case!r}")
        results[case] = res
        print(json.dumps({case: res}), f"({time.perf_counter() - t:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print_tables(results)
    ray.shutdown()


if __name__ == "__main__":
    main()
