"""Rectified flow behind the same protocol: the tiny SD 3 backend against stock diffusers, and every command on it."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image

from hifi import load_backend
from hifi.algorithms.attention import AttentionStore, controlled_attention, observed_attention
from hifi.algorithms.generate import generate, initial_noise
from hifi.algorithms.null_text import NullTextConfig, null_text_inversion
from hifi.algorithms.sampling import ddim_invert, ddim_sample
from hifi.algorithms.subject import Subject
from hifi.cli import main
from hifi.io.diffusers_compat import pipeline_inputs
from hifi.io.runs import apply_run, load_run
from hifi.kernels.ddim import DdimGrid
from hifi.protocols.denoiser import DenoiserBackend, LoraBackend
from test_eval import DATASET, needs_dataset
from test_sdxl import _photos

PROMPT = "a photo of a dog on the beach"


@pytest.fixture(scope="module")
def sd3():
    return load_backend("tiny-sd3", seed=0)


def stock_pipeline(backend) -> StableDiffusion3Pipeline:
    """A stock SD 3 pipeline over the backend's own components (no T5, as the backend)."""
    return StableDiffusion3Pipeline(
        transformer=backend.transformer, vae=backend.vae, text_encoder=backend.text_encoder,
        tokenizer=backend.tokenizer, text_encoder_2=backend.text_encoder_2, tokenizer_2=backend.tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(backend.scheduler_config),
    )


def test_the_condition_is_sd3s_joint_sequence_and_pooled_embedding(sd3):
    assert isinstance(sd3, DenoiserBackend) and isinstance(sd3, LoraBackend) and sd3.schedule.is_flow
    c = sd3.encode_text([PROMPT])
    assert c.sequence.shape == (1, sd3.max_length, sd3.text_width) and sd3.max_length == 24 + 8
    assert set(c.extras) == {"pooled_projections"} and c.extras["pooled_projections"].shape == (1, 64)
    assert not c.sequence[:, 24:].any(), "without T5 the T5 part is zeros, where c_s goes"
    stock = stock_pipeline(sd3).encode_prompt(PROMPT, PROMPT, PROMPT, device="cpu", max_sequence_length=8)
    torch.testing.assert_close(c.sequence, stock[0])
    torch.testing.assert_close(c.extras["pooled_projections"], stock[2])
    phi = sd3.null_embedding()  # SD 3's negative: the encoded empty prompt
    torch.testing.assert_close(phi.sequence, stock[1])
    torch.testing.assert_close(phi.extras["pooled_projections"], stock[3])


def test_hifi_generation_equals_the_stock_sd3_pipeline_fed_its_embeddings(sd3):
    grid = DdimGrid.build(sd3.schedule, 6)
    g = torch.Generator().manual_seed(1)
    subject = Subject("dog", "hifi", c_s=torch.randn(4, sd3.text_width, generator=g),
                      stepwise={t: torch.randn(4, sd3.text_width, generator=g) for t in grid.timesteps})
    ours = generate(sd3, subject, PROMPT, [3], num_steps=6)
    with torch.no_grad():
        stock = stock_pipeline(sd3)(
            num_inference_steps=6, guidance_scale=7.5, latents=initial_noise(sd3, [3]), height=32, width=32,
            output_type="latent", max_sequence_length=8, **pipeline_inputs(sd3, subject, PROMPT, 6),
        ).images
    assert ours.latents.abs().max() > 0.1
    torch.testing.assert_close(stock, ours.latents, atol=1e-4, rtol=1e-4)


def test_the_flow_inversion_round_trip_converges_and_null_text_beats_plain_inversion(sd3):
    image = torch.full((1, 3, 32, 32), -0.6)
    image[:, 0, 8:24, 10:22] = 0.8
    image[:, 1, 8:24, 10:22] = 0.2
    with torch.no_grad():
        x_0 = sd3.encode_images(image)
        cond = sd3.encode_text(["a photo of a cat on the beach"])
        errors = {}
        for n in (10, 25, 50):
            grid = DdimGrid.build(sd3.schedule, n)
            back = ddim_sample(sd3.denoise, grid, ddim_invert(sd3.denoise, grid, x_0, cond)[-1], cond, guidance=1.0)
            errors[n] = (back - x_0).pow(2).mean().sqrt().item()
    print("tiny-sd3 flow round-trip RMS error by step count:", errors)
    assert errors[50] < errors[25] < errors[10] and errors[50] < 0.6 * errors[10]
    phi = sd3.null_embedding()
    grid = DdimGrid.build(sd3.schedule, 8)
    inversion = null_text_inversion(sd3.denoise, grid, x_0, cond, phi,
                                    NullTextConfig(guidance=7.5, num_steps=8, inner_steps=4, lr=5e-2))
    with torch.no_grad():
        plain = ddim_sample(sd3.denoise, grid, inversion.x_T, cond, uncond=phi, guidance=7.5)
    plain_error = (plain - x_0).pow(2).mean().item()
    null_text_error = (inversion.reconstruction - x_0).pow(2).mean().item()
    print(f"tiny-sd3, w=7.5, 8 steps, K=4: latent MSE null-text {null_text_error:.5f}, plain {plain_error:.5f}")
    assert null_text_error < 0.5 * plain_error
    assert all(torch.equal(p.extras["pooled_projections"], phi.extras["pooled_projections"]) for p in inversion.phis)


