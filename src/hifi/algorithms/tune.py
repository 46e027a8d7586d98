"""Learning the subject (Section 3.2): :func:`tune` runs one mode's loop on a subject's photos.

The modes: ``hifi`` (c_s by Eq. 5 and 6, then step-wise c_s^t by Algorithm 1:
:mod:`hifi.algorithms.tune_hifi`), and the baselines ``classic-ti`` (Eq. 2) and
``dreambooth`` (the whole denoiser, or LoRA adapters: :mod:`hifi.algorithms.tune_baselines`).
Settings, loop state and checkpointing are in :mod:`hifi.algorithms.tune_loop`.

Costs kept out of the loops: the caption is encoded once (the text encoder never runs
inside the HiFi and DreamBooth loops; it must for classic TI, which learns an *input*
embedding); the UNet is frozen in the embedding modes; all source images go in one batch.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from hifi.algorithms.subject import Subject
from hifi.algorithms.tune_baselines import tune_classic_ti, tune_dreambooth
from hifi.algorithms.tune_hifi import tune_hifi
from hifi.algorithms.tune_loop import Checkpointer, StepHook, TuneConfig, TuneLoop, caption_for
from hifi.errors import HifiError
from hifi.execution.edge import StepFactory, adam_steps
from hifi.kernels.losses import resize_mask
from hifi.protocols.denoiser import DenoiserBackend, Model, gradient_checkpointing

__all__ = ["Checkpointer", "TuneConfig", "TuneResult", "caption_for", "tune"]


@attrs.frozen(eq=False)
class TuneResult:
    """The learned subject, the loss log, and (dreambooth) the fine-tuned denoiser weights or LoRA adapters."""

    subject: Subject
    losses: list[dict[str, Any]]
    caption: str
    denoiser_state: dict[str, Tensor] | None = None
    lora_state: dict[str, Tensor] | None = None
    """DreamBooth with ``lora_rank``: the adapters, in diffusers' ``load_lora_weights`` layout."""



def tune(
    backend: DenoiserBackend,
    images: Tensor,
    class_name: str,
    *,
    masks: Tensor | None = None,
    config: TuneConfig | None = None,
    checkpointer: Checkpointer | None = None,
    on_step: StepHook | None = None,
    model: Model | None = None,
    optimiser: StepFactory = adam_steps,
) -> TuneResult:
    """Learn a subject from its photos.

    Args:
        backend: the model (its weights stay frozen except in ``dreambooth`` mode, which
            fine-tunes the backend's denoiser in place, or with ``lora_rank`` leaves the trained
            LoRA adapters on it).
        images: ``[B, 3, H, W]`` in [-1, 1] at the backend's resolution, B = 3..6 photos.
        class_name: the subject's class word ("dog").
        masks: ``[B, H, W]`` subject masks in {0, 1} (None: all ones).
        config: the settings (:class:`TuneConfig`).
        checkpointer: where to keep resumable state; if it holds a state, the tune resumes.
        on_step: called after every optimisation step with (stage, step, loss).
        model: the denoiser callable, ready from the edge (default ``backend.denoise``).
        optimiser: makes the Adam-step runners of the c_s loops (default eager Adam;
            :meth:`hifi.execution.edge.Execution.runner` compiles or captures them).
    """
    config = config or TuneConfig()
    if config.mode == "hifi" and not config.num_tokens < backend.max_length - 1:
        raise HifiError(f"--tokens {config.num_tokens} leaves no room for the caption: c_s takes the last n of"
                        f" {backend.max_length} positions, so n must be at most {backend.max_length - 2}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise HifiError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if masks is None:
        masks = torch.ones(images.shape[0], *images.shape[-2:])
    if masks.shape[0] != images.shape[0]:
        raise HifiError(f"{masks.shape[0]} masks for {images.shape[0]} images")
    if (masks.flatten(1).sum(dim=1) == 0).any():
        raise HifiError("a subject mask is empty: every pixel is background")
    with torch.no_grad():
        latents = backend.encode_images(images)
    latent_masks = resize_mask(masks.to(latents.device, torch.float32), (latents.shape[-2], latents.shape[-1]))
    loop = TuneLoop(backend, model or backend.denoise, latents, latent_masks if config.use_mask else None, config,
                    checkpointer, on_step)
    resume = checkpointer.load() if checkpointer is not None else None
    if resume is not None and resume.get("config") != config.resolved():
        raise HifiError(
            "the checkpoint was made with other settings; resume with the same flags, or start"
            f" a new run folder (saved: {resume.get('config')}, now: {config.resolved()})"
        )
    caption = caption_for(config.mode, class_name)
    denoiser_state = lora_state = None
    with gradient_checkpointing(backend, config.gradient_checkpointing):
        if config.mode == "hifi":
            subject = attrs.evolve(tune_hifi(loop, caption, optimiser, resume), class_name=class_name)
        elif config.mode == "classic-ti":
            subject = tune_classic_ti(loop, class_name, resume)
        else:
            weights = tune_dreambooth(loop, class_name, resume)
            denoiser_state, lora_state = (weights, None) if config.lora_rank is None else (None, weights)
            subject = Subject(class_name=class_name, mode="dreambooth")
    return TuneResult(subject=subject, losses=loop.losses, caption=caption, denoiser_state=denoiser_state,
                      lora_state=lora_state)
