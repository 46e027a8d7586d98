"""Does the ToyWorld model follow prompts? ToyCLIP zero-shot on generated images.

:func:`prompt_following` draws images for prompts ``"a <class> <scene phrase>"`` (class and
scene drawn at random, seeded) and asks ToyCLIP which scene and which class each image
shows: the scene among all scenes (the prompt's class held fixed in the candidate texts)
and the class among all classes (the prompt's scene held fixed). The same classifier on
freshly rendered images (the renderer's own truth) is reported beside it, as the ceiling
the classifier itself allows, and on those renders after a round trip through the model's
VAE (encode, decode), the ceiling the latent space allows the UNet.

:func:`colour_following` asks whether the prompted main colour comes out, without ToyCLIP:
images for ``"a <colour> <class> <scene phrase>"``, the object found by the segmenter, and
the palette colour nearest the median of its pixels; beside it the same on renders.

:func:`detail_following` asks whether the prompted pattern and mark come out, each in its
colour: images for full captions (``"a red mug with white stripes and a blue cross on the
beach"``), read by the detail classifier (the object cropped by the toy segmenter's mask, a
small CNN trained on crops of blurred renders, stage ``detail``); beside it the same
classifier on renders and on their VAE round trips.

:func:`reference_rows` measures, per evaluation subject, what the model shows of a subject
without the method: its photos against each other, their VAE round trips (the latent's
ceiling), untuned images told the subject's exact description, and the class word alone,
with the identity metric and ToyCLIP; these are the reference rows beside the method's in
the check and in Tables 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from hifi.algorithms.generate import generate
from hifi.algorithms.subject import Subject
from hifi.protocols.denoiser import DenoiserBackend
from hifi.toyworld.world import CLASSES, COLOURS, SCENES, Look, ToyObject, caption, render, sample_object
from hifi_backends.toy.perception import ToyClipEmbedder

__all__ = [
    "REFERENCE_ROWS",
    "ColourReport",
    "DetailReport",
    "FollowingReport",
    "ReferenceReport",
    "bootstrap",
    "classify",
    "colour_following",
    "detail_following",
    "detail_hits",
    "detail_objects",
    "nearest_colour",
    "prompt_following",
    "reference_rows",
    "round_trip",
    "wilson",
]


class _Report:
    """A report that writes itself as plain data (``check.json``)."""

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)  # type: ignore[arg-type]  # the subclasses are attrs classes


@attrs.frozen
class FollowingReport(_Report):
    samples: int
    scene_accuracy: float
    class_accuracy: float
    renders_scene_accuracy: float
    renders_class_accuracy: float
    vae_scene_accuracy: float
    vae_class_accuracy: float
    rows: tuple[dict[str, Any], ...]


def classify(
    clip: ToyClipEmbedder, images: Tensor, classes: list[str], scenes: list[str]
) -> tuple[list[str], list[str]]:
    """ToyCLIP's zero-shot (scene, class) of each image, given the prompted class and scene."""
    feats = clip.embed(images).cpu()
    scene_keys, found_scenes, found_classes = list(SCENES), [], []
    # The candidate texts depend on the prompt's class or scene alone: encode each set once.
    by_class = {c: clip.embed_text([f"a {c} {SCENES[s]}" for s in scene_keys]) for c in set(classes)}
    by_scene = {s: clip.embed_text([f"a {c} {SCENES[s]}" for c in CLASSES]) for s in set(scenes)}
    for f, cls, scene in zip(feats, classes, scenes, strict=True):
        found_scenes.append(scene_keys[int((by_class[cls] @ f).argmax())])
        found_classes.append(CLASSES[int((by_scene[scene] @ f).argmax())])
    return found_scenes, found_classes


def prompt_following(backend: DenoiserBackend, clip: ToyClipEmbedder, samples: int = 40, *, seed: int = 0,
                     num_steps: int = 25, guidance: float = 7.5) -> FollowingReport:
    """Generate ``samples`` images for random "a <class> <scene>" prompts and score them."""
    rng = np.random.default_rng(seed)
    objects: list[ToyObject] = [sample_object(rng) for _ in range(samples)]
    classes = [o.look.cls for o in objects]
    scenes = [o.scene for o in objects]
    images = []
    for i, (cls, scene) in enumerate(zip(classes, scenes, strict=True)):
        prompt = f"a {cls} {SCENES[scene]}"
        images.append(generate(backend, Subject.plain(cls), prompt, [seed * 100_000 + i], guidance=guidance,
                               num_steps=num_steps).images.cpu())
    generated = torch.cat(images)
    got_scenes, got_classes = classify(clip, generated, classes, scenes)
    renders = torch.stack([_render_tensor(o, seed * 100_000 + i) for i, o in enumerate(objects)])
    r_scenes, r_classes = classify(clip, renders, classes, scenes)
    v_scenes, v_classes = classify(clip, round_trip(backend, renders), classes, scenes)
    rows = tuple({"prompt": f"a {c} {SCENES[s]}", "scene": s, "class": c, "found_scene": fs, "found_class": fc}
                 for c, s, fs, fc in zip(classes, scenes, got_scenes, got_classes, strict=True))

    def acc(found: list[str], truth: list[str]) -> float:
        return float(np.mean([a == b for a, b in zip(found, truth, strict=True)]))

    return FollowingReport(samples, acc(got_scenes, scenes), acc(got_classes, classes), acc(r_scenes, scenes),
                           acc(r_classes, classes), acc(v_scenes, scenes), acc(v_classes, classes), rows)


