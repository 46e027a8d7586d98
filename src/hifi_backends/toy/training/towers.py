"""The small models' stages: ToyCLIP (``clip``), its text and image towers (``clip_metric``, ``clip_unet``),
the identity embedder (``identity``) and the segmenter (``segmenter``), with the contrastive loss they share."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hifi.toyworld.world import COLOURS, SCENES, caption
from hifi_backends.toy.training.bundle import _save_model_dir, _save_small
from hifi_backends.toy.training.data import Pool
from hifi_backends.toy.training.loop import _loop, _schedule
from hifi_backends.toy.training.settings import TrainSettings


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
        return _adam_step(opt, contrastive_loss(clip.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T, texts))

    stats = _loop("clip", work, s.clip_steps, step, {"model": clip, "opt": opt})
    _save_model_dir(clip, work / "toyclip")
    tokenizer.save_pretrained(work / "tokenizer")
    return stats


def stage_clip_metric(work: Path, s: TrainSettings) -> dict[str, Any]:
    """The metric ToyCLIP (:func:`_train_text_image_towers`, written to ``toyclip_metric``)."""
    return _train_text_image_towers(work, s, "clip_metric", "toyclip_metric", colour_swap=s.clip_metric_colour_swap)


def stage_clip_unet(work: Path, s: TrainSettings) -> dict[str, Any]:
    """The UNet's own text tower (``unet_text="unet"``): the metric recipe with the colour term.

    The ``clip`` stage's tower gives every class word nearly the same state, so a UNet
    attending to it draws blobs; the metric tower keeps classes apart but not colours (its
    colour words' states have cosine up to 0.98), so a UNet on it loses colour (README,
    ToyWorld probes). This copy is trained with the colour-swapped term too and kept apart
    from the metric ToyCLIP, so the metric does not share the generator's text tower.
    """
    return _train_text_image_towers(work, s, "clip_unet", "toyclip_unet", colour_swap=s.clip_unet_colour_swap)


def _train_text_image_towers(work: Path, s: TrainSettings, name: str, folder: str, *,
                             colour_swap: float) -> dict[str, Any]:
    """A text tower and a CNN image tower trained together, written to ``work/<folder>``.

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
        return _adam_step(opt, total)

    stats = _loop(name, work, s.clip_metric_steps, step,
                  {"text": text, "image": image, "scale": torch.nn.ParameterDict({"log_scale": log_scale}),
                   "opt": opt})
    dest, tmp = work / folder, work / f".{folder}.tmp"
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


def _seeded(seed: int, make: Any, *, lr: float, weight_decay: float
            ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    """A small model made right after seeding torch, its AdamW, and the stage's own generator (same seed)."""
    torch.manual_seed(seed)
    net = make()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    return net, opt, torch.Generator().manual_seed(seed)


def _adam_step(opt: torch.optim.Optimizer, loss: Tensor) -> float:
    """One optimiser step on ``loss``; its value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def stage_identity(work: Path, s: TrainSettings) -> dict[str, Any]:
    from hifi_backends.toy.models import IdentityNet

    pool = Pool(work)
    net, opt, gen = _seeded(s.seed + 3, IdentityNet, lr=1e-3, weight_decay=0.01)
    looks = len(pool) // 2

    def step(i: int) -> float:
        _schedule(opt, 1e-3, i, s.identity_steps)
        pairs = torch.randperm(looks, generator=gen)[: s.identity_batch]
        a = F.normalize(net(pool.batch(2 * pairs)), dim=-1)
        b = F.normalize(net(pool.batch(2 * pairs + 1)), dim=-1)
        logits = a @ b.T / 0.1
        target = torch.arange(len(pairs))
        return _adam_step(opt, 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)))

    stats = _loop("identity", work, s.identity_steps, step, {"model": net, "opt": opt})
    _save_small(net, work / "identity")
    return stats


def stage_segmenter(work: Path, s: TrainSettings) -> dict[str, Any]:
    from hifi_backends.toy.models import MaskNet

    pool = Pool(work)
    net, opt, gen = _seeded(s.seed + 4, MaskNet, lr=2e-3, weight_decay=0.0)

    def step(i: int) -> float:
        _schedule(opt, 2e-3, i, s.segmenter_steps)
        index = torch.randint(len(pool), (s.segmenter_batch,), generator=gen)
        logits = net(pool.batch(index))
        target = pool.masks[index].float()
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
        return _adam_step(opt, F.binary_cross_entropy_with_logits(logits, target) + dice.mean())

    stats = _loop("segmenter", work, s.segmenter_steps, step, {"model": net, "opt": opt})
    net.eval()
    with torch.no_grad():
        index = torch.arange(min(256, len(pool)))
        pred = net(pool.batch(index)) > 0
        target = pool.masks[index]
        stats["eval_iou"] = float((pred & target).sum() / (pred | target).sum().clamp(min=1))
    _save_small(net, work / "segmenter")
    return stats
