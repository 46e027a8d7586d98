"""Null-text inversion (Eq. 3, Eq. 4): exact-answer stand-in models and the tiny backend."""

from __future__ import annotations

import pytest
import torch

from hifi.algorithms.null_text import NullTextConfig, null_text_inversion, null_text_sample
from hifi.algorithms.sampling import ddim_sample
from hifi.errors import HifiError
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid, Schedule

SD_SCHEDULE = Schedule.from_config(
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False,
     "steps_offset": 1}
)


class StandIn:
    """eps(x, t, c) = 0.1 x + 0.5 tanh(first entries of c) (1 + t/1000): any output is one phi away.

    Records, for every call, whether it was the conditional branch and whether autograd was on.
    """

    def __init__(self, cond: Condition) -> None:
        self.cond = cond
        self.calls: list[tuple[bool, bool]] = []

    def __call__(self, x: torch.Tensor, t: int, c: Condition) -> torch.Tensor:
        self.calls.append((c is self.cond, torch.is_grad_enabled()))
        return 0.1 * x + 0.5 * torch.tanh(c.sequence.flatten(1)[:, : x[0].numel()]).view_as(x) * (1 + t / 1000)


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    x_0, cond = torch.randn(1, 2, 2, 2, generator=g), Condition(torch.randn(1, 4, 3, generator=g))
    return x_0, cond, Condition(torch.zeros(1, 4, 3))


def test_null_text_recovers_the_image_when_phi_can_express_the_correction(problem):
    x_0, cond, phi = problem
    model = StandIn(cond)
    config = NullTextConfig(num_steps=10, inner_steps=100, lr=5e-2)
    inv = null_text_inversion(model, DdimGrid.build(SD_SCHEDULE, config.num_steps), x_0, cond, phi, config)
    plain = ddim_sample(model, DdimGrid.build(SD_SCHEDULE, 10), inv.x_T, cond, uncond=phi, guidance=7.5)
    assert (plain - x_0).pow(2).mean() > 100, "plain guided DDIM from x*_T misses x_0 by far"
    assert (inv.reconstruction - x_0).pow(2).mean() < 1e-4
    assert all(loss < 1e-5 or k == 100 for loss, k in zip(inv.losses, inv.iterations, strict=True))
    assert min(inv.iterations) < 100, "early stopping ends some steps before K"
    again = null_text_sample(model, DdimGrid.build(SD_SCHEDULE, inv.num_steps), inv.x_T, cond, inv.phis, guidance=7.5)
    torch.testing.assert_close(again, inv.reconstruction)


def test_the_conditional_branch_runs_once_per_step_without_gradients(problem):
    x_0, cond, phi = problem
    model = StandIn(cond)
    config = NullTextConfig(num_steps=6, inner_steps=3, tolerance=0)
    inv = null_text_inversion(model, DdimGrid.build(SD_SCHEDULE, config.num_steps), x_0, cond, phi, config)
    conditional = [grad for is_cond, grad in model.calls if is_cond]
    assert len(conditional) == 6 + 6, "6 inversion steps, then once per denoising step"
    assert not any(conditional)
    unconditional = [grad for is_cond, grad in model.calls if not is_cond]
    assert len(unconditional) == 6 * (3 + 1), "K updates and the step to x_{t-1}"
    assert unconditional == [True, True, True, False] * 6, "the step to x_{t-1} needs no gradients"
    assert inv.iterations == (3,) * 6
    assert len(inv.phis) == 6 and len(inv.trajectory) == 7
    assert not any(p.sequence.requires_grad for p in inv.phis)


def test_a_loose_tolerance_leaves_phi_untouched(problem):
    x_0, cond, phi = problem
    inv = null_text_inversion(StandIn(cond), DdimGrid.build(SD_SCHEDULE, 4), x_0, cond, phi,
                              NullTextConfig(num_steps=4, tolerance=1e9))
    assert inv.iterations == (0,) * 4
    assert all(torch.equal(p.sequence, phi.sequence) for p in inv.phis)


