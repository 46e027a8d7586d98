"""Masked latent substitution of Algorithm 2: ``x_t[M] = x*_t[M]``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["binarize_mask", "substitute_masked"]


def binarize_mask(mask: Tensor, threshold: float = 0.5) -> Tensor:
    """A soft latent-grid mask ``[B, 1, h, w]`` in [0, 1] -> a boolean mask of the same shape."""
    return mask > threshold


def substitute_masked(x: Tensor, x_star: Tensor, mask: Tensor) -> Tensor:
    """Algorithm 2, at t = t_s: the latents under the mask come from the reference trajectory.

    ``x`` and ``x_star`` are ``[B, C, h, w]``; ``mask`` is boolean ``[B or 1, 1, h, w]`` and
    broadcasts over channels. Returns a new tensor (``x`` is not modified); gradients flow
    to ``x`` outside the mask and to ``x_star`` inside it.
    """
    if mask.dtype != torch.bool:
        raise TypeError("mask must be boolean; use binarize_mask on a soft mask")
    if x.shape != x_star.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_star {tuple(x_star.shape)} differ in shape")
    return torch.where(mask, x_star, x)
