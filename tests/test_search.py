"""``togembed search OUTPUT QUERY...`` over existing outputs, and ``embed --query`` (the same code):
the model from the output's metadata or its job file, texts from the input, clear errors.

Against a fake server in a thread of this process (``serve_in_thread``): the commands run in
process (click's CliRunner), each with its own event loop. A query equal to a record's text has
exactly that record's vector (``fake_embeddings``), so its first hit is that record.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner, Result
from standin_model import StandInModel

from togembed import cli as cli_module
from togembed.core.config import DEFAULT_LOCAL_MODEL
from togembed.jobs.jobfile import job_path
from togembed.jobs.store import JobStore
from togembed.jobs.writers import npy_ids_path
from togembed.testing import FakeTogetherServer, fake_embedding, fake_embeddings, serve_in_thread

DIM = 32
MADE = "made/model"  # the only model the server knows
_CLEAN_ENV = {"TOGETHER_API_KEY": None, "TOGETHER_BASE_URL": None}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeTogetherServer]:
    with serve_in_thread(dim=DIM, models=[MADE]) as s:
        yield s


def togembed(*args: object) -> Result:
    return CliRunner().invoke(
        cli_module.cli, [str(a) for a in args], env=_CLEAN_ENV, catch_exceptions=False
    )


def corpus(tmp_path: Path, n: int = 60) -> tuple[Path, list[str], list[str]]:
    ids = [f"d{k}" for k in range(n)]
    words = ("lorem", "ipsum", "dolor", "sit", "amet")  # short texts, shown whole
    texts = [f"record {k}: " + " ".join(words[: 1 + k % 5]) for k in range(n)]
    src = tmp_path / "docs.jsonl"
    rows = zip(ids, texts, strict=True)
    src.write_bytes(b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in rows))
    return src, ids, texts


def embed(server: FakeTogetherServer, src: Path, out: Path, *args: object) -> None:
    result = togembed("embed", src, "-o", out, "-m", MADE, "--base-url", server.base_url, *args)
    assert result.exit_code == 0, result.stderr


def hits(stdout: str) -> dict[str, list[tuple[str, str, str]]]:
    """query -> [(score, id, text)] from the command's output."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    query = None
    for line in stdout.splitlines():
        if line.startswith("nearest to "):
            query = line.removeprefix("nearest to ").removesuffix(":")
            found[query] = []
        elif line.startswith("  ") and query is not None and not line.strip().startswith("("):
            score, rid, *text = line.split(maxsplit=2)
            found[query].append((score, rid, text[0] if text else ""))
    return found


def expected_ids(ids: list[str], texts: list[str], query: str, k: int) -> list[str]:
    """The ids of the ``k`` records nearest to ``query``, by the fake server's vectors."""
    matrix, q = fake_embeddings(texts, DIM), fake_embedding(query, DIM)
    scores = matrix @ q / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(q))
    return [ids[i] for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
def test_search_prints_the_nearest_records_with_their_texts(
    tmp_path: Path, server: FakeTogetherServer, suffix: str
) -> None:
    src, ids, texts = corpus(tmp_path)
    out = tmp_path / f"vectors{suffix}"
    embed(server, src, out)
    result = togembed("search", out, texts[7], texts[42], "-k", 3, "--base-url", server.base_url)
    assert result.exit_code == 0, result.stderr
    found = hits(result.stdout)
    assert list(found) == [repr(texts[7]), repr(texts[42])]
    for k in (7, 42):
        got = found[repr(texts[k])]
        assert [rid for _, rid, _ in got] == expected_ids(ids, texts, texts[k], 3)
        assert got[0] == ("1.000", ids[k], texts[k])  # the record itself, with its text
        assert all(text == texts[ids.index(rid)] for _, rid, text in got)


def test_a_parquet_output_knows_its_model_and_input_without_its_job_files(
    tmp_path: Path, server: FakeTogetherServer
) -> None:
    src, _, texts = corpus(tmp_path)
    out = tmp_path / "vectors.parquet"
    embed(server, src, out)
    JobStore.delete(job_path(out))  # what the docs suggest once the output is safe
    result = togembed("search", out, texts[3], "--base-url", server.base_url)
    assert result.exit_code == 0, result.stderr
    assert hits(result.stdout)[repr(texts[3])][0] == ("1.000", "d3", texts[3])
    assert len(hits(result.stdout)[repr(texts[3])]) == 5  # -k defaults to 5


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_without_its_job_file_an_npy_or_jsonl_output_needs_model(
    tmp_path: Path, server: FakeTogetherServer, suffix: str
) -> None:
    src, _, texts = corpus(tmp_path)
    out = tmp_path / f"vectors{suffix}"
    embed(server, src, out)
    JobStore.delete(job_path(out))
    unknown = togembed("search", out, texts[3], "--base-url", server.base_url)
    assert unknown.exit_code == 2
    assert f"the model {out} was made with is not known" in unknown.stderr
    assert "pass --model" in unknown.stderr
    # --model: the hits, by id (the input is not known either) ...
    plain = togembed("search", out, texts[3], "--base-url", server.base_url, "-m", MADE)
    assert plain.exit_code == 0, plain.stderr
    assert hits(plain.stdout)[repr(texts[3])][0] == ("1.000", "d3", "")
    # ... and with --input, their texts (ids from its 'id' field, found as embed finds it).
    full = togembed(
        "search", out, texts[3], "--base-url", server.base_url, "-m", MADE, "--input", src
    )
    assert full.exit_code == 0, full.stderr
    assert hits(full.stdout)[repr(texts[3])][0] == ("1.000", "d3", texts[3])
    # --no-id-field: the input's ids are its line numbers, none of the output's: no texts.
    numbered = togembed(
        "search", out, texts[3], "--base-url", server.base_url, "-m", MADE, "--input", src,
        "--no-id-field",
    )  # fmt: skip
    assert numbered.exit_code == 0, numbered.stderr
    assert hits(numbered.stdout)[repr(texts[3])][0] == ("1.000", "d3", "")


def test_model_overrides_what_the_output_says(tmp_path: Path, server: FakeTogetherServer) -> None:
    src, _, texts = corpus(tmp_path)
    out = tmp_path / "vectors.parquet"
    embed(server, src, out)
    result = togembed("search", out, texts[0], "--base-url", server.base_url, "-m", "other/m")
    assert result.exit_code == 1  # the server does not know it: an API error
    assert "error: HTTP 404" in result.stderr and "other/m" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_of_another_dimension_is_a_clear_error(
    tmp_path: Path, server: FakeTogetherServer
) -> None:
    src, _, texts = corpus(tmp_path)
    out = tmp_path / "vectors.npy"
    embed(server, src, out)
    with serve_in_thread(dim=16) as narrow:
        result = togembed("search", out, texts[0], "--base-url", narrow.base_url)
    assert result.exit_code == 2
    assert f"the queries' vectors have 16 dimensions, those of {out} {DIM}" in result.stderr
    assert "pass --model" in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("vectors.csv", b"id,embedding\n", "is not a togembed output: must end in .parquet"),
        ("vectors.jsonl", b'{"not": "ours"}\n', "cannot read it as a togembed output"),
        ("vectors.parquet", b"garbage", "cannot read it as a togembed output"),
        ("vectors.npy", None, "its ids file"),  # an array without its ids
    ],
)
def test_a_file_that_is_not_an_output_is_exit_2(
    tmp_path: Path, server: FakeTogetherServer, name: str, content: bytes | None, message: str
) -> None:
    out = tmp_path / name
    if content is None:
        np.save(out, np.ones((2, DIM), np.float32))
        assert not npy_ids_path(out).exists()
    else:
        out.write_bytes(content)
    result = togembed("search", out, "q", "--base-url", server.base_url, "-m", MADE)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors(tmp_path: Path, server: FakeTogetherServer) -> None:
    missing = togembed("search", tmp_path / "nope.parquet", "q")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    src, _, _ = corpus(tmp_path)
    out = tmp_path / "v.npy"
    embed(server, src, out)
    no_query = togembed("search", out)
    assert no_query.exit_code == 2 and "Missing argument 'QUERY...'" in no_query.stderr
    remote = togembed("search", out, "q", "--base-url", "https://api.together.xyz/v1")
    assert remote.exit_code == 2 and "no API key" in remote.stderr
    both = togembed("search", out, "q", "--local", "--base-url", server.base_url)
    assert both.exit_code == 2 and "leave out --base-url" in both.stderr
    ids = togembed("search", out, "q", "--id-field", "id", "--no-id-field")
    assert ids.exit_code == 2 and "exclude each other" in ids.stderr
    bare = togembed("search")
    assert "Examples:" in bare.output


