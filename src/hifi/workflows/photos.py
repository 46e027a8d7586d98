"""Photos in: a subject's source photos and masks from folders, and a run's references.

The I/O side of tuning and reference guidance: clear errors for a missing or empty folder,
unreadable files, unmatched or empty masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs
import torch
from PIL import Image
from torch import Tensor

from hifi.algorithms.reference import References, prepare_references
from hifi.errors import HifiError
from hifi.io.images import image_to_tensor, list_images, load_image, mask_to_tensor
from hifi.io.runs import MASKS_DIR, Run
from hifi.perception import ImageEmbedder

__all__ = ["SubjectPhotos", "load_references", "load_subject_photos"]

MaskSource = Literal["none", "folder", "auto"]


@attrs.frozen(eq=False)
class SubjectPhotos:
    """Source photos and masks, square at the backend's resolution."""

    names: tuple[str, ...]
    images: Tensor
    """``[B, 3, S, S]`` in [-1, 1]."""
    masks: Tensor
    """``[B, S, S]`` in {0, 1}."""
    mask_source: MaskSource
    warnings: tuple[str, ...] = ()


def load_subject_photos(
    subject_dir: str | Path, size: int, masks: str | Path | None = None, class_name: str | None = None
) -> SubjectPhotos:
    """Read 3-6 photos of any size, mode and orientation, and their masks.

    ``masks`` is a folder holding a mask per photo under the same file stem (any image
    format; non-black pixels are the subject), ``"auto"`` for a segmenter's masks of
    ``class_name`` (Grounded SAM, see :func:`hifi.perception.masks.auto_masks`), or
    ``"none"``/None for all-ones masks. Clear
    errors for a missing or empty folder, unreadable files, unmatched masks, empty masks.
    """
    files = list_images(subject_dir)
    warnings: list[str] = []
    if not 3 <= len(files) <= 6:
        warnings.append(f"{len(files)} photos in {subject_dir}; the method is meant for 3 to 6")
    photos = [load_image(f) for f in files]
    images = torch.stack([image_to_tensor(p, size) for p in photos])
    names = tuple(f.stem for f in files)
    if masks is None or str(masks) == "none":
        return SubjectPhotos(names, images, torch.ones(len(files), size, size), "none", tuple(warnings))
    if str(masks) == "auto":
        from hifi.perception.masks import auto_masks

        found = auto_masks(images, class_name or "")
        empty = [n for n, m in zip(names, found, strict=True) if not m.any()]
        if empty:
            warnings.append(f"no {class_name} found in {', '.join(empty)}: the whole photo is its mask")
        found[found.flatten(1).sum(1) == 0] = 1.0
        return SubjectPhotos(names, images, found, "auto", tuple(warnings))
    mask_files = {f.stem: f for f in list_images(masks)}
    missing = [n for n in names if n not in mask_files]
    extra = sorted(set(mask_files) - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no mask for {', '.join(missing)}")
        if extra:
            parts.append(f"masks without a photo: {', '.join(extra)}")
        raise HifiError(f"photos and masks do not match ({'; '.join(parts)}) in {masks}")
    mask_list = []
    for name, photo in zip(names, photos, strict=True):
        img = load_image(mask_files[name], mode="L")
        if img.size != photo.size:
            warnings.append(f"mask {mask_files[name].name} is {img.size[0]}x{img.size[1]}, its photo"
                            f" {photo.size[0]}x{photo.size[1]}: resized")
            img = img.resize(photo.size, Image.Resampling.NEAREST)
        m = mask_to_tensor(img, size)
        if m.sum() == 0:
            raise HifiError(f"mask {mask_files[name]} is empty: it marks no subject pixel")
        mask_list.append(m)
    return SubjectPhotos(names, images, torch.stack(mask_list), "folder", tuple(warnings))


def load_references(run: Run, size: int, embedder: ImageEmbedder) -> tuple[References, list[str]]:
    """The run's source photos and the masks it was tuned with; a missing or empty mask is the whole photo."""
    sources = run.source_images()
    if not sources:
        raise HifiError(f"{run.path} has no source photos (sources/*.png) to take a reference from; use --no-reference")
    masks = {p.stem: p for p in run.mask_images()}
    warnings = []
    images, mask_list = [], []
    for path in sources:
        images.append(image_to_tensor(load_image(path), size))
        mask = mask_to_tensor(load_image(masks[path.stem], "L"), size) if path.stem in masks else None
        if mask is None or not bool(mask.any()):
            warnings.append(
                f"{path.name} has no subject mask in {run.path / MASKS_DIR}; the whole photo is its subject"
            )
            mask = torch.ones(size, size)
        mask_list.append(mask)
    refs = prepare_references(torch.stack(images), torch.stack(mask_list) > 0.5, [p.stem for p in sources], embedder)
    return refs, warnings
