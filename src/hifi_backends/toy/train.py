"""Train ToyWorld's models from scratch and write the bundle: ``python -m hifi_backends.toy.train``.

Stages (each resumable: a finished stage's output is kept and skipped on a rerun, and the
long ones checkpoint every few hundred steps):

1. ``render``: a pool of rendered training images (pairs of renders of each look, in two
   scenes and poses), their masks and looks. No evaluation subject's look is ever drawn.
2. ``vae``: the AutoencoderKL (64x64x3 <-> 8x8x4), MSE + L1 + a small KL term; then
   ``vae_detail`` goes on with the object's pixels weighted 5x (the masks are exact), so
   that the few latent cells an object covers learn its pattern and mark, not just the
   background that fills most of every image.
3. ``clip``: ToyCLIP, contrastive on (image, caption) with phrases dropped at random. Its
   text tower is what the UNet attends to.
4. ``identity``: the identity embedder, InfoNCE over the two renders of each look.
5. ``segmenter``: the mask network, BCE + Dice on the exact masks. Then ``clip_metric``:
   the metric ToyCLIP (ToyCLIP-I, ToyCLIP-T, the prompt-following check), the ``clip``
   stage's text tower with a CNN image tower warm-started from the identity embedder, with
   a swapped-word term beside InfoNCE (see :func:`_train_text_image_towers` for why).
   With ``unet_text="unet"``, ``clip_unet`` after it: the same recipe plus a colour-swapped
   term, a text tower for the UNet alone (:func:`stage_clip_unet`).
6. ``latents``: the pool encoded by the VAE; the scaling factor that gives unit variance.
7. ``unet``: the UNet2DConditionModel on epsilon with Stable Diffusion's noise schedule,
   conditioned on ToyCLIP's text tower (frozen; ``unet_text`` says which), captions dropped 10% of the time for
   classifier-free guidance; an exponential moving average of the weights is what ships.
   Optionally Min-SNR-gamma weighting over timesteps (``unet_snr_gamma``) and extra weight
   on the latent cells the object covers (``unet_object_weight``).
8. ``bundle``: everything in fp16 safetensors in a diffusers folder plus ``training.json``.

Stages 2 and 3-5 (with their second phases) run side by side in two processes of one thread each (small models use
two cores better that way); the UNet gets both cores. The defaults (the CPU recipe) fit this project's
budget: at most 90 minutes on a 2-core CPU (``training.json`` records what it took). The
bundled model comes from the GPU recipe, :meth:`TrainSettings.gpu` (``--preset gpu``): a
wider VAE and UNet, larger batches, the VAE and UNet stages on the GPU (``device``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from typing import Any, cast

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from hifi.io.images import atomic_path, write_json
from hifi.toyworld.subjects import SUBJECTS
from hifi.toyworld.world import COLOURS, SCENES, Look, ToyObject, caption, render, sample_object, sample_pose

__all__ = ["TrainSettings", "finetune", "main", "settings_over", "train_all"]


def _ints(values: Any) -> tuple[int, ...]:
    """A tuple of ints (settings read back from JSON hold lists)."""
    return tuple(int(v) for v in values)


@attrs.frozen
class TrainSettings:
    """Step counts and sizes of every stage (the defaults are the bundled model's)."""

    seed: int = 0
    looks: int = 15_000  # pool: 2 renders of each look
    vae_steps: int = 1_100
    vae_batch: int = 16
    vae_detail_steps: int = 1_500
    clip_steps: int = 1_000
    clip_batch: int = 64
    clip_metric_steps: int = 1_200
    clip_metric_swap: float = 2.0
    identity_steps: int = 1_200
    identity_batch: int = 32
    segmenter_steps: int = 1_500
    segmenter_batch: int = 16
    unet_steps: int = 5_000
    unet_batch: int = 32
    caption_drop: float = 0.25  # each phrase (colour, pattern, mark, scene) left out this often
    uncond_drop: float = 0.1  # whole caption left out (classifier-free guidance)
    photo_prefix: float = 0.3  # "a photo of ..." this often
    unet_text: str = attrs.field(default="clip", validator=attrs.validators.in_(("clip", "metric", "unet")))
    """The text tower the UNet attends to: ``"clip"`` (the clip stage's), ``"metric"`` (the metric
    ToyCLIP's) or ``"unet"`` (its own, from the ``clip_unet`` stage)."""
    clip_metric_colour_swap: float = 0.0  # weight of a colour-swapped-word term in clip_metric (0: none)
    clip_unet_colour_swap: float = 2.0  # the clip_unet stage's colour-swapped-word weight
    unet_snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain epsilon MSE
    unet_object_weight: float = 0.0  # extra loss weight on the latent cells the object covers (0: none)
    vae_width: tuple[int, ...] = attrs.field(default=(16, 32, 64, 64), converter=_ints)  # the VAE's 4 levels
    unet_width: tuple[int, ...] = attrs.field(default=(64, 128), converter=_ints)  # the UNet's levels
    unet_layers: int = 1  # ResNet + attention layers per UNet level
    device: str = "cpu"  # where the VAE, latents and UNet stages run ("cuda" on a GPU machine)
    render_workers: int = 2  # processes rendering the pool
    vae_seconds: float = 0.0
    """Wall-clock budget of each VAE stage (``vae``, then ``vae_detail``): if above 0, the step count is
    re-planned from the pace of the warm-up steps (at most ``vae_steps`` / ``vae_detail_steps``) and
    the stage's statistics record the count used, which reproduces the run as plain settings."""
    unet_seconds: float = 0.0  # the same for the UNet stage (at most ``unet_steps``)
    unet_lr: float = 4e-4  # the UNet's peak learning rate (warm-up, then cosine decay to a tenth)
    unet_init: str = ""
    """A ToyWorld bundle folder to go on from (:func:`finetune`): the UNet starts from its weights and
    attends to its text tower, the latents come from its VAE at its scaling factor, and the new
    bundle is that one with the UNet replaced. Empty: train everything from scratch."""

    @classmethod
    def quick(cls) -> TrainSettings:
        """Tiny step counts: the whole script in a minute (tests)."""
        return cls(looks=64, vae_steps=3, vae_batch=4, vae_detail_steps=3, clip_steps=3, clip_batch=8,
                   clip_metric_steps=3, identity_steps=3,
                   identity_batch=4, segmenter_steps=3, segmenter_batch=4, unet_steps=4, unet_batch=4)

    @classmethod
    def gpu(cls) -> TrainSettings:
        """The GPU recipe (``--preset gpu``): a wider VAE and UNet, larger batches, more steps.

        The step counts are caps: ``vae_seconds`` and ``unet_seconds`` fit each stage to a
        wall-clock budget on the machine at hand (the VAE stages and the UNet in about six
        minutes of an H100); the counts a run used are in its ``training.json`` and reproduce
        it as plain settings. The bundle came from this recipe through
        ``benchmarks/toyworld_gpu.py``, the small models (ToyCLIP, identity, segmenter) from
        the CPU recipe of the same seed.
        """
        return cls(looks=30_000, vae_width=(32, 64, 96, 96), vae_batch=64, vae_steps=20_000, vae_detail_steps=30_000,
                   unet_width=(128, 128), unet_batch=256, unet_steps=40_000, unet_text="unet",
                   unet_snr_gamma=5.0, unet_object_weight=3.0, device="cuda", render_workers=16,
                   vae_seconds=70.0, unet_seconds=230.0)


# -- stage 1: the pool ------------------------------------------------------------------------


def _render_chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    seed, start, stop = args
    held_out = list(SUBJECTS.values())
    images, masks, objects = [], [], []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        first = sample_object(rng, exclude=held_out)
        scenes = list(SCENES)
        other_scene = str(rng.choice([s for s in scenes if s != first.scene]))
        second = ToyObject(first.look, sample_pose(rng), other_scene)
        for j, obj in enumerate((first, second)):
            image, mask = render(obj, seed=int(rng.integers(2**31)) + j)
            images.append(image)
            masks.append(mask)
            objects.append({"look": attrs.asdict(obj.look), "pose": attrs.asdict(obj.pose), "scene": obj.scene})
    return np.stack(images), np.stack(masks), objects


def stage_render(work: Path, s: TrainSettings) -> None:
    chunks = [(s.seed, a, min(a + 500, s.looks)) for a in range(0, s.looks, 500)]
    with get_context("spawn").Pool(s.render_workers) as pool:
        parts = list(tqdm(pool.imap(_render_chunk, chunks), total=len(chunks), desc="render pool"))
    images = np.concatenate([p[0] for p in parts])
    masks = np.concatenate([p[1] for p in parts])
    objects = [o for p in parts for o in p[2]]
    with atomic_path(work / "pool.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, masks=masks)
    write_json(work / "pool.json", objects)


class Pool:
    """The rendered pool: images [N, 3, 64, 64] in [0, 1], masks, objects; index 2k and 2k+1 share a look."""

    def __init__(self, work: Path, device: str | torch.device = "cpu") -> None:
        data = np.load(work / "pool.npz")
        self.device = torch.device(device)
        self.images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.masks = torch.from_numpy(data["masks"]).to(self.device)
        raw = json.loads((work / "pool.json").read_text())
        self.objects = [ToyObject(Look(**o["look"]), _pose(o["pose"]), o["scene"]) for o in raw]

    def __len__(self) -> int:
        return len(self.objects)

    def batch(self, index: Tensor) -> Tensor:
        return self.images[index.to(self.device)].float() / 255.0


def _pose(d: dict[str, float]) -> Any:
    from hifi.toyworld.world import Pose

    return Pose(**d)


def train_caption(obj: ToyObject, rng: np.random.Generator, s: TrainSettings) -> str:
    """A training caption: phrases dropped at random, sometimes "a photo of ...", sometimes empty."""
    if rng.random() < s.uncond_drop:
        return ""
    text = caption(obj, rng, drop=s.caption_drop)
    if rng.random() < s.photo_prefix:
        text = "a photo of " + text
    return text


# -- checkpointing ----------------------------------------------------------------------------


def _save_ckpt(path: Path, step: int, total: int, **states: Any) -> None:
    payload = {"step": step, "total": total, **{k: v.state_dict() for k, v in states.items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_ckpt(path: Path, **states: Any) -> tuple[int, int | None]:
    """The step to resume at and the step count the run had planned (None: an older checkpoint)."""
    if not path.exists():
        return 0, None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in states.items():
        v.load_state_dict(payload[k])
    total = payload.get("total")
    return int(payload["step"]), None if total is None else int(total)


def _schedule(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 100) -> None:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    for group in opt.param_groups:
        group["lr"] = lr


@attrs.define
class Plan:
    """A stage's step count, which a wall-clock budget may re-plan once, inside the warm-up.

    The learning-rate warm-up does not depend on the step count, so choosing the count after
    ``probe[1]`` steps (from the pace of steps ``probe[0]`` to ``probe[1]``) gives the same run
    as asking for that count from the start.
    """

    total: int
    seconds: float = 0.0  # 0: keep total
    probe: tuple[int, int] = (10, 90)
    every: int = 100  # the re-planned count is a multiple of this

    def replan(self, pace: float, elapsed: float) -> None:
        """Fit the count to the budget left after ``elapsed`` seconds at ``pace`` seconds a step."""
        more = (self.seconds - elapsed) / max(pace, 1e-9)
        fitted = (self.probe[1] + int(more)) // self.every * self.every
        self.total = max(self.probe[1] + self.every, min(self.total, fitted))


def _loop(name: str, work: Path, total: int | Plan, step_fn: Callable[[int], float | Tensor],
          states: dict[str, Any], every: int = 200) -> dict[str, Any]:
    """Run ``step_fn`` for each step, checkpointing every ``every`` steps (resumable).

    ``step_fn`` may return the loss as a tensor: it is read back (a device sync) only every 20
    steps, so that a GPU's queue is not drained after every step.
    """
    plan = total if isinstance(total, Plan) else Plan(total)
    if plan.seconds > 0 and plan.probe[1] >= every:
        raise ValueError(f"{name}: the budget's probe ends at step {plan.probe[1]}, after the first checkpoint")
    ckpt = work / f"{name}.ckpt"
    start, planned = _load_ckpt(ckpt, **states)
    if planned is not None:
        plan.total, plan.seconds = planned, 0.0  # a resumed run keeps the count it planned
    losses: list[float] = []
    pending: list[Tensor] = []
    began = time.time()
    probe_began = began

    def read_back(step: int) -> None:
        values = torch.stack(pending).tolist() if pending else []
        pending.clear()
        for v in values:
            if not math.isfinite(v):
                raise RuntimeError(f"{name}: loss became {v} at or before step {step}")
        losses.extend(values)

    with tqdm(total=plan.total, desc=name, initial=start) as bar:
        step = start
        while step < plan.total:
            loss = step_fn(step)
            # kept on its device until read back
            pending.append(loss.detach().float().reshape(()) if isinstance(loss, Tensor) else torch.tensor(float(loss)))
            if plan.seconds > 0 and start == 0 and step + 1 in plan.probe:
                read_back(step)
                if step + 1 == plan.probe[0]:
                    probe_began = time.time()
                else:
                    plan.replan((time.time() - probe_began) / (plan.probe[1] - plan.probe[0]), time.time() - began)
                    bar.total = plan.total
            if step % 20 == 0 or step + 1 == plan.total:
                read_back(step)
                if losses:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if (step + 1) % every == 0 and step + 1 < plan.total:
                _save_ckpt(ckpt, step + 1, plan.total, **states)
            step += 1
            bar.update(1)
    read_back(step)
    return {"steps": plan.total, "resumed_at": start, "seconds": round(time.time() - began, 1),
            "final_loss": float(np.mean(losses[-100:])) if losses else None}


# -- stage 2: VAE -----------------------------------------------------------------------------


def stage_vae(work: Path, s: TrainSettings) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    from hifi_backends.toy.models import vae_config

    dev = _device(s)
    pool = Pool(work, dev)
    torch.manual_seed(s.seed + 1)
    vae = AutoencoderKL(**vae_config(s.vae_width)).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 1)
    plan = Plan(s.vae_steps, s.vae_seconds, probe=(10, 90))

    def step(i: int) -> Tensor:
        _schedule(opt, 1e-3, i, plan.total)
        x = pool.batch(torch.randint(len(pool), (s.vae_batch,), generator=gen)) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return F.mse_loss(recon.detach(), x)

    stats = _loop("vae", work, plan, step, {"model": vae, "opt": opt})
    vae.eval()
    with torch.no_grad():
        x = pool.batch(torch.arange(min(256, len(pool)))) * 2 - 1
        stats["eval_mse"] = float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x))
    _save_model_dir(vae.cpu(), work / "vae")
    return stats


def stage_vae_detail(work: Path, s: TrainSettings) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    dev = _device(s)
    pool = Pool(work, dev)
    torch.manual_seed(s.seed + 7)
    vae = AutoencoderKL.from_pretrained(work / "vae", low_cpu_mem_usage=False).to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 7)
    plan = Plan(s.vae_detail_steps, s.vae_seconds, probe=(10, 45))

    def step(i: int) -> Tensor:
        _schedule(opt, 5e-4, i, plan.total, warmup=50)
        index = torch.randint(len(pool), (s.vae_batch,), generator=gen).to(dev)
        x = pool.batch(index) * 2 - 1
        weight = 1.0 + 4.0 * pool.masks[index].float()[:, None]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        err = recon - x
        loss = (weight * err.pow(2)).mean() + 0.5 * (weight * err.abs()).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return err.detach().pow(2).mean()

    stats = _loop("vae_detail", work, plan, step, {"model": vae, "opt": opt})
    vae.eval()
    with torch.no_grad():
        index = torch.arange(min(256, len(pool)), device=dev)
        x = pool.batch(index) * 2 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        mask = pool.masks[index][:, None].expand_as(x)
        stats["eval_mse"] = float(F.mse_loss(recon, x))
        stats["eval_mse_object"] = float((recon - x).pow(2)[mask].mean())
    _save_model_dir(vae.cpu(), work / "vae_final")
    return stats