def test_joint_attention_shows_its_image_to_text_block_and_an_identity_controller_changes_nothing(sd3):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = sd3.encode_text(["a dog"])
    seen: list[tuple[int, ...]] = []

    def identity(layer, probs, heads):
        seen.append(tuple(probs.shape))
        return probs

    store = AttentionStore()
    with torch.no_grad():
        plain = sd3.denoise(x, 500.0, cond)
        with controlled_attention(sd3, identity):
            controlled = sd3.denoise(x, 500.0, cond)
        with observed_attention(sd3, store):
            observed = sd3.denoise(x, 500.0, cond)
    assert seen == [(4, 64, sd3.max_length)] * 2  # heads x image tokens x text tokens, both blocks
    torch.testing.assert_close(controlled, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(observed, plain)
    assert store.token_maps().shape == (1, 8, 8, sd3.max_length)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    photos = _photos(root / "photos")
    out = {}
    for name, flags in (("hifi", ["--mode", "hifi", "--stepwise-steps", "1"]), ("dreambooth", ["--mode", "dreambooth"]),
                        ("dreambooth-lora", ["--mode", "dreambooth", "--lora-rank", "2"])):
        run = root / name
        argv = ["tune", "--backend", "tiny-sd3", "--subject", str(photos), "--class-name", "dog", "--out", str(run),
                "--steps", "3", "--ddim-steps", "4", "--masks", "none", "--samples", "1", "--quiet", *flags]
        assert main(argv) == 0, name
        out[name] = run
    return out


def test_every_tune_writes_a_run_whose_step_wise_c_s_are_keyed_by_the_flows_timesteps(runs, sd3):
    for run in runs.values():
        assert json.loads((run / "run.json").read_text())["model_id"] == "random:tiny-sd3:0"
    subject = load_run(runs["hifi"]).subject
    assert sorted(subject.stepwise, reverse=True) == list(DdimGrid.build(sd3.schedule, 4).timesteps)


def test_the_lora_run_loads_in_the_stock_sd3_pipeline_and_denoises_as_hifi_does(runs):
    fresh, ours = load_backend("tiny-sd3", seed=0), load_backend("tiny-sd3", seed=0)
    pipe = stock_pipeline(fresh)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = ours.encode_text(["a sks dog"])
        base = fresh.denoise(x, 500.0, cond)
        pipe.load_lora_weights(str(runs["dreambooth-lora"]))
        apply_run(load_run(runs["dreambooth-lora"]), ours)
        stock, tuned = fresh.denoise(x, 500.0, cond), ours.denoise(x, 500.0, cond)
    assert (stock - base).abs().max() > 0
    torch.testing.assert_close(stock, tuned)


def test_the_lora_run_exports_for_diffusers_and_kohyas_layout_is_refused_in_one_line(runs, tmp_path, capsys):
    assert main(["export", str(runs["dreambooth-lora"]), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "pytorch_lora_weights.safetensors").is_file()
    out = tmp_path / "hifi-dog.safetensors"
    assert main(["export", str(runs["dreambooth-lora"]), "--format", "comfyui", "--out", str(out)]) == 2
    assert "--format diffusers" in capsys.readouterr().err and not out.exists()


def test_generate_edit_replace_and_demo_run_on_sd3(runs, tmp_path):
    fast = ["--steps", "5", "--t-start", "4", "--t-end", "2", "--phi-steps", "1", "--quiet"]
    for mode in runs:
        out = tmp_path / f"gen-{mode}"
        assert main(["generate", "--run", str(runs[mode]), "--prompt", "a dog on the beach", "--out", str(out),
                     *fast]) == 0, mode
        assert json.loads((out / "generate.json").read_text())["images"], mode
    assert main(["generate", "--run", str(runs["hifi"]), "--prompt", "a dog", "--out", str(tmp_path / "plain"),
                 "--no-reference", "--steps", "5", "--quiet"]) == 0
    photo = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (60, 160, 70)).save(photo)
    null = ["--ddim-steps", "4", "--inner-steps", "2", "--quiet"]
    assert main(["edit", "--backend", "tiny-sd3", "--image", str(photo), "--caption", "a cat on the grass",
                 "--source-word", "cat", "--target-word", "dog", "--out", str(tmp_path / "e.png"),
                 "--save-intermediates", *null]) == 0
    assert main(["replace", "--run", str(runs["hifi"]), "--image", str(photo), "--source-word", "cat",
                 "--out", str(tmp_path / "r.png"), *null]) == 0
    assert all((tmp_path / name).is_file() for name in ("e.png", "e.attention.png", "r.png"))
    demo = tmp_path / "demo"
    assert main(["demo", "--backend", "tiny-sd3", "--out", str(demo), "--steps", "3", "--stepwise-steps", "1",
                 "--ddim-steps", "5", "--t-start", "4", "--t-end", "2", "--phi-steps", "1", "--quiet"]) == 0
    assert (demo / "grid.png").is_file()


@needs_dataset
def test_eval_runs_on_sd3(tmp_path):
    out = tmp_path / "eval"
    argv = ["eval", "--dataset", str(DATASET), "--out", str(out), "--method", "hifi", "--backend", "tiny-sd3",
            "--subjects", "can", "--prompts", "1", "--images-per-prompt", "1", "--steps", "2", "--stepwise-steps", "1",
            "--ddim-steps", "4", "--t-start", "3", "--t-end", "2", "--phi-steps", "1", "--dino-model", "random:tiny",
            "--clip-model", "random:tiny", "--quiet"]
    assert main(argv) == 0
    assert json.loads((out / "hifi" / "summary.json").read_text())["overall"]["dino"]["subjects"] == 1


def test_without_weights_the_sd3_backend_says_what_to_supply(monkeypatch, tmp_path):
    from hifi.errors import ModelNotFoundError

    monkeypatch.delenv("HIFI_SD3_MODEL", raising=False)
    with pytest.raises(ModelNotFoundError, match="HIFI_SD3_MODEL"):
        load_backend("sd3")
    with pytest.raises(ModelNotFoundError, match="transformer/"):
        load_backend("sd3", model=str(tmp_path / "missing"))
