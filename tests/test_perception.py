"""Weight-free perception for reference-guided generation: attention segmenter, embedder, captioner."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hifi import HifiError
from hifi.algorithms.attention import AttentionStore, observed_attention
from hifi.algorithms.reference import first_pass, subject_token_positions
from hifi.algorithms.subject import Subject
from hifi.kernels.morphology import fill_holes, largest_component, otsu_threshold
from hifi.perception import (
    AttentionSegmenter,
    Captioner,
    ImageEmbedder,
    Segmenter,
    TemplateCaptioner,
    VaeLatentEmbedder,
    default_perception,
    subject_attention,
)

STEPS = 6


def _components(mask: torch.Tensor, neighbours: list[tuple[int, int]]) -> list[set[tuple[int, int]]]:
    """Connected components by breadth-first search: the naive implementation to check against."""
    h, w = mask.shape
    seen: set[tuple[int, int]] = set()
    out = []
    for start in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        start = (int(start[0]), int(start[1]))
        if start in seen:
            continue
        component, queue = {start}, deque([start])
        seen.add(start)
        while queue:
            r, c = queue.popleft()
            for dr, dc in neighbours:
                n = (r + dr, c + dc)
                if 0 <= n[0] < h and 0 <= n[1] < w and mask[n] and n not in seen:
                    seen.add(n)
                    component.add(n)
                    queue.append(n)
        out.append(component)
    return out


EIGHT = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
FOUR = [(-1, 0), (1, 0), (0, -1), (0, 1)]
masks_strategy = st.builds(
    lambda bits, h, w: torch.tensor(bits[: h * w], dtype=torch.bool).view(h, w),
    st.lists(st.booleans(), min_size=144, max_size=144),
    st.integers(3, 12),
    st.integers(3, 12),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(masks_strategy)
def test_largest_component_is_a_largest_8_connected_component(mask):
    kept = largest_component(mask)
    components = _components(mask, EIGHT)
    if not components:
        assert not kept.any()
        return
    cells = {(int(r), int(c)) for r, c in torch.nonzero(kept)}
    assert cells in components
    assert len(cells) == max(len(c) for c in components)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(masks_strategy)
def test_fill_holes_fills_exactly_the_background_cut_off_from_the_border(mask):
    filled = fill_holes(mask)
    h, w = mask.shape
    expected = mask.clone()
    for region in _components(~mask, FOUR):
        if not any(r in (0, h - 1) or c in (0, w - 1) for r, c in region):
            for cell in region:
                expected[cell] = True
    assert torch.equal(filled, expected)


def test_otsu_threshold_separates_two_levels():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([0.2 + 0.05 * torch.rand(300, generator=g), 0.7 + 0.05 * torch.rand(100, generator=g)])
    assert 0.25 <= otsu_threshold(values) <= 0.7


def test_segment_map_keeps_the_peak_region_and_drops_specks_and_holes():
    grid = torch.full((16, 16), 0.1)
    grid[4:12, 3:10] = 0.9
    grid[7, 6] = 0.1  # a hole inside the subject
    grid[14, 14] = 0.9  # a speck elsewhere
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:12, 3:10] = True
    assert torch.equal(AttentionSegmenter().segment_map(grid), expected)


def test_a_flat_attention_map_has_no_subject():
    images = torch.zeros(2, 3, 32, 32)
    flat = torch.full((2, 8, 8), 0.05) + 1e-4 * torch.rand(2, 8, 8)
    assert not AttentionSegmenter().segment(images, "dog", flat).any()


def test_the_attention_segmenter_needs_attention():
    with pytest.raises(HifiError, match="cross-attention"):
        AttentionSegmenter().segment(torch.zeros(1, 3, 32, 32), "dog", None)


def _plant(monkeypatch, backend, positions, region, decoy):
    """Make every cross-attention layer's probabilities, as an observer computes them, show a planted map.

    In the conditional half the subject tokens look at ``region`` and the other tokens at
    ``decoy``; in the unconditional half the subject tokens look at ``decoy``. The layers'
    own processors (which produce the image) are untouched.
    """

    def fake_scores(query, key, mask=None):
        rows, queries, length = query.shape[0], query.shape[1], key.shape[1]
        side = int(queries**0.5)
        scale = 32 // side  # planted regions are given on a 32 x 32 grid

        def cells(box):
            r0, r1, c0, c1 = (v // scale for v in box)
            m = torch.zeros(side, side, dtype=torch.bool)
            m[r0:r1, c0:c1] = True
            return m.flatten()

        inside, elsewhere = cells(region), cells(decoy)
        probs = torch.full((rows, queries, length), 1.0)
        subject = torch.zeros(length, dtype=torch.bool)
        subject[list(positions)] = True
        half = rows // 2
        probs[half:, :, subject] += 30.0 * inside[:, None].float()
        probs[half:, :, ~subject] += 30.0 * elsewhere[:, None].float()
        probs[:half, :, subject] += 30.0 * elsewhere[:, None].float()
        return probs / probs.sum(dim=-1, keepdim=True)

    for module in backend.unet.modules():
        if getattr(module, "is_cross_attention", False):
            monkeypatch.setattr(module, "get_attention_scores", fake_scores)


@pytest.mark.parametrize("mode", ["hifi", "dreambooth"])
def test_the_attention_segmenter_finds_a_subject_planted_in_the_recorded_attention(tiny, monkeypatch, mode):
    """The planted region flows through recording, the late-step window, token choice and cleaning."""
    subject = Subject("dog", mode, c_s=torch.zeros(5, tiny.text_width) if mode == "hifi" else None)
    prompt = "a photo of a dog on the beach"
    positions = subject_token_positions(tiny, subject, prompt)
    region, decoy = (8, 24, 8, 24), (0, 8, 24, 32)  # on whole cells of the 4 x 4 and 8 x 8 layers
    _plant(monkeypatch, tiny, positions, region, decoy)
    drawn = first_pass(tiny, subject, prompt, 0, num_steps=STEPS)
    mask = AttentionSegmenter().segment(drawn.image, "dog", drawn.attention)[0]
    planted = torch.zeros(32, 32, dtype=torch.bool)
    planted[region[0] : region[1], region[2] : region[3]] = True
    iou = (mask & planted).sum() / (mask | planted).sum()
    assert iou > 0.9, f"IoU {float(iou):.2f}"


def test_observing_attention_changes_no_number_and_restores_the_processors(tiny):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = tiny.encode_text(["a dog", "a cat"]).detach()
    before = tiny.attn_processors
    with torch.no_grad():
        plain = tiny.denoise(x, 500, c)
        store = AttentionStore()
        with observed_attention(tiny, store):
            observed = tiny.denoise(x, 500, c)
        with pytest.raises(RuntimeError), observed_attention(tiny, store):
            raise RuntimeError("boom")
    assert torch.equal(plain, observed)
    assert tiny.attn_processors == before
    maps = store.maps[0]
    assert len(maps) == 7, "every cross-attention layer of the tiny UNet was seen"
    for m in maps.values():
        assert m.shape[0] == 2 and torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5)
    attention = subject_attention(store, [1, 2], batch=1)
    assert attention.shape == (1, 8, 8)


def test_vae_latent_embedder_ranks_a_perturbed_copy_closest(tiny):
    g = torch.Generator().manual_seed(1)
    sources = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    query = (sources[2:3] + 0.05 * torch.randn(1, 3, 32, 32, generator=g)).clamp(-1, 1)
    embedder = VaeLatentEmbedder(tiny)
    e = embedder.embed(torch.cat([sources, query]))
    assert e.shape[0] == 5 and e.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(e[4:], e[:4])
    assert int(cos.argmax()) == 2
    assert torch.allclose(torch.nn.functional.cosine_similarity(e[:1], e[:1]), torch.ones(1))


def test_template_captioner_and_the_protocols(tiny):
    assert TemplateCaptioner().caption(torch.zeros(2, 3, 8, 8), "can") == ["a photo of a can"] * 2
    perception = default_perception(tiny)
    assert isinstance(perception.segmenter, Segmenter)
    assert isinstance(perception.embedder, ImageEmbedder)
    assert isinstance(perception.captioner, Captioner)
    assert perception.describe() == {"segmenter": "attention", "embedder": "vae-latent", "captioner": "template"}
