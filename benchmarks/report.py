"""Where the benchmarks keep their results, and how one is written: NAME.json beside NAME.md, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hifi.io.images import atomic_path, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def save_result(name: str, result: Any, markdown: str) -> Path:
    """Write ``results/NAME.json`` (``result``) and ``results/NAME.md`` (``markdown``); the JSON's path."""
    write_json(RESULTS / f"{name}.json", result)
    with atomic_path(RESULTS / f"{name}.md") as tmp:
        tmp.write_text(markdown)
    return RESULTS / f"{name}.json"


def report(result: Any, markdown: str, name: str | None) -> int:
    """A script's ending: print its table, keep it as ``results/NAME`` when named; exit status 0."""
    print(markdown)
    if name:
        save_result(name, result, markdown)
    return 0
