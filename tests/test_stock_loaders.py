"""What hifi ships loads with the stock loaders as a user writes them (no dtype, no extra arguments)."""

from __future__ import annotations

import pytest
import torch

from hifi.algorithms.generate import generate, initial_noise
from hifi.algorithms.subject import Subject
from hifi.registry import load_backend


def test_the_bundle_draws_in_a_stock_pipeline_as_hifi_does():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from hifi_backends.toy.backend import bundle_path

    pipe = StableDiffusionPipeline.from_pretrained(bundle_path(), safety_checker=None, requires_safety_checker=False)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype == torch.float32
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    toy = load_backend("toy", device="cpu")
    prompt = "a red mug with white stripes on the beach"
    ours = generate(toy, Subject.plain("mug"), prompt, [3], num_steps=5)
    stock = pipe(prompt, num_inference_steps=5, guidance_scale=7.5, latents=initial_noise(toy, [3]),
                 output_type="latent").images
    torch.testing.assert_close(stock, ours.latents, rtol=1e-4, atol=1e-4)


def test_a_dreambooth_run_loads_into_a_stock_unet(tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from hifi.cli import main
    from hifi.io.runs import DENOISER_FILE, apply_run, load_run
    from hifi.io.synthetic import draw_subject_photos

    photos, masks = draw_subject_photos(tmp_path / "photos")
    run_dir = tmp_path / "run"
    assert main(["tune", "--subject", str(photos), "--class-name", "dog", "--masks", str(masks), "--out",
                 str(run_dir), "--backend", "tiny", "--mode", "dreambooth", "--steps", "2", "--samples", "0",
                 "--quiet"]) == 0
    tiny = load_backend("tiny")
    stock = UNet2DConditionModel.from_config(tiny.unet.config)
    stock.load_state_dict(load_file(str(run_dir / DENOISER_FILE)))  # strict: every key, every shape
    apply_run(load_run(run_dir), tiny)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = tiny.encode_text(["a sks dog"])
        torch.testing.assert_close(stock(x, 500, encoder_hidden_states=cond.sequence).sample,
                                   tiny.denoise(x, 500, cond))


@pytest.mark.parametrize("mode", ["classic-ti", "dreambooth", "dreambooth-lora"])
def test_each_run_file_of_the_toy_model_loads_in_the_stock_pipeline(tmp_path, mode):
    """A run on the bundled model, its file read by the stock loader of its kind, gives hifi's numbers."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from hifi.algorithms.subject import PLACEHOLDER
    from hifi.cli import main
    from hifi.io.runs import DENOISER_FILE, TI_FILE, apply_run, load_run
    from hifi.toyworld.subjects import export_dataset
    from hifi_backends.toy.backend import bundle_path

    dataset, masks = export_dataset(tmp_path / "data", ["striped_mug"])
    run_dir = tmp_path / "run"
    extra = ["--lora-rank", "2"] if mode == "dreambooth-lora" else []
    assert main(["tune", "--subject", str(dataset / "striped_mug"), "--masks", str(masks / "striped_mug"),
                 "--class-name", "mug", "--out", str(run_dir), "--backend", "toy", "--mode", mode.removesuffix("-lora"),
                 "--steps", "2", "--lr", "1e-3", "--samples", "0", "--quiet", *extra]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(bundle_path(), safety_checker=None, requires_safety_checker=False)
    toy = load_backend("toy", device="cpu")
    subject = apply_run(load_run(run_dir), toy)
    if mode == "classic-ti":
        pipe.load_textual_inversion(str(run_dir / TI_FILE))
    elif mode == "dreambooth":
        pipe.unet.load_state_dict(load_file(str(run_dir / DENOISER_FILE)))
    else:
        pipe.load_lora_weights(str(run_dir))
    prompt = subject.render_prompt("a photo of a <subject>")
    with torch.no_grad():
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        stock_cond = pipe.text_encoder(ids)[0]
        ours_cond = subject.encode(toy, ["a photo of a <subject>"])
        assert ours_cond.extras == {}
        torch.testing.assert_close(stock_cond, ours_cond.sequence, rtol=1e-5, atol=1e-5)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        stock = pipe.unet(x, 500, encoder_hidden_states=ours_cond.sequence).sample
        torch.testing.assert_close(stock, toy.denoise(x, 500, ours_cond), rtol=1e-4, atol=1e-5)
    assert mode != "classic-ti" or PLACEHOLDER in prompt
