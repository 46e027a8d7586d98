"""Use a run with a stock diffusers ``StableDiffusionPipeline``, without hifi's generation code.

:func:`pipeline_inputs` turns a subject into the pipeline's ``prompt_embeds`` (the first
step's ``[c, c_s^T]``), ``negative_prompt_embeds`` (phi) and a ``callback_on_step_end``
that swaps in ``[c, c_s^t]`` before every later step (Eq. 7)::

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

from typing import Any

import torch
from torch import Tensor

from hifi.algorithms.generate import step_conditions
from hifi.algorithms.subject import Subject
from hifi.kernels.ddim import DdimGrid
from hifi.protocols.denoiser import DenoiserBackend

__all__ = ["StepwiseEmbeddingsCallback", "pipeline_inputs"]


class StepwiseEmbeddingsCallback:
    """``callback_on_step_end`` that sets the conditional embedding of the next step.

    The pipeline calls it after step i; it puts ``conds[i + 1]`` in place of the
    conditional half of ``prompt_embeds`` (the first half, phi, is kept).
    """

    tensor_inputs = ["prompt_embeds"]

    def __init__(self, conds: list[Tensor]) -> None:
        self.conds = conds

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
        if step + 1 >= len(self.conds):
            return callback_kwargs
        embeds = callback_kwargs["prompt_embeds"]
        nxt = self.conds[step + 1].to(embeds.device, embeds.dtype)
        if embeds.shape[0] == 2 * nxt.shape[0]:  # classifier-free guidance: [phi, c]
            nxt = torch.cat([embeds[: nxt.shape[0]], nxt])
        return {**callback_kwargs, "prompt_embeds": nxt}


def pipeline_inputs(backend: DenoiserBackend, subject: Subject, prompt: str, num_steps: int) -> dict[str, Any]:
    """Keyword arguments for a stock ``StableDiffusionPipeline`` call with a DDIM scheduler."""
    with torch.no_grad():
        conds = step_conditions(backend, subject, prompt, DdimGrid.build(backend.schedule, num_steps))
        phi = backend.null_embedding()
    return {
        "prompt_embeds": conds[0],
        "negative_prompt_embeds": phi,
        "callback_on_step_end": StepwiseEmbeddingsCallback(conds),
        "callback_on_step_end_tensor_inputs": StepwiseEmbeddingsCallback.tensor_inputs,
    }