MAIN_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c != "black")
"""The colours the sampler draws as an object's main colour (black is for patterns and marks)."""


@attrs.frozen
class ColourReport(_Report):
    samples: int
    colour_accuracy: float
    renders_colour_accuracy: float
    rows: tuple[dict[str, Any], ...]


def nearest_colour(images: Tensor, masks: Tensor, min_pixels: int = 8) -> list[str | None]:
    """The main colour nearest the per-channel median of each image's masked pixels.

    ``images`` ``[B, 3, H, W]`` in [-1, 1], ``masks`` ``[B, H, W]`` (bool or probabilities);
    ``None`` where the mask holds fewer than ``min_pixels`` pixels (no object found).
    """
    palette = torch.tensor([COLOURS[c] for c in MAIN_COLOURS], dtype=torch.float32) / 255.0
    found: list[str | None] = []
    for image, mask in zip(images.float().cpu(), masks.cpu() > 0.5, strict=True):
        if int(mask.sum()) < min_pixels:
            found.append(None)
            continue
        pixels = ((image + 1.0) / 2.0)[:, mask]  # [3, N] in [0, 1]
        median = pixels.median(dim=1).values
        found.append(MAIN_COLOURS[int((palette - median).norm(dim=1).argmin())])
    return found


def colour_following(backend: DenoiserBackend, segmenter: Any, samples: int = 40, *, seed: int = 1,
                     num_steps: int = 25, guidance: float = 7.5) -> ColourReport:
    """Generate ``samples`` images for random "a <colour> <class> <scene>" prompts; score the colour."""
    rng = np.random.default_rng(seed)
    objects = []
    for _ in range(samples):
        obj = sample_object(rng)
        # Plain and unmarked renders: the ceiling of the measure itself, on the colour alone.
        look = Look(obj.look.cls, str(rng.choice(MAIN_COLOURS)))
        objects.append(ToyObject(look, obj.pose, obj.scene))
    prompts = [f"a {o.look.colour} {o.look.cls} {SCENES[o.scene]}" for o in objects]
    generated, renders = [], []
    for i, (o, prompt) in enumerate(zip(objects, prompts, strict=True)):
        generated.append(generate(backend, Subject.plain(o.look.cls), prompt, [seed * 100_000 + i],
                                  guidance=guidance, num_steps=num_steps).images.cpu())
        renders.append(_render_tensor(o, seed * 100_000 + i))
    images, rendered = torch.cat(generated), torch.stack(renders)
    found = nearest_colour(images, segmenter.segment(images, "object"))
    found_r = nearest_colour(rendered, segmenter.segment(rendered, "object"))
    truth = [o.look.colour for o in objects]
    rows = tuple({"prompt": p, "colour": t, "found_colour": f, "render_found_colour": r}
                 for p, t, f, r in zip(prompts, truth, found, found_r, strict=True))
    return ColourReport(samples, float(np.mean([f == t for f, t in zip(found, truth, strict=True)])),
                        float(np.mean([r == t for r, t in zip(found_r, truth, strict=True)])), rows)


# -- details: patterns and marks ----------------------------------------------------------------


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion ``hits / n``."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def detail_hits(found: dict[str, list[str]], looks: Sequence[Look]) -> dict[str, list[bool]]:
    """Per image: ``pattern`` (the look's pattern in its colour), ``mark`` (the mark in its colour), and the
    kinds alone (``pattern_kind``, ``mark_kind``), from a :class:`~hifi_backends.toy.perception.ToyDetailClassifier`'s
    ``read``."""
    hits: dict[str, list[bool]] = {"pattern": [], "mark": [], "pattern_kind": [], "mark_kind": []}
    for i, look in enumerate(looks):
        pattern_kind = found["pattern"][i] == look.pattern
        mark_kind = found["mark"][i] == look.mark
        hits["pattern_kind"].append(pattern_kind)
        hits["mark_kind"].append(mark_kind)
        hits["pattern"].append(pattern_kind and (look.pattern == "plain" or found["colour2"][i] == look.colour2))
        hits["mark"].append(mark_kind and (look.mark == "none" or found["mark_colour"][i] == look.mark_colour))
    return hits


