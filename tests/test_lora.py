"""DreamBooth with LoRA adapters (``--lora-rank``): what trains, resume, the stock loader, the run's commands."""

from __future__ import annotations

import json
import types

import attrs
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from hifi import HifiError, load_backend
from hifi.algorithms.generate import generate, initial_noise
from hifi.algorithms.subject import Subject
from hifi.algorithms.tune import TuneConfig, tune
from hifi.cli import main
from hifi.io.runs import DENOISER_FILE, LORA_FILE, RUN_FILE, FolderCheckpointer, apply_run, load_run
from hifi.io.synthetic import draw_subject_photos
from hifi.protocols.denoiser import LoraBackend, lora_backend

CONFIG = TuneConfig(mode="dreambooth", steps=8, lr=1e-2, lora_rank=2, checkpoint_every=4)
"""A few steps at a rate high enough that the adapters visibly change the model."""
PROMPT = "a <subject> on the beach"


@pytest.fixture
def images(tiny):
    g = torch.Generator().manual_seed(4)
    return torch.rand(3, 3, tiny.resolution, tiny.resolution, generator=g) * 2 - 1


@pytest.fixture
def bare(tiny):
    """The session's tiny backend, with any LoRA a test puts on it taken off afterwards."""
    yield tiny
    tiny.remove_lora()


