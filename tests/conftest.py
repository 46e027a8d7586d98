"""Shared fixtures: the tiny backend (built once per session) and self-made images."""

from __future__ import annotations

import pytest
import torch

from hifi.registry import load_backend


@pytest.fixture(scope="session")
def tiny():
    """The ``tiny`` backend with seed 0 (random weights, CPU)."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_backend("tiny", seed=0)


def draw_subject_photos(folder, n=3, with_masks=True, sizes=((80, 60), (64, 96), (50, 50)), modes=("RGB", "RGBA", "L")):
    """Photos of one made-up subject (a red box with a yellow stripe) on varied backgrounds.

    Returns (photo folder, mask folder). Sizes, orientations and image modes vary, as a
    user's photos do; masks are exact.
    """
    from PIL import Image, ImageDraw

    photos, masks = folder / "photos", folder / "masks"
    photos.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        bg = (40 + 60 * i % 200, 150, 220 - 40 * i % 200)
        img = Image.new("RGB", (w, h), bg)
        mask = Image.new("L", (w, h), 0)
        box = [w // 4 + i, h // 4, w // 4 + w // 2, h // 4 + h // 2]
        for d, fill in ((ImageDraw.Draw(img), (220, 30, 30)), (ImageDraw.Draw(mask), 255)):
            d.rectangle(box, fill=fill)
        ImageDraw.Draw(img).rectangle([box[0], box[1] + 4, box[2], box[1] + 8], fill=(240, 220, 40))
        img.convert(modes[i % len(modes)]).save(photos / f"photo{i}.png")
        if with_masks:
            mask.save(masks / f"photo{i}.png")
    return photos, masks
