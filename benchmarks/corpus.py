"""Benchmark the ``togembed embed`` command (a corpus job) on a local fake server.

    python benchmarks/corpus.py                         # speed (n=20000, 3 rounds) and memory
    python benchmarks/corpus.py --only speed --rounds 5
    python benchmarks/corpus.py --only memory --sizes 100000,300000

speed   Wall time of ``togembed embed texts.txt -o out.parquet`` (a subprocess, default batch 128
        and concurrency 16) against a script that calls ``AsyncClient.embed()`` on the same texts,
        each against a fresh fake server (``--latency``, ``--dim``). The script reads the same
        file and writes the same .parquet (``togembed.jobs.writers.write_output``), so both process
        walls are end to end; "in-run s" is the job time the command reports ("... this run in
        X s": store, embed, write the output) and, for the script, ``embed()`` plus the write.
        The command's rows are checked against ``fake_embeddings`` after every run.
memory  Peak RSS (``wait4`` ru_maxrss of the command's process) while it streams N short texts
        to .parquet, per N: it should stay flat as N grows.

Progress goes to stderr; markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(REPO_ROOT)]

from clients import make_texts  # noqa: E402
from run import FakeServer, _env, machine_info  # noqa: E402

MODEL = "BAAI/bge-base-en-v1.5"
_JOB_TIME = re.compile(r"this run in ([\d.]+) s")

# Reads the texts, times AsyncClient.embed(), writes the same .parquet the command writes.
_EMBED_SCRIPT = """
import asyncio, json, sys, time
from togembed import AsyncClient
from togembed.jobs.writers import write_output

async def main(src, out, url, model):
    with open(src, encoding="utf-8") as f:
        texts = f.read().splitlines()
    t0 = time.perf_counter()
    async with AsyncClient(base_url=url) as client:
        vectors = await client.embed(texts, model=model)
    t1 = time.perf_counter()
    rows = zip((str(i) for i in range(1, len(texts) + 1)), vectors)
    write_output(out, rows, dim=vectors.shape[1], count=len(texts))
    print(json.dumps({"embed_s": t1 - t0, "write_s": time.perf_counter() - t1}))

