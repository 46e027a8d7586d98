"""Prompt-to-prompt cross-attention control (Hertz et al.), as Algorithm 3 uses it.

Controllers are callables ``controller(layer, probs, heads) -> probs`` that
:func:`hifi.algorithms.attention.controlled_attention` installs through diffusers' attention-processor
seam. They are built from plain values (which rows of the batch are the reconstruction
and the edit, and where each edited token's map comes from) and never count calls: a
controller does the same thing at every layer and step it is called at.

Memory: Algorithm 3 stores the reconstruction's maps a_t^{r*} for every step and injects
them while generating the edit. Kept per head for every cross-attention layer, that is
gigabytes for Stable Diffusion at 512 px and 50 steps. Instead the reconstruction and the
edit run as one batch (as prompt-to-prompt does): at each layer the reconstruction row's
maps are a_t^{r*} of that layer and step, and :class:`AttentionReplace` copies them into the
edit row on the fly. The reconstruction row is never changed, so it follows exactly the
trajectory it would follow alone.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from hifi.algorithms.attention import AttentionController

__all__ = ["AttentionMean", "AttentionReplace", "chain", "inject_maps"]


def inject_maps(source: Tensor, target: Tensor, index: Tensor, own: Tensor) -> Tensor:
    """The maps of the modified step F~ of Algorithm 3: stored maps for all but the own tokens.

    ``source`` (the reconstruction's a_t^{r*}) and ``target`` (the edit's) are ``[..., Q, K]``
    cross-attention probabilities; ``index`` ``[K]`` gives, for each target token, its
    source token (-1: none, see :func:`hifi.kernels.token_align.align_tokens`); ``own``
    ``[K]`` marks the tokens that keep the edit's own maps (``[c_s^t, w_g]``). Token j of
    the result is ``source[..., index[j]]`` where ``index[j] >= 0`` and not ``own[j]``, else
    ``target[..., j]``. Rows are not renormalised, as in prompt-to-prompt.
    """
    if index.shape[-1] != target.shape[-1] or own.shape != index.shape:
        raise ValueError(
            f"index {tuple(index.shape)} and own {tuple(own.shape)} must have one entry per token"
            f" of the maps ({target.shape[-1]})"
        )
    index = index.to(target.device)
    inject = (index >= 0) & ~own.to(target.device)
    return target.where(~inject, source[..., index.clamp(min=0)])


class AttentionReplace:
    """Cross-attention control of Algorithm 3: the edit row gets the reconstruction row's maps.

    ``probs`` arrive as ``[B * heads, Q, K]``; sample ``source_row`` of the batch is the
    reconstruction, ``target_row`` the edit (see :func:`inject_maps` for ``index`` and
    ``own``). Every other row passes unchanged (the unconditional branch is not edited,
    as in prompt-to-prompt).
    """

    def __init__(self, index: Tensor, own: Tensor, source_row: int, target_row: int) -> None:
        self.index = index
        self.own = own
        self.source_row = source_row
        self.target_row = target_row

    def __call__(self, layer: str, probs: Tensor, heads: int) -> Tensor:
        per_sample = probs.reshape(-1, heads, *probs.shape[1:])
        out = per_sample.clone()
        out[self.target_row] = inject_maps(
            per_sample[self.source_row], per_sample[self.target_row], self.index, self.own
        )
        return out.reshape(probs.shape)


class AttentionMean:
    """Running mean of the head-averaged cross-attention maps of some batch rows.

    Every map is resized to ``side x side`` on arrival and summed, so memory stays at one
    ``[rows, side, side, K]`` tensor whatever the number of layers and steps (unlike
    :class:`hifi.algorithms.attention.AttentionStore`, which keeps every step and layer).
    """

    def __init__(self, rows: tuple[int, ...], side: int) -> None:
        self.rows = rows
        self.side = side
        self.total: Tensor | None = None
        self.count = 0

    def __call__(self, layer: str, probs: Tensor, heads: int) -> Tensor:
        maps = probs.detach().reshape(-1, heads, *probs.shape[1:])[list(self.rows)].mean(dim=1).float()
        r, q, k = maps.shape
        grid = maps.reshape(r, int(q**0.5), int(q**0.5), k).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(self.side, self.side), mode="bilinear", align_corners=False)
        self.total = grid if self.total is None else self.total + grid
        self.count += 1
        return probs

    def maps(self) -> Tensor:
        """The mean maps ``[rows, side, side, K]``."""
        if self.total is None:
            raise ValueError("no cross-attention maps were seen")
        return (self.total / self.count).permute(0, 2, 3, 1)


def chain(*controllers: AttentionController) -> AttentionController:
    """One controller that applies ``controllers`` in order (each sees the previous one's output)."""

    def run(layer: str, probs: Tensor, heads: int) -> Tensor:
        for controller in controllers:
            probs = controller(layer, probs, heads)
        return probs

    return run
