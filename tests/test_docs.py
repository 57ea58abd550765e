"""Every fenced code block of README.md and docs/*.md runs, so a doc example cannot rot.

How a block runs depends on its fence's language:

- ``python``: the blocks of a page run in page order in one namespace, so later blocks build on
  earlier ones. Top-level ``await`` is allowed: such a block runs in the page's event loop.
  A block that defines ``test_`` functions is a user's test module: it is written to a file and
  run by pytest in a subprocess, outside this repository (no conftest, pytest-asyncio in its
  default strict mode), as a reader would run it.
- ``bash``/``sh``: ``bash -euo pipefail`` in a fresh scratch directory holding the files the docs
  name (``docs.jsonl``, ``more.jsonl``, ``corpus.txt``, and ``togembed/`` as in a clone).
  ``curl`` fails on an HTTP error status; ``pip install`` of togembed or its extras is checked
  against the installed packages, not run (no network). A block whose last command is started
  in the background (``&``) leaves it running for the next blocks of the page: the test waits
  until the ports it names accept connections, as a reader waits for the ready line.

Everything talks to 127.0.0.1: ``TOGETHER_BASE_URL`` and ``TOGETHER_API_KEY`` point at a
``FakeTogetherServer``; ``togembed serve`` runs the real local model; the docs' ports 8000 and
8001 become free ports (below the ephemeral range, so no client connection can hold them).

A block that cannot run offline (a real Together key, installing packages, an output sample, a
diagram) carries ``<!-- not run: REASON -->`` on the line before its fence. Each one is
reported as a skipped test with its reason (``pytest -rs tests/test_docs.py``); any other block
that fails, or a block in another language without the marker, fails its page's test.

``CONTEXT`` below is what a page leaves to the reader (a ``texts`` list, "your" ``client``):
code run just before the block that contains the given text, in the block's language.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import json
import os
import random
import re
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web
from apps import app_in_thread, json_response

import togembed
from togembed.testing import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]

PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
MARKER = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->$")
ANY_COMMENT = re.compile(r"^<!--.*-->$")

# The fake server's dimension per page (default 768, bge-base-en-v1.5's, which streaming.md's
# memmap assumes); the README's quickstart embeds 100,000 texts: small rows keep it quick.
PAGE_DIM = {"README.md": 16}
DOC_PORTS = (8000, 8001)

# (page, text found in exactly one block of the page) -> code run just before that block.
# $openai_url is an OpenAI-like server that honours `dimensions`, `user` and extra fields.
CONTEXT: dict[tuple[str, str], str] = {
    ("docs/backends.md", 'base_url="http://127.0.0.1:8080/v1"'): "import togembed",
    ("docs/rate-limits.md", "# 1. Nothing configured"): "import togembed",
    ("docs/rate-limits.md", "class Limiter(Protocol)"): "from typing import Protocol",
    ("docs/retries-and-errors.md", "togembed.AsyncClient(retry="): "import togembed",
    ("docs/retries-and-errors.md", "await client.embed([query]"): (
        'client = togembed.AsyncClient(model="BAAI/bge-base-en-v1.5")\n'
        'query = "how do I reset my password?"'
    ),
    ("docs/retries-and-errors.md", "except togembed.InvalidInputError"): (
        'client = togembed.AsyncClient(model="BAAI/bge-base-en-v1.5")\n'
        'texts = [f"text {i}" for i in range(300)]'
    ),
    ("docs/streaming.md", "done = 0"): (
        'client = togembed.AsyncClient(model="BAAI/bge-base-en-v1.5")\n'
        'path = "corpus.txt"\n'
        "def store(start, vectors): pass"
    ),
    ("docs/usage.md", 'client = togembed.AsyncClient(model="BAAI/bge-base-en-v1.5")   #'): (
        'texts = [f"text {i}" for i in range(300)]'
    ),
    ("docs/usage.md", "extra_headers="): (
        "client = togembed.AsyncClient(\n"
        '    base_url="$openai_url", api_key="sk-test", model="text-embedding-3-small"\n'
        ")\n"
        'trace = "trace-1234"'
    ),
    ("docs/corpus-jobs.md", 'togembed search vectors.parquet "compress a file"'): (
        # "Here over the output of the README's offline command ..., its job files deleted"
        "togembed embed togembed/data/stdlib_modules.jsonl --id-field id -o vectors.parquet"
        " --local -q\nrm vectors.parquet.togembed-job.*"
    ),
}

SHELL_PRELUDE = """\
set -euo pipefail
pip() { "$DOCTEST_PYTHON" "$DOCTEST_PIP" "$@"; }
curl() { command curl --fail-with-body "$@"; }
"""

# `pip install` in a shell block: check that togembed and the extras named are installed.
PIP_CHECK = """\
import re, sys
from importlib import metadata
from packaging.requirements import Requirement