def _rates(hits: dict[str, list[bool]]) -> dict[str, dict[str, Any]]:
    return {k: {"rate": float(np.mean(v)), "ci95": list(wilson(int(sum(v)), len(v))), "n": len(v)}
            for k, v in hits.items()}


@attrs.frozen
class DetailReport(_Report):
    """Pattern and mark following: generated images, the renders of the same objects (the judge's
    own ceiling) and those renders through the VAE (the latent space's ceiling)."""

    samples: int
    generated: dict[str, dict[str, Any]]
    renders: dict[str, dict[str, Any]]
    vae: dict[str, dict[str, Any]]
    rows: tuple[dict[str, Any], ...]


def round_trip(backend: DenoiserBackend, images: Tensor) -> Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] encoded and decoded by the backend's VAE (on the CPU, float32)."""
    with torch.no_grad():
        latents = backend.encode_images(images.to(backend.device, backend.dtype))
        return backend.decode_latents(latents).float().clamp(-1.0, 1.0).cpu()


def _render_tensor(obj: ToyObject, seed: int) -> Tensor:
    return torch.from_numpy(render(obj, seed=seed)[0]).permute(2, 0, 1).float() / 127.5 - 1.0


def detail_objects(samples: int, seed: int) -> list[ToyObject]:
    """The detail check's objects: training-sampler looks with both a pattern and a mark (seeded)."""
    rng = np.random.default_rng(seed)
    objects: list[ToyObject] = []
    while len(objects) < samples:
        obj = sample_object(rng)
        if obj.look.pattern != "plain" and obj.look.mark != "none":
            objects.append(obj)
    return objects


def detail_following(backend: DenoiserBackend, detail: Any, samples: int = 40, *, seed: int = 2,
                     num_steps: int = 25, guidance: float = 7.5) -> DetailReport:
    """Generate ``samples`` images for the full captions of random patterned, marked looks; read their details.

    The caption names everything (``"a red mug with white stripes and a blue cross on the
    beach"``); ``detail`` (the toy detail classifier) reads the pattern, the mark and their
    colours from the generation, from a render of the same object and from that render's VAE
    round trip. No ToyCLIP and nothing tuned: this is the model's own ceiling for the method.
    """
    objects = detail_objects(samples, seed)
    prompts = [caption(o) for o in objects]
    seeds = [seed * 100_000 + i for i in range(samples)]
    images = torch.cat([generate(backend, Subject.plain(o.look.cls), p, [s], guidance=guidance,
                                 num_steps=num_steps).images.cpu()
                        for o, p, s in zip(objects, prompts, seeds, strict=True)])
    renders = torch.stack([_render_tensor(o, s) for o, s in zip(objects, seeds, strict=True)])
    looks = [o.look for o in objects]
    found = detail.read(images)
    hits = detail_hits(found, looks)
    rows = tuple({"prompt": p, "found": {k: found[k][i] for k in found}, "pattern": hits["pattern"][i],
                  "mark": hits["mark"][i]} for i, p in enumerate(prompts))
    return DetailReport(samples, _rates(hits), _rates(detail_hits(detail.read(renders), looks)),
                        _rates(detail_hits(detail.read(round_trip(backend, renders)), looks)), rows)


# -- the reference rows: what the model can show without the method ------------------------------


REFERENCE_ROWS = {
    "real": "real vs real (no self-pairs)",
    "vae": "VAE round trip of the photos vs the other photos (the latent's ceiling)",
    "exact": "no tuning, told the subject's exact description",
    "class": "no tuning, the class word alone",
    "others": "other subjects' photos (floor)",
}
"""The reference rows (key -> what it is), measured by :func:`reference_rows`."""


@attrs.frozen
class ReferenceReport(_Report):
    """Per reference row and metric: per-subject means and their mean with a 95% bootstrap interval;
    ``detail``: pattern and mark following of the photos, their round trips and the exact-description
    generations, per subject and overall."""

    rows: dict[str, dict[str, dict[str, Any]]]
    detail: dict[str, dict[str, Any]]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]


