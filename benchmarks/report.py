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
