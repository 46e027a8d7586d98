"""Reference-guided generation (Section 3.3, Algorithm 2) on the tiny backend, stage by stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hifi import HifiError, load_backend
from hifi.algorithms.generate import generate, initial_noise, step_conditions
from hifi.algorithms.guidance import check_guidance_window, reference_guided_sample
from hifi.algorithms.reference import (
    ReferenceSettings,
    align_reference,
    choose_reference,
    first_pass,
    invert_reference,
    latent_mask,
    prepare_references,
    reference_guided_generate,
    subject_token_positions,
)
from hifi.algorithms.sampling import ddim_sample
from hifi.algorithms.subject import PLACEHOLDER, Subject
from hifi.kernels.ddim import DdimGrid, ddim_timesteps
from hifi.perception import Perception, TemplateCaptioner, VaeLatentEmbedder, default_perception

PROMPT = "a photo of a dog on the beach"
T, T_S, T_E, J = 8, 6, 3, 3
FAST = ReferenceSettings(num_steps=T, t_start=T_S, t_end=T_E, phi_steps=J)


@pytest.fixture(scope="module")
def subject():
    return Subject("dog", "hifi", c_s=0.5 * torch.randn(5, 32, generator=torch.Generator().manual_seed(0)))


def _box(size, rows, cols):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


@pytest.fixture(scope="module")
def sources():
    """Three photos of a red box on different backgrounds, with exact masks."""
    g = torch.Generator().manual_seed(2)
    images, masks = [], []
    for k in range(3):
        img = torch.empty(3, 32, 32)
        img[:] = (torch.rand(3, 1, 1, generator=g) * 2 - 1)
        mask = _box(32, (6 + 2 * k, 22 + 2 * k), (8, 24))
        img[:, mask] = torch.tensor([0.8, -0.8, -0.8])[:, None]
        images.append(img)
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)


@pytest.fixture(scope="module")
def guided_inputs(tiny, subject, sources):
    """x_T, [c, c_s^t], a real reference trajectory and a latent mask for Algorithm 2."""
    with torch.no_grad():
        conds = step_conditions(tiny, subject, PROMPT, DdimGrid.build(tiny.schedule, T))
    trajectory = invert_reference(tiny, sources[0][0], "a photo of a dog", num_steps=T)
    mask = latent_mask(sources[1][0], (8, 8))
    return initial_noise(tiny, [0]), conds, trajectory, mask


def _sample(tiny, guided_inputs, **kwargs):
    x_T, conds, trajectory, mask = guided_inputs
    options = {"t_start": T_S, "t_end": T_E, "phi_steps": J, **kwargs}
    return reference_guided_sample(
        tiny.denoise, DdimGrid.build(tiny.schedule, T), x_T, conds, trajectory, mask, uncond=tiny.null_embedding(),
        **options
    )


# Settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t_start", "t_end", "phi_steps", "message"),
    [
        (3, 5, 2, "t_s = 3 is below t_e = 5"),
        (9, 2, 2, r"t_s \(--t-start\) must be a denoising step index in 1..T = 1..8, got 9"),
        (4, 0, 2, r"t_e \(--t-end\) must be .* got 0"),
        (4, 2, -1, "must be >= 0, got -1"),
    ],
)
def test_a_window_algorithm_2_cannot_run_is_a_clear_error(tiny, guided_inputs, t_start, t_end, phi_steps, message):
    with pytest.raises(HifiError, match=message):
        check_guidance_window(T, t_start, t_end, phi_steps)
    with pytest.raises(HifiError, match=message):
        _sample(tiny, guided_inputs, t_start=t_start, t_end=t_end, phi_steps=phi_steps)


# Step 1 ----------------------------------------------------------------------------------


def test_i_g1_is_exactly_the_plain_generation_whether_or_not_attention_is_recorded(tiny, subject):
    plain = generate(tiny, subject, PROMPT, [5], num_steps=T)
    for record in (True, False):
        drawn = first_pass(tiny, subject, PROMPT, 5, num_steps=T, record_attention=record)
        assert torch.equal(drawn.image, plain.images)
        assert torch.equal(drawn.x_T, initial_noise(tiny, [5]))
        assert (drawn.attention is not None) == record


def test_subject_token_positions_in_each_mode(tiny):
    hifi = Subject("dog", "hifi", c_s=torch.zeros(5, 32))
    assert subject_token_positions(tiny, hifi, PROMPT) == tuple(range(19, 24))
    booth = Subject("dog", "dreambooth")
    ids = tiny.token_ids([booth.render_prompt(PROMPT)])[0]
    positions = subject_token_positions(tiny, booth, PROMPT)
    assert tiny.tokenizer.decode(ids[list(positions)]) == "sks dog"
    assert subject_token_positions(tiny, booth, "a " * 30 + "dog") == (), "truncated away"


# Steps 3 and 4 ---------------------------------------------------------------------------


def test_the_reference_is_the_source_of_highest_cosine_not_of_highest_dot_product():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        embeddings = torch.randn(5, 16, generator=g) * torch.rand(5, 1, generator=g) * 10
        query = torch.randn(16, generator=g)
        e, q = embeddings.numpy().astype(np.float64), query.numpy().astype(np.float64)
        cosine = e @ q / (np.linalg.norm(e, axis=1) * np.linalg.norm(q))
        choice = choose_reference(query, embeddings)
        assert choice.index == int(np.argmax(cosine))
        assert np.allclose(choice.scores, cosine, atol=1e-5)
    planted = choose_reference(torch.tensor([0.5, 0.9, 0.1]), torch.tensor([[10.0, 0, 0], [0.6, 0.8, 0], [0, 0, 1]]))
    assert planted.index == 1


def test_align_reference_lays_the_reference_mask_onto_the_generated_one():
    image = torch.rand(3, 32, 32) * 2 - 1
    mask_r = _box(32, (4, 14), (4, 14))
    mask_g = _box(32, (12, 27), (10, 25))
    aligned = align_reference(image, mask_r, mask_g)
    iou = (aligned.mask & mask_g).sum() / (aligned.mask | mask_g).sum()
    assert iou > 0.85
    assert math.isclose(aligned.fit.scale, 1.5, rel_tol=0.1)
    assert aligned.image.shape == (3, 32, 32)


# Step 6: Algorithm 2 ---------------------------------------------------------------------


def test_substitution_at_t_s_changes_only_the_masked_latents(tiny, subject, guided_inputs):
    """The latent Algorithm 2 denoises at t_s equals I_g1's outside M and x*_{t_s} inside it."""
    x_T, conds, trajectory, mask = guided_inputs
    timestep_s = ddim_timesteps(tiny.schedule, T)[T - T_S]

    def recorder(seen):
        def model(x, t, cond):
            seen.setdefault(t, x[:1].clone())
            return tiny.denoise(x, t, cond)

        return model

    plain_seen, guided_seen = {}, {}
    with torch.no_grad():
        ddim_sample(recorder(plain_seen), DdimGrid.build(tiny.schedule, T), x_T, conds, uncond=tiny.null_embedding())
    reference_guided_sample(
        recorder(guided_seen), DdimGrid.build(tiny.schedule, T), x_T, conds, trajectory, mask,
        uncond=tiny.null_embedding(), t_start=T_S, t_end=T_E, phi_steps=1,
    )
    for t in ddim_timesteps(tiny.schedule, T)[: T - T_S]:
        assert torch.equal(plain_seen[t], guided_seen[t]), "before t_s the guided run follows I_g1 exactly"
    plain, guided = plain_seen[timestep_s], guided_seen[timestep_s]
    outside = ~mask.expand_as(plain)
    assert torch.equal(guided[outside], plain[outside])
    assert torch.equal(guided[~outside], trajectory[T_S][~outside])
    assert not torch.equal(guided, plain)


