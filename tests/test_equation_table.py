"""The README's table of equations and algorithms names real functions that cite them."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _rows() -> list[tuple[str, str]]:
    text = README.read_text()
    table = text.split("<!-- equations -->", 1)[1].split("<!-- /equations -->", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2].startswith("`"):
            rows.append((cells[0], cells[2].strip("`")))
    return rows


def _resolve(dotted: str) -> object:
    module_name, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def test_every_equation_and_algorithm_has_one_row():
    papers = [paper for paper, _ in _rows()]
    expected = [f"Eq. {n}" for n in range(1, 11)] + [f"Algorithm {n}" for n in range(1, 5)]
    assert sorted(papers) == sorted(expected)


def test_each_row_names_a_public_function_whose_docstring_cites_it():
    for paper, dotted in _rows():
        target = _resolve(dotted)
        assert inspect.isfunction(target), f"{dotted} is not a function"
        assert not dotted.rsplit(".", 1)[1].startswith("_"), f"{dotted} is private"
        kind, number = paper.split()
        cite = rf"Eq\. \(?{number}\)?(?!\d)" if kind == "Eq." else rf"Algorithm {number}(?!\d)"
        doc = inspect.getdoc(target) or ""
        first_paragraph = doc.split("\n\n", 1)[0]
        assert re.search(cite, first_paragraph), f"{dotted}'s docstring does not open by citing {paper}: {doc[:120]!r}"
