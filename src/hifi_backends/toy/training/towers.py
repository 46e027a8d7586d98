"""The small models' stages: ToyCLIP (``clip``), its text and image towers (``clip_metric``, ``clip_unet``),
the identity embedder (``identity``), the segmenter (``segmenter``) and the detail classifier (``detail``),
with the contrastive loss they share."""

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


def blur_augment(images: Tensor, gen: torch.Generator, max_sigma: float = 1.5) -> Tensor:
    """Each ``[B, 3, H, W]`` image blurred by a Gaussian of its own sigma in [0, ``max_sigma``] (0 for a
    third of them), plus a little noise: what a VAE and a small UNet do to a render's edges."""
    b = images.shape[0]
    sigma = torch.rand(b, generator=gen) * max_sigma
    sigma[torch.rand(b, generator=gen) < 1 / 3] = 0.0
    r = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, 7]; sigma ~ 0 gives the identity
    x = images.reshape(1, b * 3, *images.shape[2:])
    kx = kernel.repeat_interleave(3, dim=0)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), kx[:, None, None, :], groups=b * 3)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), kx[:, None, :, None], groups=b * 3)
    noise = torch.randn(x.shape, generator=gen) * 0.02 * torch.rand(1, generator=gen)
    return (x + noise).reshape(images.shape).clamp(0.0, 1.0)


def detail_labels(objects: list[Any]) -> dict[str, Tensor]:
    """The detail classifier's targets for looks: class indices per head, -100 (ignored) for the colour
    of a pattern or mark the look does not have."""
    from hifi.toyworld.world import MARKS, PATTERNS

    colours = list(COLOURS)
    rows = [(PATTERNS.index(o.look.pattern), colours.index(o.look.colour2) if o.look.pattern != "plain" else -100,
             MARKS.index(o.look.mark), colours.index(o.look.mark_colour) if o.look.mark != "none" else -100)
            for o in objects]
    table = torch.tensor(rows, dtype=torch.long)
    return {"pattern": table[:, 0], "colour2": table[:, 1], "mark": table[:, 2], "mark_colour": table[:, 3]}


def stage_detail(work: Path, s: TrainSettings) -> dict[str, Any]:
    """The detail classifier: cross-entropy per head on the objects' crops of blurred renders
    (:func:`blur_augment`, :func:`~hifi_backends.toy.models.crop_to_object`).

    It judges whether generated images show the prompted pattern and mark, in their colours
    (:func:`hifi_backends.toy.quality.detail_following`); the blur stands for what decoding does to a
    render, so that the judge reads a soft stripe as a stripe. Its accuracy on the evaluation
    subjects' photos (looks it never saw) is in the stage's statistics.
    """
    from hifi.toyworld.subjects import SUBJECTS, subject_photos
    from hifi_backends.toy.models import DetailNet, crop_to_object

    pool = Pool(work)
    labels = detail_labels(pool.objects)
    net, opt, gen = _seeded(s.seed + 6, DetailNet, lr=2e-3, weight_decay=0.01)

    def step(i: int) -> float:
        _schedule(opt, 2e-3, i, s.detail_steps)
        index = torch.randint(len(pool), (s.detail_batch,), generator=gen)
        # Crops around the exact mask, their margin and centre jittered: a segmenter's mask is not exact.
        margin = 0.05 + 0.25 * torch.rand(len(index), generator=gen)
        shift = (torch.rand(len(index), 2, generator=gen) - 0.5) * 0.12
        crops = crop_to_object(blur_augment(pool.batch(index), gen), pool.masks[index], margin=margin, shift=shift)
        logits = net(crops)
        loss = sum(F.cross_entropy(logits[k], labels[k][index], ignore_index=-100) for k in logits)
        return _adam_step(opt, loss)  # type: ignore[arg-type]  # a sum of tensors is a tensor

    stats = _loop("detail", work, s.detail_steps, step, {"model": net, "opt": opt})
    net.eval()
    photos = [p for name in SUBJECTS for p in subject_photos(name)]
    images = torch.stack([torch.from_numpy(p[0]).permute(2, 0, 1).float() / 255.0 for p in photos])
    masks = torch.stack([torch.from_numpy(p[1]) for p in photos])
    truth = detail_labels([p[2] for p in photos])
    with torch.no_grad():
        found = {k: v.argmax(dim=1) for k, v in net(crop_to_object(images, masks)).items()}
    stats["subjects_accuracy"] = {k: float((found[k] == truth[k]).float().mean()) for k in found}
    _save_small(net, work / "detail")
    return stats