def test_guiding_i_g1_by_its_own_path_is_a_fixed_point(tiny, guided_inputs):
    """Exact answer: with x*_t = I_g1's own x_t, F(x_t, phi) already hits x*_{t-1}, so Eq. 10 is 0 at phi_h = phi.

    Guards the index mapping of Algorithm 2: the substituted x*_t and the target x*_{t-1}.
    (J = 0: Adam, whose steps have size lr even for a vanishing gradient, would leave the
    minimum.)
    """
    x_T, conds, _, mask = guided_inputs
    path = [x_T]
    with torch.no_grad():
        x_0 = ddim_sample(tiny.denoise, DdimGrid.build(tiny.schedule, T), x_T, conds, uncond=tiny.null_embedding(),
                          callback=lambda i, t, x: path.append(x))
    sample = _sample(tiny, (x_T, conds, path[::-1], mask), phi_steps=0)
    assert [len(s.losses) for s in sample.losses] == [1] * (T_S - T_E + 1)
    assert all(s.losses[0] < 1e-9 for s in sample.losses), [s.losses for s in sample.losses]
    assert torch.allclose(sample.latents, x_0, atol=1e-5)


def test_the_phi_h_loss_falls_within_every_guided_step(tiny, guided_inputs):
    sample = _sample(tiny, guided_inputs)
    grid = ddim_timesteps(tiny.schedule, T)
    assert [s.step for s in sample.losses] == list(range(T_S, T_E - 1, -1))
    assert [s.timestep for s in sample.losses] == [grid[T - s] for s in range(T_S, T_E - 1, -1)]
    for s in sample.losses:
        assert len(s.losses) == J + 1
        assert s.losses[-1] < s.losses[0], f"step {s.step}: {s.losses}"


