"""The subject-learning losses of Section 3.2: the noise loss (Eq. 2), its masked form (Eq. 5)
and the ridge-to-null regulariser (Eq. 6), with the splice ``[c, c_s]`` they act through.

Pure functions: no state, no device moves, differentiable throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hifi.kernels.condition import Condition

__all__ = [
    "masked_mse",
    "masked_mse_per_sample",
    "noise_loss",
    "resize_mask",
    "ridge_to_null",
    "splice_subject",
    "subject_slots",
]


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a subject mask ``[B, H, W]`` or ``[B, 1, H, W]`` to a latent grid ``[B, 1, h, w]``.

    Area interpolation: each latent cell gets the fraction of its pixels that belong to
    the subject, a soft version of the binary M of Eq. 5 that does not lose thin subjects
    on the 8x coarser latent grid. A mask of ones stays ones.
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
    mask = mask.to(torch.float32) if not mask.is_floating_point() else mask
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="area")


def noise_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """The noise loss of Eq. 2, ``||eps_theta(x_t, [c, c_s]) - eps||^2`` as a mean, or Eq. 5 with ``mask``.

    In float32 whatever the model's dtype; with a mask it is :func:`masked_mse`.
    """
    pred, target = pred.float(), target.float()
    return F.mse_loss(pred, target) if mask is None else masked_mse(pred, target, mask)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked noise loss, Eq. 5: ``||M * (eps_theta(x_t, [c, c_s]) - eps)||^2``, normalised.

    ``pred`` and ``target`` are ``[B, C, h, w]``; ``mask`` is ``[B, 1, h, w]`` (see
    :func:`resize_mask`) with values in [0, 1]. Normalisation: the weighted sum of squared
    errors divided by ``C * sum(M)``, i.e. the mean squared error over the subject's
    latent cells. So a mask of ones gives exactly ``F.mse_loss(pred, target)``, and the
    loss scale does not depend on how large the subject is in the photo. Cells outside
    the mask receive no gradient. An all-zero mask is an error (nothing to learn from);
    that check reads the sum back, so it is skipped inside ``torch.compile`` and CUDA-graph
    capture (:mod:`hifi.execution.fastpath`), where callers check their masks once beforehand.
    """
    if mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match prediction {tuple(pred.shape)};"
            " resize it with resize_mask first"
        )
    weight = mask.to(pred.dtype)
    denom = weight.sum() * pred.shape[1]
    if not _tracing() and float(denom) <= 0:
        raise ValueError("the subject mask is empty: every pixel is background")
    return (weight * (pred - target) ** 2).sum() / denom


def masked_mse_per_sample(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """:func:`masked_mse` of each sample of a batch, ``[B]``: each over its own mask.

    Their sum is the loss of a batch whose samples are optimised together but must keep
    their own gradients (each sample's term depends on its own parameters only); for
    B = 1 it is :func:`masked_mse`. Every mask must be non-empty (checked as there).
    """
    if mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match prediction {tuple(pred.shape)};"
            " resize it with resize_mask first"
        )
    weight = mask.to(pred.dtype)
    denom = weight.flatten(1).sum(dim=1) * pred.shape[1]
    if not _tracing() and not bool((denom > 0).all()):
        raise ValueError("a subject mask is empty: every pixel is background")
    return (weight * (pred - target) ** 2).flatten(1).sum(dim=1) / denom


def _tracing() -> bool:
    """Inside torch.compile or a CUDA-graph capture, where reading a value back is not allowed."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def ridge_to_null(c_s: Tensor, phi_s: Tensor, w_s: float) -> Tensor:
    """Ridge-to-null regulariser of Eq. 6: ``w_s * ||c_s - phi_s||_2^2`` (a plain sum).

    ``phi_s`` is the last n positions of the null-text embedding phi, where c_s starts.
    Its gradient with respect to c_s is ``2 * w_s * (c_s - phi_s)``.
    """
    return w_s * ((c_s - phi_s) ** 2).sum()


def subject_slots(condition: Condition, n: int) -> Tensor:
    """The last n positions of a condition's text sequence ``[B, L, D]`` -> ``[B, n, D]``.

    Applied to the null condition phi this is phi_s, the start and anchor of c_s.
    """
    sequence = condition.sequence
    if not 0 < n < sequence.shape[-2]:
        raise ValueError(f"n must be in 1..{sequence.shape[-2] - 1}, got {n}")
    return sequence[..., -n:, :]


def splice_subject(c: Condition, c_s: Tensor) -> Condition:
    """The splice ``[c, c_s]`` of Eq. 6 and 7: replace the last n positions of c's sequence with c_s.

    ``c`` holds a text-encoder output ``[B, L, D]`` (its extras, e.g. SDXL's pooled
    embedding, stay the prompt's); ``c_s`` is ``[n, D]`` (shared by the batch) or
    ``[B, n, D]``. The last positions of a CLIP output are padding, so with c_s equal to
    them the splice returns c unchanged.
    """
    sequence = c.sequence
    n = c_s.shape[-2]
    if not 0 < n < sequence.shape[-2]:
        raise ValueError(f"c_s has {n} tokens but the sequence has only {sequence.shape[-2]} positions")
    if c_s.dim() == 2:
        c_s = c_s.unsqueeze(0)
    c_s = c_s.to(sequence.dtype).expand(sequence.shape[0], -1, -1)
    return c.with_sequence(torch.cat([sequence[:, :-n], c_s], dim=1))
