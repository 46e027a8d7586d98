"""SDXL behind the same protocol: the tiny SDXL backend against stock diffusers, and every command on it."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from hifi import load_backend
from hifi.algorithms.generate import generate, initial_noise
from hifi.algorithms.null_text import NullTextConfig, null_text_inversion
from hifi.algorithms.sampling import ddim_invert, ddim_sample
from hifi.algorithms.subject import PLACEHOLDER, Subject
from hifi.cli import main
from hifi.io.diffusers_compat import load_sdxl_embedding, pipeline_inputs
from hifi.io.runs import TI_FILE, apply_run, load_run
from hifi.kernels.ddim import DdimGrid
from hifi.protocols.denoiser import DenoiserBackend, LoraBackend, TextualInversionBackend
from test_eval import DATASET, needs_dataset

PROMPT = "a photo of a dog on the beach"


@pytest.fixture(scope="module")
def xl():
    return load_backend("tiny-sdxl", seed=0)


def stock_pipeline(backend) -> StableDiffusionXLPipeline:
    """A stock SDXL pipeline over the backend's own components, with a DDIM scheduler from its config."""
    return StableDiffusionXLPipeline(
        vae=backend.vae, text_encoder=backend.text_encoder, text_encoder_2=backend.text_encoder_2,
        tokenizer=backend.tokenizer, tokenizer_2=backend.tokenizer_2, unet=backend.unet,
        scheduler=DDIMScheduler.from_config(backend.scheduler_config), force_zeros_for_empty_prompt=True,
    )