def _save_model_dir(model: Any, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# -- stages 3-5: ToyCLIP, identity, segmenter --------------------------------------------------


def stage_clip(work: Path, s: TrainSettings) -> dict[str, Any]:
    from hifi_backends.toy.models import build_clip, build_tokenizer

    pool = Pool(work)
    tokenizer = build_tokenizer()
    torch.manual_seed(s.seed + 2)
    clip = build_clip(tokenizer)
    opt = torch.optim.AdamW(clip.parameters(), lr=5e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(s.seed + 2)
    rng = np.random.default_rng(s.seed + 2)

    def step(i: int) -> float:
        _schedule(opt, 5e-4, i, s.clip_steps)
        index = torch.randint(len(pool), (s.clip_batch,), generator=gen)
        texts = [caption(pool.objects[k], rng, drop=s.caption_drop) for k in index.tolist()]
        texts = [("a photo of " + t) if rng.random() < s.photo_prefix else t for t in texts]
        image_emb, text_emb = clip_features(clip, _clip_pixels(pool.batch(index)), _token_ids(tokenizer, texts))
        assert image_emb is not None and text_emb is not None
        loss = contrastive_loss(clip.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T, texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    stats = _loop("clip", work, s.clip_steps, step, {"model": clip, "opt": opt})
    _save_model_dir(clip, work / "toyclip")
    tokenizer.save_pretrained(work / "tokenizer")
    return stats


def stage_clip_metric(work: Path, s: TrainSettings) -> dict[str, Any]:
    """The metric ToyCLIP (:func:`_train_text_image_towers`, written to ``toyclip_metric``)."""
    return _train_text_image_towers(work, s, "clip_metric", colour_swap=s.clip_metric_colour_swap)


def stage_clip_unet(work: Path, s: TrainSettings) -> dict[str, Any]:
    """The UNet's own text tower (``unet_text="unet"``): the metric recipe with the colour term.

    The ``clip`` stage's tower gives every class word nearly the same state, so a UNet
    attending to it draws blobs; the metric tower keeps classes apart but not colours (its
    colour words' states have cosine up to 0.98), so a UNet on it loses colour (README,
    ToyWorld probes). This copy is trained with the colour-swapped term too and kept apart
    from the metric ToyCLIP, so the metric does not share the generator's text tower.
    """
    return _train_text_image_towers(work, s, "clip_unet", colour_swap=s.clip_unet_colour_swap)


def _train_text_image_towers(work: Path, s: TrainSettings, name: str, *, colour_swap: float) -> dict[str, Any]:
    """A text tower and a CNN image tower trained together, written to ``work/_DONE[name]``.

    The recipe of the metric ToyCLIP (stage ``clip_metric``) and of the UNet's own tower
    (stage ``clip_unet``): the ``clip`` stage's text tower and a CNN image tower.

    After the ``clip`` stage, ToyCLIP's ViT image tower told scenes apart (100% on renders)
    but not classes (25%; its text tower's "a mug on the beach" and "a ball on the beach"
    had cosine 0.86 to 0.99), and neither more contrastive steps on batches of one scene and
    one colour nor supervised steps on the class (31% after 400) fixed it. So the metric
    copy gets :class:`~hifi_backends.toy.models.ClipImageTower`, its body warm-started from
    the identity embedder (which already sees shape, colour and pattern), and two losses:
    CLIP's InfoNCE on random batches of (image, caption), plus a swapped-word term: each
    image against the 8 prompts "a <class> <its scene>" (the class swapped) and the 10
    prompts "a <its class> <scene>" (the scene swapped), cross-entropy on the true one, as
    NegCLIP does with swapped captions. The weight of that term is ``clip_metric_swap``.
    Measured on 240 held-out renders while choosing this (1,200 steps): class 99%, scene
    100%. The UNet keeps the ``clip`` stage's text tower by default; the metric copy only measures.
    ``colour_swap`` > 0 adds a third swapped-word term (each image against "a <colour> <its
    class>" for the 8 main colours), for a tower that keeps colour words apart too
    (``clip_metric_colour_swap`` for the metric, ``clip_unet_colour_swap`` for the UNet's own;
    README "ToyWorld").
    """
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from hifi.toyworld.world import CLASSES
    from hifi_backends.toy.models import ClipImageTower

    pool = Pool(work)
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    clip = CLIPModel.from_pretrained(work / "toyclip")
    text_config = CLIPTextConfig(**{**clip.config.text_config.to_dict(), "projection_dim": clip.config.projection_dim})
    text = CLIPTextModelWithProjection(text_config)
    text.load_state_dict({k: v for k, v in clip.state_dict().items()
                          if k.startswith(("text_model.", "text_projection."))})
    identity_config = json.loads((work / "identity" / "config.json").read_text())
    torch.manual_seed(s.seed + 8)
    image = ClipImageTower(**identity_config, projection_dim=clip.config.projection_dim)
    image.body.load_state_dict(load_file(str(work / "identity" / "model.safetensors")))
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*text.parameters(), *image.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(s.seed + 8)
    rng = np.random.default_rng(s.seed + 8)
    scenes = list(SCENES)
    grid = _token_ids(tokenizer, [f"a {c} {SCENES[sc]}" for c in CLASSES for sc in scenes])
    pool_class = torch.tensor([CLASSES.index(o.look.cls) for o in pool.objects])
    pool_scene = torch.tensor([scenes.index(o.scene) for o in pool.objects])
    colours = [c for c in COLOURS if c != "black"]  # the main colours the sampler draws
    colour_grid = _token_ids(tokenizer, [f"a {col} {c}" for col in colours for c in CLASSES]
                             ) if colour_swap > 0 else None
    pool_colour = torch.tensor([colours.index(o.look.colour) for o in pool.objects])

    def step(i: int) -> float:
        _schedule(opt, 1e-3, i, s.clip_metric_steps, warmup=50)
        index = torch.randint(len(pool), (s.clip_batch,), generator=gen)
        texts = [caption(pool.objects[k], rng, drop=s.caption_drop) for k in index.tolist()]
        image_emb = F.normalize(image(pool.batch(index)), dim=-1)
        text_emb = F.normalize(text(input_ids=_token_ids(tokenizer, texts)).text_embeds, dim=-1)
        scale = log_scale.exp().clamp(max=100)
        loss = contrastive_loss(scale * image_emb @ text_emb.T, texts)
        # Swapped words: [B, class, scene] similarities to every "a <class> <scene>" prompt.
        sim = scale * (image_emb @ F.normalize(text(input_ids=grid).text_embeds, dim=-1).T).view(
            -1, len(CLASSES), len(scenes))
        rows, cls, scene = torch.arange(len(index)), pool_class[index], pool_scene[index]
        swap = F.cross_entropy(sim[rows, :, scene], cls) + F.cross_entropy(sim[rows, cls, :], scene)
        total = loss + s.clip_metric_swap * swap
        if colour_grid is not None:
            # The colour swapped: each image against "a <colour> <its class>" for every main colour.
            sim_c = scale * (image_emb @ F.normalize(text(input_ids=colour_grid).text_embeds, dim=-1).T).view(
                -1, len(colours), len(CLASSES))
            total = total + colour_swap * F.cross_entropy(sim_c[rows, :, cls], pool_colour[index])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total.item()

    stats = _loop(name, work, s.clip_metric_steps, step,
                  {"text": text, "image": image, "scale": torch.nn.ParameterDict({"log_scale": log_scale}),
                   "opt": opt})
    dest, tmp = work / _DONE[name], work / f".{_DONE[name]}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    text.save_pretrained(tmp / "text", safe_serialization=True)
    _save_small(image, tmp / "image")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # the stage counts as done once this folder exists
    return stats


def _token_ids(tokenizer: Any, texts: list[str]) -> Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def contrastive_loss(logits: Tensor, texts: list[str]) -> Tensor:
    """CLIP's symmetric InfoNCE over ``logits`` (images x captions, scaled cosines).

    Captions of different images can be identical ("a mug"): every equal caption counts as
    a positive, so the loss does not push identical texts apart.
    """
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
    target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (torch.sum(-target * logits.log_softmax(dim=1), dim=1).mean()
                  + torch.sum(-target * logits.T.log_softmax(dim=1), dim=1).mean())


def clip_features(clip: Any, pixels: Tensor | None, ids: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Unit-norm ToyCLIP image and text embeddings (either may be None)."""
    image = text = None
    if pixels is not None:
        image = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    if ids is not None:
        text = F.normalize(clip.text_projection(clip.text_model(input_ids=ids).pooler_output), dim=-1)
    return image, text


def _clip_pixels(images: Tensor) -> Tensor:
    """ToyCLIP's input: [0, 1] images scaled to [-1, 1] (no other preprocessing)."""
    return images * 2.0 - 1.0


def stage_identity(work: Path, s: TrainSettings) -> dict[str, Any]:
    from hifi_backends.toy.models import IdentityNet

    pool = Pool(work)
    torch.manual_seed(s.seed + 3)
    net = IdentityNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(s.seed + 3)
    looks = len(pool) // 2

    def step(i: int) -> float:
        _schedule(opt, 1e-3, i, s.identity_steps)
        pairs = torch.randperm(looks, generator=gen)[: s.identity_batch]
        a = F.normalize(net(pool.batch(2 * pairs)), dim=-1)
        b = F.normalize(net(pool.batch(2 * pairs + 1)), dim=-1)
        logits = a @ b.T / 0.1
        target = torch.arange(len(pairs))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    stats = _loop("identity", work, s.identity_steps, step, {"model": net, "opt": opt})
    _save_small(net, work / "identity")
    return stats


def stage_segmenter(work: Path, s: TrainSettings) -> dict[str, Any]:
    from hifi_backends.toy.models import MaskNet

    pool = Pool(work)
    torch.manual_seed(s.seed + 4)
    net = MaskNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 4)

    def step(i: int) -> float:
        _schedule(opt, 2e-3, i, s.segmenter_steps)
        index = torch.randint(len(pool), (s.segmenter_batch,), generator=gen)
        logits = net(pool.batch(index))
        target = pool.masks[index].float()
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, target) + dice.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    stats = _loop("segmenter", work, s.segmenter_steps, step, {"model": net, "opt": opt})
    net.eval()
    with torch.no_grad():
        index = torch.arange(min(256, len(pool)))
        pred = net(pool.batch(index)) > 0
        target = pool.masks[index]
        stats["eval_iou"] = float((pred & target).sum() / (pred | target).sum().clamp(min=1))
    _save_small(net, work / "segmenter")
    return stats


def _save_small(net: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    config = dict(cast(dict[str, Any], net.config))
    write_json(folder / "config.json", config)


# -- stages 6-7: latents and the UNet ---------------------------------------------------------


def stage_latents(work: Path, s: TrainSettings) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    dev = _device(s)
    pool = Pool(work, dev)
    folder = Path(s.unet_init) / "vae" if s.unet_init else work / "vae_final"
    vae = AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False).float().to(dev).eval()
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(pool), 256), desc="encode pool"):
            x = pool.batch(torch.arange(start, min(start + 256, len(pool)))) * 2 - 1
            chunks.append(vae.encode(x).latent_dist.mean.cpu())
    latents = torch.cat(chunks)
    # Going on from a bundle: its UNet learned latents at the bundle's scaling factor.
    scale = float(vae.config.scaling_factor) if s.unet_init else float(1.0 / latents.std())
    with atomic_path(work / "latents.pt") as tmp:
        torch.save({"latents": latents * scale, "scaling_factor": scale}, tmp)
    return {"scaling_factor": scale, "count": len(latents), "init": s.unet_init}


