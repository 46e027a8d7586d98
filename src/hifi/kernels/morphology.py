"""Binary-mask morphology on small grids: Otsu's threshold, dilation, largest component, hole filling.

Pure functions on ``[h, w]`` tensors, used to turn a cross-attention map into a clean
subject mask (:class:`hifi.perception.AttentionSegmenter`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dilate", "fill_holes", "largest_component", "otsu_threshold"]


def otsu_threshold(values: Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist = torch.histc(values.float().flatten(), bins=bins, min=0.0, max=1.0)
    p = hist / hist.sum()
    centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    w0 = p.cumsum(0)
    m0 = (p * centres).cumsum(0)
    mean = m0[-1]
    between = (mean * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    return float((int(between[:-1].argmax()) + 1) / bins)


def dilate(mask: Tensor, cross: bool) -> Tensor:
    """One dilation of a ``[h, w]`` bool mask, 8-connected (3x3) or 4-connected (cross)."""
    if not cross:
        return F.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    out = mask.clone()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def largest_component(mask: Tensor) -> Tensor:
    """The largest 8-connected component of a ``[h, w]`` bool mask (all False if empty).

    Labels spread by repeated 3x3 max-pooling within the mask until they settle: fine for
    the attention grids this is meant for (at most 64 x 64).
    """
    if not bool(mask.any()):
        return mask.clone()
    h, w = mask.shape
    inside = mask.float()
    labels = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(h, w) * inside
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * inside
        if torch.equal(grown, labels):
            break
        labels = grown
    ids = labels.long().flatten()
    counts = torch.bincount(ids, minlength=h * w + 1)
    counts[0] = 0
    return labels.long() == int(counts.argmax())


def fill_holes(mask: Tensor) -> Tensor:
    """Fill the background regions of a ``[h, w]`` bool mask that do not touch the border."""
    background = ~mask
    border = torch.zeros_like(mask)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    outside = background & border
    while True:
        grown = dilate(outside, cross=True) & background
        if torch.equal(grown, outside):
            break
        outside = grown
    return ~outside