def test_only_the_unconditional_branch_is_differentiated_and_naive_gives_the_same_result(tiny, guided_inputs):
    def counting(calls):
        def model(x, t, cond):
            if torch.is_grad_enabled() and cond.sequence.requires_grad:
                calls.append(x.shape[0])
            return tiny.denoise(x, t, cond)

        return model

    x_T, conds, trajectory, mask = guided_inputs
    results = {}
    for naive in (False, True):
        calls: list[int] = []
        results[naive] = reference_guided_sample(
            counting(calls), DdimGrid.build(tiny.schedule, T), x_T, conds, trajectory, mask,
            uncond=tiny.null_embedding(), t_start=T_S, t_end=T_E, phi_steps=J, naive=naive,
        )
        assert calls == [2 if naive else 1] * (J * (T_S - T_E + 1))
    fast, slow = results[False], results[True]
    assert torch.allclose(fast.latents, slow.latents, atol=1e-4)
    for a, b in zip(fast.losses, slow.losses, strict=True):
        assert np.allclose(a.losses, b.losses, rtol=1e-3, atol=1e-6)


# All six ---------------------------------------------------------------------------------


class PlantedEmbedder:
    """Returns fixed embeddings: first for the sources, then for each I_g1."""

    name = "planted"

    def __init__(self, *outputs):
        self.outputs = list(outputs)

    def embed(self, images):
        return self.outputs.pop(0)


class NothingSegmenter:
    name = "nothing"
    wants_attention = False

    def segment(self, images, class_name, attention=None):
        return torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)


def test_the_pipeline_guides_with_the_highest_cosine_source(tiny, subject, sources):
    embedder = PlantedEmbedder(
        torch.tensor([[10.0, 0, 0], [0.6, 0.8, 0], [0, 0, 1]]), torch.tensor([[0.5, 0.9, 0.1]])
    )
    refs = prepare_references(*sources, ["a", "b", "c"], embedder)
    perception = attrs_evolve(default_perception(tiny), embedder=embedder)
    result = reference_guided_generate(tiny, subject, PROMPT, 0, refs, perception, settings=FAST)
    assert result.fallback is None and result.warnings == ()
    assert result.reference is not None and result.reference.index == 1 and result.reference_name == "b"
    assert result.caption == "a photo of a dog"
    assert len(result.losses) == T_S - T_E + 1
    assert result.image.shape == (3, 32, 32)
    assert not torch.equal(result.image, result.first.image[0])


def attrs_evolve(perception, **changes):
    return Perception(**{"segmenter": perception.segmenter, "embedder": perception.embedder,
                         "captioner": perception.captioner, **changes})


def test_no_subject_in_i_g1_falls_back_to_the_plain_image_with_a_warning(tiny, subject, sources):
    refs = prepare_references(*sources, ["a", "b", "c"], VaeLatentEmbedder(tiny))
    perception = Perception(NothingSegmenter(), VaeLatentEmbedder(tiny), TemplateCaptioner())
    result = reference_guided_generate(tiny, subject, PROMPT, 0, refs, perception, settings=FAST)
    assert result.fallback is not None and "found no dog" in result.fallback
    assert any("plain generation" in w for w in result.warnings)
    assert torch.equal(result.image, result.first.image[0])
    assert result.reference is None and result.alignment is None and result.losses == ()


@pytest.mark.parametrize("mode", ["classic-ti", "dreambooth"])
def test_the_pipeline_runs_for_classic_ti_and_dreambooth(sources, mode):
    backend = load_backend("tiny", seed=0)  # classic-ti adds a token to the tokenizer
    subject = Subject("dog", mode, token_vector=torch.randn(32) if mode == "classic-ti" else None)
    refs = prepare_references(*sources, ["a", "b", "c"], VaeLatentEmbedder(backend))
    settings = ReferenceSettings(num_steps=6, t_start=4, t_end=3, phi_steps=2)
    result = reference_guided_generate(backend, subject, PROMPT, 1, refs, default_perception(backend),
                                       settings=settings)
    assert result.first.positions, "the subject words were found"
    if mode == "classic-ti":
        ids = backend.token_ids([subject.render_prompt(PROMPT)])[0]
        assert backend.tokenizer.decode(ids[list(result.first.positions)]) == PLACEHOLDER
    assert result.fallback is None
    assert [s.step for s in result.losses] == [4, 3]
