"""The evaluation harness: the DreamBooth protocol on the tiny backend, single process and torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hifi import HifiError
from hifi.cli import main
from hifi.workflows.evaluation import METHODS, _interval, load_dreambooth, summarise

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambooth"
needs_dataset = pytest.mark.skipif(
    not (DATASET / "prompts_and_classes.txt").exists(),
    reason=f"the DreamBooth set is not at {DATASET} (CI has it beside the clone; a user's clone does not)",
)
FAST = ["--subjects", "can,dog", "--prompts", "2", "--images-per-prompt", "1", "--steps", "2",
        "--stepwise-steps", "1", "--ddim-steps", "4", "--t-start", "3", "--t-end", "2", "--phi-steps", "1",
        "--dino-model", "random:tiny", "--clip-model", "random:tiny", "--quiet"]


def _eval(out, method="hifi"):
    return ["eval", "--dataset", str(DATASET), "--out", str(out), "--method", method, *FAST]


@needs_dataset
def test_dataset_parses():
    ds = load_dreambooth(DATASET)
    assert len(ds.classes) == 30 and len(ds.object_prompts) == 25 and len(ds.live_prompts) == 25
    assert sum(ds.is_live(s) for s in ds.classes) == 9
    assert ds.object_prompts[0] == "a <subject> in the jungle"
    assert "wearing a red hat" in ds.live_prompts[10]


def test_not_a_dataset_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(HifiError, match="not a DreamBooth dataset"):
        load_dreambooth(tmp_path)


def test_interval_and_summary():
    mean, lo, hi = _interval([0.1, 0.2, 0.3, 0.4])
    assert mean == pytest.approx(0.25) and lo < mean < hi and _interval([0.1, 0.2, 0.3, 0.4]) == (mean, lo, hi)
    rows = [{"method": "ti", "subject": s, "dino": d, "clip_i": 0.5, "clip_t": ""}
            for s, d in (("a", 0.2), ("a", 0.4), ("b", 0.6))]
    summary = summarise(rows)
    assert summary["per_subject"]["a"]["dino"] == pytest.approx(0.3)
    assert summary["overall"]["dino"]["mean"] == pytest.approx(0.45)
    assert "clip_t" not in summary["overall"]


def test_every_table_row_is_a_method():
    for row in ("real", "no-tuning", "ti", "ti-mask", "hifi-reg", "hifi-stepwise", "hifi", "dreambooth",
                "dreambooth-ref"):
        assert row in METHODS


def _scores(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@needs_dataset
def test_eval_runs_resumes_and_torchrun_merges_the_same_table(tmp_path, capsys):
    single = tmp_path / "single"
    assert main(_eval(single)) == 0
    assert "DINO" in capsys.readouterr().out
    rows = _scores(single / "hifi" / "scores.csv")
    assert len(rows) == 2 * 2 * 1 and {r["subject"] for r in rows} == {"can", "dog"}
    summary = json.loads((single / "hifi" / "summary.json").read_text())
    for metric in ("dino", "clip_i", "clip_t"):
        assert summary["overall"][metric]["subjects"] == 2
    assert (single / "hifi" / "can.grid.png").exists() and (single / "hifi" / "can" / "run" / "run.json").exists()

    images = sorted((single / "hifi").glob("*/images/*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in images}
    assert main(_eval(single)) == 0  # a rerun skips finished work
    assert {p: p.stat().st_mtime_ns for p in images} == stamps
    assert _scores(single / "hifi" / "scores.csv") == rows

    assert main(_eval(single, "real")) == 0
    real = json.loads((single / "real" / "summary.json").read_text())
    assert real["overall"]["dino"]["mean"] > 0 and "clip_t" not in real["overall"]

    sharded = tmp_path / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "hifi", *_eval(sharded)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = _scores(sharded / "hifi" / "scores.csv")
    assert len(merged) == len(rows)
    for a, b in zip(rows, merged, strict=True):
        assert a["subject"] == b["subject"] and a["prompt"] == b["prompt"] and a["seed"] == b["seed"]
        for m in ("dino", "clip_i", "clip_t"):
            assert float(a[m]) == pytest.approx(float(b[m]), abs=1e-5)
    assert json.loads((sharded / "hifi" / "summary.json").read_text())["overall"].keys() == summary["overall"].keys()


def test_rows_that_tune_alike_share_the_run_and_lr_reaches_the_tune(tmp_path, monkeypatch):
    """hifi-stepwise and hifi tune identically: the second copies the first's run instead of tuning."""
    import hifi.workflows.evaluation
    from hifi.workflows.evaluation import EvalSettings, Scorers, evaluate

    tunes = []
    real_tune = hifi.workflows.evaluation.tune_to_run
    monkeypatch.setattr(hifi.workflows.evaluation, "tune_to_run",
                        lambda *a, **k: tunes.append(a[3]) or real_tune(*a, **k))
    from hifi.perception import VaeLatentEmbedder
    from hifi.registry import load_backend
    from hifi.toyworld.subjects import export_dataset

    dataset_dir, masks_dir = export_dataset(tmp_path / "data", ["striped_mug"])
    dataset = load_dreambooth(dataset_dir)
    backend = load_backend("tiny")

    class Clip(VaeLatentEmbedder):
        def embed_text(self, texts):
            import torch

            return torch.ones(len(texts), self.embed(torch.zeros(1, 3, 32, 32)).shape[-1])

    scorers = Scorers(VaeLatentEmbedder(backend), Clip(backend))
    common = dict(subjects=("striped_mug",), prompts=1, images_per_prompt=1, steps=2, stepwise_steps=1,
                  num_steps=3, masks=str(masks_dir), learning_rates=(("hifi", 1e-3),))
    for method in ("hifi-stepwise", "hifi"):
        evaluate(dataset, lambda: load_backend("tiny"), scorers, tmp_path / "out",
                 EvalSettings(method=method, **common))
    first = tmp_path / "out" / "hifi-stepwise" / "striped_mug" / "run"
    second = tmp_path / "out" / "hifi" / "striped_mug" / "run"
    assert tunes == [first]
    assert (first / "subject.safetensors").read_bytes() == (second / "subject.safetensors").read_bytes()
    assert json.loads((second / "run.json").read_text())["config"]["lr"] == 1e-3
    # hifi-reg differs (no step-wise pass): it tunes on its own.
    evaluate(dataset, lambda: load_backend("tiny"), scorers, tmp_path / "out",
             EvalSettings(method="hifi-reg", **common))
    reg = tmp_path / "out" / "hifi-reg" / "striped_mug" / "run" / "run.json"
    assert json.loads(reg.read_text())["config"]["stepwise_steps"] == 0 and len(tunes) == 2
