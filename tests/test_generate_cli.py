"""``hifi generate`` end to end from a run folder on the tiny backend."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hifi import load_backend
from hifi.algorithms.subject import Subject
from hifi.cli import main
from hifi.io.runs import RunMeta, save_run
from hifi.perception.registry import register_segmenter

FAST = ["--steps", "6", "--t-start", "4", "--t-end", "2", "--phi-steps", "2", "--quiet"]
PROMPT = "a photo of a dog on the beach"


def make_run(folder, mode="hifi"):
    """A run folder as ``hifi tune`` writes it: subject files, run.json, sources/ and masks/."""
    backend = load_backend("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    subject = Subject(
        "dog", mode,
        c_s=0.5 * torch.randn(5, backend.text_width, generator=g) if mode == "hifi" else None,
        token_vector=torch.randn(backend.text_width, generator=g) if mode == "classic-ti" else None,
    )
    names = ("p0", "p1")
    for i, name in enumerate(names):
        img, mask = Image.new("RGB", (32, 32), (40 + 80 * i, 150, 200)), Image.new("L", (32, 32), 0)
        box = [6 + 3 * i, 8, 22 + 3 * i, 24]
        ImageDraw.Draw(img).rectangle(box, fill=(220, 30, 30))
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        (folder / "sources").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(exist_ok=True)
        img.save(folder / "sources" / f"{name}.png")
        mask.save(folder / "masks" / f"{name}.png")
    meta = RunMeta(
        backend="tiny", model_id=backend.model_id, mode=mode, class_name="dog", caption="a photo of a dog",
        num_tokens=subject.num_tokens, text_width=backend.text_width, max_length=backend.max_length,
        schedule=backend.schedule.to_config(), num_steps=6, sources=names, masks="folder",
    )
    save_run(folder, subject, meta, denoiser_state=backend.denoiser_state() if mode == "dreambooth" else None)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def guided(run_dir, tmp_path_factory):
    """A reference-guided run of two prompts and two seeds, with intermediates."""
    out = tmp_path_factory.mktemp("out")
    argv = ["generate", "--run", str(run_dir), "--prompt", PROMPT, "--prompt", "a dog in the snow",
            "--num-images", "2", "--seed", "3", "--out", str(out), "--save-intermediates", *FAST]
    assert main(argv) == 0
    return out


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_command_writes_images_grid_metadata_and_every_stage(guided):
    result = json.loads((guided / "generate.json").read_text())
    assert result["reference_guided"] is True and result["seeds"] == [3, 4]
    assert result["settings"] == {
        "guidance": 7.5, "num_steps": 6, "t_start": 4, "t_end": 2, "phi_steps": 2, "phi_lr": 0.01,
        "segmenter": "attention", "embedder": "vae-latent", "captioner": "template",
    }
    assert len(result["images"]) == 4
    assert Image.open(guided / "grid.png").size[0] > 2 * 32
    for record in result["images"]:
        assert record["fallback"] is False and record["reference_guided"] is True
        assert record["reference"] in ("p0", "p1")
        assert (guided / record["file"]).is_file()
        stages = guided / record["intermediates"]
        for name in ("i_g1", "mask_g", "reference", "mask_r", "reference_warped", "mask_r_warped", "stages"):
            assert (stages / f"{name}.png").is_file(), name
        info = json.loads((stages / "stages.json").read_text())
        assert info["reference"] == record["reference"]
        assert max(info["cosine"], key=info["cosine"].get) == info["reference"]
        assert set(info["transform"]) == {"scale", "angle_rad", "tx", "ty", "matrix", "residual_px"}
        assert [s["step"] for s in info["phi_losses"]] == [4, 3, 2]
        assert all(len(s["losses"]) == 3 for s in info["phi_losses"])
        assert Image.open(stages / "stages.png").size[0] >= 8 * 128
    files = [r["file"] for r in result["images"]]
    assert files[0] == "a-photo-of-a-dog-on-the-beach_seed3.png" and len(set(files)) == 4


def test_no_reference_draws_exactly_the_i_g1_of_the_guided_run(run_dir, guided, tmp_path):
    assert main(["generate", "--run", str(run_dir), "--prompt", PROMPT, "--num-images", "2", "--seed", "3",
                 "--out", str(tmp_path), "--no-reference", *FAST]) == 0
    result = json.loads((tmp_path / "generate.json").read_text())
    assert result["reference_guided"] is False
    assert set(result["settings"]) == {"guidance", "num_steps"}
    for seed in (3, 4):
        name = f"a-photo-of-a-dog-on-the-beach_seed{seed}"
        plain = _pixels(tmp_path / f"{name}.png")
        assert np.array_equal(plain, _pixels(guided / "intermediates" / name / "i_g1.png"))
        assert not np.array_equal(plain, _pixels(guided / f"{name}.png")), "the guidance changed the image"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--t-start", "2", "--t-end", "4"], "t_s = 2 is below t_e = 4"),
        (["--t-start", "7"], r"must be a denoising step index in 1..T = 1..6, got 7"),
        (["--phi-steps", "-1"], "must be >= 0"),
    ],
)
def test_a_bad_guidance_window_is_one_clear_line(run_dir, tmp_path, capsys, flags, message):
    argv = ["generate", "--run", str(run_dir), "--prompt", PROMPT, "--num-images", "1", "--out", str(tmp_path),
            *FAST, *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hifi: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)
    assert not any(tmp_path.iterdir())


class NothingSegmenter:
    name = "nothing"
    wants_attention = False

    def segment(self, images, class_name, attention=None):
        return torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)


def test_an_image_without_a_subject_falls_back_and_says_so(run_dir, tmp_path, capsys):
    register_segmenter("nothing", lambda **_: NothingSegmenter())  # through the registry, as a plug-in would
    assert main(["generate", "--run", str(run_dir), "--prompt", PROMPT, "--num-images", "1", "--out",
                 str(tmp_path), "--save-intermediates", "--segmenter", "nothing", *FAST]) == 0
    captured = capsys.readouterr()
    assert "hifi: warning: seed 0: the nothing segmenter found no dog in I_g1" in captured.err
    assert "1 fell back to plain generation" in captured.out
    record = json.loads((tmp_path / "generate.json").read_text())["images"][0]
    assert record["fallback"] is True and record["reference_guided"] is False
    assert "found no dog" in record["fallback_reason"]
    stages = tmp_path / record["intermediates"]
    assert np.array_equal(_pixels(stages / "i_g1.png"), _pixels(tmp_path / record["file"]))
    assert (stages / "stages.png").is_file() and not (stages / "reference.png").exists()


@pytest.mark.parametrize("mode", ["classic-ti", "dreambooth"])
def test_classic_ti_and_dreambooth_runs_generate_with_reference_guidance(tmp_path, mode):
    run = make_run(tmp_path / "run", mode)
    out = tmp_path / "out"
    assert main(["generate", "--run", str(run), "--prompt", "a <subject> on the beach", "--num-images", "1",
                 "--out", str(out), *FAST]) == 0
    record = json.loads((out / "generate.json").read_text())["images"][0]
    assert record["reference_guided"] is True and (out / record["file"]).is_file()