def test_the_condition_carries_the_pooled_embedding_and_the_time_ids(xl):
    assert isinstance(xl, DenoiserBackend) and isinstance(xl, TextualInversionBackend) and isinstance(xl, LoraBackend)
    c = xl.encode_text([PROMPT, "a cat"])
    assert c.sequence.shape == (2, xl.max_length, xl.text_width) and xl.text_width == 64
    assert set(c.extras) == {"text_embeds", "time_ids"} and c.extras["text_embeds"].shape == (2, 32)
    assert c.extras["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    assert not torch.allclose(c.extras["text_embeds"][0], c.extras["text_embeds"][1])
    phi = xl.null_embedding()
    assert phi.batch == 1 and not phi.sequence.any() and not phi.extras["text_embeds"].any()  # SDXL's zeros
    assert phi.extras["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    stock = stock_pipeline(xl).encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(c.sequence[:1], stock[0])
    torch.testing.assert_close(c.extras["text_embeds"][:1], stock[2])


def test_hifi_generation_equals_the_stock_sdxl_pipeline_fed_its_embeddings(xl):
    grid = DdimGrid.build(xl.schedule, 6)
    g = torch.Generator().manual_seed(1)
    subject = Subject("dog", "hifi", c_s=torch.randn(4, xl.text_width, generator=g),
                      stepwise={t: torch.randn(4, xl.text_width, generator=g) for t in grid.timesteps})
    ours = generate(xl, subject, PROMPT, [3], num_steps=6)
    with torch.no_grad():
        stock = stock_pipeline(xl)(
            num_inference_steps=6, guidance_scale=7.5, latents=initial_noise(xl, [3]), height=32, width=32,
            output_type="latent", **pipeline_inputs(xl, subject, PROMPT, 6),
        ).images
    assert ours.latents.abs().max() > 0.1
    torch.testing.assert_close(stock, ours.latents, atol=1e-4, rtol=1e-4)


def test_the_inversion_round_trip_error_shrinks_with_more_steps(xl):
    """As on SD 1.x (tests/test_ddim.py): a random UNet's noise depends on x, so the round trip converges."""
    x_0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = xl.encode_text(["a photo of a dog"])
    errors = {}
    with torch.no_grad():
        for n in (25, 50, 100):
            grid = DdimGrid.build(xl.schedule, n)
            back = ddim_sample(xl.denoise, grid, ddim_invert(xl.denoise, grid, x_0, cond)[-1], cond, guidance=1.0)
            errors[n] = (back - x_0).pow(2).mean().sqrt().item()
    print("tiny-sdxl DDIM round-trip RMS error by step count:", errors)
    assert errors[100] < errors[50] < errors[25] and errors[100] < 0.6 * errors[25]


def test_null_text_reconstructs_better_than_plain_inversion_and_keeps_the_pooled_zeros(xl):
    image = torch.full((1, 3, 32, 32), -0.6)
    image[:, 0, 8:24, 10:22] = 0.8
    image[:, 1, 8:24, 10:22] = 0.2
    with torch.no_grad():
        x_0 = xl.encode_images(image)
        cond = xl.encode_text(["a photo of a cat on the beach"])
    phi = xl.null_embedding()
    config = NullTextConfig(guidance=7.5, num_steps=8, inner_steps=4, lr=5e-2)
    grid = DdimGrid.build(xl.schedule, 8)
    inversion = null_text_inversion(xl.denoise, grid, x_0, cond, phi, config)
    with torch.no_grad():
        plain = ddim_sample(xl.denoise, grid, inversion.x_T, cond, uncond=phi, guidance=7.5)
    plain_error = (plain - x_0).pow(2).mean().item()
    null_text_error = (inversion.reconstruction - x_0).pow(2).mean().item()
    print(f"tiny-sdxl, w=7.5, 8 steps, K=4: latent MSE null-text {null_text_error:.5f}, plain {plain_error:.5f}")
    assert null_text_error < 0.5 * plain_error
    # phi_t is learned in the sequence only: the pooled part stays SDXL's zeros.
    assert all(not p.extras["text_embeds"].any() for p in inversion.phis)
    assert any(p.sequence.any() for p in inversion.phis)


def _photos(folder):
    folder.mkdir()
    for i in range(3):
        img = Image.new("RGB", (32, 32), (40 + 60 * i, 150, 200))
        ImageDraw.Draw(img).rectangle([6 + 2 * i, 8, 22 + 2 * i, 24], fill=(220, 30, 30))
        img.save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short tune per mode on tiny-sdxl, through the command line."""
    root = tmp_path_factory.mktemp("xl")
    photos = _photos(root / "photos")
    out = {}
    for name, flags in (("hifi", ["--mode", "hifi", "--stepwise-steps", "1"]), ("classic-ti", ["--mode", "classic-ti"]),
                        ("dreambooth", ["--mode", "dreambooth"]),
                        ("dreambooth-lora", ["--mode", "dreambooth", "--lora-rank", "2"])):
        run = root / name
        argv = ["tune", "--backend", "tiny-sdxl", "--subject", str(photos), "--class-name", "dog", "--out", str(run),
                "--steps", "3", "--ddim-steps", "4", "--masks", "none", "--samples", "1", "--quiet", *flags]
        assert main(argv) == 0, name
        out[name] = run
    return out


def test_every_tune_mode_writes_a_run_that_names_the_backend(runs):
    for name, run in runs.items():
        meta = json.loads((run / "run.json").read_text())
        assert meta["backend"] == "tiny-sdxl" and meta["model_id"] == "random:tiny-sdxl:0" and meta["text_width"] == 64
        assert (run / "samples" / "seed0.png").is_file(), name


def test_classic_ti_writes_one_vector_per_text_encoder_and_the_stock_pipeline_loads_it(runs, xl):
    tensors = load_file(str(runs["classic-ti"] / TI_FILE))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (1, 32), "clip_g": (1, 32)}
    vector = load_run(runs["classic-ti"]).subject.token_vector
    fresh = load_backend("tiny-sdxl", seed=0)  # components without the token, as a user's pipeline has them
    pipe = stock_pipeline(fresh)
    load_sdxl_embedding(pipe, runs["classic-ti"] / TI_FILE)
    prompt = f"a photo of a {PLACEHOLDER}"
    with torch.no_grad():
        stock = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        xl.add_placeholder_token(PLACEHOLDER)
        ours = xl.encode_text([prompt], token_embeddings={PLACEHOLDER: vector})
    torch.testing.assert_close(ours.sequence, stock[0])
    torch.testing.assert_close(ours.extras["text_embeds"], stock[2])
    for fmt, out in (("a1111", "subject.safetensors"), ("diffusers", "ti")):
        target = runs["classic-ti"].parent / f"export-{fmt}" / out
        assert main(["export", str(runs["classic-ti"]), "--format", fmt, "--out", str(target)]) == 0
        written = target if fmt == "a1111" else target / TI_FILE
        assert set(load_file(str(written))) == {"clip_l", "clip_g"}


def test_the_lora_run_loads_in_the_stock_sdxl_pipeline_and_denoises_as_hifi_does(runs):
    fresh, ours = load_backend("tiny-sdxl", seed=0), load_backend("tiny-sdxl", seed=0)
    pipe = stock_pipeline(fresh)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = ours.encode_text(["a sks dog"])
        base = fresh.denoise(x, 500, cond)
        pipe.load_lora_weights(str(runs["dreambooth-lora"]))
        apply_run(load_run(runs["dreambooth-lora"]), ours)
        stock, tuned = fresh.denoise(x, 500, cond), ours.denoise(x, 500, cond)
    assert (stock - base).abs().max() > 0
    torch.testing.assert_close(stock, tuned)


def test_generate_edit_replace_and_demo_run_on_sdxl(runs, tmp_path):
    fast = ["--steps", "5", "--t-start", "4", "--t-end", "2", "--phi-steps", "1", "--quiet"]
    for mode in ("hifi", "classic-ti", "dreambooth", "dreambooth-lora"):
        out = tmp_path / f"gen-{mode}"
        assert main(["generate", "--run", str(runs[mode]), "--prompt", "a dog on the beach", "--out", str(out),
                     *fast]) == 0, mode
        result = json.loads((out / "generate.json").read_text())
        assert result["reference_guided"] is True and result["images"], mode
    plain = tmp_path / "plain"
    assert main(["generate", "--run", str(runs["hifi"]), "--prompt", "a dog", "--out", str(plain), "--no-reference",
                 "--steps", "5", "--quiet"]) == 0
    photo = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (60, 160, 70)).save(photo)
    null = ["--ddim-steps", "4", "--inner-steps", "2", "--quiet"]
    assert main(["edit", "--backend", "tiny-sdxl", "--image", str(photo), "--caption", "a cat on the grass",
                 "--source-word", "cat", "--target-word", "dog", "--out", str(tmp_path / "e.png"), *null]) == 0
    assert main(["replace", "--run", str(runs["hifi"]), "--image", str(photo), "--source-word", "cat",
                 "--out", str(tmp_path / "r.png"), *null]) == 0
    assert (tmp_path / "e.png").is_file() and (tmp_path / "r.png").is_file()
    demo = tmp_path / "demo"
    assert main(["demo", "--backend", "tiny-sdxl", "--out", str(demo), "--steps", "3", "--stepwise-steps", "1",
                 "--ddim-steps", "5", "--t-start", "4", "--t-end", "2", "--phi-steps", "1", "--quiet"]) == 0
    assert (demo / "grid.png").is_file() and json.loads((demo / "metrics.json").read_text())["rows"]


def test_hifi_backends_lists_the_sdxl_backends(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("sdxl", "sdxl-fp16", "tiny-sdxl"))


def test_without_weights_the_sdxl_backend_says_what_to_supply(monkeypatch, tmp_path):
    from hifi.errors import ModelNotFoundError

    monkeypatch.delenv("HIFI_SDXL_MODEL", raising=False)
    with pytest.raises(ModelNotFoundError, match="HIFI_SDXL_MODEL"):
        load_backend("sdxl")
    with pytest.raises(ModelNotFoundError, match="text_encoder_2/"):
        load_backend("sdxl", model=str(tmp_path / "missing"))


@needs_dataset
def test_eval_runs_on_sdxl(tmp_path):
    out = tmp_path / "eval"
    argv = ["eval", "--dataset", str(DATASET), "--out", str(out), "--method", "hifi", "--backend", "tiny-sdxl",
            "--subjects", "can", "--prompts", "1", "--images-per-prompt", "1", "--steps", "2", "--stepwise-steps", "1",
            "--ddim-steps", "4", "--t-start", "3", "--t-end", "2", "--phi-steps", "1", "--dino-model", "random:tiny",
            "--clip-model", "random:tiny", "--quiet"]
    assert main(argv) == 0
    summary = json.loads((out / "hifi" / "summary.json").read_text())
    assert summary["overall"]["dino"]["subjects"] == 1