def test_an_input_gone_since_shows_the_ids_alone(
    tmp_path: Path, server: FakeTogetherServer
) -> None:
    src, _, texts = corpus(tmp_path)
    out = tmp_path / "vectors.parquet"
    embed(server, src, out)
    src.unlink()
    result = togembed("search", out, texts[5], "--base-url", server.base_url)
    assert result.exit_code == 0, result.stderr
    assert "texts not shown:" in result.stderr
    assert hits(result.stdout)[repr(texts[5])][0] == ("1.000", "d5", "")


def test_an_empty_output_has_no_hits(tmp_path: Path, server: FakeTogetherServer) -> None:
    src = tmp_path / "empty.txt"
    src.write_bytes(b"")
    out = tmp_path / "vectors.parquet"
    embed(server, src, out)
    result = togembed("search", out, "anything", "--base-url", server.base_url)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"nearest to 'anything':\n  (none: {out} has no rows)\n"


def test_embed_query_prints_the_same_as_search(tmp_path: Path, server: FakeTogetherServer) -> None:
    src, ids, texts = corpus(tmp_path)
    out = tmp_path / "vectors.parquet"
    result = togembed(
        "embed", src, "-o", out, "-m", MADE, "--base-url", server.base_url, "--query", texts[9]
    )
    assert result.exit_code == 0, result.stderr
    got = hits(result.stdout)[repr(texts[9])]
    assert [rid for _, rid, _ in got] == expected_ids(ids, texts, texts[9], 5)
    assert got[0] == ("1.000", "d9", texts[9])
    search = togembed("search", out, texts[9], "--base-url", server.base_url)
    assert search.stdout == result.stdout


def test_local_embeds_the_queries_with_the_local_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--local`` starts the local model's server in process, as ``embed --local`` does (a
    deterministic stand-in model here)."""
    loaded: list[str | None] = []

    def load_model(name: str | None = None) -> StandInModel:
        loaded.append(name)
        return StandInModel(name=name or DEFAULT_LOCAL_MODEL, dim=8)

    fake = types.ModuleType("togembed.local.model")
    fake.load_model = load_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "togembed.local.model", fake)
    src, _, texts = corpus(tmp_path, 40)
    out = tmp_path / "vectors.npy"
    made = togembed("embed", src, "-o", out, "--local")
    assert made.exit_code == 0, made.stderr
    result = togembed("search", out, texts[11], texts[30], "--local", "-k", 2)
    assert result.exit_code == 0, result.stderr
    assert loaded == [DEFAULT_LOCAL_MODEL, DEFAULT_LOCAL_MODEL]  # the model of the job file
    found = hits(result.stdout)
    assert found[repr(texts[11])][0] == ("1.000", "d11", texts[11])
    assert found[repr(texts[30])][0] == ("1.000", "d30", texts[30])