def stage_unet(work: Path, s: TrainSettings) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from hifi.kernels.ddim import Schedule, add_noise
    from hifi_backends.configs import load_config
    from hifi_backends.toy.models import unet_config

    dev = _device(s)
    pool = Pool(work, dev)
    latents = torch.load(work / "latents.pt", weights_only=True)["latents"].to(dev)
    init = Path(s.unet_init) if s.unet_init else None
    tokenizer = CLIPTokenizer.from_pretrained(init / "tokenizer" if init else work / "tokenizer")
    # ``unet_text="metric"``: attend to the metric ToyCLIP's text tower instead of the ``clip``
    # stage's. The clip stage's tower gives the class word nearly the same hidden state for
    # every class (cosine 0.88 on average at the class token, up to 0.99); the metric tower,
    # trained against swapped class words, -0.03 (README, ToyWorld).
    if init is not None:  # the bundle's own tower, so that its UNet goes on hearing the same states
        text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder").float()
    elif s.unet_text in ("metric", "unet"):
        folder = "toyclip_metric" if s.unet_text == "metric" else "toyclip_unet"
        tower: Any = CLIPTextModelWithProjection.from_pretrained(work / folder / "text")
        text_encoder = CLIPTextModel(tower.config)
    else:
        tower = CLIPModel.from_pretrained(work / "toyclip")
        text_encoder = CLIPTextModel(tower.config.text_config)
    if init is None:
        text_encoder.load_state_dict(tower.text_model.state_dict())
    text_encoder.eval().requires_grad_(False)
    _save_model_dir(text_encoder, work / "text_encoder")
    text_encoder.to(dev)
    schedule = Schedule.from_config(load_config("sd14", "scheduler"))
    alphas = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32, device=dev)
    # Min-SNR-gamma (Hang et al. 2023), for epsilon prediction: weight min(SNR, gamma) / SNR,
    # so the nearly clean timesteps, whose noise is hardest to see and least about shape, stop
    # dominating the gradient. Off (all ones) when unet_snr_gamma is 0.
    snr = alphas / (1 - alphas)
    t_weight = snr.clamp(max=s.unet_snr_gamma) / snr if s.unet_snr_gamma > 0 else torch.ones_like(snr)
    # The object covers a few of the 64 latent cells; unet_object_weight adds weight there
    # (its fraction of each cell, from the exact masks), as vae_detail does in pixels.
    cell_cover = F.avg_pool2d(pool.masks[:, None].float(), 8) if s.unet_object_weight > 0 else None

    torch.manual_seed(s.seed + 5)
    config = unet_config(cross_attention_dim=text_encoder.config.hidden_size, width=s.unet_width, layers=s.unet_layers)
    unet = UNet2DConditionModel(**config)
    if init is not None:
        start = UNet2DConditionModel.from_pretrained(init / "unet")
        found = (tuple(start.config.block_out_channels), start.config.layers_per_block)
        if found != (tuple(s.unet_width), s.unet_layers):
            raise ValueError(f"{init / 'unet'} has block_out_channels {found[0]} and {found[1]} layer(s) per block;"
                             f" the settings ask for {tuple(s.unet_width)} and {s.unet_layers}: set unet_width and"
                             " unet_layers to the bundle's")
        unet.load_state_dict({k: v.float() for k, v in start.state_dict().items()})
    ema = UNet2DConditionModel(**config)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    unet.to(dev)
    ema.to(dev)
    params, ema_params = list(unet.parameters()), list(ema.parameters())  # once, not every step
    opt = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 5)
    rng = np.random.default_rng(s.seed + 5)
    decay = 0.998
    plan = Plan(s.unet_steps, s.unet_seconds, probe=(20, 180))
    words = WordTokens(tokenizer)
    sample = [train_caption(o, np.random.default_rng(k), s) for k, o in enumerate(pool.objects[:256])]
    token_ids = words if words.matches(sample) else words.reference

    def step(i: int) -> Tensor:
        _schedule(opt, s.unet_lr, i, plan.total, warmup=200)
        index = torch.randint(len(pool), (s.unet_batch,), generator=gen)
        texts = [train_caption(pool.objects[k], rng, s) for k in index.tolist()]
        ids = token_ids(texts).to(dev)
        with torch.no_grad():
            cond = text_encoder(ids)[0]
        index = index.to(dev)
        x0 = latents[index]
        t = torch.randint(0, schedule.num_train_timesteps, (s.unet_batch,), generator=gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        x_t = add_noise(x0, noise, alphas[t])
        err = (unet(x_t, t, encoder_hidden_states=cond).sample - noise).pow(2)
        if cell_cover is not None:
            w = 1.0 + s.unet_object_weight * cell_cover[index]
            err = err * (w / w.mean(dim=(2, 3), keepdim=True))
        loss = (err.mean(dim=(1, 2, 3)) * t_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(decay, (1 + i) / (10 + i))
            torch._foreach_lerp_(ema_params, params, 1 - d)
        return loss.detach()

    stats = _loop("unet", work, plan, step, {"model": unet, "ema": ema, "opt": opt}, every=250)
    _save_model_dir(ema.cpu(), work / "unet")
    return {**stats, "init": s.unet_init}


class WordTokens:
    """A CLIP tokenizer's ids for captions of whole words, from a per-word cache.

    The slow (Python) CLIP tokenizer took 36 ms for a batch of 256 captions on this CPU, a
    third of a GPU UNet step; captions rarely repeat but their words do. CLIP's BPE works
    word by word, so a caption's ids are BOS, its words' ids, EOS, then padding (truncated
    to the context as the tokenizer does). :meth:`matches` checks that against the tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.length = int(tokenizer.model_max_length)
        self.cache: dict[str, list[int]] = {}

    def reference(self, texts: list[str]) -> Tensor:
        """The tokenizer's own ids (padded to the context, truncated)."""
        return cast(Tensor, self.tokenizer(texts, padding="max_length", max_length=self.length, truncation=True,
                                           return_tensors="pt").input_ids)

    def __call__(self, texts: list[str]) -> Tensor:
        tok = self.tokenizer
        rows = []
        for text in texts:
            ids: list[int] = []
            for word in text.split():
                if word not in self.cache:
                    self.cache[word] = tok(word, add_special_tokens=False).input_ids
                ids += self.cache[word]
            ids = [tok.bos_token_id, *ids[: self.length - 2], tok.eos_token_id]
            rows.append(ids + [tok.pad_token_id] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def matches(self, texts: list[str]) -> bool:
        """Whether the cached path gives exactly the tokenizer's ids on ``texts``."""
        return bool(torch.equal(self(texts), self.reference(texts)))


def _device(s: TrainSettings) -> torch.device:
    """The device of the VAE, latents and UNet stages; a clear error if it is not here."""
    dev = torch.device(s.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"TrainSettings.device is {s.device!r} but this machine has no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return dev


# -- stage 8: the bundle ----------------------------------------------------------------------


def stage_bundle(work: Path, out: Path, s: TrainSettings, report: dict[str, Any]) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from hifi_backends.configs import load_config

    scale = torch.load(work / "latents.pt", weights_only=True)["scaling_factor"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vae = AutoencoderKL.from_pretrained(work / "vae_final", low_cpu_mem_usage=False)
    vae.register_to_config(scaling_factor=scale)
    half = {"safe_serialization": True}
    vae.half().save_pretrained(tmp / "vae", **half)
    UNet2DConditionModel.from_pretrained(work / "unet").half().save_pretrained(tmp / "unet", **half)
    CLIPTextModel.from_pretrained(work / "text_encoder").half().save_pretrained(tmp / "text_encoder", **half)
    (tmp / "toyclip").mkdir()
    CLIPTextModelWithProjection.from_pretrained(work / "toyclip_metric" / "text").half().save_pretrained(
        tmp / "toyclip" / "text", **half)
    CLIPTokenizer.from_pretrained(work / "tokenizer").save_pretrained(tmp / "tokenizer")
    scheduler = load_config("sd14", "scheduler")
    write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
    for name, dest in (("identity", "identity"), ("segmenter", "segmenter"), ("toyclip_metric/image", "toyclip/image")):
        from safetensors.torch import load_file, save_file

        (tmp / dest).mkdir()
        state = {k: v.half() for k, v in load_file(str(work / name / "model.safetensors")).items()}
        save_file(state, str(tmp / dest / "model.safetensors"))
        shutil.copy(work / name / "config.json", tmp / dest / "config.json")
    write_json(tmp / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    })
    write_json(tmp / "training.json", report)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# -- orchestration ----------------------------------------------------------------------------

STAGES = ("render", "vae", "vae_detail", "clip", "identity", "segmenter", "clip_metric", "clip_unet", "latents",
          "unet")
_DONE = {"render": "pool.json", "vae": "vae", "vae_detail": "vae_final", "clip": "toyclip", "identity": "identity",
         "segmenter": "segmenter", "clip_metric": "toyclip_metric", "clip_unet": "toyclip_unet",
         "latents": "latents.pt", "unet": "unet"}
_FUNCS: dict[str, Callable[[Path, TrainSettings], Any]] = {
    "vae": stage_vae, "vae_detail": stage_vae_detail, "clip": stage_clip, "identity": stage_identity,
    "segmenter": stage_segmenter,
    "clip_metric": stage_clip_metric, "clip_unet": stage_clip_unet,
    "latents": stage_latents, "unet": stage_unet,
}


def run_stage(name: str, work: Path, s: TrainSettings) -> dict[str, Any]:
    """Run one stage unless its output exists; its statistics go to ``work/<name>.json``."""
    stats_file = work / f"{name}.json"
    if (work / _DONE[name]).exists() and stats_file.exists():
        return json.loads(stats_file.read_text())
    began = time.time()
    if name == "render":
        stage_render(work, s)
        stats: dict[str, Any] = {"images": 2 * s.looks}
    else:
        stats = _FUNCS[name](work, s)
    stats["wall_seconds"] = round(time.time() - began, 1)
    write_json(stats_file, stats)
    return stats


def _subprocess_stages(names: list[str], work: Path, s: TrainSettings, threads: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HIFI_TOY_THREADS=str(threads))
    cmd = [sys.executable, "-m", "hifi_backends.toy.train", "--work", str(work), "--stages", ",".join(names),
           "--settings", json.dumps(attrs.asdict(s))]
    return subprocess.Popen(cmd, env=env)


def train_all(out: str | Path, work: str | Path, settings: TrainSettings | None = None,
              parallel: bool = True) -> dict[str, Any]:
    """Every stage, then the bundle in ``out``; returns the report written as ``training.json``."""
    s = settings or TrainSettings()
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    began = time.time()
    torch.set_num_threads(2)
    run_stage("render", work, s)
    # The clip_unet stage only when the UNet attends to its tower.
    stages = [n for n in STAGES if n != "clip_unet" or s.unet_text == "unet"]
    if parallel:
        second: list[str] = [n for n in ("clip", "identity", "segmenter", "clip_metric", "clip_unet") if n in stages]
        procs = [_subprocess_stages(["vae", "vae_detail"], work, s, 1), _subprocess_stages(second, work, s, 1)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"a training process failed (exit codes {codes}); rerun to resume")
    for name in stages[1:]:
        run_stage(name, work, s)
    report = {
        "settings": attrs.asdict(s),
        "stages": {name: json.loads((work / f"{name}.json").read_text()) for name in stages},
        "wall_seconds_total": round(time.time() - began, 1),
        "torch": torch.__version__,
        "threads": 2,
        "machine": _machine(s.device),
    }
    stage_bundle(work, out, s, report)
    return report


def finetune(init: str | Path, out: str | Path, work: str | Path, settings: TrainSettings) -> dict[str, Any]:
    """Go on training the UNet of the bundle ``init``; write that bundle with the new UNet to ``out``.

    The pool is rendered into ``work`` if it is not there (``settings.looks``), encoded by the
    bundle's VAE at its scaling factor, and the UNet trained from the bundle's weights
    (``unet_lr``, ``unet_steps`` or ``unet_seconds``) with the bundle's text tower; every other
    model is the bundle's, copied. ``training.json`` keeps the bundle's own record under
    ``"init"``. ``out`` may be ``init``: it is replaced only once the new bundle is complete.
    """
    from diffusers import UNet2DConditionModel

    init, work, out = Path(init), Path(work), Path(out)
    s = attrs.evolve(settings, unet_init=str(init))
    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "training.json") if not (init / n).exists()]
    if missing:
        raise ValueError(f"{init} is not a ToyWorld bundle (no {', '.join(missing)})")
    work.mkdir(parents=True, exist_ok=True)
    # The latents and UNet stages of a work folder belong to one starting bundle (finished stages
    # are skipped on a rerun): the bundle is known by its UNet's bytes, so a second round from
    # the new bundle, even at the same path, needs a fresh folder.
    digest = hashlib.sha256((init / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16]
    record = work / "finetune.json"
    began_from = json.loads(record.read_text()).get("unet_sha256") if record.exists() else None
    held = [n for n in ("latents.json", "latents.pt", "unet.json", "unet.ckpt") if (work / n).exists()]
    if held and began_from != digest:
        raise ValueError(f"{work} holds the latents or UNet of another run ({', '.join(held)}), not of {init}:"
                         " use a fresh work folder")
    write_json(record, {"init": s.unet_init, "unet_sha256": digest})
    began = time.time()
    torch.set_num_threads(2)
    stages = {name: run_stage(name, work, s) for name in ("render", "latents", "unet")}
    report = {
        "settings": attrs.asdict(s),
        "stages": stages,
        "wall_seconds_total": round(time.time() - began, 1),
        "torch": torch.__version__,
        "machine": _machine(s.device),
        "note": f"fine-tune: the UNet of {init} trained further (settings.unet_*); every other model copied from it",
        "init_unet_sha256": digest,  # which UNet it went on from (a path alone may have held several)
        "init": json.loads((init / "training.json").read_text()),
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    shutil.rmtree(tmp / "unet")
    UNet2DConditionModel.from_pretrained(work / "unet").half().save_pretrained(tmp / "unet", safe_serialization=True)
    write_json(tmp / "training.json", report)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report


def _machine(device: str = "cpu") -> str:
    """The machine a run went on: its processor and cores, and the GPU's name where the stages ran on one."""
    import platform

    host = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{host}, {torch.cuda.get_device_name(torch.device(device))}"
    return host


def _check_setting(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` has the type of the TrainSettings field ``name`` (and is not negative).

    JSON gives ints, floats, strings and lists; a string where a count belongs would otherwise
    surface as a TypeError deep inside a training stage, an hour into a run.
    """
    default = attrs.fields_dict(TrainSettings)[name].default
    if isinstance(default, tuple):
        ok = isinstance(value, list) and bool(value) and all(type(v) is int and v > 0 for v in value)
        want = "a list of positive whole numbers"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, int):
        ok, want = type(value) is int and value >= 0, "a whole number >= 0"
    else:
        ok, want = type(value) in (int, float) and value >= 0, "a number >= 0"
    if not ok:
        raise ValueError(f"--settings: {name} must be {want}, not {json.dumps(value)}")


def settings_over(base: TrainSettings, text: str) -> TrainSettings:
    """``base`` with the fields of the JSON object ``text`` (a command line's ``--settings``) set.

    Raises ValueError, naming the flag, for text that is not a JSON object, an unknown field or
    a value of the wrong type.
    """
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--settings is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError("--settings must be a JSON object of TrainSettings fields")
    unknown = sorted(set(fields) - set(attrs.fields_dict(TrainSettings)))
    if unknown:
        raise ValueError(f"--settings: unknown field(s) {unknown}")
    for name, value in fields.items():
        _check_setting(name, value)
    try:
        return attrs.evolve(base, **fields)
    except ValueError as e:  # a validator (unet_text)
        raise ValueError(f"--settings: {e.args[0]}") from None  # attrs puts the message first


def _settings(args: argparse.Namespace) -> TrainSettings:
    """The settings a command line asks for: a preset (or a bundle's own), then --settings, --device."""
    if args.finetune:
        record = Path(args.finetune) / "training.json"
        if not record.exists():
            raise ValueError(f"{args.finetune} is not a ToyWorld bundle (no training.json)")
        saved = json.loads(record.read_text()).get("settings")
        if not isinstance(saved, dict):
            raise ValueError(f"{record} holds no training settings: is {args.finetune} a ToyWorld bundle?")
        known = {f.name for f in attrs.fields(TrainSettings)}
        s = TrainSettings(**{k: v for k, v in saved.items() if k in known})
    else:
        s = TrainSettings.quick() if args.quick else TrainSettings.gpu() if args.preset == "gpu" else TrainSettings()
        s = attrs.evolve(s, seed=args.seed)
    if args.settings:
        s = settings_over(s, args.settings)
    if args.device:
        s = attrs.evolve(s, device=args.device)
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hifi_backends.toy.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="bundle folder to write (default: the package's bundle)")
    p.add_argument("--work", default="toyworld-work", help="folder for the pool, checkpoints and stage outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny step counts (a smoke test, not a model)")
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: the 2-core recipe (default, about 90 minutes); gpu: TrainSettings.gpu(), the wider"
                        " VAE and UNet fitted to about eight minutes of an H100")
    p.add_argument("--device", default=None, help="where the VAE and UNet stages run (default: the preset's)")
    p.add_argument("--stages", default=None,
                   help="only these stages (comma-separated, e.g. the small models for the GPU recipe:"
                        " render,clip,identity,segmenter,clip_metric,clip_unet), in WORK, one thread; no bundle")
    p.add_argument("--settings", default=None,
                   help="a JSON object of TrainSettings fields over the preset's (with --finetune: over the"
                        ' bundle\'s own), e.g. \'{"unet_seconds": 3300, "unet_batch": 128}\'')
    p.add_argument("--finetune", default=None, metavar="BUNDLE",
                   help="go on training the UNet of this ToyWorld bundle (its other models copied); the new"
                        " bundle goes to --out")
    args = p.parse_args(argv)
    try:
        s = _settings(args)
        _device(s)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = args.stages.split(",") if args.stages else []
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        print(f"error: unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}", file=sys.stderr)
        return 2
    if names:  # a worker process started by train_all, or the small models for the GPU recipe
        torch.set_num_threads(int(os.environ.get("HIFI_TOY_THREADS", "1")))
        Path(args.work).mkdir(parents=True, exist_ok=True)
        for name in names:
            run_stage(name, Path(args.work), s)
        return 0
    from hifi_backends.toy.backend import BUNDLE

    if args.finetune:
        try:
            report = finetune(args.finetune, args.out or BUNDLE, args.work, s)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"bundle written to {args.out or BUNDLE} in {report['wall_seconds_total'] / 60:.1f} min")
        return 0
    report = train_all(args.out or BUNDLE, args.work, s)
    print(f"bundle written to {args.out or BUNDLE} in {report['wall_seconds_total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
