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
        "real images (real vs real, no self-pairs)", "VAE round trip of the photos (the latent's ceiling)",
        "no tuning (class word only)", "no tuning, told the exact description", "HiFi, plain (Eq. 7)",
        "HiFi + reference guidance (Algorithm 2)",
    }
    # Seven labelled rows of 64-pixel images enlarged 3x (pixel for pixel) beside a 200-pixel label column.
    from PIL import Image

    with Image.open(out / "grid.png") as grid:
        assert grid.size == (200 + 5 * (192 + 4) + 4, 7 * (192 + 4) + 4)
    assert all(-1.0 <= v <= 1.0 for v in metrics["rows"].values())
    assert main(argv) == 0  # a rerun reuses the finished tune
