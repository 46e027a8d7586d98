"""Use a run with a stock diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``).

:func:`pipeline_inputs` turns a subject into the pipeline's ``prompt_embeds`` (the first
step's ``[c, c_s^T]``), ``negative_prompt_embeds`` (phi) and a ``callback_on_step_end``
that swaps in ``[c, c_s^t]`` before every later step (Eq. 7); for SDXL and SD 3 also the
pooled embeddings, ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds`` (SDXL's
pipeline computes the same default time ids itself)::

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from hifi import load_backend
    from hifi.io.diffusers_compat import pipeline_inputs
    from hifi.io.runs import apply_run, load_run

    backend = load_backend("sd14", model="/models/sd-v1-4")
    subject = apply_run(load_run("runs/can"), backend)
    pipe = StableDiffusionPipeline.from_pretrained("/models/sd-v1-4", safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe(num_inference_steps=50, guidance_scale=7.5,
                 **pipeline_inputs(backend, subject, "a <subject> on the beach", 50)).images[0]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hifi.algorithms.generate import step_conditions
from hifi.algorithms.subject import PLACEHOLDER, Subject
from hifi.errors import HifiError
from hifi.io.runs import SDXL_EMBEDDING_KEYS, load_tensors
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid
from hifi.protocols.denoiser import DenoiserBackend

__all__ = ["StepwiseEmbeddingsCallback", "load_sdxl_embedding", "pipeline_inputs"]


class StepwiseEmbeddingsCallback:
    """``callback_on_step_end`` that sets the conditional embedding of the next step.

    The pipeline calls it after step i; it puts ``conds[i + 1]`` in place of the
    conditional half of ``prompt_embeds`` (the first half, phi, is kept).
    """

    tensor_inputs = ["prompt_embeds"]

    def __init__(self, conds: list[Tensor]) -> None:
        self.conds = conds
        """The conditional sequence of every step, ``[c, c_s^t]`` for t = T..1."""

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
        if step + 1 >= len(self.conds):
            return callback_kwargs
        embeds = callback_kwargs["prompt_embeds"]
        nxt = self.conds[step + 1].to(embeds.device, embeds.dtype)
        if embeds.shape[0] == 2 * nxt.shape[0]:  # classifier-free guidance: [phi, c]
            nxt = torch.cat([embeds[: nxt.shape[0]], nxt])
        return {**callback_kwargs, "prompt_embeds": nxt}


PIPELINE_EXTRAS = {"text_embeds": "pooled_prompt_embeds", "pooled_projections": "pooled_prompt_embeds"}
"""The condition extras a stock pipeline takes as inputs, by its argument name (the negative
one is ``negative_`` + it). SDXL's ``time_ids`` are not among them: the pipeline computes the
same default (H, W, 0, 0, H, W) itself from ``height`` and ``width``."""
COMPUTED_EXTRAS = ("time_ids",)


def _extras(cond: Condition, prefix: str = "") -> dict[str, Tensor]:
    unknown = set(cond.extras) - set(PIPELINE_EXTRAS) - set(COMPUTED_EXTRAS)
    if unknown:
        raise HifiError(f"a stock pipeline takes no input for the condition extras {sorted(unknown)}")
    return {prefix + PIPELINE_EXTRAS[k]: v for k, v in cond.extras.items() if k in PIPELINE_EXTRAS}


def pipeline_inputs(backend: DenoiserBackend, subject: Subject, prompt: str, num_steps: int) -> dict[str, Any]:
    """Keyword arguments for a stock ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``) call with a
    DDIM scheduler; pass ``height`` and ``width`` at the backend's resolution for SDXL's time ids."""
    with torch.no_grad():
        conds = step_conditions(backend, subject, prompt, DdimGrid.build(backend.schedule, num_steps))
        phi = backend.null_embedding()
    return {
        "prompt_embeds": conds[0].sequence,
        "negative_prompt_embeds": phi.sequence,
        **_extras(conds[0]),
        **_extras(phi, "negative_"),
        "callback_on_step_end": StepwiseEmbeddingsCallback([c.sequence for c in conds]),
        "callback_on_step_end_tensor_inputs": StepwiseEmbeddingsCallback.tensor_inputs,
    }


def load_sdxl_embedding(pipe: Any, path: str | Path, token: str = PLACEHOLDER) -> None:
    """Load an SDXL classic-TI file (``{"clip_l": [1, 768], "clip_g": [1, 1280]}``) into a stock
    ``StableDiffusionXLPipeline``: each part with ``load_textual_inversion`` into its own text encoder."""
    tensors = load_tensors(Path(path))
    missing = [key for key in SDXL_EMBEDDING_KEYS if key not in tensors]
    if missing:
        raise HifiError(f"{path} is not an SDXL embedding: it has no {', '.join(missing)}")
    clip_l, clip_g = (tensors[key] for key in SDXL_EMBEDDING_KEYS)
    pipe.load_textual_inversion(clip_l, token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
