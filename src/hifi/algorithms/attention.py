"""Cross-attention control through diffusers' attention-processor seam.

:class:`ControlledAttnProcessor` computes attention as diffusers' reference
``AttnProcessor`` does, but hands every *cross*-attention probability tensor to a
controller, a callable ``controller(layer, probs, heads) -> probs`` (prompt-to-prompt's
shape, without its module globals). An MMDiT's joint attention (SD 3: image and text
tokens in one softmax, an ``Attention`` with ``add_q_proj``) hands over its image-to-text
block, ``[B * heads, image tokens, text tokens]``, the same shape a UNet's cross-attention
has: a controller does not know which it sees. A replaced block keeps the rest of its rows
(the image-to-image part) as they were. A controller never counts calls to know where it is:
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
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if _is_joint(attn):
            return _joint_attention(attn, hidden_states, encoder_hidden_states, self.layer, self.controller)
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


def _is_joint(attn: Any) -> bool:
    """An MMDiT's joint attention (image and text tokens attend together), not a UNet's cross-attention."""
    return getattr(attn, "add_q_proj", None) is not None


def _heads(attn: Any, x: Tensor, project: Any, norm: Any) -> Tensor:
    """``project(x)`` as ``[B, heads, N, head_dim]``, normed as diffusers' joint processor norms it."""
    out = project(x)
    out = out.view(x.shape[0], -1, attn.heads, out.shape[-1] // attn.heads).transpose(1, 2)
    return norm(out) if norm is not None else out


def _joint_attention(attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None, layer: str,
                     controller: AttentionController | None, observe_only: bool = False) -> Any:
    """diffusers' ``JointAttnProcessor2_0`` with explicit probabilities, the image-to-text block shown to
    (and, unless ``observe_only``, replaced by) ``controller``. A block without text (SD 3.5's second,
    self-only attention) runs uncontrolled."""
    n_image = hidden_states.shape[1]
    query = _heads(attn, hidden_states, attn.to_q, attn.norm_q)
    key = _heads(attn, hidden_states, attn.to_k, attn.norm_k)
    value = _heads(attn, hidden_states, attn.to_v, None)
    if encoder_hidden_states is not None:
        query = torch.cat([query, _heads(attn, encoder_hidden_states, attn.add_q_proj, attn.norm_added_q)], dim=2)
        key = torch.cat([key, _heads(attn, encoder_hidden_states, attn.add_k_proj, attn.norm_added_k)], dim=2)
        value = torch.cat([value, _heads(attn, encoder_hidden_states, attn.add_v_proj, None)], dim=2)
    batch, heads, tokens, head_dim = query.shape
    probs = (query @ key.transpose(-1, -2) * head_dim**-0.5).softmax(dim=-1)
    if encoder_hidden_states is not None and controller is not None:
        block = probs[:, :, :n_image, n_image:].reshape(batch * heads, n_image, tokens - n_image)
        replaced = controller(layer, block, heads)
        if not observe_only:
            image_rows = torch.cat([probs[:, :, :n_image, :n_image], replaced.reshape(batch, heads, n_image, -1)], -1)
            probs = torch.cat([image_rows, probs[:, :, n_image:]], dim=2)
    if observe_only:
        return None
    out = (probs @ value).transpose(1, 2).reshape(batch, tokens, heads * head_dim).to(query.dtype)
    hidden, text = out[:, :n_image], out[:, n_image:]
    hidden = attn.to_out[1](attn.to_out[0](hidden))
    if encoder_hidden_states is None:
        return hidden
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    return hidden, text


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
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if _is_joint(attn):
            if encoder_hidden_states is not None:
                with torch.no_grad():
                    _joint_attention(attn, hidden_states, encoder_hidden_states, self.layer, self.controller,
                                     observe_only=True)
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
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
