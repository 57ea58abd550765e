"""``--connect-retries N`` on the commands that talk to a server (``embed``, ``search``,
``models``): a server that cannot be reached at all is tried 1 + N times, then the command
fails with exit 1. Without the flag it is tried as often as any failure (1 + 6 times, ~16-32 s
of backoff outside the tests).

The server is a port that refuses connections. Every attempt goes through the transport,
which counts them: the tests assert on attempts, never on time (the tests' retries do not
wait: conftest's ``_no_backoff``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result

from togembed import cli as cli_module
from togembed.core.config import DEFAULT_MAX_RETRIES
from togembed.core.transport import AiohttpTransport, Response
from togembed.jobs.jobfile import job_path

MODEL = "BAAI/bge-base-en-v1.5"
_CLEAN_ENV = {"TOGETHER_API_KEY": None, "TOGETHER_BASE_URL": None}


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URL of every request the commands' clients try to send (POST or GET)."""
    tried: list[str] = []
    post, get = AiohttpTransport.post, AiohttpTransport.get

    async def counted_post(
        self: AiohttpTransport, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Response:
        tried.append(url)
        return await post(self, url, body, headers, timeout)

    async def counted_get(
        self: AiohttpTransport, url: str, headers: Mapping[str, str], timeout: float
    ) -> Response:
        tried.append(url)
        return await get(self, url, headers, timeout)

    monkeypatch.setattr(AiohttpTransport, "post", counted_post)
    monkeypatch.setattr(AiohttpTransport, "get", counted_get)
    return tried


def togembed(*args: object) -> Result:
    return CliRunner().invoke(
        cli_module.cli, [str(a) for a in args], env=_CLEAN_ENV, catch_exceptions=False
    )


def command(name: str, url: str, tmp_path: Path) -> list[object]:
    """``togembed NAME`` against ``url``, with the files it needs."""
    if name == "embed":
        src = tmp_path / "in.txt"
        src.write_text("hello\n", encoding="utf-8")
        return ["embed", src, "-o", tmp_path / "out.npy", "-m", MODEL, "--base-url", url]
    if name == "search":
        out = tmp_path / "v.jsonl"  # an output with one record; --model: it has no job file
        out.write_bytes(orjson.dumps({"id": "a", "embedding": [1.0, 0.0]}) + b"\n")
        return ["search", out, "hello", "--model", MODEL, "--base-url", url]
    return ["models", "--base-url", url]


COMMANDS = ["embed", "search", "models"]


@pytest.mark.parametrize("name", COMMANDS)
def test_connect_retries_zero_fails_at_the_first_refusal(
    name: str, refused_url: str, attempts: list[str], tmp_path: Path
) -> None:
    result = togembed(*command(name, refused_url, tmp_path), "--connect-retries", 0)
    assert result.exit_code == 1, result.output
    assert len(attempts) == 1  # one attempt, no retry
    assert attempts[0].startswith(refused_url)
    assert "error: " in result.stderr and "Traceback" not in result.stderr
    assert "retrying" not in result.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_connect_retries_n_tries_one_plus_n_times(
    name: str, refused_url: str, attempts: list[str], tmp_path: Path
) -> None:
    result = togembed(*command(name, refused_url, tmp_path), "--connect-retries", 2)
    assert result.exit_code == 1, result.output
    assert len(attempts) == 3


@pytest.mark.parametrize("name", COMMANDS)
def test_without_the_flag_a_refused_connection_is_retried_like_any_failure(
    name: str, refused_url: str, attempts: list[str], tmp_path: Path
) -> None:
    result = togembed(*command(name, refused_url, tmp_path))
    assert result.exit_code == 1, result.output
    assert len(attempts) == 1 + DEFAULT_MAX_RETRIES


@pytest.mark.parametrize("name", ["embed", "search"])
def test_the_warning_names_the_flag(
    name: str,
    refused_url: str,
    attempts: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one warning a client gives when it cannot reach the server says how to fail at once,
    in words for Python (connect_retries=0) and for the command line."""
    caplog.set_level(logging.WARNING, logger="togembed")
    togembed(*command(name, refused_url, tmp_path))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "cannot reach" in warning
    assert "connect_retries=0" in warning and "--connect-retries 0" in warning


def test_embed_with_connect_retries_zero_leaves_no_job(
    refused_url: str, attempts: list[str], tmp_path: Path
) -> None:
    result = togembed(*command("embed", refused_url, tmp_path), "--connect-retries", 0)
    assert result.exit_code == 1
    assert "nothing was embedded" in result.stderr
    assert not job_path(tmp_path / "out.npy").exists()


@pytest.mark.parametrize("bad", ["-1", "many"])
def test_a_bad_connect_retries_is_a_usage_error(
    bad: str, refused_url: str, attempts: list[str], tmp_path: Path
) -> None:
    result = togembed(*command("embed", refused_url, tmp_path), "--connect-retries", bad)
    assert result.exit_code == 2
    assert "--connect-retries" in result.stderr
    assert attempts == []


@pytest.mark.parametrize("name", COMMANDS)
def test_help_documents_the_flag(name: str) -> None:
    result = togembed(name, "--help")
    assert result.exit_code == 0
    assert "--connect-retries" in result.stdout
    assert "0 fails at once" in " ".join(result.stdout.split())
