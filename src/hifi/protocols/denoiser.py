"""What the algorithms need from a model, as narrow protocols.

The core defines these; ``hifi_backends`` implements them and imports ``hifi``, never the
reverse. Algorithms import only these protocols, so a new Stable Diffusion version is a
new backend, not a change to any algorithm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from hifi.errors import HifiError
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import Schedule, Timestep

__all__ = [
    "ChannelsLastBackend",
    "DenoiserBackend",
    "GradientCheckpointingBackend",
    "LoraBackend",
    "Model",
    "TextualInversionBackend",
    "VocabularyBackend",
    "gradient_checkpointing",
    "lora_backend",
    "textual_inversion",
]

Model = Callable[[Tensor, Any, Condition], Tensor]
"""The model callable the algorithms run: ``model(x_t, t, cond) -> output`` (a backend's
``denoise``, an accelerated wrapper of it from :mod:`hifi.execution.edge`, or a function
with an exact answer in a test)."""


@runtime_checkable
class DenoiserBackend(Protocol):
    """A latent text-to-image diffusion model, as the paper's algorithms see it.

    Conventions: images are ``[B, 3, H, W]`` floats in [-1, 1]; latents are
    ``[B, latent_channels, H / vae_scale_factor, W / vae_scale_factor]``, already multiplied
    by the VAE's scaling factor; a text condition is a :class:`~hifi.kernels.condition.Condition`:
    the text encoder's full output sequence ``[B, max_length, text_width]`` (the c of the
    paper, including padding positions, whose last n slots c_s replaces) and the model's
    extra conditions, which no algorithm looks into (SDXL's pooled embedding and time ids;
    none for SD 1.x and 2.x).
    """

    name: str
    """Registry name of the backend that built this instance (``tiny``, ``sd14`` ...)."""
    model_id: str
    """Where the weights came from (a folder, a hub id, or ``random:<arch>:<seed>``)."""
    schedule: Schedule
    """The noise schedule; ``schedule.prediction_type`` says what :meth:`denoise` returns."""
    resolution: int
    """Native image side in pixels."""
    vae_scale_factor: int
    latent_channels: int
    max_length: int
    """Text sequence length L (77 for Stable Diffusion; SD 3: 77 CLIP positions + its T5 part, 256)."""
    text_width: int
    """Text embedding width D (768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode_text(
        self, prompts: Sequence[str], token_embeddings: Mapping[str, Tensor] | None = None
    ) -> Condition:
        """The text conditions of the prompts: sequences ``[B, L, D]`` and the model's extras.

        ``token_embeddings`` maps a placeholder word (e.g. ``"<hifi-subject>"``) to an
        input-embedding vector ``[D_in]`` that replaces that word's token embedding before
        the text encoder runs: the classic Textual Inversion parameterisation (Eq. 2),
        differentiable with respect to the vector (with several text encoders, D_in is
        their input widths one after another).
        """
        ...

    def token_ids(self, prompts: Sequence[str]) -> Tensor:
        """Token ids ``[B, L]`` as :meth:`encode_text` sees them (padded to ``max_length``).

        Prompt-to-prompt and the attention segmenter use them to find a word's positions.
        """
        ...

    def null_embedding(self) -> Condition:
        """phi, the null condition of classifier-free guidance, batch 1 (the empty prompt's, or zeros for SDXL)."""
        ...

    def denoise(self, x_t: Tensor, t: Timestep | Tensor, cond: Condition) -> Tensor:
        """The denoiser output (noise or v, per the schedule) for latents at timestep t."""
        ...

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> scaled latents (the posterior mean: deterministic)."""
        ...

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1]."""
        ...

    @property
    def attn_processors(self) -> dict[str, Any]:
        """The denoiser's attention processors by layer name (diffusers' processor seam)."""
        ...

    def set_attn_processor(self, processors: Mapping[str, Any] | Any) -> None:
        """Install attention processors: one for every layer, or a ``{name: processor}`` map."""
        ...

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters a full fine-tune (the DreamBooth variant) trains: the denoiser's."""
        ...

    def denoiser_state(self) -> dict[str, Tensor]:
        """The denoiser's weights, for saving a fine-tune."""
        ...

    def load_denoiser_state(self, state: Mapping[str, Tensor]) -> None:
        """Load denoiser weights saved by :meth:`denoiser_state` (a DreamBooth run)."""
        ...


@runtime_checkable
class TextualInversionBackend(Protocol):
    """A backend whose tokenizer can take a new word with a learnable input embedding (classic TI, Eq. 2)."""

    @property
    def input_widths(self) -> tuple[int, ...]:
        """Each text encoder's input-embedding width: a token vector is these parts, in order (SDXL: 768, 1280)."""
        ...

    def add_placeholder_token(self, word: str) -> int:
        """Add ``word`` as one new token (no-op when it is there already); its token id."""
        ...

    def input_embedding(self, word: str) -> Tensor:
        """The input-embedding vector ``[D_in]`` of a one-token word; a HifiError for other words."""
        ...


@runtime_checkable
class GradientCheckpointingBackend(Protocol):
    """A backend whose denoiser can recompute activations in the backward pass instead of keeping them."""

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Switch gradient checkpointing of the denoiser on or off (same gradients, less memory, more time)."""
        ...


@runtime_checkable
class LoraBackend(Protocol):
    """A backend whose denoiser can carry low-rank adapters (LoRA) on its attention projections.

    At most one LoRA is on the denoiser at a time: adding or loading one first removes any
    other, so runs applied one after another never stack. Adapter states are in the layout of
    diffusers' ``load_lora_weights`` (``unet.<module>.lora.down.weight`` and ``.lora.up.weight``),
    the file a stock pipeline reads.
    """

    def add_lora(self, rank: int, seed: int) -> None:
        """Put fresh adapters of rank ``rank`` on the denoiser, in place of any LoRA there.

        Up-projections start at zero (the model is unchanged), down-projections are drawn from
        ``seed``; the adapters' parameters are frozen until a tune switches them on.
        """
        ...

    def lora_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The adapters' parameters (none without a LoRA): what a LoRA tune trains."""
        ...

    def lora_state(self) -> dict[str, Tensor]:
        """The adapters' weights, in the ``load_lora_weights`` layout; a HifiError without a LoRA."""
        ...

    def load_lora_state(self, state: Mapping[str, Tensor]) -> None:
        """Load adapters saved by :meth:`lora_state` (their rank read from the shapes), in place of any LoRA."""
        ...

    def remove_lora(self) -> None:
        """Take any LoRA off the denoiser, leaving its base weights as they were (a no-op without one)."""
        ...


@contextlib.contextmanager
def gradient_checkpointing(backend: DenoiserBackend, on: bool = True) -> Iterator[None]:
    """The denoiser's gradient checkpointing on for a ``with`` block (a no-op when ``on`` is False);
    a clear error for a backend that cannot (:class:`GradientCheckpointingBackend`). Off again afterwards."""
    if not on:
        yield
        return
    if not isinstance(backend, GradientCheckpointingBackend):
        raise HifiError(f"backend {backend.name!r} cannot checkpoint its denoiser's activations")
    backend.set_gradient_checkpointing(True)
    try:
        yield
    finally:
        backend.set_gradient_checkpointing(False)


def textual_inversion(backend: DenoiserBackend) -> TextualInversionBackend:
    """``backend`` as a :class:`TextualInversionBackend`, or a clear error when it is not one."""
    if not isinstance(backend, TextualInversionBackend):
        raise HifiError(f"backend {backend.name!r} cannot learn or use a Textual Inversion token")
    return backend


def lora_backend(backend: DenoiserBackend) -> LoraBackend:
    """``backend`` as a :class:`LoraBackend`, or a clear error when it is not one."""
    if not isinstance(backend, LoraBackend):
        raise HifiError(f"backend {backend.name!r} cannot carry LoRA adapters (--lora-rank)")
    return backend


@runtime_checkable
class ChannelsLastBackend(Protocol):
    """A backend that can hold its denoiser in channels-last memory layout."""

    def set_channels_last(self, on: bool = True) -> None:
        """Hold the denoiser's weights channels-last (``on``) or in the default layout (no change of any number)."""
        ...


@runtime_checkable
class VocabularyBackend(Protocol):
    """A backend that can say what its tokenizer makes of a prompt, so the edge can warn or refuse first.

    A word the tokenizer does not know reaches the text encoder as pieces (or unknown
    tokens) the model never learned, so the model cannot draw what it names; a prompt
    longer than the text encoder's window is cut, and in ``hifi`` mode its last tokens
    would sit where c_s goes.
    """

    def unknown_words(self, prompts: Sequence[str]) -> tuple[str, ...]:
        """The words of ``prompts`` (lower case, each once, in order) that the tokenizer does not know."""
        ...

    def prompt_lengths(self, prompts: Sequence[str]) -> tuple[int, ...]:
        """Each prompt's token count, without the start and end tokens and before any truncation."""
        ...
