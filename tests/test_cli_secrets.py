"""The API key a server echoes back never reaches what ``togembed embed`` writes or prints.

Servers sometimes quote the request's Authorization header in an error. The client redacts the
key from every server text it keeps (docs/retries-and-errors.md); these tests read the bytes of
every file the command leaves (the output, ``OUTPUT.failures.jsonl``, the job files) and its
stdout and stderr, as a real process, against an in-process aiohttp app on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
from aiohttp import web
from apps import App, Handler, app_in_thread, embeddings, error

from togembed.jobs.failures import failures_path
from togembed.jobs.jobfile import job_path

KEY = "sk-test-ECHOED-0123456789abcdef"
REDACTED = b"[REDACTED]"
MODEL = "BAAI/bge-base-en-v1.5"


def echoing(app: list[App], *, refuse_all: bool = False) -> Handler:
    """Embeddings that quote the Authorization header back: a 503 the first time (retried),
    a 400 for a batch with a "bad" input (bisected to that input), else vectors; with
    ``refuse_all``, a 401 for everything (the job stops)."""

    async def handler(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        texts = app[0].seen[-1].body["input"]
        if refuse_all:
            return error(401, f"Invalid Authorization header: {auth}", type="invalid_api_key")
        if len(app[0].seen) == 1:
            return error(503, f"overloaded, try again (request had {auth})", type="server_error")
        if any("bad" in t for t in texts):
            return error(
                400, f"input rejected; you sent {auth}", type="invalid_request_error", param="input"
            )
        return embeddings(texts, 8)

    return handler


def run_embed(*args: object) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "TOGETHER_BASE_URL"}
    env["TOGETHER_API_KEY"] = KEY
    cmd = [sys.executable, "-m", "togembed", "embed", *(str(a) for a in args)]
    return subprocess.run(cmd, capture_output=True, env=env, timeout=120)


def left_files(out: Path) -> dict[str, bytes]:
    """Every file the job left beside (and as) its output, by name."""
    return {p.name: p.read_bytes() for p in out.parent.iterdir() if p.name.startswith(out.name)}


def test_an_echoed_key_is_redacted_from_files_stdout_and_stderr(tmp_path: Path) -> None:
    texts = [f"bad text {i}" if i in (5, 17) else f"text {i}" for i in range(30)]
    src = tmp_path / "in.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = (src, "-o", out, "-m", MODEL, "--batch-size", 8, "--concurrency", 1)

    holder: list[App] = []
    with app_in_thread({("POST", "/v1/embeddings"): echoing(holder)}) as app:
        holder.append(app)
        first = run_embed(*args, "--base-url", app.base_url)
        # the server did see the key, and quoted it back
        assert all(s.headers["Authorization"] == f"Bearer {KEY}" for s in app.seen)
        assert app.requests > 5  # the 503, the batches, the bisection of the two bad ones
    assert first.returncode == 3, first.stderr.decode()

    failures = [orjson.loads(line) for line in failures_path(out).read_bytes().splitlines()]
    assert [f["position"] for f in failures] == [5, 17]
    assert all(f"you sent Bearer {REDACTED.decode()}" in f["error"] for f in failures)
    files = left_files(out)
    assert {out.name, failures_path(out).name, job_path(out).name} <= set(files)
    assert any(name.endswith(".vectors") for name in files)
    assert REDACTED in files[job_path(out).name]  # the failures' reasons are kept there too

    # A rerun whose every request is refused with the key quoted: exit 1, progress kept.
    holder.clear()
    with app_in_thread({("POST", "/v1/embeddings"): echoing(holder, refuse_all=True)}) as app:
        holder.append(app)
        second = run_embed(*args, "--base-url", app.base_url, "--retry-failed")
    assert second.returncode == 1, second.stderr.decode()
    assert b"error: HTTP 401: Invalid Authorization header: Bearer [REDACTED]" in second.stderr

    secret = KEY.encode()
    for run in (first, second):
        assert secret not in run.stdout
        assert secret not in run.stderr
    for name, data in left_files(out).items():
        assert secret not in data, f"the key is in {name}"