def missing(extras, seen):
    out = []
    for raw in metadata.requires("togembed") or []:
        req = Requirement(raw)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        if req.name == "togembed":
            if not req.extras <= seen:
                out += missing(req.extras - seen, seen | req.extras)
            continue
        try:
            if not req.specifier.contains(metadata.version(req.name), prereleases=True):
                out.append(raw)
        except metadata.PackageNotFoundError:
            out.append(raw)
    return out


args = sys.argv[1:]
specs = [a for a in args[1:] if not a.startswith("-")]
if args[:1] != ["install"] or not specs:
    sys.exit(f"doc test: only `pip install` of togembed is checked, not {args}")
for spec in specs:
    m = re.fullmatch(r"(?:\\.|togembed)(?:\\[([\\w,-]*)\\])?", spec)
    if m is None:
        sys.exit(f"doc test: cannot install {spec!r} offline; mark the block <!-- not run: ... -->")
    extras = set(filter(None, (m.group(1) or "").split(",")))
    gone = missing(extras, extras)
    if gone:
        sys.exit(f"doc test: {spec} is not installed here: {gone}")
    print(f"(doc test: {spec} is installed; not reinstalled)")
"""


@attrs.frozen
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the marker's reason

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: str) -> list[Block]:
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        end = i + 1
        while end < len(lines) and not lines[end].lstrip().startswith(fence):
            end += 1
        assert end < len(lines), f"{page}:{i + 1}: a code fence that is never closed"
        before = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
        reason = None
        if ANY_COMMENT.match(before) and "not run" in before:
            marker = MARKER.match(before)
            assert marker and marker.group(1), (
                f"{page}:{i + 1}: write the marker as <!-- not run: REASON -->, not {before}"
            )
            reason = marker.group(1)
        blocks.append(Block(page, i + 1, lang, "\n".join(lines[i + 1 : end]) + "\n", reason))
        i = end + 1
    return blocks


BLOCKS = {page: read_blocks(page) for page in PAGES}
MARKED = [b for page in PAGES for b in BLOCKS[page] if b.not_run is not None]


def context_for(block: Block) -> str | None:
    for (page, text), code in CONTEXT.items():
        if page == block.page and text in block.code:
            return code
    return None


def test_every_context_names_exactly_one_block() -> None:
    for page, text in CONTEXT:
        found = [b.where for b in BLOCKS[page] if text in b.code]
        assert len(found) == 1, f"CONTEXT key {text!r} matches {found or 'no block'} in {page}"


def test_blocks_are_found() -> None:
    # A fence the reader sees but the parser missed would be a block that never runs.
    for page in PAGES:
        fences = sum(
            1 for s in (ROOT / page).read_text(encoding="utf-8").splitlines() if FENCE.match(s)
        )
        assert fences == 2 * len(BLOCKS[page]), page
    assert sum(len(b) for b in BLOCKS.values()) >= 40


@pytest.mark.parametrize("block", MARKED, ids=[b.where for b in MARKED])
def test_marked_block_is_not_run(block: Block) -> None:
    """One skipped test per marked block: the count and the reasons show in pytest's report."""
    pytest.skip(f"{block.where} not run: {block.not_run}")


# --- the page runner -------------------------------------------------------------------------