def _tune_cli(photos, masks, out, *extra):
    return main(["tune", "--subject", str(photos), "--class-name", "dog", "--masks", str(masks), "--out", str(out),
                 "--backend", "tiny", "--mode", "dreambooth", "--samples", "0", "--quiet", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA DreamBooth run (rank 2) and a full one, tuned by the command on the same photos."""
    root = tmp_path_factory.mktemp("lora")
    photos, masks = draw_subject_photos(root / "photos")
    assert _tune_cli(photos, masks, root / "lora", "--lora-rank", "2", "--steps", "3", "--lr", "1e-2") == 0
    assert _tune_cli(photos, masks, root / "full", "--steps", "1") == 0
    return root / "lora", root / "full"


def test_a_lora_tune_trains_the_adapters_and_nothing_else(bare, images):
    unet, text = ({k: v.clone() for k, v in m.state_dict().items()} for m in (bare.unet, bare.text_encoder))
    result = tune(bare, images, "dog", config=CONFIG)
    assert result.denoiser_state is None and result.subject.mode == "dreambooth"
    assert all(k.startswith("unet.") and (k.endswith(".lora.down.weight") or k.endswith(".lora.up.weight"))
               for k in result.lora_state)
    ups = [v for k, v in result.lora_state.items() if k.endswith(".lora.up.weight")]
    assert len(ups) == 4 * 14 and all(v.shape[1] == 2 for v in ups), "q, k, v, out of the tiny UNet's 14 attentions"
    assert all(v.abs().max() > 0 for v in ups), "the up-projections start at zero and moved"
    after = bare.unet.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in after.items() if ".lora_" not in k}
    assert base.keys() == unet.keys() and all(torch.equal(v, unet[k]) for k, v in base.items()), "base weights kept"
    assert all(torch.equal(v, text[k]) for k, v in bare.text_encoder.state_dict().items())
    assert not any(p.requires_grad for p in bare.unet.parameters()), "frozen again after the tune"
    bare.remove_lora()
    assert bare.unet.state_dict().keys() == unet.keys()


def test_resume_equals_an_uninterrupted_lora_tune(bare, images, tmp_path):
    whole = tune(bare, images, "dog", config=CONFIG)

    class Killed(Exception):
        pass

    def kill(stage, step, loss):
        if step == 5:  # after the step-4 checkpoint
            raise Killed

    checkpointer = FolderCheckpointer(tmp_path / "checkpoint")
    with pytest.raises(Killed):
        tune(bare, images, "dog", config=CONFIG, checkpointer=checkpointer, on_step=kill)
    assert checkpointer.load()["step"] == 4
    resumed = tune(bare, images, "dog", config=CONFIG, checkpointer=checkpointer)
    assert resumed.losses == whole.losses
    assert resumed.lora_state.keys() == whole.lora_state.keys()
    assert all(torch.equal(v, whole.lora_state[k]) for k, v in resumed.lora_state.items())
    with pytest.raises(HifiError, match="other settings"):
        tune(bare, images, "dog", config=attrs.evolve(CONFIG, lora_rank=3), checkpointer=checkpointer)


def test_a_stock_pipeline_with_load_lora_weights_draws_what_hifi_draws(runs):
    lora_dir, _ = runs
    meta = json.loads((lora_dir / RUN_FILE).read_text())
    assert (meta["mode"], meta["lora_rank"], meta["lora_file"]) == ("dreambooth", 2, LORA_FILE)
    assert meta["config"]["lora_rank"] == 2 and meta["config"]["lr"] == 1e-2
    assert (lora_dir / LORA_FILE).is_file() and not (lora_dir / DENOISER_FILE).exists()
    ours = load_backend("tiny", seed=0)
    plain = generate(ours, Subject("dog", "dreambooth"), PROMPT, [7], num_steps=5).latents
    run = load_run(lora_dir)
    subject = apply_run(run, ours)
    drawn = generate(ours, subject, PROMPT, [7], num_steps=5).latents
    assert not torch.allclose(plain, drawn, atol=1e-3), "the adapters change the image"
    apply_run(run, ours)  # a second time: the adapters are replaced, not stacked
    assert len(ours.unet.peft_config) == 1
    torch.testing.assert_close(generate(ours, subject, PROMPT, [7], num_steps=5).latents, drawn)

    stock_backend = load_backend("tiny", seed=0)  # its own UNet: the stock loader adds the adapters to it
    parts = {name: getattr(stock_backend, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
    pipe = StableDiffusionPipeline(**parts, scheduler=DDIMScheduler.from_config(stock_backend.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_dir))
    stock = pipe("a sks dog on the beach", num_inference_steps=5, guidance_scale=7.5,
                 latents=initial_noise(ours, [7]), output_type="latent").images
    torch.testing.assert_close(stock, drawn, rtol=1e-4, atol=1e-4)


def test_a_run_without_lora_takes_an_earlier_runs_lora_off(runs, tmp_path):
    lora_dir, _ = runs
    backend = load_backend("tiny", seed=0)
    keys = set(backend.unet.state_dict())
    apply_run(load_run(lora_dir), backend)
    photos, masks = draw_subject_photos(tmp_path / "photos")
    assert main(["tune", "--subject", str(photos), "--class-name", "dog", "--masks", str(masks), "--out",
                 str(tmp_path / "hifi"), "--steps", "1", "--stepwise-steps", "0", "--samples", "0", "--quiet"]) == 0
    apply_run(load_run(tmp_path / "hifi"), backend)
    assert set(backend.unet.state_dict()) == keys and not getattr(backend.unet, "peft_config", None)


def test_the_lora_file_is_far_smaller_than_the_full_denoiser(runs):
    lora_dir, full_dir = runs
    lora, full = (lora_dir / LORA_FILE).stat().st_size, (full_dir / DENOISER_FILE).stat().st_size
    print(f"tiny UNet, rank 2: {LORA_FILE} {lora:,} bytes, {DENOISER_FILE} {full:,} bytes ({full / lora:.0f}x)")
    assert full > 20 * lora


def test_reference_guided_generate_and_replace_run_on_a_lora_run(runs, tmp_path):
    from PIL import Image, ImageDraw

    lora_dir, _ = runs
    out = tmp_path / "gen"
    assert main(["generate", "--run", str(lora_dir), "--prompt", PROMPT, "--num-images", "1", "--out", str(out),
                 "--steps", "6", "--t-start", "4", "--t-end", "2", "--phi-steps", "2", "--quiet"]) == 0
    record = json.loads((out / "generate.json").read_text())["images"][0]
    assert record["reference_guided"] is True and (out / record["file"]).is_file()

    photo = tmp_path / "cat.png"
    img = Image.new("RGB", (32, 32), (60, 160, 70))
    ImageDraw.Draw(img).rectangle([10, 8, 22, 26], fill=(150, 100, 50))
    img.save(photo)
    new = tmp_path / "rep" / "dog.png"
    assert main(["replace", "--run", str(lora_dir), "--image", str(photo), "--source-word", "cat",
                 "--caption", "a photo of a cat on the grass", "--out", str(new), "--ddim-steps", "3",
                 "--inner-steps", "1", "--save-intermediates", "--quiet"]) == 0
    summary = json.loads((tmp_path / "rep" / "dog.json").read_text())
    assert new.is_file() and summary["mode"] == "dreambooth"
    assert summary["edited_caption"] == "a photo of a sks dog on the grass"


def test_lora_rank_outside_dreambooth_is_one_line(tiny, tmp_path, capsys):
    photos, masks = draw_subject_photos(tmp_path / "photos")
    for flags, message in ((["--mode", "hifi", "--lora-rank", "4"], "--lora-rank applies to --mode dreambooth"),
                           (["--mode", "dreambooth", "--lora-rank", "0"], "--lora-rank must be >= 1")):
        argv = ["tune", "--subject", str(photos), "--class-name", "dog", "--out", str(tmp_path / "run"), "--quiet"]
        assert main(argv + flags) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert TuneConfig(mode="dreambooth", lora_rank=4).learning_rate == 1e-4, "diffusers' LoRA example's rate"
    assert TuneConfig(mode="dreambooth").learning_rate == 5e-6
    assert isinstance(tiny, LoraBackend)
    with pytest.raises(HifiError, match="cannot carry LoRA adapters"):
        lora_backend(types.SimpleNamespace(name="fake"))
