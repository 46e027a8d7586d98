"""The baselines of Table 2 as tuning loops: classic Textual Inversion (Eq. 2) and DreamBooth.

Classic TI learns the *input* embedding of a new token, so the text encoder runs in every
step; DreamBooth fine-tunes the denoiser itself on "a sks <class>" (all its weights, or LoRA
adapters), optionally with prior preservation on the frozen model's own class images. Both
keep the loop state of :class:`~hifi.algorithms.tune_loop.TuneLoop` (generator, log, checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hifi.algorithms.generate import generate
from hifi.algorithms.subject import PLACEHOLDER, Subject
from hifi.algorithms.tune_loop import TuneConfig, TuneLoop, adam_state, caption_for, check_loss
from hifi.errors import HifiError
from hifi.kernels.losses import noise_loss
from hifi.protocols.denoiser import DenoiserBackend, lora_backend, textual_inversion

__all__ = ["class_prior", "tune_classic_ti", "tune_dreambooth"]


def tune_classic_ti(loop: TuneLoop, class_name: str, resume: Mapping[str, Any] | None) -> Subject:
    """Textual Inversion (Eq. 2): a new token's input embedding, the text encoder in the loop."""
    backend, cfg = loop.backend, loop.config
    vocabulary = textual_inversion(backend)
    vocabulary.add_placeholder_token(PLACEHOLDER)
    try:
        start = vocabulary.input_embedding(class_name)
    except HifiError:
        start = vocabulary.input_embedding(class_name.split()[-1])  # a multi-token class: start from its last word
    vector = start.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([vector], lr=cfg.learning_rate)
    first = 0
    if resume is not None:
        loop.restore(resume)
        with torch.no_grad():
            vector.copy_(resume["vector"])
        opt.load_state_dict(resume["optimizer"])
        first = int(resume["step"])
    caption = caption_for("classic-ti", class_name)
    for step in range(first, cfg.total_steps):
        x_t, ts, target = loop.noisy_batch()
        c = backend.encode_text([caption], token_embeddings={PLACEHOLDER: vector})
        loss = loop.noise_loss(loop.model(x_t, ts, c), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loop.log("global", step, check_loss(loss, "global", step))
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.total_steps:
            loop.save({"stage": "global", "step": step + 1, "vector": vector.detach().clone(),
                       "optimizer": adam_state(opt)})
    return Subject(class_name=class_name, mode="classic-ti", token_vector=vector.detach().clone())


def class_prior(backend: DenoiserBackend, class_name: str, cfg: TuneConfig) -> Tensor:
    """Prior-preservation latents: the frozen model's own images of "a <class>"."""
    plain = Subject(class_name=class_name, mode="dreambooth")
    seeds = [10_000 + cfg.seed * 1_000 + i for i in range(cfg.num_class_images)]
    images = generate(backend, plain, f"a {class_name}", seeds, num_steps=cfg.num_steps).images
    with torch.no_grad():
        return backend.encode_images(images)


def tune_dreambooth(loop: TuneLoop, class_name: str, resume: Mapping[str, Any] | None) -> dict[str, Tensor]:
    """DreamBooth: fine-tune the denoiser on "a sks <class>" (optionally with prior preservation).

    With ``lora_rank`` only LoRA adapters of that rank train (the backend must be a
    :class:`~hifi.protocols.denoiser.LoraBackend`) and stay on the denoiser. Returns the
    denoiser's weights, or with LoRA the adapters' in diffusers' ``load_lora_weights`` layout.
    """
    backend, cfg = loop.backend, loop.config
    with torch.no_grad():
        c = backend.encode_text([caption_for("dreambooth", class_name)])
        c_prior = backend.encode_text([f"a {class_name}"])
    prior = class_prior(backend, class_name, cfg) if cfg.prior_preservation else None
    if cfg.lora_rank is None:
        state, load_state, trained = backend.denoiser_state, backend.load_denoiser_state, backend.trainable_parameters
    else:
        lora = lora_backend(backend)
        state, load_state, trained = lora.lora_state, lora.load_lora_state, lora.lora_parameters
        if resume is None:
            lora.add_lora(cfg.lora_rank, cfg.seed)
    if resume is not None:
        load_state(resume["denoiser"])  # before the parameters are taken: a loaded LoRA is new modules
    params = list(trained())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    first = 0
    if resume is not None:
        loop.restore(resume)
        opt.load_state_dict(resume["optimizer"])
        first = int(resume["step"])
    for p in params:
        p.requires_grad_(True)
    try:
        for step in range(first, cfg.total_steps):
            x_t, ts, target = loop.noisy_batch()
            loss = loop.noise_loss(loop.model(x_t, ts, c), target)
            if prior is not None:
                xp, tp, target_p = loop.noisy_batch(x0=prior)
                loss = loss + cfg.prior_weight * noise_loss(loop.model(xp, tp, c_prior), target_p)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loop.log("global", step, check_loss(loss, "global", step))
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.total_steps:
                loop.save({"stage": "global", "step": step + 1, "denoiser": state(), "optimizer": adam_state(opt)})
    finally:
        for p in params:
            p.requires_grad_(False)
    return {k: v.clone() for k, v in state().items()}
