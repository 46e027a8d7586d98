"""The tables command of benchmarks/toyworld.py, on one subject at tiny step counts (issue: the paper's tables)."""

from __future__ import annotations

import json
import math

from benchmarks import toyworld


def test_tables_command_writes_every_row_with_finite_values(tmp_path, capsys):
    out = tmp_path / "tables"
    argv = ["tables", "--out", str(out), "--subjects", "striped_mug", "--seeds", "0", "--prompts", "1",
            "--images-per-prompt", "1", "--steps", "2", "--stepwise-steps", "1", "--ddim-steps", "4", "--t-start",
            "3", "--t-end", "1", "--phi-steps", "1", "--quiet"]
    assert toyworld.main(argv) == 0
    assert "## Table 1" in capsys.readouterr().out
    summary = json.loads((out / "tables.json").read_text())
    assert set(summary["rows"]) == set(toyworld.ROWS) | {"other-subjects"} | set(toyworld.REFERENCE)
    for name in (*toyworld.ROWS, *toyworld.REFERENCE):
        metrics = ("dino", "clip_i") if name in ("real", "vae") else ("dino", "clip_i", "clip_t")
        for m in metrics:
            entry = summary["rows"][name][m]
            assert math.isfinite(entry["mean"]) and entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
    # Every row's images, and the reference rows', read by the detail classifier: shares of images.
    for name in (*toyworld.ROWS, *toyworld.REFERENCE):
        for m in toyworld.DETAILS:
            entry = summary["rows"][name][m]
            assert 0.0 <= entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1] <= 1.0, (name, m, entry)
    # The real row is the subject's photos, whose pattern the classifier reads (all 50 photos right).
    assert summary["rows"]["real"]["pattern"]["mean"] == 1.0, summary["rows"]["real"]
    table = (out / "tables.md").read_text()
    assert table.count("| ToyCLIP-T | the subject's pattern | the subject's mark |") == 2, table
    assert all(f"(`{name}`)" in table for name in (*toyworld.ROWS, *toyworld.REFERENCE))
    # The reference rows stand beside "real" and "no tuning" in Table 1, and open Table 2.
    table1, table2 = table.split("## Table 2")
    assert table1.index("(`no-tuning`)") < table1.index("(`exact`)") < table1.index("(`vae`)") < table1.index("(`ti`)")
    assert table2.index("(`exact`)") < table2.index("(`ti`)")
    assert (tmp_path / "tables" / "work" / "reference.json").exists()
    assert (out / "tables.png").exists() and (out / "grids" / "striped_mug.hifi.png").exists()