def free_port() -> int:
    """A port free now, below the ephemeral range: only an explicit bind could take it."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def wait_for_port(port: int, out: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"nothing listens on port {port} after {timeout:g} s; output:\n{out.read_text()}"
            )
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    """Whether a process of this group still runs (zombies are done)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def stop_group(pgid: int) -> None:
    """SIGTERM what a shell block left running (servers stop gracefully), then SIGKILL."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def write_fixtures(directory: Path) -> None:
    """The files the docs' commands name, in a directory laid out like a clone."""
    directory.mkdir(parents=True)
    topics = ["refunds", "shipping", "passwords", "invoices", "returns"]
    docs = [
        {"id": f"d{i}", "doc_id": f"doc-{i}", "text": f"how to handle {topics[i % 5]}, note {i}"}
        for i in range(20)
    ]
    more = [{"id": f"d{i}", "doc_id": f"doc-{i}", "text": f"new note {i}"} for i in range(20, 25)]
    for name, records in (("docs.jsonl", docs), ("more.jsonl", more)):
        text = "".join(json.dumps(r) + "\n" for r in records)
        (directory / name).write_text(text, encoding="utf-8")
    corpus = "".join(f"line {i} of the corpus\n" for i in range(300))
    (directory / "corpus.txt").write_text(corpus, encoding="utf-8")
    (directory / "togembed").symlink_to(ROOT / "togembed", target_is_directory=True)


async def _openai_embeddings(request: web.Request) -> web.Response:
    """OpenAI's text-embedding-3 shape: honours `dimensions`, takes `user` and extra fields."""
    body = await request.json()
    texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
    dim = body.get("dimensions") or 1536
    data = [
        {"object": "embedding", "index": i, "embedding": [1.0 / (i + 1)] * dim}
        for i in range(len(texts))
    ]
    usage = {"prompt_tokens": len(texts), "total_tokens": len(texts)}
    return json_response(
        200, {"object": "list", "model": body["model"], "data": data, "usage": usage}
    )


async def _openai_models(request: web.Request) -> web.Response:
    ids = ["text-embedding-3-small", "gpt-4o"]
    data = [{"id": i, "object": "model", "created": 0, "owned_by": "openai"} for i in ids]
    return json_response(200, {"object": "list", "data": data})


