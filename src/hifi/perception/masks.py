"""Subject masks for the source photos when none are given (``--masks auto``): Grounded SAM by default."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hifi.errors import HifiError
from hifi.perception.models import GROUNDING_DINO_MODEL_ENV, SAM_CHECKPOINT_ENV, SAM_MODEL_ENV
from hifi.perception.registry import configured_segmenter, load_segmenter

__all__ = ["auto_masks"]


def auto_masks(images: Tensor, class_name: str, segmenter_name: str | None = None, **options: Any) -> Tensor:
    """Subject masks ``[B, H, W]`` in {0, 1} for source photos ``[B, 3, H, W]`` in [-1, 1] (``--masks auto``).

    Uses ``segmenter_name`` or else Grounded SAM when its weights are configured
    (``HIFI_GROUNDING_DINO_MODEL`` with ``HIFI_SAM_MODEL`` or ``HIFI_SAM_CHECKPOINT``).
    A photo where the subject is not found gets an all-zero mask: the caller decides.
    """
    name = segmenter_name or configured_segmenter()
    if name is None:
        raise HifiError(
            f"--masks auto needs Grounded SAM: set {GROUNDING_DINO_MODEL_ENV} (a Grounding DINO folder or hub id)"
            f" and {SAM_MODEL_ENV} (a SAM folder or hub id) or {SAM_CHECKPOINT_ENV} (a segment-anything .pth);"
            " or pass --masks DIR or --masks none"
        )
    segmenter = load_segmenter(name, **options)
    if segmenter.wants_attention:
        raise HifiError(f"the {name} segmenter reads the attention of a generation; photos need another segmenter")
    with torch.no_grad():
        return segmenter.segment(images, class_name).float()