asyncio.run(main(*sys.argv[1:]))
"""


def measure(cmd: list[str], *, timeout: float, cwd: Path) -> dict[str, Any]:
    """Run ``cmd``: its wall time, CPU time and peak RSS.

    Peak RSS comes from GNU time (``/usr/bin/time -f %M``), which forks from a tiny process:
    Linux carries a process's RSS high-water mark across fork and exec, so ``wait4`` on a
    child of this (larger) Python process would report at least our own peak.
    """
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.TemporaryDirectory() as tmp:
        usage_file = Path(tmp) / "usage"
        if gnu_time:
            cmd = [gnu_time, "-f", "%U %S %M", "-o", str(usage_file), *cmd]
        with open(Path(tmp) / "out", "w+") as out, open(Path(tmp) / "err", "w+") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=_env(), cwd=cwd, start_new_session=True
            )
            timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            wall = time.perf_counter() - t0
            rc = os.waitstatus_to_exitcode(status)
            proc.returncode = rc
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if gnu_time and usage_file.exists():
            user, system, max_kb = usage_file.read_text().split()[-3:]
            cpu, peak_kb = float(user) + float(system), int(max_kb)
        else:  # an upper bound, see above
            cpu, peak_kb = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
    return {
        "rc": rc,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": peak_kb / 1024,
        "stdout": stdout,
        "stderr": stderr,
    }


def embed_cmd(src: Path, out: Path, url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "togembed",
        "embed",
        str(src),
        "-o",
        str(out),
        "-m",
        MODEL,
        "--base-url",
        url,
    ]


def check_rows(out: Path, texts: list[str], dim: int) -> int:
    """Rows of a .parquet output that are not exactly (id = line number, fake vector)."""
    import pyarrow.parquet as pq

    from togembed.testing import fake_embeddings

    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy()
    vectors = vectors.reshape(len(ids), dim)
    if ids != [str(i) for i in range(1, len(texts) + 1)]:
        return len(texts)
    return int((vectors != fake_embeddings(texts, dim)).any(axis=1).sum())


def _clean(work: Path, out: Path) -> None:
    for p in work.glob(out.name + "*"):
        p.unlink()
    for p in work.glob("." + out.name + "*"):
        p.unlink()


def _server(args: argparse.Namespace) -> FakeServer:
    return FakeServer(["--dim", str(args.dim), "--latency", str(args.latency)])


def bench_speed(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    texts = make_texts(args.n)
    src = work / "speed.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    script = work / "embed_call.py"
    script.write_text(_EMBED_SCRIPT, encoding="utf-8")
    out = work / "speed.parquet"
    results: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        modes = ["cli", "embed()"] if rnd % 2 == 0 else ["embed()", "cli"]
        for mode in modes:
            _clean(work, out)
            server = _server(args)
            try:
                if mode == "cli":
                    cmd = embed_cmd(src, out, server.base_url)
                else:
                    cmd = [sys.executable, str(script), str(src), str(out), server.base_url, MODEL]
                res = measure(cmd, timeout=args.timeout, cwd=work)
                res["requests"] = server.stats().get("requests")
            finally:
                server.stop()
            res.update(mode=mode, round=rnd)
            if res["rc"] != 0:
                res["error"] = res["stderr"][-500:]
            elif mode == "cli":
                m = _JOB_TIME.search(res["stderr"])
                res["inner_s"] = float(m.group(1)) if m else None
                res["wrong_rows"] = check_rows(out, texts, args.dim)
            else:
                times = json.loads(res["stdout"].strip().splitlines()[-1])
                res["embed_s"], res["write_s"] = times["embed_s"], times["write_s"]
                res["inner_s"] = times["embed_s"] + times["write_s"]
                res["wrong_rows"] = None
            results.append(res)
            print(
                f"[speed] round {rnd} {mode:8s} wall={res['wall_s']:.2f}s "
                f"in-run={res.get('inner_s')} rc={res['rc']} "
                f"rss={res['peak_rss_mb']:.0f}MB wrong={res.get('wrong_rows')}",
                file=sys.stderr,
                flush=True,
            )
    _clean(work, out)
    return results


def bench_memory(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for n in args.sizes:
        src = work / f"short{n}.txt"
        with open(src, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(f"short text number {i}\n")
        out = work / f"short{n}.parquet"
        _clean(work, out)
        server = _server(args)
        # The job's SQLite file and its vectors file.
        job_files = [Path(f"{out}.togembed-job.sqlite"), Path(f"{out}.togembed-job.vectors")]
        try:
            res = measure(embed_cmd(src, out, server.base_url), timeout=args.timeout, cwd=work)
            res["requests"] = server.stats().get("requests")
        finally:
            server.stop()
        res.update(n=n)
        if res["rc"] != 0:
            res["error"] = res["stderr"][-500:]
        else:
            import pyarrow.parquet as pq

            res["rows"] = pq.ParquetFile(out).metadata.num_rows
            res["output_mb"] = out.stat().st_size / 2**20
            res["job_mb"] = sum(f.stat().st_size for f in job_files if f.exists()) / 2**20
        results.append(res)
        print(
            f"[memory] n={n} wall={res['wall_s']:.1f}s rc={res['rc']} "
            f"rss={res['peak_rss_mb']:.0f}MB rows={res.get('rows')}",
            file=sys.stderr,
            flush=True,
        )
        _clean(work, out)
        src.unlink()
    return results


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _f(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def speed_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | ok | wall s | in-run s | CPU s | peak RSS MB | requests | wrong rows |",
        "|---|---|---|---|---|---|---|---|",
    ]
    med: dict[str, dict[str, float | None]] = {}
    for mode in ("cli", "embed()"):
        rows = [r for r in results if r["mode"] == mode]
        ok = [r for r in rows if r["rc"] == 0]
        med[mode] = {k: _median([r.get(k) for r in ok]) for k in ("wall_s", "inner_s")}
        wrong = [r["wrong_rows"] for r in ok if r.get("wrong_rows") is not None]
        label = "`togembed embed`" if mode == "cli" else "`AsyncClient.embed()` script"
        lines.append(
            f"| {label} | {len(ok)}/{len(rows)} | {_f(med[mode]['wall_s'])} | "
            f"{_f(med[mode]['inner_s'])} | {_f(_median([r['cpu_s'] for r in ok]))} | "
            f"{_f(_median([r['peak_rss_mb'] for r in ok]), 0)} | "
            f"{_median([r['requests'] for r in ok])} | {max(wrong) if wrong else '—'} |"
        )
    for key, what in (("wall_s", "process wall"), ("inner_s", "in-run")):
        a, b = med["cli"][key], med["embed()"][key]
        ratio = f"{a / b:.2f}x" if a and b else "—"
        lines.append(f"\n{what}: command / script = {ratio} (target <= 1.1x)")
    script = [r for r in results if r["mode"] == "embed()" and r["rc"] == 0]
    embed, write = (_median([r.get(k) for r in script]) for k in ("embed_s", "write_s"))
    lines.append(f"\n(the script's embed(): {_f(embed)} s, then its .parquet write: {_f(write)} s)")
    pairs = [
        a["wall_s"] / b["wall_s"]
        for a, b in zip(
            [r for r in results if r["mode"] == "cli"],
            [r for r in results if r["mode"] == "embed()"],
            strict=True,
        )
        if a["rc"] == 0 and b["rc"] == 0
    ]
    if pairs:
        lines.append(
            f"\nper-round process wall ratios: median {statistics.median(pairs):.2f}x, "
            f"range {min(pairs):.2f}-{max(pairs):.2f}x over {len(pairs)} rounds"
        )
    return "\n".join(lines)


def memory_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| texts | ok | wall s | texts/s | peak RSS MB | CPU s | output MB | job files MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ok = r["rc"] == 0 and r.get("rows") == r["n"]
        lines.append(
            f"| {r['n']:,} | {'yes' if ok else 'NO'} | {_f(r['wall_s'], 1)} | "
            f"{r['n'] / r['wall_s']:,.0f} | {_f(r['peak_rss_mb'], 0)} | {_f(r['cpu_s'], 1)} | "
            f"{_f(r.get('output_mb'), 0)} | {_f(r.get('job_mb'), 0)} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=("speed", "memory"), default=None)
    p.add_argument("--n", type=int, default=20000, help="texts for the speed comparison")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="100000,1000000", help="texts per memory run")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--latency", type=float, default=0.02, help="fake server latency, seconds")
    p.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    p.add_argument("--workdir", default=None, help="where inputs and outputs go (default: tmp)")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    info = machine_info()
    print(f"- CPU: {info['cpu']} ({info['cores']} cores), Python {info['python']}")
    print(f"- dim={args.dim} latency={args.latency}s\n", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="togembed-corpus-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.only in (None, "speed"):
            print(f"## Speed: {args.n:,} texts, medians of {args.rounds} rounds\n")
            print(speed_table(bench_speed(args, work)) + "\n", flush=True)
        if args.only in (None, "memory"):
            print("## Memory: short texts to .parquet\n")
            print(memory_table(bench_memory(args, work)) + "\n", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
