"""Laws of the Section 3.2 losses (Eq. 5, 6), the splice [c, c_s], and latent substitution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hifi.kernels.condition import Condition
from hifi.kernels.latents import binarize_mask, substitute_masked
from hifi.kernels.losses import (
    masked_mse,
    resize_mask,
    ridge_to_null,
    splice_subject,
    subject_slots,
)

seeds = st.integers(0, 2**16)


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=seeds, batch=st.integers(1, 3), side=st.sampled_from([4, 8, 16]))
def test_mask_of_ones_gives_plain_mse(seed, batch, side):
    pred, target = _rand(seed, batch, 4, side, side), _rand(seed + 1, batch, 4, side, side)
    ones = resize_mask(torch.ones(batch, side * 8, side * 8), (side, side))
    torch.testing.assert_close(masked_mse(pred, target, ones), F.mse_loss(pred, target))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=seeds, frac=st.floats(0.1, 0.9))
def test_nothing_outside_the_mask_receives_a_gradient(seed, frac):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2, 1, 8, 8, generator=g) < frac).float()
    mask[0, 0, 0, 0], mask[1, 0, 7, 7] = 1.0, 0.0  # both inside and outside are non-empty
    pred = _rand(seed, 2, 4, 8, 8).requires_grad_(True)
    masked_mse(pred, _rand(seed + 1, 2, 4, 8, 8), mask).backward()
    outside = (mask == 0).expand_as(pred)
    assert torch.all(pred.grad[outside] == 0)
    assert pred.grad[~outside].abs().sum() > 0


def test_masked_loss_is_the_mean_over_the_subject():
    pred, target = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    target[0, :, 0, 0] = 2.0  # error 4 per channel in one cell, inside the mask
    target[0, :, 1, 1] = 9.0  # large error outside the mask: ignored
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, :] = 1.0  # two cells
    assert masked_mse(pred, target, mask).item() == pytest.approx(2 * 4.0 / (2 * 2))


def test_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        masked_mse(torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), torch.zeros(1, 1, 2, 2))


def test_resize_mask_keeps_area_fractions():
    mask = torch.zeros(1, 16, 16)
    mask[0, :8, :] = 1.0  # top half
    small = resize_mask(mask, (2, 2))
    torch.testing.assert_close(small, torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]]))
    half = resize_mask(torch.ones(1, 3, 3).tril(), (1, 1))
    assert half.item() == pytest.approx(6 / 9)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=seeds, n=st.integers(1, 6), w_s=st.floats(0.0, 10.0))
def test_regulariser_gradient_is_2_ws_times_difference(seed, n, w_s):
    c_s = _rand(seed, n, 16).requires_grad_(True)
    phi_s = _rand(seed + 1, n, 16)
    ridge_to_null(c_s, phi_s, w_s).backward()
    torch.testing.assert_close(c_s.grad, 2 * w_s * (c_s.detach() - phi_s))


def test_regulariser_value():
    assert ridge_to_null(torch.ones(2, 3), torch.zeros(2, 3), 0.5).item() == pytest.approx(3.0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=seeds, n=st.integers(1, 7), batch=st.integers(1, 3))
def test_splice_with_own_last_positions_returns_c(seed, n, batch):
    c = Condition(_rand(seed, batch, 8, 5))
    torch.testing.assert_close(splice_subject(c, subject_slots(c, n)).sequence, c.sequence)


def test_splice_replaces_only_the_last_n_positions():
    c = Condition(torch.zeros(2, 6, 3))
    c_s = torch.ones(2, 3)
    out = splice_subject(c, c_s).sequence
    assert out.shape == c.sequence.shape
    assert out[:, :4].abs().sum() == 0 and (out[:, 4:] == 1).all()
    with pytest.raises(ValueError):
        splice_subject(c, torch.ones(6, 3))


def test_splice_passes_gradient_to_c_s_only_at_its_slots():
    c = torch.zeros(1, 6, 3, requires_grad=True)
    c_s = torch.zeros(2, 3, requires_grad=True)
    splice_subject(Condition(c), c_s).sequence.sum().backward()
    assert (c_s.grad == 1).all()
    assert (c.grad[:, :4] == 1).all() and (c.grad[:, 4:] == 0).all()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=seeds, frac=st.floats(0.0, 1.0))
def test_substitution_changes_only_masked_latents(seed, frac):
    g = torch.Generator().manual_seed(seed)
    x, x_star = _rand(seed, 2, 4, 8, 8), _rand(seed + 1, 2, 4, 8, 8)
    mask = binarize_mask((torch.rand(2, 1, 8, 8, generator=g) < frac).float())
    out = substitute_masked(x, x_star, mask)
    m = mask.expand_as(x)
    assert torch.equal(out[m], x_star[m])
    assert torch.equal(out[~m], x[~m])


def test_substitution_needs_a_boolean_mask():
    with pytest.raises(TypeError):
        substitute_masked(torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), torch.ones(1, 1, 2, 2))
