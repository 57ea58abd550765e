"""Benchmark togembed against the peers a user would otherwise pick, on a local fake server.

    python benchmarks/run.py                 # n=20000, dim=768, 3 rounds, all clients/scenarios
    python benchmarks/run.py --quick         # smoke run: n=2000, 1 round

For each scenario a fake Together server runs in its own subprocess; every (client, round) runs in
a fresh subprocess (benchmarks/clients.py). Medians over rounds are printed as markdown tables, the
targets are checked, and all raw results are written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
CLIENTS_PY = HERE / "clients.py"
ALL_CLIENTS = ("togembed", "openai", "together", "aiohttp", "aiohttp-orjson")
SCENARIOS: dict[str, list[str]] = {
    "float": ["--encoding", "float"],
    "base64": ["--encoding", "honour"],
    "faults": ["--encoding", "honour", "--fault-rate-429", "0.1", "--fault-rate-5xx", "0.1"],
}
REF = "togembed"


# ----------------------------------------------------------------------------- environment


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    code = (
        "import json\nfrom importlib import metadata\nout={}\n"
        "for p in ('togembed','openai','together','aiohttp','httpx','numpy','orjson'):\n"
        "    try: out[p]=metadata.version(p)\n"
        "    except metadata.PackageNotFoundError: out[p]=None\n"
        "try:\n    import togembed; out['togembed_AsyncClient']=hasattr(togembed,'AsyncClient')\n"
        "    out['togembed']=out['togembed'] or getattr(togembed,'__version__',None)\n"
        "except Exception as e: out['togembed_AsyncClient']=repr(e)\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60
    )
    try:
        versions = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        versions = {"error": proc.stderr[-500:]}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


# ----------------------------------------------------------------------------- fake server


class FakeServer:
    """`python -m togembed.server.fake` in a subprocess; waits for its READY line."""

    def __init__(self, args: list[str], startup_timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "togembed.server.fake", "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(
            cmd + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=REPO_ROOT,
        )
        self.output: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()

        def drain(stream: Any) -> None:
            for line in stream:
                self.output.append(line.rstrip("\n"))
                lines.put(line)
            lines.put(None)

        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=drain, args=(stream,), daemon=True).start()

        deadline = time.monotonic() + startup_timeout
        closed = 0
        self.base_url = ""
        while not self.base_url:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError("fake server did not print READY in time") from None
            if line is None:
                closed += 1
                if closed == 2:
                    self.stop()
                    tail = "\n".join(self.output[-20:])
                    raise RuntimeError(f"fake server exited before READY:\n{tail}")
            elif line.startswith("READY "):
                self.base_url = line.split(None, 1)[1].strip()
        root = self.base_url.rstrip("/").removesuffix("/v1")
        self.stats_url = root + "/stats"

    def _request(self, url: str, method: str) -> Any:
        data = b"" if method == "POST" else None
        req = urllib.request.Request(url, method=method, data=data)
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def reset_stats(self) -> None:
        self._request(self.stats_url + "/reset", "POST")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request(self.stats_url, "GET")
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------------------- running


def run_client(
    client: str, base_url: str, n: int, dim: int, model: str | None, timeout: float
) -> dict[str, Any]:
    cmd = [sys.executable, str(CLIENTS_PY), "--client", client, "--base-url", base_url]
    cmd += ["--n", str(n), "--dim", str(dim)]
    if model:
        cmd += ["--model", model]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired:
        return {"client": client, "error": f"timeout after {timeout:.0f}s", "wrong_rows": n}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    tail = proc.stderr.strip().splitlines()[-5:]
    return {
        "client": client,
        "error": f"exit {proc.returncode} after {time.perf_counter() - t0:.1f}s: "
        + " | ".join(tail),
        "wrong_rows": n,
    }


def _count_statuses(stats: dict[str, Any]) -> tuple[int, int]:
    counts = {int(k): int(v) for k, v in (stats.get("status_counts") or {}).items()}
    n429 = counts.get(429, 0)
    n5xx = sum(v for k, v in counts.items() if 500 <= k < 600)
    return n429, n5xx


def run_scenario(name: str, args: argparse.Namespace, clients: list[str]) -> list[dict[str, Any]]:
    """Every (client, round) gets a fresh server seeded with round + 1, so all clients of a round
    face the same random fault sequence (the server's RNG is not reset by /stats/reset, and a
    shared server would hand each client a different slice of it). Not seed 0: its first 20
    draws are all >= 0.2, i.e. a --quick run would see no faults at all."""
    raw: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = clients if rnd % 2 == 0 else list(reversed(clients))
        server_args = ["--dim", str(args.dim), "--latency", str(args.latency)]
        server_args += ["--seed", str(rnd + 1)]
        for client in order:
            server = FakeServer(server_args + SCENARIOS[name])
            try:
                server.reset_stats()
                res = run_client(
                    client, server.base_url, args.n, args.dim, args.model, args.timeout
                )
                try:
                    stats = server.stats()
                except OSError as exc:
                    stats = {"error": repr(exc)}
            finally:
                server.stop()
            n429, n5xx = _count_statuses(stats)
            res.update(
                scenario=name,
                round=rnd,
                client=client,
                requests=stats.get("requests"),
                server_inputs=stats.get("inputs"),
                status_counts=stats.get("status_counts"),
                n429=n429,
                n5xx=n5xx,
            )
            raw.append(res)
            msg = (
                f"[{name}] round {rnd} {client:9s} wall={_fmt(res.get('wall_s'), 2)}s "
                f"req={res['requests']} wrong={res.get('wrong_rows')}"
            )
            if res.get("error"):
                msg += f" ERROR {res['error'][:200]}"
            print(msg, file=sys.stderr, flush=True)
    return raw


# ----------------------------------------------------------------------------- reporting


def _median(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def summarize(raw: list[dict[str, Any]], clients: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for client in clients:
        rows = [r for r in raw if r["client"] == client]
        ok = [r for r in rows if not r.get("error")]
        wrong = [r.get("wrong_rows") for r in rows]
        delta = _median([r.get("rss_delta_mb") for r in ok])
        arr_mb = _median([r.get("array_mb") for r in ok])
        out[client] = {
            "rounds": len(rows),
            "ok_rounds": len(ok),
            "errors": [r["error"] for r in rows if r.get("error")],
            "wall_s": _median([r.get("wall_s") for r in ok]),
            "cpu_s": _median([r.get("cpu_s") for r in ok]),
            "rss_before_mb": _median([r.get("rss_before_mb") for r in ok]),
            "rss_delta_mb": delta,
            "array_mb": arr_mb,
            "rss_delta_x_array": (delta / arr_mb) if delta is not None and arr_mb else None,
            "max_loop_lag_ms": _median([r.get("max_loop_lag_ms") for r in ok]),
            "max_loop_lag_ms_worst": max(
                (r["max_loop_lag_ms"] for r in ok if r.get("max_loop_lag_ms") is not None),
                default=None,
            ),
            "requests": _median([r.get("requests") for r in rows]),
            "n429": _median([r.get("n429") for r in rows]),
            "n5xx": _median([r.get("n5xx") for r in rows]),
            # Worst round, not median: a single wrong row is a failure.
            "wrong_rows_max": None if any(w is None for w in wrong) else max(wrong, default=None),
        }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table(summary: dict[str, dict[str, Any]]) -> str:
    ref = summary.get(REF, {})
    head = (
        "| client | ok | wall s | CPU s | RSS before MB | peak-before MB | x array | "
        "max lag ms | worst lag ms | requests | 429/5xx | wrong rows | "
        "wall peer/tg | wall tg/peer | CPU peer/tg |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for client, s in summary.items():
        wrong = s["wrong_rows_max"]
        lines.append(
            f"| {client} | {s['ok_rounds']}/{s['rounds']} | {_fmt(s['wall_s'])} "
            f"| {_fmt(s['cpu_s'])} | {_fmt(s['rss_before_mb'], 0)} | {_fmt(s['rss_delta_mb'], 0)} "
            f"| {_fmt(s['rss_delta_x_array'], 1)} | {_fmt(s['max_loop_lag_ms'], 1)} "
            f"| {_fmt(s['max_loop_lag_ms_worst'], 1)} "
            f"| {_fmt(s['requests'], 0)} | {_fmt(s['n429'], 0)}/{_fmt(s['n5xx'], 0)} "
            f"| {'—' if wrong is None else wrong} "
            f"| {_fmt(_ratio(s['wall_s'], ref.get('wall_s')))} "
            f"| {_fmt(_ratio(ref.get('wall_s'), s['wall_s']))} "
            f"| {_fmt(_ratio(s['cpu_s'], ref.get('cpu_s')))} |"
        )
    for client, s in summary.items():
        for err in dict.fromkeys(s["errors"]):
            lines.append(f"\n- {client} error: `{err[:300]}`")
    return "\n".join(lines)


def check_targets(summaries: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float) -> None:
        ok = value is not None and value <= limit
        checks.append({"target": name, "value": value, "limit": limit, "pass": ok})

    def wall_ratio(scn: str, peer: str) -> float | None:
        s = summaries.get(scn, {})
        if REF not in s or peer not in s:
            return None
        return _ratio(s[REF]["wall_s"], s[peer]["wall_s"])

    if "float" in summaries:
        if "aiohttp" in summaries["float"]:
            add("float: togembed wall / aiohttp wall", wall_ratio("float", "aiohttp"), 0.35)
        if "together" in summaries["float"]:
            add("float: togembed wall / together wall", wall_ratio("float", "together"), 0.1)
    if "base64" in summaries and "openai" in summaries["base64"]:
        add("base64: togembed wall / openai wall", wall_ratio("base64", "openai"), 0.35)
    for scn, s in summaries.items():
        if REF not in s:
            continue
        add(f"{scn}: togembed peak-before RSS / array size", s[REF]["rss_delta_x_array"], 3.0)
        add(f"{scn}: togembed max loop lag ms", s[REF]["max_loop_lag_ms"], 20.0)
        add(f"{scn}: togembed wrong rows (worst round)", s[REF]["wrong_rows_max"], 0)
        add(f"{scn}: togembed failed rounds", s[REF]["rounds"] - s[REF]["ok_rounds"], 0)
    return checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--latency", type=float, default=0.02, help="fake server latency, seconds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", default=",".join(ALL_CLIENTS))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--model", default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="per-client-run timeout, seconds")
    p.add_argument(
        "--out",
        default=None,
        help="raw JSON output (default benchmarks/results/latest.json, committed; "
        "--quick: results/quick.json, git-ignored)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: n=2000, rounds=1")
    args = p.parse_args()
    if args.quick:
        args.n, args.rounds = 2000, 1
    if args.out is None:
        args.out = str(HERE / "results" / ("quick.json" if args.quick else "latest.json"))
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for c in clients:
        if c not in ALL_CLIENTS:
            p.error(f"unknown client {c!r}; choose from {ALL_CLIENTS}")
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {tuple(SCENARIOS)}")

    info = machine_info()
    print("## Machine\n")
    print(f"- CPU: {info['cpu']} ({info['cores']} cores), Python {info['python']}")
    print(f"- {info['platform']}")
    print("- " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(
        f"- n={args.n} dim={args.dim} latency={args.latency}s rounds={args.rounds} "
        f"(medians of rounds; wrong rows = worst round)\n",
        flush=True,
    )

    raw: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, dict[str, dict[str, Any]]] = {}
    for scn in scenarios:
        try:
            raw[scn] = run_scenario(scn, args, clients)
        except (RuntimeError, OSError) as exc:
            print(f"## Scenario: {scn}\n\nfake server failed: {exc}\n", flush=True)
            continue
        summaries[scn] = summarize(raw[scn], clients)
        print(f"## Scenario: {scn}\n")
        print(table(summaries[scn]) + "\n", flush=True)

    checks = check_targets(summaries)
    print("## Targets\n")
    if args.n < 20000:
        print(
            f"(targets are stated for n=20000; at n={args.n} fixed per-process memory dominates "
            "the RSS ratio, so treat this as a smoke test)\n"
        )
    for c in checks:
        val = c["value"]
        shown = "—" if val is None else (f"{val:.3f}" if isinstance(val, float) else str(val))
        verdict = "N/A" if val is None else ("PASS" if c["pass"] else "FAIL")
        print(f"- [{verdict}] {c['target']}: {shown} (<= {c['limit']})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in vars(args).items() if k != "out"}
    doc = {
        "params": params,
        "machine": info,
        "raw": raw,
        "summary": summaries,
        "targets": checks,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
