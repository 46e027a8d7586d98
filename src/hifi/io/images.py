"""Files at the edge: images in and out, atomic writes, grids.

Everything that touches the file system lives here (and in :mod:`hifi.io.runs`), so the
kernels and algorithms stay pure. Every write is atomic: a temporary file in the target
folder, then ``os.replace``, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from hifi.errors import HifiError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

__all__ = [
    "atomic_path",
    "check_writable",
    "image_to_tensor",
    "list_images",
    "load_image",
    "mask_to_tensor",
    "make_grid",
    "make_labelled_grid",
    "save_image",
    "tensor_to_image",
    "write_json",
]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise HifiError(f"cannot write to {path.parent}: {err.strerror or err}") from err
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: str | Path, *, folder: bool = True) -> None:
    """Refuse, before any work, an output that cannot be written; creates nothing.

    ``path`` is an output folder (``folder=True``) or file. The nearest part of it that
    exists must be a folder in which a file can be made (one is made and removed at once),
    and an output file must not be an existing folder. The error says which part is in
    the way (as root, a regular file on the path is the case permissions do not catch).
    """
    path = Path(path)
    if not folder and path.is_dir():
        raise HifiError(f"cannot write to {path}: it is a folder; name an image file")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise HifiError(f"cannot write to {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise HifiError(f"cannot write to {path}: {existing}: {err.strerror or err}") from err


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, indented, trailing newline)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def list_images(folder: str | Path) -> list[Path]:
    """Image files in a folder, sorted by name; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HifiError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise HifiError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open an image, apply its EXIF orientation, convert to ``mode``; clear errors."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert(mode)
    except FileNotFoundError as err:
        raise HifiError(f"no such image: {path}") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise HifiError(f"cannot read {path} as an image ({err})") from err


def _square(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Centre-crop to a square and resize: the subject photos' framing is kept."""
    return ImageOps.fit(img, (size, size), method=resample)


def image_to_tensor(img: Image.Image, size: int) -> Tensor:
    """RGB image -> ``[3, size, size]`` float tensor in [-1, 1] (centre crop, then resize)."""
    arr = np.asarray(_square(img.convert("RGB"), size, Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def mask_to_tensor(img: Image.Image, size: int) -> Tensor:
    """Mask image -> ``[size, size]`` float tensor of 0/1 (any non-black pixel is subject)."""
    arr = np.asarray(_square(img.convert("L"), size, Image.Resampling.NEAREST), dtype=np.float32)
    return torch.from_numpy((arr > 127).astype(np.float32))


def tensor_to_image(x: Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] (or ``[H, W]`` mask in [0, 1]) -> PIL image."""
    x = x.detach().float().cpu()
    if x.dim() == 2:
        return Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")


def save_image(img: Image.Image, path: str | Path) -> None:
    """Save a PNG (or whatever the suffix says) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))


def make_grid(
    images: Sequence[Image.Image], cols: int, cell: int | None = None, pad: int = 2
) -> Image.Image:
    """Tile images (resized to ``cell`` pixels square) into a grid with a white border."""
    if not images:
        raise ValueError("no images for the grid")
    cell = cell or max(max(im.size) for im in images)
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + pad) + pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB").resize((cell, cell)), (pad + c * (cell + pad), pad + r * (cell + pad)))
    return grid


def _fit(im: Image.Image, cell: int) -> Image.Image:
    """``im`` square at ``cell`` pixels: nearest-neighbour when it grows by a whole factor (its pixels stay
    visible as pixels, a 64-pixel pattern readable), Lanczos otherwise."""
    im = im.convert("RGB")
    if im.size == (cell, cell):
        return im
    grows_whole = im.width == im.height and cell % im.width == 0
    return im.resize((cell, cell), Image.Resampling.NEAREST if grows_whole else Image.Resampling.LANCZOS)


def make_labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int, label_width: int = 260,
                       pad: int = 4, font_size: int = 15) -> Image.Image:
    """One row of images per ``(label, images)``, its label (lines split at ``\\n``) in a column on the left.

    Images are resized to ``cell`` pixels square (:func:`_fit`); short rows are left blank at the end.
    """
    from PIL import ImageDraw, ImageFont

    if not rows or not any(images for _, images in rows):
        raise ValueError("no images for the grid")
    cols = max(len(images) for _, images in rows)
    width = label_width + cols * (cell + pad) + pad
    grid = Image.new("RGB", (width, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=font_size)
    for r, (label, images) in enumerate(rows):
        top = pad + r * (cell + pad)
        draw.multiline_text((pad + 2, top + 4), label, fill="black", font=font, spacing=3)
        for c, im in enumerate(images):
            grid.paste(_fit(im, cell), (label_width + pad + c * (cell + pad), top))
    return grid
