"""The ToyWorld training script's GPU recipe pieces: budgets, widths, fast tokens, the orchestrator."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import time
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

from hifi.toyworld.world import sample_object
from hifi_backends.toy.models import build_tokenizer, unet_config, vae_config
from hifi_backends.toy.train import main
from hifi_backends.toy.training.data import train_caption
from hifi_backends.toy.training.denoiser import WordTokens
from hifi_backends.toy.training.loop import Plan, _loop
from hifi_backends.toy.training.settings import TrainSettings, settings_over


def test_word_tokens_give_the_tokenizers_ids():
    tokenizer = build_tokenizer()
    rng = np.random.default_rng(0)
    texts = [train_caption(sample_object(rng), rng, TrainSettings()) for _ in range(400)]
    texts += ["", "a photo of a red mug on the beach", " ".join(["red"] * 50)]  # empty, plain, truncated
    words = WordTokens(tokenizer)
    assert torch.equal(words(texts), words.reference(texts))
    assert words.matches(texts)
    assert words(texts[-1:]).shape == (1, tokenizer.model_max_length)
    # The guard the training stage relies on: a word path that disagrees is caught.
    words.cache["mug"] = [words.cache["mug"][0] + 1]
    assert not words.matches(["a mug on the beach"])


def test_a_budget_replans_the_step_count_inside_the_warm_up(tmp_path):
    model = torch.nn.Linear(2, 1)
    calls: list[int] = []

    def step(i: int) -> torch.Tensor:
        calls.append(i)
        time.sleep(0.01)
        return torch.tensor(0.5)

    plan = Plan(100_000, seconds=1.0, probe=(2, 10), every=10)
    stats = _loop("fit", tmp_path, plan, step, {"model": model}, every=25)
    # about 1 s at 10 ms a step: far fewer than asked, a multiple of `every`, all of them run
    assert 20 <= stats["steps"] <= 200 and stats["steps"] % 10 == 0, stats
    assert calls == list(range(stats["steps"])) and stats["final_loss"] == pytest.approx(0.5)
    # Without a budget the count is kept.
    assert _loop("plain", tmp_path, 7, lambda i: 1.0, {"model": model})["steps"] == 7


def test_a_resumed_run_keeps_the_count_it_planned(tmp_path):
    model = torch.nn.Linear(2, 1)

    def failing(i: int) -> float:
        if i == 55:  # the planned count is a multiple of 50, at least 60, whatever the machine's pace
            raise KeyboardInterrupt
        time.sleep(0.005)
        return 1.0

    with pytest.raises(KeyboardInterrupt):
        _loop("fit", tmp_path, Plan(100_000, seconds=0.5, probe=(2, 10), every=50), failing, {"model": model},
              every=25)
    payload = torch.load(tmp_path / "fit.ckpt", weights_only=True)
    assert payload["step"] == 50 and payload["total"] < 100_000
    stats = _loop("fit", tmp_path, Plan(100_000, seconds=0.5, probe=(2, 10), every=50), lambda i: 1.0,
                  {"model": model}, every=25)
    assert stats["steps"] == payload["total"] and stats["resumed_at"] == 50


def test_settings_round_trip_through_json_and_widths_are_checked():
    gpu = TrainSettings.gpu()
    again = TrainSettings(**json.loads(json.dumps(attrs.asdict(gpu))))
    assert again == gpu and again.vae_width == (32, 64, 96, 96) and again.unet_width == (128, 128)
    assert unet_config(width=(128, 128))["down_block_types"] == ("CrossAttnDownBlock2D",) * 2
    assert vae_config((16, 32, 64), 16)["down_block_types"] == ("DownEncoderBlock2D",) * 3
    assert unet_config(latent_side=16, latent_channels=16)["in_channels"] == 16
    with pytest.raises(ValueError, match="vae width"):
        vae_config((16, 32))
    with pytest.raises(ValueError, match="halved"):
        unet_config(width=(64, 64, 64), latent_side=6)
    # Refused when the settings are made, not when the VAE stage starts after the pool's renders.
    with pytest.raises(ValueError, match="vae width"):
        TrainSettings(vae_width=(16, 32))
    with pytest.raises(ValueError, match="latent_channels"):
        TrainSettings(latent_channels=0)
    with pytest.raises(ValueError, match="unet width"):
        unet_config(width=(80, 160))


def test_settings_from_a_command_line_are_type_checked():
    base = TrainSettings.gpu()
    # What the GPU orchestrator hands its UNet process: every field, lists for tuples.
    assert settings_over(TrainSettings(), json.dumps(attrs.asdict(base))) == base
    got = settings_over(base, '{"unet_seconds": 400, "unet_lr": 2e-4, "unet_width": [128, 128], "device": "cpu"}')
    assert (got.unet_seconds, got.unet_lr, got.unet_width, got.device) == (400, 2e-4, (128, 128), "cpu")
    for bad, said in [('{"unet_seconds": "400"}', "unet_seconds must be a number"),
                      ('{"unet_batch": 12.5}', "unet_batch must be a whole number"),
                      ('{"unet_steps": -1}', "unet_steps must be a whole number >= 0"),
                      ('{"looks": true}', "looks must be a whole number"),
                      ('{"unet_width": 128}', "unet_width must be a list"),
                      ('{"unet_width": [128, 0]}', "unet_width must be a list"),
                      ('{"device": 0}', "device must be a string"),
                      ('{"unet_text": "bert"}', "--settings: 'unet_text' must be in"),
                      ('[1, 2]', "must be a JSON object"), ('{"unet_steps": ', "not JSON")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            settings_over(base, bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_run_records_the_gpu_it_trained_on(monkeypatch):
    """training.json's "machine" names the GPU where the stages ran on one (a log alone held it before)."""
    from hifi_backends.toy.training import pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert pipeline._machine("cuda").endswith(", NVIDIA H100 80GB HBM3")
    assert pipeline._machine("cuda:0").endswith(", NVIDIA H100 80GB HBM3")
    assert "NVIDIA" not in pipeline._machine("cpu")


