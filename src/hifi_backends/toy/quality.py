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
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from hifi.algorithms.generate import generate
from hifi.algorithms.subject import Subject
from hifi.protocols.denoiser import DenoiserBackend
from hifi.toyworld.world import CLASSES, COLOURS, SCENES, Look, ToyObject, render, sample_object
from hifi_backends.toy.perception import ToyClipEmbedder

__all__ = ["ColourReport", "FollowingReport", "classify", "colour_following", "nearest_colour", "prompt_following"]


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
    renders = torch.stack([
        torch.from_numpy(render(o, seed=seed * 100_000 + i)[0]).permute(2, 0, 1).float() / 127.5 - 1.0
        for i, o in enumerate(objects)
    ])
    r_scenes, r_classes = classify(clip, renders, classes, scenes)
    with torch.no_grad():
        latents = backend.encode_images(renders.to(backend.device, backend.dtype))
        round_trip = backend.decode_latents(latents).float().clamp(-1.0, 1.0).cpu()
    v_scenes, v_classes = classify(clip, round_trip, classes, scenes)
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
        renders.append(torch.from_numpy(render(o, seed=seed * 100_000 + i)[0]).permute(2, 0, 1).float() / 127.5 - 1)
    images, rendered = torch.cat(generated), torch.stack(renders)
    found = nearest_colour(images, segmenter.segment(images, "object"))
    found_r = nearest_colour(rendered, segmenter.segment(rendered, "object"))
    truth = [o.look.colour for o in objects]
    rows = tuple({"prompt": p, "colour": t, "found_colour": f, "render_found_colour": r}
                 for p, t, f, r in zip(prompts, truth, found, found_r, strict=True))
    return ColourReport(samples, float(np.mean([f == t for f, t in zip(found, truth, strict=True)])),
                        float(np.mean([r == t for r, t in zip(found_r, truth, strict=True)])), rows)
