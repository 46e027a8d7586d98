"""Many images at once: batched null-text inversion and reference guidance equal their batch-1 results."""

from __future__ import annotations

import pytest
import torch

from hifi import load_backend
from hifi.algorithms.guidance import reference_guided_sample
from hifi.algorithms.null_text import NullTextConfig, null_text_inversion, null_text_inversions
from hifi.algorithms.sampling import ddim_invert
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid
from hifi_backends.diffusers_backend import DiffusersBackend

T, T_S, T_E, J = 6, 5, 2, 3


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model in float64: a batch and its images alone then agree to 1e-9, so the test sees the
    algorithm; in float32 they agree to ~1e-4, the rounding of batched kernels amplified by Adam's steps."""
    base = load_backend("tiny", seed=0)  # its own modules: converting them leaves the session's tiny alone
    return DiffusersBackend(name="tiny", model_id=base.model_id, unet=base.unet, vae=base.vae,
                            text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                            scheduler_config=base.scheduler_config, dtype=torch.float64)


def _latents(backend, n, seed):
    return torch.randn(n, backend.latent_channels, 8, 8, generator=torch.Generator().manual_seed(seed)).to(
        backend.dtype)


@pytest.mark.parametrize("tolerance", [0.0, "median"])
def test_null_text_inversion_of_a_batch_equals_each_image_alone(tiny64, tolerance):
    """Three photos, one caption each; with a tolerance that stops some images early and not others."""
    x_0 = _latents(tiny64, 3, 0) * 0.3
    with torch.no_grad():
        cond = tiny64.encode_text(["a photo of a dog", "a cat on the beach", "a red cube"])
    phi = tiny64.null_embedding()
    grid = DdimGrid.build(tiny64.schedule, T)
    probe = NullTextConfig(num_steps=T, inner_steps=4, lr=5e-2, tolerance=0.0)
    if tolerance == "median":  # a tolerance between the images' losses: some stop early, some do not
        first = [null_text_inversion(tiny64.denoise, grid, x_0[b : b + 1], cond[b], phi, probe).losses[0]
                 for b in range(3)]
        tolerance = sorted(first)[1] * 1.5
    config = NullTextConfig(num_steps=T, inner_steps=4, lr=5e-2, tolerance=tolerance)
    together = null_text_inversions(tiny64.denoise, grid, x_0, cond, phi, config)
    alone = [null_text_inversion(tiny64.denoise, grid, x_0[b : b + 1], cond[b], phi, config) for b in range(3)]
    if config.tolerance > 0:
        assert len({a.iterations for a in alone}) > 1, "the tolerance should stop the images differently"
    for a, b in zip(together, alone, strict=True):
        assert a.iterations == b.iterations
        assert a.losses == pytest.approx(b.losses, rel=1e-9, abs=1e-12)
        torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=1e-9, atol=1e-9)
        for p, q in zip(a.phis, b.phis, strict=True):
            torch.testing.assert_close(p.sequence, q.sequence, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a.x_T, b.x_T, rtol=1e-9, atol=1e-9)


def test_a_batch_of_one_is_the_single_image_call(tiny):
    x_0 = _latents(tiny, 1, 1) * 0.3
    cond = tiny.encode_text(["a dog"])
    grid = DdimGrid.build(tiny.schedule, 4)
    config = NullTextConfig(num_steps=4, inner_steps=2)
    one = null_text_inversion(tiny.denoise, grid, x_0, cond, tiny.null_embedding(), config)
    (batched,) = null_text_inversions(tiny.denoise, grid, x_0, cond, tiny.null_embedding(), config)
    assert one.losses == batched.losses and torch.equal(one.reconstruction, batched.reconstruction)
    with pytest.raises(Exception, match="null_text_inversions"):
        null_text_inversion(tiny.denoise, grid, _latents(tiny, 2, 0), cond, tiny.null_embedding(), config)


