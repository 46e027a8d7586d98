"""The README's main job, `hifi demo`, end to end at tiny step counts."""

from __future__ import annotations

import json

from hifi.cli import main


def test_demo_writes_grid_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "5", "--stepwise-steps", "1", "--ddim-steps", "6",
            "--t-start", "4", "--t-end", "2", "--phi-steps", "1", "--quiet"]
    assert main(argv) == 0
    assert "| HiFi + reference guidance (Algorithm 2) |" in capsys.readouterr().out
    assert (out / "grid.png").exists() and (out / "run" / "run.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["rows"]) == {
        "real images (real vs real, no self-pairs)", "no tuning (class word only)", "HiFi, plain (Eq. 7)",
        "HiFi + reference guidance (Algorithm 2)",
    }
    assert all(-1.0 <= v <= 1.0 for v in metrics["rows"].values())
    assert main(argv) == 0  # a rerun reuses the finished tune