def test_training_on_cuda_without_cuda_is_refused_at_once(tmp_path, capsys):
    assert main(["--quick", "--device", "cuda", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "b")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert main(["--quick", "--stages", "vae,unetz", "--work", str(tmp_path / "w")]) == 2
    assert "unknown stage(s) ['unetz']" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_gpu_orchestrator_packs_bundles_in_parts_and_refuses_unknown_variants(tmp_path, monkeypatch, capsys):
    from benchmarks import toyworld_gpu

    folder = tmp_path / "bundle-x"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(np.random.default_rng(0).bytes(50_000))
    monkeypatch.setattr(toyworld_gpu, "PART", 20_000)
    toyworld_gpu._pack(folder, tmp_path / "bundle-x.tar.gz")
    parts = sorted(tmp_path.glob("bundle-x.tar.gz.*"))
    assert len(parts) == 3 and not (tmp_path / "bundle-x.tar.gz").exists()
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        member = tar.extractfile("bundle-x/weights.bin")
        assert member is not None and member.read() == (folder / "weights.bin").read_bytes()
    assert toyworld_gpu.main(["--carried", str(tmp_path), "--out", str(tmp_path / "o"), "--variants", "u7"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    for bad in ('{"unet_steps": ', '{"unet_stepz": 3}'):
        assert toyworld_gpu.main(["--carried", str(tmp_path), "--out", str(tmp_path / "o"), "--settings", bad]) == 2
        assert "error: --settings" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # No carried small models: one line, before any work.
    assert toyworld_gpu.main(["--carried", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "lacks tokenizer, toyclip_metric" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_gpu_orchestrator_carries_a_trained_vae_in_fp32(tmp_path, capsys):
    from benchmarks import toyworld_gpu
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config())
    vae.half().save_pretrained(tmp_path / "vae")
    toyworld_gpu.carry_vae(tmp_path / "vae", tmp_path / "work")
    carried = AutoencoderKL.from_pretrained(tmp_path / "work" / "vae_final", low_cpu_mem_usage=False)
    assert all(p.dtype == torch.float32 for p in carried.parameters())
    for a, b in zip(carried.parameters(), vae.parameters(), strict=True):
        assert torch.equal(a, b.float())
    assert json.loads((tmp_path / "work" / "vae_detail.json").read_text())["carried_from"] == str(tmp_path / "vae")
    assert toyworld_gpu.main(["--carried", str(tmp_path), "--out", str(tmp_path / "o"), "--vae", str(tmp_path)]) == 2
    assert "not a diffusers AutoencoderKL folder" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_model_check_takes_a_guidance_scale(tmp_path):
    from benchmarks.toyworld import main as toyworld_main

    assert toyworld_main(["check", "--out", str(tmp_path), "--samples", "2", "--ddim-steps", "2",
                          "--guidance", "3"]) == 0
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["guidance"] == 3.0 and result["prompt_following"]["samples"] == 2
    assert "guidance 3)" in (tmp_path / "check.md").read_text()


def test_finetune_goes_on_from_a_bundle_and_replaces_only_its_unet(tmp_path, capsys):
    from safetensors.torch import load_file

    from hifi_backends.toy.backend import BUNDLE

    out, work = tmp_path / "out", tmp_path / "work"
    quick = {"looks": 64, "unet_steps": 4, "unet_batch": 4, "device": "cpu", "render_workers": 1,
             "unet_seconds": 0, "unet_lr": 1e-5}
    args = ["--finetune", str(BUNDLE), "--work", str(work), "--settings", json.dumps(quick)]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "training.json").read_text())
    assert report["settings"]["unet_init"] == str(BUNDLE) and report["settings"]["unet_batch"] == 4
    assert report["init"] == json.loads((BUNDLE / "training.json").read_text())
    unet_bytes = (BUNDLE / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert report["init_unet_sha256"] == hashlib.sha256(unet_bytes).hexdigest()[:16]
    # It went on from the bundle's weights: a fresh UNet's epsilon loss starts near 1.
    assert report["stages"]["unet"]["steps"] == 4 and report["stages"]["unet"]["final_loss"] < 0.3
    vae = json.loads((BUNDLE / "vae" / "config.json").read_text())
    assert report["stages"]["latents"]["scaling_factor"] == pytest.approx(vae["scaling_factor"])
    # Every model but the UNet is the bundle's, byte for byte; the UNet moved.
    for f in sorted(p for p in BUNDLE.rglob("*") if p.is_file()):
        rel = f.relative_to(BUNDLE)
        if rel.parts[0] not in ("unet", "training.json"):
            assert (out / rel).read_bytes() == f.read_bytes(), rel
    before, after = load_file(str(BUNDLE / "unet" / "diffusion_pytorch_model.safetensors")), load_file(
        str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    capsys.readouterr()
    # The same work folder with another bundle is refused (its latents are the first bundle's).
    assert main(["--finetune", str(out), "--work", str(work), "--settings", json.dumps(quick),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "another run" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    # Not a bundle, a UNet of other widths, a settings field that does not exist: one line, exit 2.
    assert main(["--finetune", str(tmp_path), "--out", str(tmp_path / "o3")]) == 2
    assert "not a ToyWorld bundle" in capsys.readouterr().err
    (tmp_path / "training.json").write_text('{"note": "no settings"}')
    assert main(["--finetune", str(tmp_path), "--out", str(tmp_path / "o3")]) == 2
    assert "holds no training settings" in capsys.readouterr().err
    wrong = {**quick, "unet_width": [64, 128]}
    assert main(["--finetune", str(BUNDLE), "--work", str(tmp_path / "w4"), "--settings", json.dumps(wrong),
                 "--out", str(tmp_path / "o4")]) == 2
    assert "unet_width" in capsys.readouterr().err and not (tmp_path / "o4").exists()
    assert main(["--quick", "--settings", '{"unet_stepz": 3}', "--work", str(tmp_path / "w5")]) == 2
    assert "unet_stepz" in capsys.readouterr().err


def test_gpu_orchestrator_takes_the_small_models_from_a_bundle_and_smokes_a_16x16_world(tmp_path, capsys):
    """`--carried src/hifi_backends/toy/bundle`: the bundle's small models in a work folder's layout (the
    UNet's own tower inside toyclip_unet), then the smoke run of a three-level VAE's world on the CPU."""
    from benchmarks import toyworld_gpu
    from safetensors.torch import load_file

    from hifi_backends.toy.backend import BUNDLE

    work = tmp_path / "carried"
    toyworld_gpu.carry_bundle(BUNDLE, work)
    assert all((work / name).is_dir() for name in toyworld_gpu.SMALL)
    own = load_file(str(work / "toyclip_unet" / "text" / "model.safetensors"))
    bundled = load_file(str(BUNDLE / "text_encoder" / "model.safetensors"))
    assert bundled and all(torch.equal(own[f"text_model.{k}"], v.float()) for k, v in bundled.items())
    settings = attrs.evolve(TrainSettings.gpu(), device="cpu", vae_width=(32, 64, 96))
    toyworld_gpu.smoke(BUNDLE, tmp_path / "smoke", settings, {"u128": toyworld_gpu.VARIANTS["u128"]})
    assert "smoke u128: ok" in capsys.readouterr().out
    config = json.loads((tmp_path / "smoke" / "bundle-u128" / "unet" / "config.json").read_text())
    assert config["sample_size"] == 16 and config["block_out_channels"] == [128, 128]
    folder = tmp_path / "not-a-bundle"
    folder.mkdir()
    assert toyworld_gpu.main(["--carried", str(folder), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    # A bundle from before the detail classifier: refused in one line before any work, not mid-smoke.
    old = tmp_path / "old-bundle"
    shutil.copytree(BUNDLE, old, ignore=shutil.ignore_patterns("detail"))
    capsys.readouterr()
    assert toyworld_gpu.main(["--carried", str(old), "--out", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    assert "lacks detail" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    with pytest.raises(FileNotFoundError, match="lacks detail"):
        toyworld_gpu.carry_bundle(old, tmp_path / "w-old")


def test_gpu_orchestrator_sums_up_a_full_check(tmp_path, monkeypatch):
    """The summary in checks.json reads the keys `benchmarks.toyworld check` writes (its committed check.json)."""
    from benchmarks import toyworld, toyworld_gpu

    result = json.loads((Path(toyworld.__file__).parent / "results" / "toyworld-model" / "check.json").read_text())
    seen = {}

    def fake_check(out, **kwargs):
        seen.update(out=out, **kwargs)
        return result

    monkeypatch.setattr(toyworld, "run_check", fake_check)
    summary = toyworld_gpu._check(tmp_path / "bundle", "cuda", 60, tmp_path / "check-u128")
    assert seen["out"] == tmp_path / "check-u128" and seen["device"] == "cuda" and seen["samples"] == 60
    assert summary["class"] == result["prompt_following"]["class_accuracy"]
    assert summary["pattern (generated)"] == result["detail_following"]["generated"]["pattern"]["rate"]
    assert summary["identity (exact)"] == result["reference"]["rows"]["exact"]["dino"]["mean"]
    assert {"mark (vae)", "identity (vae)", "colour", "scene", "seconds"} <= set(summary)
