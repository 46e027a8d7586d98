"""The training data: the pool of renders (stage ``render``), :class:`Pool` to read it, the training captions."""

from __future__ import annotations

import json
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hifi.io.images import atomic_path, write_json
from hifi.toyworld.subjects import SUBJECTS
from hifi.toyworld.world import SCENES, Look, ToyObject, caption, render, sample_object, sample_pose
from hifi_backends.toy.training.settings import TrainSettings


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