def test_null_text_works_under_no_grad(problem):
    x_0, cond, phi = problem
    with torch.no_grad():
        inv = null_text_inversion(
            StandIn(cond), DdimGrid.build(SD_SCHEDULE, 3), x_0, cond, phi,
            NullTextConfig(num_steps=3, inner_steps=2, lr=0.1),
        )
    assert not all(torch.equal(p.sequence, phi.sequence) for p in inv.phis)


def test_bad_settings_are_clear_errors():
    with pytest.raises(HifiError, match="inner_steps >= 0"):
        NullTextConfig(inner_steps=-1)
    with pytest.raises(HifiError, match="lr > 0"):
        NullTextConfig(lr=0)


@pytest.fixture(scope="module")
def tiny_inversion(tiny):
    image = torch.full((1, 3, 32, 32), -0.6)
    image[:, 0, 8:24, 10:22] = 0.8
    image[:, 1, 8:24, 10:22] = 0.2
    with torch.no_grad():
        x_0 = tiny.encode_images(image)
        cond = tiny.encode_text(["a photo of a cat on the beach"])
    phi = tiny.null_embedding()
    config = NullTextConfig(guidance=7.5, num_steps=8, inner_steps=4, lr=5e-2)
    inv = null_text_inversion(tiny.denoise, DdimGrid.build(tiny.schedule, config.num_steps), x_0, cond, phi, config)
    with torch.no_grad():
        plain = ddim_sample(tiny.denoise, DdimGrid.build(tiny.schedule, 8), inv.x_T, cond, uncond=phi, guidance=7.5)
    return x_0, cond, inv, plain


def test_null_text_reconstructs_better_than_plain_ddim_inversion(tiny_inversion):
    x_0, _, inv, plain = tiny_inversion
    torch.testing.assert_close(inv.trajectory[0], x_0)
    null_text_error = (inv.reconstruction - x_0).pow(2).mean().item()
    plain_error = (plain - x_0).pow(2).mean().item()
    print(f"tiny, w=7.5, 8 steps, K=4, lr=5e-2: latent MSE null-text {null_text_error:.4f}, plain {plain_error:.4f}")
    assert null_text_error < 0.5 * plain_error


def test_the_learned_phis_retrace_the_reconstruction(tiny, tiny_inversion):
    _, cond, inv, _ = tiny_inversion
    with torch.no_grad():
        grid = DdimGrid.build(tiny.schedule, inv.num_steps)
        again = null_text_sample(tiny.denoise, grid, inv.x_T, cond, inv.phis, guidance=7.5)
    torch.testing.assert_close(again, inv.reconstruction, atol=1e-3, rtol=1e-4)
    assert all(p.sequence.shape == tiny.null_embedding().sequence.shape and p.extras == {} for p in inv.phis)


def test_the_naive_loop_gives_the_same_phis(tiny):
    """The benchmark's naive twin (both branches recomputed with gradients) learns the same phis."""
    g = torch.Generator().manual_seed(5)
    x_0 = torch.randn(1, 4, 8, 8, generator=g)
    cond = tiny.encode_text(["a photo of a dog"])
    phi = tiny.null_embedding()
    fast, naive = (
        null_text_inversion(tiny.denoise, DdimGrid.build(tiny.schedule, 4), x_0, cond, phi,
                            NullTextConfig(num_steps=4, inner_steps=2, lr=5e-2, naive=flag))
        for flag in (False, True)
    )
    # Batched and separate calls round differently, and Adam turns a near-zero gradient's
    # rounding into a step of up to lr: measured worst element 7e-4 (lr 5e-2).
    for a, b in zip(fast.phis, naive.phis, strict=True):
        torch.testing.assert_close(a.sequence, b.sequence, atol=5e-3, rtol=0)
    torch.testing.assert_close(fast.reconstruction, naive.reconstruction, atol=1e-3, rtol=1e-3)
    assert fast.iterations == naive.iterations