def test_reference_guidance_of_a_batch_equals_each_image_alone(tiny64):
    """Three images, each its x_T, reference trajectory, mask and prompt: one loop, one phi_h each."""
    x_T = _latents(tiny64, 3, 2)
    references = _latents(tiny64, 3, 3) * 0.3
    with torch.no_grad():
        cond = tiny64.encode_text(["a dog on the beach", "a dog in the snow", "a dog"])
        caption = tiny64.encode_text(["a photo of a dog"])
        grid = DdimGrid.build(tiny64.schedule, T)
        trajectory = ddim_invert(tiny64.denoise, grid, references, caption)
    mask = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    mask[0, :, 2:6, 2:6] = True
    mask[1, :, 1:7, 3:5] = True
    mask[2, :, 4:8, 0:8] = True
    settings = {"uncond": tiny64.null_embedding(), "guidance": 7.5, "t_start": T_S, "t_end": T_E, "phi_steps": J}
    together = reference_guided_sample(tiny64.denoise, grid, x_T, cond, trajectory, mask, **settings)
    for b in range(3):
        own = [z[b : b + 1] for z in trajectory]
        alone = reference_guided_sample(tiny64.denoise, grid, x_T[b : b + 1], cond[b], own, mask[b : b + 1], **settings)
        torch.testing.assert_close(together.latents[b : b + 1], alone.latents, rtol=1e-9, atol=1e-9)
        for s, r in zip(together.image_losses[b], alone.losses, strict=True):
            assert (s.step, s.timestep) == (r.step, r.timestep)
            assert s.losses == pytest.approx(r.losses, rel=1e-9, abs=1e-12)
    assert len(together.image_losses) == 3 and together.losses == together.image_losses[0]


def test_a_batch_with_an_empty_mask_is_refused(tiny):
    grid = DdimGrid.build(tiny.schedule, T)
    x_T = _latents(tiny, 2, 0)
    trajectory = [x_T] * (T + 1)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, 2:4, 2:4] = True
    with pytest.raises(Exception, match="non-empty"):
        reference_guided_sample(tiny.denoise, grid, x_T, Condition(tiny.encode_text(["a"]).sequence), trajectory, mask,
                                uncond=tiny.null_embedding(), t_start=T_S, t_end=T_E)


def test_reference_guided_generation_of_several_seeds_equals_each_seed_alone(tiny64):
    """The whole of Section 3.3 for three seeds in one batch (the attention segmenter, the VAE-latent embedder)."""
    from hifi.algorithms.reference import (
        ReferenceSettings,
        prepare_references,
        reference_guided_generate,
        reference_guided_generate_many,
    )
    from hifi.algorithms.subject import Subject
    from hifi.perception import default_perception

    g = torch.Generator().manual_seed(2)
    images = (torch.rand(3, 3, 1, 1, generator=g) * 2 - 1).expand(3, 3, 32, 32).clone().to(torch.float64)
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    for k in range(3):
        masks[k, 6 + 2 * k : 22 + 2 * k, 8:24] = True
        images[k][:, masks[k]] = torch.tensor([0.8, -0.8, -0.8], dtype=torch.float64)[:, None]
    subject = Subject("dog", "hifi", c_s=0.5 * torch.randn(5, 32, generator=g, dtype=torch.float64))
    perception = default_perception(tiny64)
    refs = prepare_references(images, masks, ["a", "b", "c"], perception.embedder)
    settings = ReferenceSettings(num_steps=T, t_start=T_S, t_end=T_E, phi_steps=J)
    prompt = "a photo of a dog on the beach"
    together = reference_guided_generate_many(tiny64, subject, prompt, [0, 1, 2], refs, perception, settings=settings)
    assert [r.seed for r in together] == [0, 1, 2]
    assert sum(r.fallback is None for r in together) >= 2, "most seeds are guided, so the batch is tested"
    for r in together:
        alone = reference_guided_generate(tiny64, subject, prompt, r.seed, refs, perception, settings=settings)
        assert r.fallback == alone.fallback and r.reference_name == alone.reference_name
        torch.testing.assert_close(r.image, alone.image, rtol=1e-9, atol=1e-9)
        for s, q in zip(r.losses, alone.losses, strict=True):
            assert s.losses == pytest.approx(q.losses, rel=1e-9, abs=1e-12)


def test_the_batch_benchmark_and_the_profile_run_and_report_every_row(capsys):
    from benchmarks import batching, profile_loops

    assert batching.main(["--backend", "tiny", "--batches", "1,2", "--steps", "2", "--phi-steps", "1",
                          "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert table.count("| plain generation (Eq. 7) |") == 2 and "| 1.00x |" in table
    assert profile_loops.main(["--backend", "tiny", "--steps", "2", "--phi-steps", "1"]) == 0
    assert "| null-text inversion (Eq. 4), K=1 |" in capsys.readouterr().out