def bootstrap(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% bootstrap interval of ``values`` (the percentile interval of ``resamples`` resampled means;
    the tables' intervals, ``benchmarks.toyworld``, are these)."""
    import random
    import statistics

    rng = random.Random(seed)
    vals = list(values)
    means = sorted(statistics.fmean(rng.choices(vals, k=len(vals))) for _ in range(resamples))
    return statistics.fmean(vals), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _summary(per_subject: dict[str, float]) -> dict[str, Any]:
    mean, lo, hi = bootstrap(list(per_subject.values()))
    return {"mean": mean, "ci95": [lo, hi], "cells": len(per_subject), "per_subject": per_subject}


def reference_rows(backend: DenoiserBackend, scorers: Any, *, subjects: Sequence[str] | None = None,
                   templates: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1), num_steps: int = 20,
                   guidance: float = 7.5, detail: Any = None) -> ReferenceReport:
    """The rows of :data:`REFERENCE_ROWS` for ToyWorld subjects, with ``scorers`` (a
    :class:`~hifi.workflows.evaluation.Scorers`: identity as ``dino``, ToyCLIP as ``clip``).

    Each subject's 5 photos are the reference of every row. The exact-description and class-word
    rows generate one image per (template, seed) with no tuning: ``templates`` (default the
    first 6 of :data:`~hifi.toyworld.subjects.PROMPTS`) with the description
    (:func:`~hifi.toyworld.subjects.exact_prompt`) or the class word in place of the subject;
    ToyCLIP-T scores them against the class-word prompt, as the tables' rows. With ``detail``,
    also pattern and mark following of photos, round trips and exact-description images.
    """
    from hifi.toyworld.subjects import PROMPTS, SUBJECTS, exact_prompt, subject_photos

    names = list(subjects or SUBJECTS)
    templates = list(templates or PROMPTS[:6])
    photos = {n: torch.stack([torch.from_numpy(p[0]).permute(2, 0, 1).float() / 127.5 - 1 for p in subject_photos(n)])
              for n in names}
    feats = {n: scorers.image_features(x) for n, x in photos.items()}
    values: dict[str, dict[str, dict[str, float]]] = {r: {"dino": {}, "clip_i": {}, "clip_t": {}}
                                                      for r in REFERENCE_ROWS}
    detail_hits_by: dict[str, dict[str, dict[str, list[bool]]]] = {"photos": {}, "vae": {}, "exact": {}}

    def mean_cos(a: Tensor, b: Tensor, exclude_self: bool = False) -> float:
        sims = a @ b.T
        if exclude_self:
            return float(sims[~torch.eye(len(sims), dtype=torch.bool)].mean())
        return float(sims.mean())

    for name in names:
        look = SUBJECTS[name]
        trip = round_trip(backend, photos[name])
        trip_feats = scorers.image_features(trip)
        plain_texts = [t.format("", look.cls).replace("  ", " ") for t in templates]
        generated: dict[str, list[Tensor]] = {"exact": [], "class": []}
        for t, plain_text in zip(templates, plain_texts, strict=True):
            for row, prompt in (("exact", exact_prompt(t, look)), ("class", plain_text)):
                generated[row].append(generate(backend, Subject.plain(look.cls), prompt, list(seeds),
                                               guidance=guidance, num_steps=num_steps).images.cpu())
        text_feats = scorers.text_features(plain_texts)
        for metric, key in (("dino", "dino"), ("clip_i", "clip")):
            own = feats[name][key]
            values["real"][metric][name] = mean_cos(own, own, exclude_self=True)
            values["vae"][metric][name] = mean_cos(trip_feats[key], own, exclude_self=True)
            values["others"][metric][name] = float(np.mean([mean_cos(own, feats[o][key]) for o in names if o != name]))
        drawn = {row: torch.cat(batches) for row, batches in generated.items()}
        per_text = text_feats.repeat_interleave(len(seeds), dim=0)
        for row, images in drawn.items():
            f = scorers.image_features(images)
            values[row]["dino"][name] = mean_cos(f["dino"], feats[name]["dino"])
            values[row]["clip_i"][name] = mean_cos(f["clip"], feats[name]["clip"])
            values[row]["clip_t"][name] = float((f["clip"] * per_text).sum(dim=1).mean())
        if detail is not None:
            for key, images in (("photos", photos[name]), ("vae", trip), ("exact", drawn["exact"])):
                detail_hits_by[key][name] = detail_hits(detail.read(images), [look] * len(images))
    rows = {r: {m: _summary(v) for m, v in metrics.items() if v} for r, metrics in values.items()}
    detail_out: dict[str, dict[str, Any]] = {}
    for key, by_subject in detail_hits_by.items():
        if not by_subject:
            continue
        detail_out[key] = {}
        for measure in ("pattern", "mark"):
            per_subject = {n: float(np.mean(h[measure])) for n, h in by_subject.items()}
            pooled = [x for h in by_subject.values() for x in h[measure]]
            detail_out[key][measure] = {**_summary(per_subject), "hits": int(sum(pooled)), "n": len(pooled)}
    return ReferenceReport(rows, detail_out, tuple(templates), tuple(seeds))
