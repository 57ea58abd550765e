"""Regenerate togembed/data/stdlib_modules.jsonl from this Python's standard library."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import sys
import warnings
from pathlib import Path

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
        "ensurepip", "venv", "pydoc_data", "test", "__phello__"}  # fmt: skip


def main() -> None:
    warnings.filterwarnings("ignore")
    rows = []
    for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_")):
        if name in SKIP:
            continue
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                module = importlib.import_module(name)
        except Exception:
            continue
        first = re.split(r"\n\s*\n", (module.__doc__ or "").strip())[0]
        text = " ".join(first.split())[:400]
        if len(text) >= 25:
            rows.append({"id": name, "text": text})
    out = Path(__file__).parent.parent / "togembed" / "data" / "stdlib_modules.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} records -> {out}")


if __name__ == "__main__":
    main()
