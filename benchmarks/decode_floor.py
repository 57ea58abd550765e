"""The float-JSON decode floor: the CPU that parsing the answers of run.py's float scenario
costs before any client work, against what togembed's decoder spends on the same bodies.

The bodies are exactly what the fake server sends for run.py's texts (N answers of 128 rows,
dim 768, JSON floats). "orjson floor": ``orjson.loads`` each body and copy its rows into one
float32 array, the least a client parsing with orjson must do. "togembed decode":
``decode_embeddings`` + ``write_into`` on the same bodies (simdjson where installed). Best of
``--repeat`` runs of process CPU time. With ``benchmarks/results/latest.json`` present, it also
prints togembed's whole float run's CPU (median of its rounds) against the orjson floor, the
figure issue 12 states its target on (<= 1.3x).

    python benchmarks/decode_floor.py
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
from clients import make_texts

from togembed.core.answers import decode_embeddings
from togembed.server.fake.vectors import fake_embeddings
from togembed.server.protocol import render_response

HERE = Path(__file__).resolve().parent
BATCH = 128


def bodies_for(n: int, dim: int) -> list[bytes]:
    texts = make_texts(n)
    vectors = fake_embeddings(texts, dim)
    return [
        render_response("BAAI/bge-base-en-v1.5", vectors[i : i + BATCH], None, "float")
        for i in range(0, n, BATCH)
    ]


def orjson_floor(bodies: list[bytes], out: np.ndarray) -> None:
    start = 0
    for body in bodies:
        rows = [item["embedding"] for item in orjson.loads(body)["data"]]
        out[start : start + len(rows)] = rows
        start += len(rows)


def togembed_decode(bodies: list[bytes], out: np.ndarray) -> None:
    start = 0
    dim = out.shape[1]
    for body in bodies:
        expected = min(BATCH, len(out) - start)
        decoded = decode_embeddings(body, expected, dim=dim)
        decoded.write_into(out[start : start + expected])
        start += expected


def best_cpu(
    fn: Callable[[list[bytes], np.ndarray], None], bodies: list[bytes], out: np.ndarray, repeat: int
) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn(bodies, out)
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    bodies = bodies_for(args.n, args.dim)
    expected = fake_embeddings(make_texts(args.n), args.dim)
    out = np.empty((args.n, args.dim), dtype=np.float32)
    floor = best_cpu(orjson_floor, bodies, out, args.repeat)
    np.testing.assert_array_equal(out, expected)
    out[:] = 0
    ours = best_cpu(togembed_decode, bodies, out, args.repeat)
    np.testing.assert_array_equal(out, expected)
    mb = sum(map(len, bodies)) / 1e6
    print(
        f"N={args.n} dim={args.dim}: {len(bodies)} float-JSON answers, {mb:.0f} MB; "
        f"best of {args.repeat}, process CPU\n"
    )
    print("| step | CPU s | / orjson floor |")
    print("|---|---|---|")
    print(f"| orjson floor (loads + copy into float32) | {floor:.2f} | 1.00 |")
    print(f"| togembed decode_embeddings + write_into | {ours:.2f} | {ours / floor:.2f} |")
    latest = HERE / "results" / "latest.json"
    if latest.exists():
        run = json.loads(latest.read_text())
        cpu = run["summary"].get("float", {}).get("togembed", {}).get("cpu_s")
        if cpu is not None and run["params"]["n"] == args.n and run["params"]["dim"] == args.dim:
            print(
                f"| togembed's whole float run (run.py, latest.json) | {cpu:.2f} | "
                f"{cpu / floor:.2f} (target <= 1.3) |"
            )


if __name__ == "__main__":
    main()
