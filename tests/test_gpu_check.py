"""benchmarks/gpu_check.py in its CPU mode (CI), and the checks it makes on each output."""

from __future__ import annotations

import json

import pytest
import torch
from benchmarks import gpu_check


def test_cpu_mode_runs_every_stage_and_prints_valid_json(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    status = gpu_check.main(["--device", "cpu", "--backend", "tiny", "--tune-steps", "2", "--ddim-steps", "3",
                             "--phi-steps", "1"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["ok"], json.dumps(report, indent=1)
    (run,) = report["runs"]
    assert (run["precision"], run["attention"]) == ("fp32", "sdpa")
    assert set(run["stages"]) == {"tune_global", "tune_stepwise", "generate", "reference_guided", "replace"}
    for stage in run["stages"].values():
        assert stage["seconds"] >= 0 and stage["peak_mb"] > 0
    assert run["checks"] and set(run["checks"].values()) == {"ok"}
    assert {"perception_dino", "perception_clip", "perception_grounded-sam", "perception_blip2",
            "perception_blip"} <= set(report["perception"]["checks"])


def test_checks_catch_bad_outputs():
    rec = gpu_check.Recorder(torch.device("cpu"))
    rec.check("good", torch.zeros(2, 3), (2, 3))
    rec.check("nan", torch.tensor([1.0, float("nan")]))
    rec.check("inf", torch.tensor([float("inf")], dtype=torch.float16))
    rec.check("shape", torch.zeros(2, 3), (3, 2))
    rec.check("missing", None)
    assert rec.checks == {"good": "ok", "nan": "not finite", "inf": "not finite",
                          "shape": "shape (2, 3), expected (3, 2)", "missing": "missing"}


def test_a_kernel_that_does_not_load_is_skipped_not_fatal(capsys, monkeypatch):
    def no_kernels(args, precision, attention):
        raise RuntimeError("no xformers here")

    monkeypatch.setattr(gpu_check, "build_backend", no_kernels)
    assert gpu_check.main(["--device", "cpu", "--backend", "tiny", "--no-perception"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == [{"precision": "fp32", "attention": "sdpa", "reason": "RuntimeError: no xformers here"}]
    assert not report["ok"]


@pytest.mark.parametrize("argv", [["--device", "cuda"]])
def test_cuda_mode_without_a_gpu_says_so(argv, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the CUDA mode would run")
    assert gpu_check.main(argv) == 1
    assert "no CUDA device" in json.loads(capsys.readouterr().out)["error"]