class PageRun:
    """Runs one page's blocks in order and cleans up what they leave behind."""

    def __init__(self, page: str, tmp: Path, env: dict[str, str], values: dict[str, str]) -> None:
        self.page = page
        self.tmp = tmp
        self.env = env
        self.values = values  # for string.Template substitution in CONTEXT
        self.ports = {doc: free_port() for doc in DOC_PORTS}
        self.namespace: dict[str, Any] = {"__name__": "__doc__"}
        self.loop = asyncio.new_event_loop()
        self.groups: list[int] = []
        self.pytest_blocks: list[Block] = []
        self.clients: list[togembed.AsyncClient] = []

    def localise(self, code: str) -> str:
        for doc, port in self.ports.items():
            code = re.sub(rf"(127\.0\.0\.1:|localhost:|--port ){doc}\b", rf"\g<1>{port}", code)
        return code

    def run(self, block: Block) -> None:
        context = context_for(block)
        if context is not None:
            context = string.Template(context).substitute(self.values)
        if block.lang in PYTHON:
            if context is not None:
                self.run_python(context, f"<context of {block.where}>", 0)
            if is_test_module(block.code):
                self.pytest_blocks.append(block)
            else:
                self.run_python(self.localise(block.code), str(ROOT / block.page), block.line)
        elif block.lang in SHELL:
            self.run_shell(block, context)
        else:
            raise AssertionError(
                f"{block.where}: a ```{block.lang or '(no language)'} block is neither run nor "
                "marked: give it a language the test runs (python, bash) or mark it "
                "<!-- not run: REASON --> on the line before the fence"
            )

    def run_python(self, source: str, filename: str, line: int) -> None:
        # Padded so that a traceback names the markdown file and the line of the failing code.
        code = compile("\n" * line + source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        if code.co_flags & inspect.CO_COROUTINE:
            self.loop.run_until_complete(eval(code, self.namespace))
        else:
            exec(code, self.namespace)

    def run_shell(self, block: Block, context: str | None) -> None:
        workdir = self.tmp / f"block-{block.line}"
        write_fixtures(workdir)
        out = workdir.parent / f"block-{block.line}.out"
        script = SHELL_PRELUDE + (context or "") + "\n" + self.localise(block.code)
        with open(out, "wb") as sink:
            proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # what it leaves running is stopped by its group id
            )
            self.groups.append(proc.pid)
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"{block.where}: still running after 120 s") from None
        output = out.read_text(errors="replace")
        assert code == 0, f"{block.where}: exit code {code}; output:\n{output}"
        commands = [s.strip() for s in block.code.splitlines() if s.strip()]
        commands = [s for s in commands if not s.startswith("#")]
        if commands and commands[-1].endswith("&"):
            for doc, port in self.ports.items():
                if re.search(rf"(:|--port ){doc}\b", block.code):
                    wait_for_port(port, out)

    def run_test_modules(self) -> None:
        if not self.pytest_blocks:
            return
        directory = self.tmp / "user-tests"
        directory.mkdir()
        # A user's project: pytest-asyncio in its default strict mode (its loop-scope nag silenced).
        ini = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
        (directory / "pytest.ini").write_text(ini, encoding="utf-8")
        expected = 0
        for block in self.pytest_blocks:
            name = f"test_{Path(block.page).stem}_line_{block.line}.py".replace("-", "_")
            (directory / name).write_text(block.code, encoding="utf-8")
            expected += len(re.findall(r"^(?:async )?def test_", block.code, re.M))
        env = {k: v for k, v in self.env.items() if not k.startswith("PYTEST_")}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "."],
            cwd=directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        where = ", ".join(b.where for b in self.pytest_blocks)
        assert result.returncode == 0, f"{where} as a user's test files:\n{result.stdout}"
        assert f"{expected} passed" in result.stdout, result.stdout
        assert not re.search(r"\d+ (skipped|xfailed|xpassed|warnings?)\b", result.stdout), (
            result.stdout
        )

    def close(self) -> None:
        for pgid in self.groups:
            stop_group(pgid)
        for client in self.clients:
            self.loop.run_until_complete(client.close())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def is_test_module(code: str) -> bool:
    tree = ast.parse(code)
    return any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
        for node in tree.body
    )


@contextlib.contextmanager
def track_clients(monkeypatch: pytest.MonkeyPatch, clients: list[Any]) -> Iterator[None]:
    """Record every AsyncClient the examples create, to close those a fragment leaves open."""
    init = togembed.AsyncClient.__init__

    def recording_init(self: togembed.AsyncClient, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        clients.append(self)

    monkeypatch.setattr(togembed.AsyncClient, "__init__", recording_init)
    yield


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runnable = [b for b in BLOCKS[page] if b.not_run is None]
    if not runnable:
        pytest.skip(f"{page}: no block to run (none, or all marked not run)")
    pip_check = tmp_path / "pip_check.py"
    pip_check.write_text(PIP_CHECK, encoding="utf-8")
    pydir = tmp_path / "python"
    pydir.mkdir()
    monkeypatch.chdir(pydir)
    write_fixtures(pydir / "data")
    for name in ("docs.jsonl", "more.jsonl", "corpus.txt"):
        (pydir / name).symlink_to(pydir / "data" / name)
    with (
        serve_in_thread(dim=PAGE_DIM.get(page, 768)) as fake,
        app_in_thread(
            {("POST", "/v1/embeddings"): _openai_embeddings, ("GET", "/v1/models"): _openai_models}
        ) as openai_like,
    ):
        monkeypatch.setenv("TOGETHER_BASE_URL", fake.base_url)
        monkeypatch.setenv("TOGETHER_API_KEY", "doc-test-key")
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["DOCTEST_PYTHON"] = sys.executable
        env["DOCTEST_PIP"] = str(pip_check)
        run = PageRun(page, tmp_path, env, {"openai_url": openai_like.base_url})
        try:
            with track_clients(monkeypatch, run.clients):
                for block in runnable:
                    try:
                        run.run(block)
                    except AssertionError:
                        raise
                    except Exception as exc:
                        raise AssertionError(f"{block.where}: the example fails: {exc!r}") from exc
                run.run_test_modules()
        finally:
            run.close()
