"""Cross-attention control through diffusers' attention-processor seam.

:class:`ControlledAttnProcessor` computes attention as diffusers' reference
``AttnProcessor`` does, but hands every *cross*-attention probability tensor to a
controller, a callable ``controller(layer, probs, heads) -> probs`` (prompt-to-prompt's
shape, without its module globals). A controller never counts calls to know where it is:
the sampling loop tells it the step (``controller.step = i`` from a step callback).

:func:`controlled_attention` installs the processors on a backend for the length of a
``with`` block and always restores the previous ones, also after an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from hifi.protocols.denoiser import DenoiserBackend

__all__ = [
    "AttentionController",
    "AttentionStore",
    "ControlledAttnProcessor",
    "controlled_attention",
    "observed_attention",
]


class AttentionController(Protocol):
    """Sees (and may replace) cross-attention probabilities ``[B * heads, Q, K]``."""

    def __call__(self, layer: str, probs: Tensor, heads: int) -> Tensor: ...


class ControlledAttnProcessor:
    """diffusers' plain attention, with the cross-attention probabilities passed to a controller."""

    def __init__(self, layer: str, controller: AttentionController) -> None:
        self.layer = layer
        self.controller = controller

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if is_cross:
            probs = self.controller(self.layer, probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def controlled_attention(backend: DenoiserBackend, controller: AttentionController) -> Iterator[None]:
    """Route every attention layer of the backend's denoiser through ``controller``.

    The previous processors come back when the block ends, whatever happens inside it.
    """
    previous = backend.attn_processors
    backend.set_attn_processor({name: ControlledAttnProcessor(name, controller) for name in previous})
    try:
        yield
    finally:
        backend.set_attn_processor(previous)


class _ObservingProcessor:
    """Runs a layer's own attention processor unchanged and shows a controller its cross-attention.

    ``ControlledAttnProcessor`` recomputes attention with explicit probabilities,
    which moves the image by ~1e-6 (and gives up fused attention); an observer must not, so
    the probabilities are computed on the side, from the same query and key projections.
    The controller's return value is ignored.
    """

    def __init__(self, layer: str, inner: Any, controller: AttentionController) -> None:
        self.layer = layer
        self.inner = inner
        self.controller = controller

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is not None:
            with torch.no_grad():
                probs = self._probs(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
                self.controller(self.layer, probs, attn.heads)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    @staticmethod
    def _probs(
        attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor, attention_mask: Tensor | None,
        temb: Tensor | None,
    ) -> Tensor:
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch, length, _ = encoder_hidden_states.shape
        mask = attn.prepare_attention_mask(attention_mask, length, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        return attn.get_attention_scores(query, key, mask)


@contextlib.contextmanager
def observed_attention(backend: DenoiserBackend, controller: AttentionController) -> Iterator[None]:
    """Show ``controller`` every cross-attention probability tensor, changing nothing.

    Unlike :func:`controlled_attention` the layers keep their own processors
    (fused attention included), so the denoiser's outputs are bit-for-bit those without the
    block. The previous processors come back when the block ends, whatever happens inside.
    """
    previous = backend.attn_processors
    backend.set_attn_processor(
        {name: _ObservingProcessor(name, proc, controller) for name, proc in previous.items()}
    )
    try:
        yield
    finally:
        backend.set_attn_processor(previous)


class AttentionStore:
    """A controller that records head-averaged cross-attention maps and changes nothing.

    ``maps[step][layer]`` is ``[B, Q, K]`` (detached). Set :attr:`step` before each
    denoising step; layers whose query count is above ``max_queries`` are skipped to bound
    memory (Stable Diffusion's 64x64 layers), as prompt-to-prompt does.
    """

    def __init__(self, max_queries: int | None = None) -> None:
        self.step = 0
        self.max_queries = max_queries
        self.maps: dict[int, dict[str, Tensor]] = {}

    def __call__(self, layer: str, probs: Tensor, heads: int) -> Tensor:
        if self.max_queries is None or probs.shape[1] <= self.max_queries:
            mean = probs.detach().reshape(-1, heads, *probs.shape[1:]).mean(dim=1)
            self.maps.setdefault(self.step, {})[layer] = mean
        return probs

    def token_maps(self, steps: range | list[int] | None = None) -> Tensor:
        """Maps averaged over layers and the given steps, ``[B, side, side, K]``.

        Layers of every resolution are resized to the finest recorded one first.
        """
        chosen = sorted(self.maps) if steps is None else [s for s in steps if s in self.maps]
        if not chosen:
            raise ValueError("no attention maps were recorded for those steps")
        side = max(int(m.shape[1] ** 0.5) for s in chosen for m in self.maps[s].values())
        total: Tensor | None = None
        count = 0
        for s in chosen:
            for m in self.maps[s].values():
                b, q, k = m.shape
                r = int(q**0.5)
                grid = m.reshape(b, r, r, k).permute(0, 3, 1, 2)
                grid = torch.nn.functional.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
                total = grid if total is None else total + grid
                count += 1
        assert total is not None
        return (total / count).permute(0, 2, 3, 1)
